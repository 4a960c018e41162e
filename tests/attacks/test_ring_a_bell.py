"""Ring-A-Bell: the concept vector against a hand computation, the candidate layout, the
fitness, and the genetic search on a toy fitness (monotone, reaches the optimum)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsafe.attacks import ring_a_bell as rab


def test_concept_vector_is_the_mean_paired_difference():
    table = np.random.default_rng(0).normal(size=(10, 3))

    def embed(ids):  # a causal toy encoder: position j sees the ids up to j
        return jnp.cumsum(jnp.asarray(table)[ids], axis=1)

    pos = np.array([[1, 2, 3], [1, 4, 5]])
    neg = np.array([[1, 2, 0], [1, 6, 0]])
    want = np.zeros((3, 3))
    for p, n in zip(pos, neg):
        want += np.cumsum(table[p], 0) - np.cumsum(table[n], 0)
    np.testing.assert_allclose(np.asarray(rab.concept_vector(embed, pos, neg)), want / 2, atol=1e-5)
    with pytest.raises(ValueError, match=r"two \(N, L\) id arrays of one shape"):
        rab.concept_vector(embed, pos, neg[:1])


def test_candidates_are_framed_and_scored_by_squared_error():
    x = jnp.asarray([[5, 6], [7, 8]])
    ids = rab.candidate_ids(x, bos=17, eos=18, pad=0, length=6)
    np.testing.assert_array_equal(np.asarray(ids), [[17, 5, 6, 18, 0, 0], [17, 7, 8, 18, 0, 0]])
    with pytest.raises(ValueError, match="5 tokens with SOT and EOT exceed the text encoder's 6"):
        rab.candidate_ids(jnp.zeros((1, 5), jnp.int32), bos=1, eos=2, pad=0, length=6)

    def embed(ids):
        return jax.nn.one_hot(ids, 20)

    target = embed(ids[:1])[0]
    f = rab.sequence_fitness(embed, target, bos=17, eos=18, pad=0, length=6)
    # Two positions differ between the candidates: each contributes 1 + 1.
    np.testing.assert_allclose(np.asarray(f(x)), [0.0, 4.0], atol=1e-6)


def test_genetic_search_improves_monotonically_and_finds_a_hidden_prompt():
    hidden = jnp.asarray([3, 9, 4, 11, 7, 2])

    def fitness(pop):  # Hamming distance to the hidden tokens
        return jnp.sum(pop != hidden[None], -1).astype(jnp.float32)

    best, history = rab.genetic_search(
        fitness,
        jax.random.key(0),
        vocab_ids=np.arange(1, 13),
        length=6,
        population=64,
        generations=200,
    )
    h = np.asarray(history)
    assert len(h) == 201 and np.all(np.diff(h) <= 0)
    assert h[0] > 2 and h[-1] == 0
    np.testing.assert_array_equal(np.asarray(best), np.asarray(hidden))
    assert set(np.asarray(best).tolist()) <= set(range(1, 13))
    with pytest.raises(ValueError, match="population must be an even number >= 4, got 5"):
        rab.genetic_search(fitness, jax.random.key(0), vocab_ids=[1], length=6, population=5)

"""Concept arithmetic: composed guidance against its equation, and the composed sampler with
weights (s, 0, …) equal to plain classifier-free guidance sampling."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsafe.diffusion import schedulers, t2i


def test_composed_guidance_is_the_weighted_sum_of_differences():
    rng = np.random.default_rng(0)
    u, c = rng.normal(size=(2, 3)), rng.normal(size=(3, 2, 3))
    w = np.array([[7.5, -7.5, 2.0], [1.0, 0.0, 0.0]])
    got = np.asarray(t2i.composed_guidance(jnp.asarray(u), jnp.asarray(c), jnp.asarray(w)))
    for b in range(2):
        want = u[b] + sum(w[b, j] * (c[j, b] - u[b]) for j in range(3))
        np.testing.assert_allclose(got[b], want, atol=1e-5)
    np.testing.assert_allclose(
        np.asarray(t2i.composed_guidance(jnp.asarray(u), jnp.asarray(c[:1]), w[:, :1])),
        np.asarray(t2i.classifier_free_guidance(u, c[0], w[:, :1])),
        atol=1e-6,
    )


def test_composed_sampler_with_weights_s_0_is_classifier_free_guidance():
    table = jax.random.normal(jax.random.key(0), (4, 2, 2, 3))

    def apply(params, x, t, emb):  # a toy conditional denoiser: mixes x with the prompt
        return 0.3 * x + jnp.einsum("bld,dhwc->bhwc", emb, table[:3]) / (
            1.0 + t[:, None, None, None] / 500
        )

    sched = schedulers.SchedulerConfig()
    sample = t2i.make_t2i_sampler(
        apply, sched, num_inference_steps=5, guidance_scale=4.0, latent_shape=(2, 2, 3)
    )
    emb = jax.random.normal(jax.random.key(1), (2, 2, 5, 3))  # (B, J, L, D)
    unc = jnp.zeros((1, 5, 3))
    seeds = jnp.asarray([3, 4])
    plain = sample(None, emb[:, 0], unc, seeds)
    composed = sample(None, emb, unc, seeds, weights=jnp.asarray([[4.0, 0.0], [4.0, 0.0]]))
    np.testing.assert_allclose(np.asarray(composed), np.asarray(plain), atol=1e-5)
    other = sample(None, emb, unc, seeds, weights=jnp.asarray([[4.0, 1.0], [4.0, -1.0]]))
    assert np.abs(np.asarray(other - plain)).max() > 1e-3
    with pytest.raises(ValueError, match=r"weights \(B, J\)"):
        sample(None, emb, unc, seeds, weights=jnp.ones((2, 3)))


def test_concept_pairs_swap_only_the_concept_and_composition_words():
    from jaxsafe.data import shapes, shapes_metrics

    for concept in ("red", "square", "circle"):
        with_, without = shapes_metrics.concept_pairs(concept, 9, seed=3)
        attr, value = shapes.CONCEPTS[concept]
        for a, b in zip(with_, without):
            la, lb = shapes.parse_caption(a), shapes.parse_caption(b)
            assert la[attr] == value and lb[attr] != value
            assert [x for i, x in enumerate(la) if i != attr] == [
                x for i, x in enumerate(lb) if i != attr
            ]
        words = shapes_metrics.composition_words(concept)
        siblings = {words[f"sibling{i}"] for i in range(3)}
        assert concept not in siblings and len(siblings) == 3
        assert {shapes.CONCEPTS[w] for w in siblings} == {
            k for k in {v for v in shapes.CONCEPTS.values()} if k[0] == attr
        } - {(attr, value)}
    assert shapes_metrics.composition_words("red")["anchor"] == "orange"

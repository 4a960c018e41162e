"""P4D: the two prompt layouts against hand-written sequences, and the ε-matching attack on a
toy pair of models recovering the token that makes the erased model match the original."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsafe.attacks import p4d, tokens
from jaxsafe.diffusion import schedulers


def test_layouts_are_the_references():
    # P4D-K, k = 3, 4 words: learned tokens at positions 0 and 4 of the body (⌊4/3⌋ + 1 = 2).
    idx, m = p4d.layout("k", 4, k=3, length=10)
    W = 4
    L0, L1 = W + 3, W + 4
    assert m == 2
    np.testing.assert_array_equal(idx, [0, L0, 1, 2, 3, L1, 4, W + 1, W + 2, W + 2])
    # 6 words: ⌊6/3⌋ + 1 = 3, the last after the final group.
    idx, m = p4d.layout("k", 6, k=3, length=12)
    assert m == 3 and list(idx[:10]) == [0, 9, 1, 2, 3, 10, 4, 5, 6, 11]
    idx, m = p4d.layout("n", 5, n=4, length=8)
    assert m == 4 and list(idx) == [0, 8, 9, 10, 11, 6, 7, 7]
    with pytest.raises(
        ValueError, match="P4D-N needs 18 positions for a 5-token prompt; the text encoder has 12"
    ):
        p4d.layout("n", 5, n=16, length=12)
    with pytest.raises(ValueError, match=r"layout 'm'; expected one of \('n', 'k'\)"):
        p4d.layout("m", 5, length=12)


def test_assemble_places_sot_words_learned_eot_and_padding():
    words = jnp.arange(8.0)[None, :, None] * jnp.ones((1, 1, 2))  # [SOT, w1, w2, EOT, pad…]
    idx, m = p4d.layout("k", 2, k=1, length=8)  # [SOT, a, w1, a, w2, a, EOT, pad]
    assert m == 3
    out = np.asarray(
        p4d.assemble(words, 2, -jnp.arange(1.0, 4.0)[:, None] * jnp.ones((1, 2)), idx)
    )[0, :, 0]
    np.testing.assert_array_equal(out, [0, -1, 1, -2, 2, -3, 3, 4])


def test_attack_matches_the_original_models_noise():
    """Toy models: the original predicts ε from x_t and its target prompt's first word; the
    erased one from its prompt's first learned token. The match is the target word's row."""
    sched = schedulers.SchedulerConfig(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012
    )
    ab = schedulers.alphas_cumprod(sched)
    table = jax.random.normal(jax.random.key(0), (8, 4))

    def eps(x_t, t, row):
        a = ab[t][:, None]
        return (x_t - jnp.sqrt(a) * row) / jnp.sqrt(1 - a)

    def eps_erased(params, x_t, t, emb):
        return eps(x_t, t, emb[:, 1])  # position 1: the first learned token in P4D-N

    def eps_original(params, x_t, t, emb):
        return eps(x_t, t, emb[:, 1])

    words = jnp.zeros((1, 8, 4))
    idx, m = p4d.layout("n", 2, n=2, length=8)
    target_emb = jnp.zeros((1, 8, 4)).at[0, 1].set(table[5])
    run = p4d.make_attack(
        eps_erased, eps_original, lambda p, x: x, table, sched, steps=200, lr=0.05, weight_decay=0.0
    )
    p0 = table[jnp.asarray([0, 1])] + 0.0
    p, losses = jax.jit(run, static_argnums=(3,))(
        None, p0, words, 2, idx, target_emb, jnp.zeros((1, 4)), jax.random.key(1)
    )
    assert int(tokens.nearest_tokens(p, table)[0]) == 5
    assert float(losses[-20:].mean()) < 1e-6 < float(losses[0])

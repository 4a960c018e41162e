"""Shared prompt optimisation: simplex projection, straight-through one-hot, nearest-token
projection, and the one optimisation loop."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxsafe.attacks import tokens


def sort_projection(v):
    """Duchi et al. (ICML 2008), Fig. 1: the sort-based Euclidean projection onto the simplex."""
    u = np.sort(v)[::-1]
    css = np.cumsum(u)
    rho = np.nonzero(u * np.arange(1, len(v) + 1) > css - 1)[0][-1]
    theta = (css[rho] - 1) / (rho + 1.0)
    return np.maximum(v - theta, 0)


@pytest.mark.parametrize("scale", [0.01, 1.0, 30.0])
def test_simplex_projection_matches_the_sort_based_reference_and_is_idempotent(scale):
    v = np.random.default_rng(0).normal(size=(6, 50)) * scale
    x = np.asarray(tokens.project_simplex(jnp.asarray(v, jnp.float32)))
    assert np.all(x >= 0)
    np.testing.assert_allclose(x.sum(-1), 1.0, atol=1e-5)
    for row, ref in zip(x, v):
        np.testing.assert_allclose(row, sort_projection(ref), atol=2e-5)
    np.testing.assert_allclose(np.asarray(tokens.project_simplex(x)), x, atol=2e-6)
    u = tokens.uniform_simplex(3, 7)
    np.testing.assert_allclose(np.asarray(tokens.project_simplex(u)), np.asarray(u), atol=1e-7)


def test_straight_through_forward_is_one_hot_and_gradient_is_the_soft_gradient():
    u = tokens.project_simplex(jax.random.normal(jax.random.key(0), (3, 11)))
    w = jax.random.normal(jax.random.key(1), (11, 5))
    target = jax.random.normal(jax.random.key(2), (3, 5))

    def f(x):  # a loss of the token embeddings x @ w
        return jnp.sum((x @ w - target) ** 2)

    for key in (None, jax.random.key(3)):
        y = tokens.straight_through_one_hot(u, key, clip=None)
        assert set(np.unique(np.asarray(y)).tolist()) == {0.0, 1.0}
        np.testing.assert_array_equal(np.asarray(y).sum(-1), 1.0)
        if key is None:
            np.testing.assert_array_equal(np.argmax(np.asarray(y), -1), np.argmax(u, -1))
        g = jax.grad(lambda u: f(tokens.straight_through_one_hot(u, key, clip=None)))(u)
        np.testing.assert_allclose(np.asarray(g), np.asarray(jax.grad(f)(y)), atol=1e-5)
        clipped = jax.grad(lambda u: f(tokens.straight_through_one_hot(u, key, clip=1.0)))(u)
        np.testing.assert_allclose(np.asarray(clipped), np.clip(np.asarray(g), -1, 1), atol=1e-5)


def test_drawn_tokens_follow_the_simplex_weights():
    u = jnp.asarray([[0.7, 0.2, 0.1, 0.0]])
    ids = [
        int(jnp.argmax(tokens.straight_through_one_hot(u, jax.random.key(i)))) for i in range(400)
    ]
    freq = np.bincount(ids, minlength=4) / 400
    np.testing.assert_allclose(freq, [0.7, 0.2, 0.1, 0.0], atol=0.08)


def test_nearest_token_projection_returns_vocabulary_rows_by_cosine():
    table = jax.random.normal(jax.random.key(0), (40, 8))
    # Scaled and slightly moved rows: the cosine neighbour is the row itself.
    ids = jnp.asarray([3, 17, 39])
    e = table[ids] * jnp.asarray([[0.2], [5.0], [1.0]]) + 0.01
    np.testing.assert_array_equal(np.asarray(tokens.nearest_tokens(e, table)), [3, 17, 39])
    p = tokens.project_to_vocabulary(e, table)
    np.testing.assert_allclose(np.asarray(p), np.asarray(table[ids]), atol=1e-6)
    g = jax.grad(lambda e: jnp.sum(tokens.project_to_vocabulary(e, table) * 2.0))(e)
    np.testing.assert_allclose(np.asarray(g), 2.0, atol=1e-6)  # identity backward


def test_optimise_finds_the_minimum_keeps_losses_and_projects():
    c = jnp.asarray([0.1, 0.6, 0.3, -0.2])

    def objective(x, key):
        return jnp.sum((x - c) ** 2)

    x, losses = tokens.optimise(
        objective, jnp.zeros(4), jax.random.key(0), steps=300, optimizer=optax.adam(0.05)
    )
    np.testing.assert_allclose(np.asarray(x), np.asarray(c), atol=1e-3)
    np.testing.assert_allclose(float(losses[0]), float(jnp.sum(c**2)), atol=1e-6)
    # With projection onto the simplex the minimiser is the projection of c.
    x, _ = tokens.optimise(
        objective,
        tokens.uniform_simplex(1, 4)[0],
        jax.random.key(0),
        steps=300,
        optimizer=optax.adam(0.05),
        project=tokens.project_simplex,
    )
    np.testing.assert_allclose(np.asarray(x), sort_projection(np.asarray(c)), atol=1e-2)
    with pytest.raises(ValueError, match="steps must be >= 1, got 0"):
        tokens.optimise(
            objective, jnp.zeros(4), jax.random.key(0), steps=0, optimizer=optax.adam(0.1)
        )


def test_recorded_snapshots_are_the_iterates_of_shorter_runs():
    target = jnp.asarray([0.3, -1.2, 2.0])

    def objective(x, key):
        return jnp.sum((x - target) ** 2) + 0.1 * jnp.sum(x * jax.random.normal(key, x.shape))

    opt = optax.adam(0.05)
    x0, key = jnp.zeros(3), jax.random.key(4)
    x, _, snaps = tokens.optimise(objective, x0, key, steps=12, optimizer=opt, record_every=4)
    assert snaps.shape == (4, 3)
    np.testing.assert_array_equal(np.asarray(snaps[0]), np.asarray(x0))
    np.testing.assert_allclose(np.asarray(snaps[-1]), np.asarray(x), atol=1e-7)
    for j in (1, 2):
        xj, _ = tokens.optimise(objective, x0, key, steps=4 * j, optimizer=opt)
        np.testing.assert_allclose(np.asarray(snaps[j]), np.asarray(xj), atol=1e-6)
    with pytest.raises(ValueError, match="record_every must be in 1..12, got 13"):
        tokens.optimise(objective, x0, key, steps=12, optimizer=opt, record_every=13)

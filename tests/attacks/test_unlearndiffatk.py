"""UnlearnDiffAtk: the reference's timestep sweep, the objective against its closed form on a
toy denoiser, the attack finding the token that makes the toy model denoise the target, and one
optimisation loop shared with AdvUnlearn's inner attack."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsafe.attacks import tokens
from jaxsafe.attacks import unlearndiffatk as uda
from jaxsafe.diffusion import schedulers

SCHED = schedulers.SchedulerConfig(
    beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012
)


def test_timestep_sweep_is_the_references():
    np.testing.assert_array_equal(uda.timestep_sweep()[:3], [10, 30, 50])
    assert uda.timestep_sweep()[-1] == 990 and len(uda.timestep_sweep()) == 50
    with pytest.raises(ValueError, match="n must be in 1..1000, got 0"):
        uda.timestep_sweep(0)


def toy(table):
    """A denoiser whose x̂₀ is the first adversarial token's embedding: its ε-error is
    √ᾱ (x₀ − E_v) / √(1 − ᾱ), so the loss is ᾱ/(1 − ᾱ) · mean((x₀ − E_v)²)."""
    ab = schedulers.alphas_cumprod(SCHED)

    def eps_theta(params, x_t, t, emb):
        a = ab[t][:, None]
        return (x_t - jnp.sqrt(a) * emb[:, 1]) / jnp.sqrt(1 - a)

    return eps_theta, (lambda params, x: x), ab


def test_attack_finds_the_token_the_model_denoises_to_and_its_loss_is_the_closed_form():
    table = jax.random.normal(jax.random.key(0), (6, 4))
    x0 = table[3][None] + 0.05
    words = jnp.zeros((1, 5, 4))
    eps_theta, enc, ab = toy(table)
    t = 500
    run = uda.make_attack_steps(eps_theta, enc, table, SCHED, steps=150, lr=0.05, weight_decay=0.0)
    u0 = tokens.uniform_simplex(1, 6)
    u, losses = jax.jit(run)(None, u0, words, x0, t, jax.random.key(1))
    assert int(jnp.argmax(u[0])) == 3
    np.testing.assert_allclose(np.asarray(u).sum(-1), 1.0, atol=1e-5)
    # Every loss is the closed form for the token drawn at that step: one of the six values.
    c = float(ab[t] / (1 - ab[t]))
    closed = np.asarray([c * float(jnp.mean((x0[0] - row) ** 2)) for row in table])
    dist = np.abs(np.asarray(losses)[:, None] - closed[None]).min(-1)
    np.testing.assert_allclose(dist, 0.0, atol=1e-4 * closed.max())
    # Batched over prompts with vmap: each prompt's own target.
    x0s = jnp.stack([table[3][None] + 0.05, table[1][None] - 0.05])
    ub, _ = jax.jit(jax.vmap(run, in_axes=(None, None, None, 0, None, 0)))(
        None, u0, words, x0s, t, jax.random.split(jax.random.key(2), 2)
    )
    np.testing.assert_array_equal(np.asarray(jnp.argmax(ub[:, 0], -1)), [3, 1])


def test_unlearndiffatk_and_advunlearn_share_one_optimisation_loop(monkeypatch):
    from jaxsafe.erasure import advunlearn

    calls = []
    real = tokens.optimise

    def counting(*a, **kw):
        calls.append(kw.get("project"))
        return real(*a, **kw)

    monkeypatch.setattr(tokens, "optimise", counting)
    monkeypatch.setattr(advunlearn, "optimise", counting)
    table = jnp.eye(3)
    eps_theta, enc, _ = toy(table)
    uda.make_attack_steps(eps_theta, enc, table, SCHED, steps=2)(
        None,
        tokens.uniform_simplex(1, 3),
        jnp.zeros((1, 4, 3)),
        jnp.ones((1, 3)),
        10,
        jax.random.key(0),
    )
    advunlearn.soft_prompt_attack(
        lambda x, k: jnp.sum(x**2), jnp.ones(3), jax.random.key(0), steps=2, lr=0.1
    )
    assert calls == [tokens.project_simplex, None]

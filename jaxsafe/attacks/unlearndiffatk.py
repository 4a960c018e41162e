r"""UnlearnDiffAtk: the unlearned model as its own diffusion classifier.

Zhang, Jia, Chen, Chen, Zhang, Liu, Liu, "To Generate or Not? Safety-Driven Unlearned Diffusion
Models Are Still Easy To Generate Unsafe Images ... For Now", ECCV 2024; reference code
``OPTML-Group/Diffusion-MU-Attack`` (``src/attackers/text_grad_.py``, ``src/tasks/classifier_.py``).
k adversarial tokens u ∈ (Δ^V)^k are prefixed to the prompt (after SOT) and optimised so that
the *unlearned* model denoises an image of the erased concept well when prompted with them:

.. math::

    \min_u\ \mathbb{E}_\epsilon\, \bigl\lVert \epsilon_{\tilde\theta}\bigl(
        \sqrt{\bar\alpha_t}\, x_0 + \sqrt{1 - \bar\alpha_t}\, \epsilon,\ t,\
        \tau([\mathrm{SOT}, \mathrm{onehot}(u) E, \mathrm{prompt}])\bigr) - \epsilon \bigr\rVert^2

with x₀ the latent of an image the *original* model generated from the prompt, onehot(u) drawn
from u with a straight-through gradient clipped to [−1, 1], Adam (lr 0.01, coupled L2 0.1) and
a projection onto the simplex after every step (``jaxsafe.attacks.tokens``). The timesteps are a
fixed sweep t_j = T/(2n) + j T/n, j = 0…n−1 (n = 50: 10, 30, …, 990), ``steps_per_t`` (40) steps
each; after each t the judge sees the argmax tokens and the attack stops at its first success.
Defaults: k = 3 for objects and styles, 5 for nudity (the reference's configs).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxsafe.attacks import tokens
from jaxsafe.diffusion import schedulers

__all__ = ["make_attack_steps", "optimizer", "timestep_sweep"]


def timestep_sweep(n: int = 50, num_train_timesteps: int = 1000) -> np.ndarray:
    """The reference's timesteps, ascending: T//n//2 + j·(T//n) (``classifier_.py`` L67-70)."""
    if not 1 <= n <= num_train_timesteps:
        raise ValueError(f"n must be in 1..{num_train_timesteps}, got {n}")
    step = num_train_timesteps // n
    return step // 2 + step * np.arange(n)


def optimizer(lr: float = 0.01, weight_decay: float = 0.1) -> optax.GradientTransformation:
    """torch ``Adam(lr, weight_decay)``: the L2 term is added to the gradient before Adam."""
    return optax.chain(optax.add_decayed_weights(weight_decay), optax.adam(lr))


def make_attack_steps(
    eps_theta: Callable,
    encode_embeds: Callable,
    table: jax.Array,
    sched: schedulers.SchedulerConfig,
    *,
    steps: int,
    lr: float = 0.01,
    weight_decay: float = 0.1,
    clip: float | None = 1.0,
    sample_tokens: bool = True,
):
    """``run(params, u, word_embeds, x0, t, key) -> (u, losses)``: ``steps`` optimiser steps of
    the objective (module docstring) at timestep ``t`` for one prompt, u (k, V) over the rows of
    ``table`` (V, D) (a vocabulary or a subset of its rows); ``eps_theta(params, x_t, t, emb)``
    the unlearned denoiser, ``encode_embeds(params, inputs_embeds) -> emb`` its text encoder
    from token embeddings, ``word_embeds`` (1, L, D) the prompt's token embeddings, ``x0`` (1,
    *latent) the target latent. ``jax.vmap`` it over prompts."""
    opt = optimizer(lr, weight_decay)

    def run(params, u, word_embeds, x0, t, key):
        def objective(u, key):
            k_tok, k_eps = jax.random.split(key)
            one_hot = tokens.straight_through_one_hot(u, k_tok if sample_tokens else None, clip)
            emb = encode_embeds(params, tokens.insert_prefix(word_embeds, one_hot @ table))
            eps = jax.random.normal(k_eps, x0.shape, x0.dtype)
            tt = jnp.full((x0.shape[0],), t, jnp.int32)
            pred = eps_theta(params, schedulers.add_noise(sched, x0, eps, tt), tt, emb)
            return jnp.mean((pred - eps) ** 2)

        return tokens.optimise(
            objective, u, key, steps=steps, optimizer=opt, project=tokens.project_simplex
        )

    return run

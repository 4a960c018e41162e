r"""Shared prompt optimisation: adversarial tokens on the vocabulary simplex or as continuous
embeddings, and one optimisation loop for every attack (and AdvUnlearn's inner attack).

Two parameterisations of k adversarial tokens over a vocabulary of V rows E (V, D):

* **Simplex** (UnlearnDiffAtk, Zhang et al., ECCV 2024; ``OPTML-Group/Diffusion-MU-Attack``
  ``src/attackers/text_grad_.py``): u ∈ Δ^V per token. The forward pass uses the one-hot of a
  token drawn from u (or of its argmax), e = onehot(u) E; the backward pass is straight-through,
  ∂L/∂u = clip(∂L/∂onehot, −1, 1) (the reference's hardtanh; ``clip=None`` turns it off). After
  every optimiser step u is projected back onto Δ^V (:func:`project_simplex`).
* **Continuous + nearest token** (PEZ, Wen et al., NeurIPS 2023; P4D, Chin et al., ICML 2024,
  ``joycenerd/P4D`` ``prompt_optimization/optimize_n.py`` L68-96): free embeddings p (k, D); the
  forward pass uses their nearest vocabulary rows by cosine similarity, the gradient at the
  projected rows is applied to p (:func:`project_to_vocabulary`).

:func:`optimise` is the one loop: ``steps`` optimiser updates of ``objective(x, key_i)`` with
an optional gradient transform (sign, for AdvUnlearn's ``fast_at``) and projection after each
update, inside one ``lax.fori_loop`` (compiled once per shape).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

__all__ = ["nearest_tokens", "optimise", "project_simplex", "project_to_vocabulary",
           "straight_through_one_hot", "uniform_simplex"]


def project_simplex(v: jax.Array, iters: int = 50) -> jax.Array:
    """Euclidean projection of each row (last axis) onto the probability simplex
    {x ≥ 0, Σx = 1}: x = max(v − μ, 0) with μ the root of Σ max(v − μ, 0) = 1, found by
    bisection on [min v − 1, max v] as in the reference (``text_grad_.py`` L20-66; ``iters``
    halvings instead of its tolerance, so the loop has a fixed length under jit). The result is
    renormalised to sum to 1 exactly up to rounding."""
    v = jnp.asarray(v)
    lo = jnp.min(v, -1, keepdims=True) - 1.0
    hi = jnp.max(v, -1, keepdims=True)

    def body(_, bounds):
        lo, hi = bounds
        mid = (lo + hi) / 2
        over = jnp.sum(jnp.maximum(v - mid, 0.0), -1, keepdims=True) > 1.0
        return jnp.where(over, mid, lo), jnp.where(over, hi, mid)

    lo, hi = jax.lax.fori_loop(0, iters, body, (lo, hi))
    x = jnp.maximum(v - (lo + hi) / 2, 0.0)
    return x / jnp.sum(x, -1, keepdims=True)


def uniform_simplex(k: int, vocab_size: int) -> jax.Array:
    """The reference's initial u: every token 1/V."""
    return jnp.full((k, vocab_size), 1.0 / vocab_size, jnp.float32)


@jax.custom_vjp
def _st(u, one_hot, clip):
    return one_hot


def _st_fwd(u, one_hot, clip):
    return one_hot, clip


def _st_bwd(clip, g):
    g_u = jnp.where(clip > 0, jnp.clip(g, -clip, clip), g)
    return g_u, jnp.zeros_like(g), jnp.zeros_like(clip)


_st.defvjp(_st_fwd, _st_bwd)


def straight_through_one_hot(u: jax.Array, key: jax.Array | None = None,
                             clip: float | None = 1.0) -> jax.Array:
    """One-hot rows (same shape as ``u``) in the forward pass: of a token drawn from each row of
    u (``key`` given, the reference's ``STERandSelect``) or of its argmax; in the backward pass
    the gradient goes to u unchanged, clipped to [−clip, clip] (``clip=None``: not clipped)."""
    if key is None:
        ids = jnp.argmax(u, -1)
    else:
        ids = jax.random.categorical(key, jnp.log(jnp.maximum(u, 1e-30)), -1)
    one_hot = jax.nn.one_hot(ids, u.shape[-1], dtype=u.dtype)
    return _st(u, jax.lax.stop_gradient(one_hot),
               jnp.asarray(0.0 if clip is None else clip, u.dtype))


def nearest_tokens(embeds: jax.Array, table: jax.Array) -> jax.Array:
    """Ids (...,) of the vocabulary rows of ``table`` (V, D) nearest to ``embeds`` (..., D) by
    cosine similarity (P4D's and PEZ's ``nn_project``)."""
    def unit(x):
        return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)

    return jnp.argmax(unit(embeds) @ unit(table).T, -1)


def project_to_vocabulary(embeds: jax.Array, table: jax.Array) -> jax.Array:
    """``table[nearest_tokens(embeds)]`` in the forward pass, the identity in the backward pass
    (the gradient at the projected rows is applied to the continuous embeddings)."""
    rows = table[nearest_tokens(embeds, table)]
    return embeds + jax.lax.stop_gradient(rows - embeds)


def optimise(objective: Callable[[jax.Array, jax.Array], jax.Array], x0: jax.Array,
             key: jax.Array, *, steps: int, optimizer: optax.GradientTransformation,
             grad_transform: Callable[[jax.Array], jax.Array] | None = None,
             project: Callable[[jax.Array], jax.Array] | None = None
             ) -> tuple[jax.Array, jax.Array]:
    """``(x, losses)``: ``steps`` updates of ``optimizer`` minimising ``objective(x, key_i)``
    from ``x0``, ``key_i = fold_in(key, i)``; ``grad_transform`` maps the gradient before the
    update (e.g. ``jnp.sign``), ``project`` maps x after it (e.g. :func:`project_simplex`).
    ``losses[i]`` is the objective at step i, before its update. A fresh optimizer state each
    call (the references build a new ``torch.optim`` per attack)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")

    def body(i, carry):
        x, opt_state, losses = carry
        loss, g = jax.value_and_grad(objective)(x, jax.random.fold_in(key, i))
        if grad_transform is not None:
            g = grad_transform(g)
        updates, opt_state = optimizer.update(g, opt_state, x)
        x = optax.apply_updates(x, updates)
        if project is not None:
            x = project(x)
        return x, opt_state, losses.at[i].set(loss)

    x, _, losses = jax.lax.fori_loop(
        0, steps, body, (x0, optimizer.init(x0), jnp.zeros((steps,), jnp.float32)))
    return x, losses

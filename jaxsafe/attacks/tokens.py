r"""Shared prompt optimisation: adversarial tokens on the vocabulary simplex or as continuous
embeddings, and one optimisation loop for every attack (and AdvUnlearn's inner attack).

Two parameterisations of k adversarial tokens over a vocabulary of V rows E (V, D):

* **Simplex** (UnlearnDiffAtk, Zhang et al., ECCV 2024; ``OPTML-Group/Diffusion-MU-Attack``
  ``src/attackers/text_grad_.py``): u ∈ Δ^V per token; the forward pass uses the one-hot of a
  token drawn from u (or of its argmax), e = onehot(u) E; the backward pass is straight-through,
  ∂L/∂u = clip(∂L/∂onehot, −1, 1) (the reference's hardtanh; ``clip=None`` turns it off); after
  every step u is projected back onto Δ^V (:func:`project_simplex`).
* **Continuous + nearest token** (PEZ, Wen et al., NeurIPS 2023; P4D, Chin et al., ICML 2024,
  ``joycenerd/P4D`` ``prompt_optimization/optimize_n.py`` L68-96): free embeddings p (k, D); the
  forward pass uses their nearest vocabulary rows by cosine similarity, the gradient at the
  projected rows is applied to p (:func:`project_to_vocabulary`).

:func:`optimise` is the one loop. The text encoder takes the adversarial tokens as embeddings:
:func:`encode_embeddings` runs a ``CLIPTextModel``'s layers from (B, L, D) token embeddings, equal
to the encoder on ids for the true ones (:func:`token_embeddings`); :func:`insert_prefix` places
k of them after SOT.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

__all__ = [
    "check_prefix_fits",
    "encode_embeddings",
    "insert_prefix",
    "nearest_tokens",
    "optimise",
    "project_simplex",
    "project_to_vocabulary",
    "straight_through_one_hot",
    "token_embeddings",
    "uniform_simplex",
]


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


def straight_through_one_hot(
    u: jax.Array, key: jax.Array | None = None, clip: float | None = 1.0
) -> jax.Array:
    """One-hot rows (same shape as ``u``) in the forward pass: of a token drawn from each row of
    u (``key`` given, the reference's ``STERandSelect``) or of its argmax; in the backward pass
    the gradient goes to u unchanged, clipped to [−clip, clip] (``clip=None``: not clipped)."""
    if key is None:
        ids = jnp.argmax(u, -1)
    else:
        ids = jax.random.categorical(key, jnp.log(jnp.maximum(u, 1e-30)), -1)
    one_hot = jax.nn.one_hot(ids, u.shape[-1], dtype=u.dtype)
    return _st(
        u, jax.lax.stop_gradient(one_hot), jnp.asarray(0.0 if clip is None else clip, u.dtype)
    )


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


def optimise(
    objective: Callable[[jax.Array, jax.Array], jax.Array],
    x0: jax.Array,
    key: jax.Array,
    *,
    steps: int,
    optimizer: optax.GradientTransformation,
    grad_transform: Callable[[jax.Array], jax.Array] | None = None,
    project: Callable[[jax.Array], jax.Array] | None = None,
    record_every: int | None = None,
):
    """``steps`` updates of ``optimizer`` minimising ``objective(x, key_i)`` from ``x0``.

    ``key_i = fold_in(key, i)``. A fresh optimizer state each call (the references build a new
    ``torch.optim`` per attack); the steps run in one ``lax.fori_loop``, compiled once per shape.

    Args:
      objective: ``objective(x, key) -> loss``.
      x0: the starting point.
      key: the PRNG key of the steps.
      steps: the number of updates.
      optimizer: an optax transform.
      grad_transform: maps the gradient before the update (e.g. ``jnp.sign``), or None.
      project: maps x after the update (e.g. :func:`project_simplex`), or None.
      record_every: e, to also return x after 0, e, 2e, … steps (P4D judges its prompt every 50
        steps, x₀ included), or None.

    Returns:
      ``(x, losses)``, ``losses[i]`` the objective at step i before its update;
      ``(x, losses, snapshots)`` with ``record_every``.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if record_every is not None and not 1 <= record_every <= steps:
        raise ValueError(f"record_every must be in 1..{steps}, got {record_every}")
    every = record_every or steps
    snaps0 = jnp.zeros((steps // every + 1,) + x0.shape, x0.dtype).at[0].set(x0)

    def body(i, carry):
        x, opt_state, losses, snaps = carry
        loss, g = jax.value_and_grad(objective)(x, jax.random.fold_in(key, i))
        if grad_transform is not None:
            g = grad_transform(g)
        updates, opt_state = optimizer.update(g, opt_state, x)
        x = optax.apply_updates(x, updates)
        if project is not None:
            x = project(x)
        if record_every is not None:
            j = (i + 1) // every
            snaps = jnp.where((i + 1) % every == 0, snaps.at[j].set(x), snaps)
        return x, opt_state, losses.at[i].set(loss), snaps

    x, _, losses, snaps = jax.lax.fori_loop(
        0, steps, body, (x0, optimizer.init(x0), jnp.zeros((steps,), jnp.float32), snaps0)
    )
    return (x, losses) if record_every is None else (x, losses, snaps)


# The text encoder from token embeddings.


def token_embeddings(text_encoder, ids: jax.Array) -> jax.Array:
    """The (B, L, D) token ("word") embeddings of ids (B, L): ``token_embedding(ids)``, without
    the position embeddings."""
    ids = jnp.asarray(ids)
    if ids.ndim != 2 or not jnp.issubdtype(ids.dtype, jnp.integer):
        raise ValueError(f"ids: expected integer (B, L), got {ids.dtype} {ids.shape}")
    return text_encoder.embeddings.token_embedding(ids)


def encode_embeddings(text_encoder, inputs_embeds: jax.Array) -> jax.Array:
    """``last_hidden_state`` (B, L, D) of a ``jaxsafe.nn.clip_text.CLIPTextModel`` run from token
    embeddings ``inputs_embeds`` (B, L, D) (``transformers``' ``inputs_embeds``): position
    embeddings added, every encoder layer (causal self-attention), the final LayerNorm."""
    cfg = text_encoder.config
    x = jnp.asarray(inputs_embeds)
    if x.ndim != 3 or x.shape[1] > cfg.max_position_embeddings or x.shape[2] != cfg.hidden_size:
        raise ValueError(
            f"inputs_embeds: expected (B, L, {cfg.hidden_size}) with L <= "
            f"{cfg.max_position_embeddings}, got {x.shape}"
        )
    h = x + text_encoder.embeddings.position_embedding(jnp.arange(x.shape[1]))[None]
    for layer in text_encoder.encoder.layers:
        h = layer(h)
    return text_encoder.final_layer_norm(h)


def insert_prefix(word_embeds: jax.Array, adv: jax.Array) -> jax.Array:
    """``[SOT, δ_1…δ_k, w_1…w_{L−k−1}]``: the k adversarial embeddings ``adv`` (k, D) inserted
    after the start token of ``word_embeds`` (B, L, D), the last k positions dropped (padding when
    :func:`check_prefix_fits` holds)."""
    b, n, d = word_embeds.shape
    if adv.ndim != 2 or adv.shape[1] != d or not 1 <= adv.shape[0] <= n - 2:
        raise ValueError(f"adv: expected (k, {d}) with 1 <= k <= {n - 2}, got {adv.shape}")
    k = adv.shape[0]
    adv = jnp.broadcast_to(adv.astype(word_embeds.dtype), (b, k, d))
    return jnp.concatenate([word_embeds[:, :1], adv, word_embeds[:, 1 : n - k]], axis=1)


def check_prefix_fits(lengths, k: int, max_length: int, prompts=None) -> None:
    """Raises ValueError unless every prompt (token count with SOT and EOT, ``lengths``) keeps its
    EOT after a k-token prefix in ``max_length`` positions."""
    for i, n in enumerate(lengths):
        if int(n) + k > max_length:
            name = repr(prompts[i]) if prompts is not None else f"prompt {i}"
            raise ValueError(
                f"{name} has {int(n)} tokens: with a {k}-token adversarial prefix it "
                f"exceeds the text encoder's {max_length} positions"
            )

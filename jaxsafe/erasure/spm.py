r"""SPM: concept-semi-permeable membranes, rank-1 adapters trained to erase a concept.

Lyu, Yang, Hong, Chen, Jin, He, Xue, Han, Ding, "One-Dimensional Adapter to Rule Them All:
Concepts, Diffusion Models and Erasing Applications", CVPR 2024; reference code ``Con6924/SPM``.
A rank-1 adapter (``jaxsafe.nn.adapters``) on every linear layer of the UNet's transformer
blocks is trained, the UNet frozen, with L = L_erase + λ L_anchor: the erase term is ESD's
(``esd.esd_target``; SPM's ``PromptEmbedsPair._erase``) with the neutral prompt c_n as c_from and
η = 1, x_t sampled towards the target c_tar by the adapted model; latent anchoring
(``preservation.anchor_mse``) keeps ε on M anchors per step, random surrogate concepts
(:func:`sample_anchors`), every other one ∅ as in the reference's batch. At inference,
facilitated transport multiplies the adapter branch by the transport rate
(:func:`transport_strength`)

.. math::

    \gamma(c) = \max_k \max\Bigl(\cos\bigl(\operatorname{vec}\tau(c),
        \operatorname{vec}\tau(c_k)\bigr),\ \frac{|T(c) \cap T(c_k)|}{|T(c_k)|}\Bigr) \in [0, 1],

c_k the erased concepts, τ the text encoder's (L, D) output, T a prompt's set of tokens.
Defaults: docs/erasure.md, "Reference defaults". Deviations: only the linear layers of the
transformer blocks are adapted (the reference: every ``Linear`` and ``Conv2d`` of each
``Transformer2DModel``); the networks see the DDIM timestep τ_n (the reference's
``timesteps_1000[int(n·1000/N)]`` is ~40 steps noisier); training at the model's latent size
(the reference: random 256–448 px buckets); the branch is multiplied by γ, as the paper says
(the reference scales both factors by γ, i.e. γ²: ``spm.transport_power = 2``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

from jaxsafe.diffusion import schedulers
from jaxsafe.erasure.esd import esd_target, partial_sample
from jaxsafe.erasure.preservation import anchor_mse

__all__ = [
    "ANCHOR_BATCHES",
    "cosine_with_hard_restarts",
    "embedding_cosine",
    "make_spm_loss",
    "sample_anchors",
    "token_overlap",
    "transport_strength",
]

ANCHOR_BATCHES = ("reference", "sampled")


def embedding_cosine(emb: jax.Array, erased_emb: jax.Array) -> jax.Array:
    """(B, K) cosine similarities of the flattened prompt embeddings ``emb`` (B, L, D) and the
    erased concepts' ``erased_emb`` (K, L, D)."""
    emb, erased_emb = jnp.asarray(emb), jnp.asarray(erased_emb)
    if emb.ndim != 3 or erased_emb.ndim != 3 or emb.shape[1:] != erased_emb.shape[1:]:
        raise ValueError(
            f"emb (B, L, D) and erased_emb (K, L, D) must share (L, D); got "
            f"{emb.shape} and {erased_emb.shape}"
        )
    a = emb.reshape(emb.shape[0], -1)
    b = erased_emb.reshape(erased_emb.shape[0], -1)
    a = a / jnp.maximum(jnp.linalg.norm(a, axis=-1, keepdims=True), 1e-8)
    b = b / jnp.maximum(jnp.linalg.norm(b, axis=-1, keepdims=True), 1e-8)
    return a @ b.T


def _first_occurrences(ids: jax.Array, special: jax.Array) -> jax.Array:
    """(K, L) mask of the first occurrence of every non-special id of each row (set semantics)."""
    n = ids.shape[-1]
    earlier = jnp.tril(jnp.ones((n, n), bool), k=-1)  # [i, j]: j < i
    repeated = jnp.any((ids[:, :, None] == ids[:, None, :]) & earlier, axis=-1)
    return ~repeated & ~jnp.isin(ids, special)


def token_overlap(ids: jax.Array, erased_ids: jax.Array, special_ids: Sequence[int]) -> jax.Array:
    """(B, K) share |T(c_b) ∩ T(c_k)| / |T(c_k)| of each erased concept's distinct non-special
    tokens (``erased_ids`` (K, L')) present in each prompt (``ids`` (B, L)); 0 for a concept
    without such tokens."""
    ids, erased_ids = jnp.asarray(ids), jnp.asarray(erased_ids)
    if ids.ndim != 2 or erased_ids.ndim != 2:
        raise ValueError(
            f"ids must be (B, L) and erased_ids (K, L'); got {ids.shape} and {erased_ids.shape}"
        )
    special = jnp.asarray(list(special_ids), ids.dtype).reshape(-1)
    concept = _first_occurrences(erased_ids, special)  # (K, L')
    present = jnp.any(ids[:, None, :, None] == erased_ids[None, :, None, :], axis=2)  # (B, K, L')
    hits = jnp.sum(present & concept[None], axis=-1)
    size = jnp.sum(concept, axis=-1)
    return jnp.where(size > 0, hits / jnp.maximum(size, 1), 0.0)


def transport_strength(
    emb: jax.Array,
    ids: jax.Array,
    erased_emb: jax.Array,
    erased_ids: jax.Array,
    special_ids: Sequence[int],
) -> jax.Array:
    """γ (B,) of the module docstring: max over the K erased concepts of the larger of
    :func:`embedding_cosine` and :func:`token_overlap`, clipped to [0, 1]."""
    shapes = [jnp.shape(a) for a in (emb, ids, erased_emb, erased_ids)]
    if shapes[0][:1] != shapes[1][:1] or shapes[2][:1] != shapes[3][:1]:
        raise ValueError(
            "one ids row per embedding: emb {} vs ids {}, erased_emb {} vs erased_ids {}".format(
                *shapes
            )
        )
    score = jnp.maximum(
        embedding_cosine(emb, erased_emb), token_overlap(ids, erased_ids, special_ids)
    )
    return jnp.clip(jnp.max(score, axis=-1), 0.0, 1.0)


def sample_anchors(
    key: jax.Array, c: jax.Array, num: int, scale_range: tuple[float, float] = (0.8, 1.2)
) -> jax.Array:
    """``num`` anchor embeddings (num, L, D) around the concept embedding ``c`` (L, D): a
    direction u uniform on the sphere, accepted with probability 1 − cos(u, vec c) (rejection
    sampling), times ρ ‖vec c‖ with ρ ~ U[scale_range]."""
    c = jnp.asarray(c)
    if c.ndim != 2:
        raise ValueError(f"c must be one embedding (L, D), got shape {c.shape}")
    flat = c.reshape(-1)
    norm = jnp.linalg.norm(flat)
    lo, hi = scale_range

    def one(k):
        def draw(state):
            k, _, _ = state
            k, k_u, k_r = jax.random.split(k, 3)
            u = jax.random.normal(k_u, flat.shape, flat.dtype)
            u = u / jnp.linalg.norm(u)
            accept = jax.random.uniform(k_r) < 1.0 - jnp.dot(u, flat) / norm
            return k, u, accept

        k_scale, k_loop = jax.random.split(k)
        _, u, _ = jax.lax.while_loop(
            lambda s: ~s[2], draw, (k_loop, jnp.zeros_like(flat), jnp.array(False))
        )
        rho = jax.random.uniform(k_scale, (), flat.dtype, lo, hi)
        return (rho * norm * u).reshape(c.shape)

    return jax.vmap(one)(jax.random.split(key, num))


def cosine_with_hard_restarts(
    peak_lr: float, warmup_steps: int, total_steps: int, num_cycles: int = 3
) -> Callable:
    """The reference's learning-rate schedule (diffusers'
    ``get_cosine_with_hard_restarts_schedule_with_warmup``) as an optax schedule of the step k:
    ``lr · k / w`` for k < w, then ``lr · ½ (1 + cos(π ((C p) mod 1)))`` with
    p = (k − w) / (T − w), and 0 from p ≥ 1 on."""
    if not 0 <= warmup_steps < total_steps:
        raise ValueError(f"need 0 <= warmup_steps < total_steps, got {warmup_steps}, {total_steps}")

    def schedule(count):
        k = jnp.asarray(count, jnp.float32)
        warm = k / max(warmup_steps, 1)
        p = (k - warmup_steps) / (total_steps - warmup_steps)
        cos = 0.5 * (1.0 + jnp.cos(jnp.pi * jnp.mod(num_cycles * p, 1.0)))
        factor = jnp.where(k < warmup_steps, warm, jnp.where(p >= 1.0, 0.0, cos))
        return peak_lr * factor

    return schedule


def make_spm_loss(
    eps_theta: Callable,
    eps_star: Callable,
    sched: schedulers.SchedulerConfig,
    *,
    latent_shape,
    anchor_weight: float = 1000.0,
    num_anchors: int = 4,
    eta: float = 1.0,
    start_guidance: float = 3.0,
    num_inference_steps: int = 30,
    anchor_scale: tuple[float, float] = (0.8, 1.2),
    batch_size: int | None = None,
    anchor_batch: str = "reference",
):
    """SPM's objective (module docstring) in the trainer's form ``loss_fn(params, frozen, extra,
    batch, rng)``.

    Batch: ``c_e`` (P, L, D) the prompts to erase, ``c_from`` (P, L, D) their neutral prompts c_n,
    ``uncond`` (P or 1, L, D) the partial sampling's unconditional prompt. Metrics:
    ``spm_erase``, ``spm_anchor`` (the loss is ``spm_erase + λ spm_anchor``), ``esd_target_gap``.

    Args:
      eps_theta: ``eps_theta(params, frozen, x_t, t, emb)``, the adapted model (strength 1).
      eps_star: ``eps_star(frozen, x_t, t, emb)``, the frozen original.
      sched: the model's scheduler config (DDIM partial sampling of x_t).
      latent_shape: (H, W, C) of x_T.
      anchor_weight: λ (1000).
      num_anchors: M per target row (4).
      eta: the erase term's negative-guidance scale (1).
      start_guidance: CFG scale of the partial sampling (3).
      num_inference_steps: N (30).
      anchor_scale: ρ's range.
      batch_size: rows drawn per step (uniformly, with replacement) from the batch's pool of
        prompt pairs, as the reference draws one prompt pair per step (batch 1); None uses
        every row.
      anchor_batch: ``"reference"``: every other one of the M anchor rows is the unconditional
        prompt ∅ (``uncond``) and the rest are sampled surrogates, which is what the reference's
        anchor batch amounts to: ``sampling.py`` L24–25 interleaves [∅, s₁, ∅, s₂, …] and
        ``predict_noise`` keeps the second half of that batch as the "conditional" one
        (``train_util.py`` L161–176), so half of what it anchors is ε(x_t, ∅). ``"sampled"``: M
        sampled surrogates, as the paper describes.
    """
    if num_anchors < 0:
        raise ValueError(f"num_anchors must be >= 0, got {num_anchors}")
    if anchor_batch not in ANCHOR_BATCHES:
        raise ValueError(f"anchor_batch={anchor_batch!r}; expected one of {ANCHOR_BATCHES}")
    if num_inference_steps < 2:
        raise ValueError(f"num_inference_steps must be >= 2, got {num_inference_steps}")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1 or None, got {batch_size}")
    latent_shape = tuple(latent_shape)

    def loss_fn(params, frozen, extra, batch, rng):
        c_e, c_from, uncond = batch["c_e"], batch["c_from"], batch["uncond"]
        if c_e.ndim != 3 or c_from.shape != c_e.shape:
            raise ValueError(
                f"batch c_e and c_from must be (P, L, D) alike; got {c_e.shape} and {c_from.shape}"
            )
        k_rows, k_n, k_x, k_a = jax.random.split(rng, 4)
        if batch_size is not None:
            rows = jax.random.randint(k_rows, (batch_size,), 0, c_e.shape[0])
            c_e, c_from = c_e[rows], c_from[rows]
            uncond = uncond[rows] if uncond.shape[0] == batch["c_e"].shape[0] else uncond
        uncond = jnp.broadcast_to(uncond, c_e.shape)
        b, m = c_e.shape[0], num_anchors
        n = jax.random.randint(k_n, (), 1, num_inference_steps)
        x_T = jax.random.normal(k_x, (b, *latent_shape))
        sampler = lambda x, t, e: eps_theta(jax.lax.stop_gradient(params), frozen, x, t, e)
        x_t, t = partial_sample(
            sampler, sched, x_T, c_e, uncond, start_guidance, num_inference_steps, n
        )
        anchors = jax.vmap(lambda k, c: sample_anchors(k, c, m, anchor_scale))(
            jax.random.split(k_a, b), c_e
        )
        if anchor_batch == "reference":
            anchors = anchors.at[:, 0::2].set(uncond[:, None])
        anchors = anchors.reshape(b * m, *c_e.shape[1:])
        x_a, t_a = jnp.repeat(x_t, m, axis=0), jnp.repeat(t, m, axis=0)
        # One batched call of each network.
        star = eps_star(
            frozen,
            jnp.concatenate([x_t, x_t, x_a]),
            jnp.concatenate([t, t, t_a]),
            jnp.concatenate([c_from, c_e, anchors]),
        )
        e_n, e_e, e_anchor = star[:b], star[b : 2 * b], star[2 * b :]
        # SPM's _erase: the neutral prediction is both the base and the guidance's reference.
        target = jax.lax.stop_gradient(esd_target(e_n, e_e, e_n, eta))
        pred = eps_theta(
            params,
            frozen,
            jnp.concatenate([x_t, x_a]),
            jnp.concatenate([t, t_a]),
            jnp.concatenate([c_e, anchors]),
        )
        erase = jnp.mean((pred[:b] - target) ** 2)
        anchor = anchor_mse(pred[b:], e_anchor) if m else jnp.zeros(())
        metrics = {
            "spm_erase": erase,
            "spm_anchor": anchor,
            "esd_target_gap": jnp.mean((e_e - target) ** 2),
        }
        return erase + anchor_weight * anchor, (metrics, extra)

    return loss_fn

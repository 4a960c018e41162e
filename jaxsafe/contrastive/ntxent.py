r"""Per-pair NT-Xent (normalised temperature-scaled cross-entropy) loss.

SimCLR (Chen et al., ICML 2020, arXiv:2002.05709), as used per instance by DBPM (Lan et al.,
ICLR 2024, arXiv:2302.03357; reference ``models/loss.py::InfoNCE`` in
``lanxiang1017/DynamicBadPairMining_ICLR24``). For B instances with L2-normalised projections
z_i^u, z_i^v of the two views, cosine similarity s and the 2B views {z_k},

.. math::

    \ell(z_i^u \to z_i^v) = -\log \frac{\exp(s(z_i^u, z_i^v) / t)}
        {\sum_{k \ne i^u} \exp(s(z_i^u, z_k) / t)}, \qquad
    L_i = \tfrac12 \bigl[\ell(z_i^u \to z_i^v) + \ell(z_i^v \to z_i^u)\bigr],

t = 0.2; the denominator runs over the 2B − 1 views other than the anchor (SimCLR's 1[k ≠ i]).
This is the reference's quantity (``-log(pos / (pos + neg))``, the mean of the two directions
per instance), computed as logsumexp − positive in float32, without the overflow of exp(1/t)
products. :func:`ntxent_per_pair_sharded` computes the same L_i, and its gradient, when the
batch is split over devices: each device all-gathers the normalised projections (the
negatives) and computes the rows of its own instances.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

__all__ = ["l2_normalize", "ntxent_per_pair", "ntxent_per_pair_sharded"]

# F.normalize's eps: vectors shorter than this are divided by eps instead of their norm.
_EPS = 1e-12


def l2_normalize(z: jax.Array, eps: float = _EPS) -> jax.Array:
    """``z / max(|z|, eps)`` along the last axis (``torch.nn.functional.normalize``).

    Written with ``rsqrt`` of the clamped squared norm so the gradient stays finite at ``z = 0``.
    """
    sq = jnp.sum(jnp.square(z), axis=-1, keepdims=True)
    return z * lax.rsqrt(jnp.maximum(sq, eps * eps))


def _check_pair(z1, z2, temperature) -> tuple[jax.Array, jax.Array]:
    z1, z2 = jnp.asarray(z1), jnp.asarray(z2)
    if z1.ndim != 2:
        raise ValueError(f"z1 must have shape (B, D), got {z1.shape}.")
    if z2.shape != z1.shape:
        raise ValueError(f"z2 shape {z2.shape} must equal z1 shape {z1.shape} (B, D).")
    if isinstance(temperature, (int, float)) and not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}.")
    # Similarities of normalised vectors divided by t = 0.2 need float32 at least.
    dtype = jnp.promote_types(z1.dtype, jnp.float32)
    return z1.astype(dtype), z2.astype(dtype)


def _rows_loss(q1, q2, k1, k2, offset, temperature):
    """Symmetric NT-Xent of local rows ``q`` (``b`` instances) against all views ``k`` (``B``).

    ``q1, q2``: normalised local views ``(b, D)``; ``k1, k2``: normalised views of the whole
    batch ``(B, D)``; local instance ``j`` is global instance ``offset + j``.
    """
    b, n = q1.shape[0], k1.shape[0]
    q = jnp.concatenate([q1, q2], axis=0)  # (2b, D) anchors
    k = jnp.concatenate([k1, k2], axis=0)  # (2B, D) candidates
    # Full float32 products: TF32/bf16 passes (GPU/TPU default) would err by ~1e-3 in s, times
    # 1/t = 5 in the logits; the (2b, 2B) matmul is small next to the encoder.
    logits = jnp.matmul(q, k.T, precision=lax.Precision.HIGHEST) / temperature  # (2b, 2B)
    j = offset + jnp.arange(b)
    self_col = jnp.concatenate([j, n + j])  # where each anchor sits in k
    pos_col = jnp.concatenate([n + j, j])  # its other view
    rows = jnp.arange(2 * b)
    logits = logits.at[rows, self_col].set(-jnp.inf)  # k != anchor: 2B - 1 candidates
    per_anchor = jax.nn.logsumexp(logits, axis=1) - logits[rows, pos_col]
    return 0.5 * (per_anchor[:b] + per_anchor[b:])


def ntxent_per_pair(z1: jax.Array, z2: jax.Array, temperature: float = 0.2) -> jax.Array:
    """Per-instance symmetric NT-Xent ``L_i`` (SimCLR; DBPM's per-pair loss), shape ``(B,)``.

    Args:
      z1, z2: projections of the two views, ``(B, D)``; L2-normalised here.
      temperature: ``t`` (DBPM / reference: 0.2).

    Returns:
      float32 (or wider) ``(B,)``: ``1/2 [l(z1_i -> z2_i) + l(z2_i -> z1_i)]`` over ``2B - 1``
      candidates. The batch loss of SimCLR is its mean.
    """
    z1, z2 = _check_pair(z1, z2, temperature)
    u, v = l2_normalize(z1), l2_normalize(z2)
    return _rows_loss(u, v, u, v, 0, temperature)


def ntxent_per_pair_sharded(
    z1: jax.Array,
    z2: jax.Array,
    temperature: float,
    mesh: Mesh,
    axis_names: Sequence[str] = ("data", "fsdp"),
) -> jax.Array:
    """:func:`ntxent_per_pair` for a batch split over the mesh axes ``axis_names``.

    Each device normalises its shard, all-gathers the normalised views of the whole batch over
    ``axis_names`` (``lax.all_gather(..., tiled=True)``, in the order ``PartitionSpec(axis_names)``
    lays the shards out) and computes the loss of its own rows against all ``2B - 1`` candidates.
    The gradient flows back through the gather (its transpose is a reduce-scatter), so
    ``jax.grad`` of any function of the result equals the single-device gradient. The output is
    sharded like the input, ``PartitionSpec(axis_names)``.

    Args:
      z1, z2: ``(B, D)`` projections; ``B`` must be a multiple of the number of shards.
      temperature: ``t``.
      mesh: the device mesh.
      axis_names: mesh axes the batch dimension is split over (default: ``data`` and ``fsdp``).
    """
    z1, z2 = _check_pair(z1, z2, temperature)
    axis_names = tuple(axis_names)
    unknown = [a for a in axis_names if a not in mesh.axis_names]
    if unknown or not axis_names:
        raise ValueError(
            f"axis_names={axis_names} must be a non-empty subset of the mesh axes "
            f"{tuple(mesh.axis_names)}."
        )
    shards = 1
    for a in axis_names:
        shards *= mesh.shape[a]
    if z1.shape[0] % shards:
        raise ValueError(
            f"batch size {z1.shape[0]} must be a multiple of the {shards} shards "
            f"of mesh axes {axis_names}."
        )

    def local(q1, q2):
        q1, q2 = l2_normalize(q1), l2_normalize(q2)
        k1 = lax.all_gather(q1, axis_names, axis=0, tiled=True)
        k2 = lax.all_gather(q2, axis_names, axis=0, tiled=True)
        offset = lax.axis_index(axis_names) * q1.shape[0]
        return _rows_loss(q1, q2, k1, k2, offset, temperature)

    spec = P(axis_names)
    return jax.shard_map(local, mesh=mesh, in_specs=(spec, spec), out_specs=spec)(z1, z2)

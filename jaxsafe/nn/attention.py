"""Scaled dot-product attention, ``softmax(Q K^T / sqrt(d)) V`` per head, on every backend.

``dot_product_attention(q, k, v)`` takes ``(B, T, N, H)`` arrays like
``jax.nn.dot_product_attention`` and picks one of three lowerings:

* ``"chunked"``: FlashAttention's tiling (Dao et al., "FlashAttention", NeurIPS 2022; Dao,
  "FlashAttention-2", 2023, Algorithms 1 and 2) over query tiles of ``c`` rows, one head at a
  time (``lax.map``). The forward keeps each row's log-sum-exp ``L = m + log sum_j exp(S_ij - m)``;
  the backward recomputes ``P = exp(S - L)`` per tile and forms ``dV += P^T dO``,
  ``dS = P * (dO V^T - rowsum(dO * O))``, ``dQ = dS K``, ``dK += dS^T Q``. At most ``c x T_k``
  logits are alive at once, so memory grows linearly with the token count and a tile stays in
  the CPU's cache. Deviation from FlashAttention: the key axis is not tiled (one tile row is a
  few KB; an online softmax over key blocks would add work without saving memory that matters).
* ``"cudnn"``: cuDNN's fused flash attention through ``jax.nn.dot_product_attention`` (GPU,
  float16/bfloat16 only).
* ``"xla"``: ``jax.nn.dot_product_attention``'s einsum-softmax-einsum.

``"auto"`` (the default) uses cuDNN on a GPU where it supports the dtype and width, the chunked
form on the host (XLA:CPU) once both ``T_q`` and ``T_k`` reach ``CHUNKED_MIN_TOKENS`` (the
crossover in docs/benchmarks.md, "Attention at 4,096 tokens"), and XLA's otherwise: on TPUs and
GPUs a sequential loop over tiles would idle the chip. Logits, softmax and the backward's
``P``/``dS`` are float32 also for bfloat16 inputs, as diffusers' ``upcast_attention``.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

IMPLEMENTATIONS = ("auto", "xla", "chunked", "cudnn")
# Below 256 x 256 logits per head the loop's overhead outweighs the cache it saves on XLA:CPU.
CHUNKED_MIN_TOKENS = 256
FORWARD_CHUNK, BACKWARD_CHUNK = 512, 256


def choose(q_len: int, kv_len: int, head_dim: int, dtype, backend: str | None = None) -> str:
    """The lowering ``"auto"`` takes for these shapes on ``backend`` (default: JAX's)."""
    backend = backend or jax.default_backend()
    if backend in ("gpu", "cuda"):
        # cuDNN's fused kernel takes half precision and head widths that are multiples of 8 up
        # to 128 (SD 1.5's 160-wide heads at the lowest resolution take XLA's).
        half = jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
        return "cudnn" if half and head_dim % 8 == 0 and head_dim <= 128 else "xla"
    if backend == "cpu" and min(q_len, kv_len) >= CHUNKED_MIN_TOKENS:
        return "chunked"
    return "xla"


def dot_product_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, *, implementation: str = "auto"
) -> jax.Array:
    """``softmax(q k^T / sqrt(H)) v`` for ``q: (B, T_q, N, H)``, ``k, v: (B, T_k, N, H)``."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"attention implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}"
        )
    if implementation == "auto":
        implementation = choose(q.shape[1], k.shape[1], q.shape[-1], q.dtype)
    if implementation == "chunked":
        return chunked_attention(q, k, v)
    return jax.nn.dot_product_attention(q, k, v, implementation=implementation)


def chunked_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    forward_chunk: int = FORWARD_CHUNK,
    backward_chunk: int = BACKWARD_CHUNK,
) -> jax.Array:
    """The ``"chunked"`` lowering; queries are zero-padded to a whole number of tiles."""
    b, t_q, n, h = q.shape
    # Both passes tile the same padded length: the forward's tile is a multiple of the backward's.
    bc = min(backward_chunk, t_q)
    padded = -(-t_q // bc) * bc
    fc = bc * math.gcd(padded // bc, max(forward_chunk // bc, 1))
    heads_first = lambda x: jnp.swapaxes(x, 1, 2).reshape(b * n, x.shape[1], h)
    qs = heads_first(q) * jnp.asarray(1.0 / np.sqrt(h), q.dtype)
    if padded != t_q:
        qs = jnp.pad(qs, ((0, 0), (0, padded - t_q), (0, 0)))
    o = _flash(qs, heads_first(k), heads_first(v), fc, bc)[:, :t_q]
    return jnp.swapaxes(o.reshape(b, n, t_q, h), 1, 2)


def _tiles(x: jax.Array, c: int) -> jax.Array:
    return x.reshape(x.shape[0], x.shape[1] // c, c, x.shape[2])


def _dot(a, b, contract):
    return jax.lax.dot_general(a, b, (contract, ((), ())), preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _flash(q, k, v, forward_chunk, backward_chunk):
    return _flash_fwd(q, k, v, forward_chunk, backward_chunk)[0]


def _flash_fwd(q, k, v, forward_chunk, backward_chunk):
    def head(args):
        q_h, k_h, v_h = args

        def tile(q_i):
            s = _dot(q_i, k_h, ((1,), (1,)))
            m = s.max(-1, keepdims=True)
            e = jnp.exp(s - m)
            total = e.sum(-1, keepdims=True)
            o = _dot(e.astype(v_h.dtype), v_h, ((1,), (0,))) / total
            return o.astype(q.dtype), m + jnp.log(total)

        return jax.lax.map(tile, q_h)

    o, lse = jax.lax.map(head, (_tiles(q, forward_chunk), k, v))
    o, lse = o.reshape(q.shape), lse.reshape(*q.shape[:2], 1)
    return o, (q, k, v, o, lse)


def _flash_bwd(forward_chunk, backward_chunk, residuals, do):
    del forward_chunk
    q, k, v, o, lse = residuals
    row = (do.astype(jnp.float32) * o.astype(jnp.float32)).sum(-1, keepdims=True)
    c = backward_chunk

    def head(args):
        q_h, k_h, v_h, do_h, lse_h, row_h = args

        # Keys on the rows (P^T, dS^T) so that three of the four matmuls take their operands
        # as stored, which XLA:CPU runs faster than the query-major orientation.
        def tile(carry, x):
            dk, dv = carry
            q_i, do_i, lse_i, row_i = x
            p_t = jnp.exp(_dot(k_h, q_i, ((1,), (1,))) - lse_i.T)
            dv = dv + _dot(p_t.astype(do_i.dtype), do_i, ((1,), (0,)))
            ds_t = p_t * (_dot(v_h, do_i, ((1,), (1,))) - row_i.T)
            dq = _dot(ds_t.astype(k_h.dtype), k_h, ((0,), (0,)))
            dk = dk + _dot(ds_t.astype(q_i.dtype), q_i, ((1,), (0,)))
            return (dk, dv), dq

        zeros = jnp.zeros(k_h.shape, jnp.float32)
        (dk, dv), dq = jax.lax.scan(tile, (zeros, zeros), (q_h, do_h, lse_h, row_h))
        return dq, dk, dv

    dq, dk, dv = jax.lax.map(
        head, (_tiles(q, c), k, v, _tiles(do, c), _tiles(lse, c), _tiles(row, c))
    )
    return dq.reshape(q.shape).astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


_flash.defvjp(_flash_fwd, _flash_bwd)

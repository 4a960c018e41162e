r"""The closed-form ridge editor of cross-attention projections, and UCE built on it.

Unified Concept Editing (UCE; Gandikota, Orgad, Belinkov, Materzyńska, Bau, WACV 2024, eq. 7;
reference code ``unified-concept-editing``) rewrites each cross-attention key/value projection W
(d_out × d_in, y = W c) so that erased embeddings c_e map to target values v*_e while preserved
embeddings c_p keep their values:

.. math::

    W = \arg\min_W\ \lambda \lVert W - W_\mathrm{old} \rVert_F^2
        + \sum_e s_e \lVert W c_e - v^*_e \rVert^2
        + \sum_p s_p \lVert (W - W_\mathrm{old})\, c_p \rVert^2
        + \operatorname{tr}\bigl((W - W_\mathrm{old})\, P\, (W - W_\mathrm{old})^\top\bigr)
      = W_\mathrm{old} + (V_e - C_e W_\mathrm{old}^\top)^\top S_e C_e A^{-1},

A = λI + Σ_e s_e c_e c_eᵀ + Σ_p s_p c_p c_pᵀ + P, with per-row weights s and an optional
precomputed preservation covariance P. A depends only on the embeddings, so one linear solve
serves every projection of the same input width (the reference inverts A for each of SD's 32
matrices; cost: docs/benchmarks.md, "Concept erasure"). UCE: v*_e = W_old c_guide (the empty
prompt by default), λ = 0.5; its paper setting retains the empty prompt and the preserve concepts
with all their token rows at preserve scale max(0.1, 1/#retained prompts) (the original
``train-scripts/train_erase.py`` L422–442, removed in commit 4502388; the current
``trainscripts/uce_sd_erase.py``: scale 1, no empty prompt, one row per prompt). RECE and TRCE
reuse :func:`ridge_edit`. Kernels are Flax kernels K = Wᵀ (d_in × d_out).
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "aligned_tail",
    "ridge_edit",
    "ridge_edit_kernel",
    "ridge_objective",
    "uce_default_preserve_scale",
    "uce_edit",
    "uce_preserve_scale",
]


def _weights(s, n: int, what: str) -> jax.Array:
    s = jnp.asarray(s, jnp.float32)
    if s.ndim == 0:
        return jnp.full((n,), s)
    if s.shape != (n,):
        raise ValueError(f"{what}: expected a scalar or one weight per row ({n},), got {s.shape}")
    return s


def _rows(c, d_in: int, what: str) -> jax.Array:
    c = jnp.asarray(c)
    if c.ndim != 2 or c.shape[1] != d_in:
        raise ValueError(f"{what}: expected (n, {d_in}) rows, got shape {c.shape}")
    return c


def _gram(d_in: int, C_e, s_e, C_p, s_p, lam, preserve_cov, dtype):
    """(A, C_e, s_e) with A = λI + Σ_e s_e c_e c_eᵀ + Σ_p s_p c_p c_pᵀ + P."""
    if lam < 0:
        raise ValueError(f"lam must be >= 0, got {lam}")
    C_e = _rows(C_e, d_in, "C_e").astype(dtype)
    se = _weights(s_e, C_e.shape[0], "s_e").astype(dtype)
    A = lam * jnp.eye(d_in, dtype=dtype) + (C_e * se[:, None]).T @ C_e
    if C_p is not None:
        C_p = _rows(C_p, d_in, "C_p").astype(dtype)
        A = A + (C_p * _weights(s_p, C_p.shape[0], "s_p").astype(dtype)[:, None]).T @ C_p
    if preserve_cov is not None:
        A = A + _cov(preserve_cov, d_in, dtype)
    return A, C_e, se


def _cov(P, d_in: int, dtype) -> jax.Array:
    P = jnp.asarray(P, dtype)
    if P.shape != (d_in, d_in):
        raise ValueError(f"preserve_cov: expected ({d_in}, {d_in}), got {P.shape}")
    return P


def _gain(A, C_e, se) -> jax.Array:
    """G = S_e C_e A⁻¹ (n_e × d_in), by a linear solve (A is symmetric)."""
    return jnp.linalg.solve(A, C_e.T).T * se[:, None]


def _apply(W_old, C_e, V_e, G) -> jax.Array:
    """W = W_old + (V_e − C_e W_oldᵀ)ᵀ G."""
    d_out = W_old.shape[0]
    V_e = jnp.asarray(V_e)
    if V_e.shape != (C_e.shape[0], d_out):
        raise ValueError(
            f"V_e: expected ({C_e.shape[0]}, {d_out}) (one target per row of C_e), got {V_e.shape}"
        )
    return W_old + (V_e.astype(W_old.dtype) - C_e @ W_old.T).T @ G


def ridge_edit(
    W_old, C_e, V_e, *, s_e=1.0, C_p=None, s_p=1.0, lam: float = 0.5, preserve_cov=None
) -> jax.Array:
    """The minimiser W (d_out × d_in) of the module docstring's objective.

    Args:
      W_old: (d_out, d_in) the current projection.
      C_e: (n_e, d_in) embeddings to edit; V_e: (n_e, d_out) their target values.
      s_e: scalar or (n_e,) per-row erase weights.
      C_p: optional (n_p, d_in) embeddings to preserve; s_p their weights.
      lam: λ ≥ 0, the pull towards W_old (λ = 0 needs A invertible from the rows alone).
      preserve_cov: optional (d_in, d_in) P = Σ s c cᵀ of a preserve set.
    """
    W_old = jnp.asarray(W_old)
    if W_old.ndim != 2:
        raise ValueError(f"W_old: expected (d_out, d_in), got shape {W_old.shape}")
    dtype = jnp.promote_types(W_old.dtype, jnp.float32)
    A, C_e, se = _gram(W_old.shape[1], C_e, s_e, C_p, s_p, lam, preserve_cov, dtype)
    return _apply(W_old.astype(dtype), C_e, V_e, _gain(A, C_e, se))


def ridge_objective(
    W, W_old, C_e, V_e, *, s_e=1.0, C_p=None, s_p=1.0, lam: float = 0.5, preserve_cov=None
) -> jax.Array:
    """The objective :func:`ridge_edit` minimises (for tests and diagnostics)."""
    D = W - W_old
    se = _weights(s_e, C_e.shape[0], "s_e")
    j = lam * jnp.sum(D**2) + jnp.sum(se * jnp.sum((C_e @ W.T - V_e) ** 2, -1))
    if C_p is not None:
        sp = _weights(s_p, C_p.shape[0], "s_p")
        j += jnp.sum(sp * jnp.sum((C_p @ D.T) ** 2, -1))
    if preserve_cov is not None:
        j += jnp.trace(D @ preserve_cov @ D.T)
    return j


def ridge_edit_kernel(K_old, C_e, V_e, **kw) -> jax.Array:
    """:func:`ridge_edit` for a Flax kernel K = Wᵀ (d_in × d_out); returns the new kernel."""
    return ridge_edit(jnp.asarray(K_old).T, C_e, V_e, **kw).T


def uce_default_preserve_scale(num_prompts: int) -> float:
    """``max(0.1, 1/num_prompts)``, ``num_prompts`` the retained *prompts* (the empty prompt
    included), not their token rows: the original ``train_erase.py`` default (L427–428)."""
    return max(0.1, 1.0 / max(num_prompts, 1))


def uce_preserve_scale(scale: float, num_prompts: int) -> float:
    """A config's UCE preserve scale: ``scale`` if positive, else the paper setting's
    :func:`uce_default_preserve_scale` of the retained prompt count."""
    return float(scale) if scale > 0 else uce_default_preserve_scale(num_prompts)


def uce_edit(
    kernels: Mapping[str, jax.Array],
    erase_rows,
    guide_rows,
    preserve_rows=None,
    *,
    erase_scale=1.0,
    preserve_scale=1.0,
    lam: float = 0.5,
    preserve_cov: Mapping[str, jax.Array] | jax.Array | None = None,
) -> dict:
    """UCE on every kernel of ``kernels``: erased rows take the old values of the guide's rows.

    The gain G is computed once per input width (per kernel only with per-kernel covariances).

    Args:
      kernels: name -> (d_in, d_out) kernels, e.g. all ``attn2/to_k`` and ``attn2/to_v``.
      erase_rows: c_e (n, d_in).
      guide_rows: c_guide (n, d_in), row-aligned with ``erase_rows`` (:func:`aligned_tail`); the
        targets are v*_e = W_old c_guide.
      preserve_rows: (m, d_in) rows that keep their values, or None.
      erase_scale: a scalar or (n,) row weights.
      preserve_scale: the weight of every preserved row (``uce_sd_erase.py``'s default 1; the
        paper setting's is :func:`uce_default_preserve_scale` of the prompt count).
      lam: λ.
      preserve_cov: one (d_in, d_in) matrix P shared by all kernels, or a dict per kernel name.

    Returns:
      The edited kernels by name, in at least float32.
    """
    erase_rows, guide_rows = jnp.asarray(erase_rows), jnp.asarray(guide_rows)
    if erase_rows.shape != guide_rows.shape:
        raise ValueError(
            f"erase_rows {erase_rows.shape} and guide_rows {guide_rows.shape} must "
            "be row-aligned (same shape)"
        )
    per_kernel = isinstance(preserve_cov, Mapping)
    gains, out = {}, {}
    for name, K in kernels.items():
        K = jnp.asarray(K)
        if K.ndim != 2:
            raise ValueError(f"kernels[{name!r}]: expected (d_in, d_out), got {K.shape}")
        d_in, dtype = K.shape[0], jnp.promote_types(K.dtype, jnp.float32)
        P = preserve_cov.get(name) if per_kernel else preserve_cov
        key = (d_in, name if per_kernel and P is not None else None)
        if key not in gains:
            A, C_e, se = _gram(
                d_in, erase_rows, erase_scale, preserve_rows, preserve_scale, lam, P, dtype
            )
            gains[key] = (C_e, _gain(A, C_e, se))
        C_e, G = gains[key]
        out[name] = _apply(K.T.astype(dtype), C_e, guide_rows.astype(dtype) @ K, G).T
    return out


def aligned_tail(emb_a, len_a: int, emb_b, len_b: int) -> tuple[np.ndarray, np.ndarray]:
    """Row-aligned token rows of two prompts' embeddings (L, D): from each prompt's last word
    token (index ``len − 2``, ``len`` counting SOT and EOT; the SOT itself for the empty
    prompt) to the end, both cut to the same number of rows (UCE's reference alignment). In a
    causal text encoder the EoT and padding rows after the last word all carry the whole
    prompt."""
    emb_a, emb_b = np.asarray(emb_a), np.asarray(emb_b)
    if emb_a.shape != emb_b.shape or emb_a.ndim != 2:
        raise ValueError(f"embeddings must both be (L, D); got {emb_a.shape} and {emb_b.shape}")
    L = emb_a.shape[0]
    for n, what in ((len_a, "len_a"), (len_b, "len_b")):
        if not 2 <= n <= L:
            raise ValueError(f"{what}={n}: a prompt has 2 (SOT, EOT) to {L} tokens")
    fa, fb = len_a - 2, len_b - 2
    far = max(fa, fb)
    return emb_a[fa : L - (far - fa)], emb_b[fb : L - (far - fb)]

r"""The closed-form ridge editor of cross-attention projections, and UCE built on it.

Unified Concept Editing (UCE; Gandikota, Orgad, Belinkov, Materzyńska, Bau, WACV 2024, eq. 7)
rewrites each cross-attention key/value projection W (d_out × d_in, ``y = W c``) so that erased
concept embeddings c_e map to target values v*_e while preserved embeddings c_p keep their old
values W_old c_p:

    W = argmin_W  λ‖W − W_old‖²_F + Σ_e s_e ‖W c_e − v*_e‖² + Σ_p s_p ‖W c_p − W_old c_p‖²
                  + tr((W − W_old) P (W − W_old)ᵀ)
      = (λ W_old + Σ_e s_e v*_e c_eᵀ + W_old (Σ_p s_p c_p c_pᵀ + P)) (λI + Σ_e s_e c_e c_eᵀ + Σ_p s_p c_p c_pᵀ + P)⁻¹

with per-row (per-token) weights s and an optional precomputed preservation covariance
P = Σ s c cᵀ over a large preserve set (so it is accumulated once, not per edit). The right
factor A is symmetric positive (semi)definite; W is computed as ``solve(A, Bᵀ)ᵀ``, a linear
solve, never an explicit inverse (the reference code calls ``torch.inverse``).

* UCE: v*_e = W_old c_guide, the old projection of a guide concept's embedding (the empty prompt
  by default, which makes the concept "nothing"); λ = 0.5, erase scale 1, preserve scale
  ``max(0.1, 1/|preserve|)`` (the authors' ``uce_sd_erase.py`` defaults).
* RECE's edit step and TRCE's first stage (λ = 0, EoT-token mapping) reuse :func:`ridge_edit`.

Which token rows (:func:`aligned_tail`): the reference edits with the rows of the text
embedding from the concept's *last word token* to the end of the sequence (its EoT and padding
tokens, which in a causal text encoder all carry the whole prompt), aligned with the guide's rows
from the guide's last word token, both cut to the same count.

Conventions: jaxsafe stores Linear weights as Flax kernels K = Wᵀ (d_in × d_out);
:func:`ridge_edit_kernel` and :func:`uce_edit` take and return kernels.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["aligned_tail", "ridge_edit", "ridge_edit_kernel", "ridge_objective",
           "uce_default_preserve_scale", "uce_edit"]


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


def ridge_edit(W_old, C_e, V_e, *, s_e=1.0, C_p=None, s_p=1.0, lam: float = 0.5,
               preserve_cov=None) -> jax.Array:
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
    d_out, d_in = W_old.shape
    C_e = _rows(C_e, d_in, "C_e")
    V_e = jnp.asarray(V_e)
    if V_e.shape != (C_e.shape[0], d_out):
        raise ValueError(f"V_e: expected ({C_e.shape[0]}, {d_out}) (one target per row of C_e), "
                         f"got {V_e.shape}")
    if lam < 0:
        raise ValueError(f"lam must be >= 0, got {lam}")
    dtype = jnp.promote_types(W_old.dtype, jnp.float32)
    C_e, V_e, W_old = C_e.astype(dtype), V_e.astype(dtype), W_old.astype(dtype)
    se = _weights(s_e, C_e.shape[0], "s_e").astype(dtype)
    P = jnp.zeros((d_in, d_in), dtype)
    if C_p is not None:
        C_p = _rows(C_p, d_in, "C_p").astype(dtype)
        P = P + (C_p * _weights(s_p, C_p.shape[0], "s_p").astype(dtype)[:, None]).T @ C_p
    if preserve_cov is not None:
        preserve_cov = jnp.asarray(preserve_cov, dtype)
        if preserve_cov.shape != (d_in, d_in):
            raise ValueError(f"preserve_cov: expected ({d_in}, {d_in}), got "
                             f"{preserve_cov.shape}")
        P = P + preserve_cov
    A = lam * jnp.eye(d_in, dtype=dtype) + (C_e * se[:, None]).T @ C_e + P
    B = lam * W_old + (V_e * se[:, None]).T @ C_e + W_old @ P
    return jnp.linalg.solve(A, B.T).T


def ridge_objective(W, W_old, C_e, V_e, *, s_e=1.0, C_p=None, s_p=1.0, lam: float = 0.5,
                    preserve_cov=None) -> jax.Array:
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


def uce_default_preserve_scale(num_preserve: int) -> float:
    """``max(0.1, 1/num_preserve)`` (authors' default when no scale is given)."""
    return max(0.1, 1.0 / max(num_preserve, 1))


def uce_edit(kernels: Mapping[str, jax.Array], erase_rows, guide_rows, preserve_rows=None, *,
             erase_scale=1.0, preserve_scale=None, lam: float = 0.5,
             preserve_cov: Mapping[str, jax.Array] | jax.Array | None = None) -> dict:
    """UCE on every kernel of ``kernels`` (name -> (d_in, d_out), e.g. all ``attn2/to_k`` and
    ``attn2/to_v``): c_e = ``erase_rows`` (n, d_in) map to v*_e = W_old c_guide with
    c_guide = ``guide_rows`` (n, d_in) (row-aligned, :func:`aligned_tail`), ``preserve_rows``
    (m, d_in) keep their values. ``erase_scale`` is a scalar or (n,) row weights;
    ``preserve_scale`` defaults to :func:`uce_default_preserve_scale` of the row count.
    ``preserve_cov``: one (d_in, d_in) matrix or a dict per kernel name."""
    erase_rows, guide_rows = jnp.asarray(erase_rows), jnp.asarray(guide_rows)
    if erase_rows.shape != guide_rows.shape:
        raise ValueError(f"erase_rows {erase_rows.shape} and guide_rows {guide_rows.shape} must "
                         "be row-aligned (same shape)")
    if preserve_scale is None:
        preserve_scale = uce_default_preserve_scale(
            0 if preserve_rows is None else len(preserve_rows))
    out = {}
    for name, K in kernels.items():
        P = preserve_cov.get(name) if isinstance(preserve_cov, Mapping) else preserve_cov
        out[name] = ridge_edit_kernel(K, erase_rows, guide_rows @ jnp.asarray(K), s_e=erase_scale,
                                      C_p=preserve_rows, s_p=preserve_scale, lam=lam,
                                      preserve_cov=P)
    return out


def aligned_tail(emb_a, len_a: int, emb_b, len_b: int) -> tuple[np.ndarray, np.ndarray]:
    """Row-aligned token rows of two prompts' embeddings (L, D): from each prompt's last word
    token (index ``len − 2``, ``len`` counting SOT and EOT; the SOT itself for the empty
    prompt) to the end, both cut to the same number of rows (UCE's reference alignment)."""
    emb_a, emb_b = np.asarray(emb_a), np.asarray(emb_b)
    if emb_a.shape != emb_b.shape or emb_a.ndim != 2:
        raise ValueError(f"embeddings must both be (L, D); got {emb_a.shape} and {emb_b.shape}")
    L = emb_a.shape[0]
    for n, what in ((len_a, "len_a"), (len_b, "len_b")):
        if not 2 <= n <= L:
            raise ValueError(f"{what}={n}: a prompt has 2 (SOT, EOT) to {L} tokens")
    fa, fb = len_a - 2, len_b - 2
    far = max(fa, fb)
    return emb_a[fa:L - (far - fa)], emb_b[fb:L - (far - fb)]

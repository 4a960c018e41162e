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
factor A is symmetric positive (semi)definite. Since B = W_old A + (V_e − W_old C_e)ᵀ S_e C_eᵀ
(columns of C_e as rows here), the solution is the low-rank update

    W = W_old + (V_e − C_e W_oldᵀ)ᵀ G,     G = S_e C_e A⁻¹  (n_e × d_in, one linear solve),

where A and G depend only on the embeddings, not on the layer: they are computed once and
shared by every edited projection of the same input width. The reference code instead forms B and
``torch.inverse(A)`` for each of SD's 32 key/value matrices; here there is one solve and no
explicit inverse, and an edit of SD 1.4's 32 matrices costs a few GFLOP (benchmarks/erasure.py).

* UCE: v*_e = W_old c_guide, the old projection of a guide concept's embedding (the empty prompt
  by default, which makes the concept "nothing"); λ = 0.5, erase scale 1 and, in the paper's
  setting, the empty prompt and the preserve concepts retained with all of their token rows at
  preserve scale ``max(0.1, 1/#retained prompts)`` (the authors' original ``train-scripts/train_erase.py``,
  removed in their commit 4502388: L422 ``retain_texts = ['']+preserve_concepts``, L427–428,
  L442 ``lamb=0.5``); their current ``trainscripts/uce_sd_erase.py`` uses preserve scale 1
  (L106), retains no empty prompt and one row per prompt.
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
           "uce_default_preserve_scale", "uce_edit", "uce_preserve_scale"]


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
        raise ValueError(f"V_e: expected ({C_e.shape[0]}, {d_out}) (one target per row of C_e), "
                         f"got {V_e.shape}")
    return W_old + (V_e.astype(W_old.dtype) - C_e @ W_old.T).T @ G


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
    dtype = jnp.promote_types(W_old.dtype, jnp.float32)
    A, C_e, se = _gram(W_old.shape[1], C_e, s_e, C_p, s_p, lam, preserve_cov, dtype)
    return _apply(W_old.astype(dtype), C_e, V_e, _gain(A, C_e, se))


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


def uce_default_preserve_scale(num_prompts: int) -> float:
    """``max(0.1, 1/num_prompts)``, ``num_prompts`` the retained *prompts* (the empty prompt
    included), not their token rows: the original ``train_erase.py`` default (L427–428)."""
    return max(0.1, 1.0 / max(num_prompts, 1))


def uce_preserve_scale(scale: float, num_prompts: int) -> float:
    """A config's UCE preserve scale: ``scale`` if positive, else the paper setting's
    :func:`uce_default_preserve_scale` of the retained prompt count."""
    return float(scale) if scale > 0 else uce_default_preserve_scale(num_prompts)


def uce_edit(kernels: Mapping[str, jax.Array], erase_rows, guide_rows, preserve_rows=None, *,
             erase_scale=1.0, preserve_scale=1.0, lam: float = 0.5,
             preserve_cov: Mapping[str, jax.Array] | jax.Array | None = None) -> dict:
    """UCE on every kernel of ``kernels`` (name -> (d_in, d_out), e.g. all ``attn2/to_k`` and
    ``attn2/to_v``): c_e = ``erase_rows`` (n, d_in) map to v*_e = W_old c_guide with
    c_guide = ``guide_rows`` (n, d_in) (row-aligned, :func:`aligned_tail`), ``preserve_rows``
    (m, d_in) keep their values. ``erase_scale`` is a scalar or (n,) row weights;
    ``preserve_scale`` weights every preserved row (``uce_sd_erase.py``'s default 1; the paper
    setting's is :func:`uce_default_preserve_scale` of the prompt count).
    ``preserve_cov``: one (d_in, d_in) matrix shared by all kernels, or a dict per kernel name.

    The gain G is computed once per input width (per kernel only with per-kernel covariances)."""
    erase_rows, guide_rows = jnp.asarray(erase_rows), jnp.asarray(guide_rows)
    if erase_rows.shape != guide_rows.shape:
        raise ValueError(f"erase_rows {erase_rows.shape} and guide_rows {guide_rows.shape} must "
                         "be row-aligned (same shape)")
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
            A, C_e, se = _gram(d_in, erase_rows, erase_scale, preserve_rows, preserve_scale,
                               lam, P, dtype)
            gains[key] = (C_e, _gain(A, C_e, se))
        C_e, G = gains[key]
        out[name] = _apply(K.T.astype(dtype), C_e, guide_rows.astype(dtype) @ K, G).T
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

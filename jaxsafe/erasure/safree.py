r"""SAFREE: training-free filtering of prompt embeddings away from a toxic concept subspace.

Yoon, Yu, Patil, Yao, Bansal, "SAFREE: Training-Free and Adaptive Guard for Safe Text-to-Image
and Video Generation", ICLR 2025 (arXiv:2410.12761, Sec. 3); reference code ``jaehong31/SAFREE``
(``models/modified_stable_diffusion_pipeline.py``: ``projection_matrix``, ``safree_projection``,
``projection_and_orthogonal``, ``f_beta``; ``generate_safree.py``). Nothing is trained:

(a) toxic subspace: P_C = C (CᵀC)⁻¹ Cᵀ for the pooled embeddings C ∈ R^{D×K} of K toxic
    keywords (:func:`subspace_projector`);
(b) trigger tokens: with p̄_{\i} the pooled embedding of the prompt with word token i masked
    and d_i = ‖(I − P_C) p̄_{\i}‖, token i is a trigger when d_i ≥ (1 + α) mean_{j≠i} d_j,
    α = 0.01 (:func:`trigger_tokens`);
(c) projection: with P_I the projector onto the span of the {p̄_{\i}}, the trigger tokens take
    p_proj,j = (I − P_C) P_I p_j (so P_C p_proj,j = 0 exactly), the others keep p_j;
(d) self-validating filtering: β = 1 − mean_j cos(p_proj,j, p_j) over SOT, words and EOT; the
    filtered embedding serves the denoising steps i ≤ t′ = round(γ σ(κ (10 β − τ))), γ = 10,
    κ = 5, τ = 5.333 (the reference's ``f_beta``, behind the paper's results), the original
    embedding after (:func:`svf_steps`);
(e) latent re-attention (FreeU-style, ``-lra``) is not implemented: results here are without it.

Deviations: projectors come from an SVD with a relative singular-value cut ``rtol`` (1e-6)
rather than ``torch.pinverse`` of the Gram matrix, whose cut lies below float32 resolution and
which squares the condition number of the nearly collinear masked embeddings; "pooled" is
whatever the caller's ``encode_tokens`` returns (CLIP's EOT state in the paper).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

__all__ = [
    "filter_prompts",
    "make_safree_apply",
    "make_safree_encoder",
    "masked_ids",
    "pack",
    "safree_filter",
    "select_embedding",
    "step_index",
    "subspace_projector",
    "svf_steps",
    "token_masks",
    "trigger_tokens",
    "unpack",
]


def subspace_projector(E: jax.Array, rtol: float = 1e-6) -> jax.Array:
    """The orthogonal projector (..., D, D) onto the span of the rows of ``E`` (..., K, D):
    V_r V_rᵀ from E's SVD, singular values ≤ ``rtol`` × the largest dropped (zero rows add
    nothing; an all-zero E gives 0). Equals E^T (E E^T)⁺ E, the reference's
    ``projection_matrix(E.T)``."""
    E = jnp.asarray(E)
    if E.ndim < 2:
        raise ValueError(f"E must be (..., K, D) rows spanning the subspace, got shape {E.shape}")
    _, s, vt = jnp.linalg.svd(E, full_matrices=False)
    keep = (s > rtol * s.max(axis=-1, keepdims=True)).astype(E.dtype)
    return jnp.einsum("...kd,...k,...ke->...de", vt, keep, vt)


def token_masks(lengths: jax.Array, L: int) -> tuple[jax.Array, jax.Array]:
    """``(words, attended)`` (B, L) booleans for prompts of ``lengths`` tokens counting SOT and
    EOT: word positions 1 … n−2, and attended positions 0 … n−1."""
    pos = jnp.arange(L)[None]
    n = jnp.asarray(lengths)[:, None]
    return (pos >= 1) & (pos <= n - 2), pos < n


def masked_ids(ids: jax.Array, mask_id: int = 0) -> jax.Array:
    """(B, L, L) ids: variant i is ``ids`` with position i replaced by ``mask_id`` (the
    reference masks with id 0)."""
    ids = jnp.asarray(ids)
    if ids.ndim != 2:
        raise ValueError(f"ids must be (B, L), got shape {ids.shape}")
    L = ids.shape[1]
    return jnp.where(jnp.eye(L, dtype=bool)[None], jnp.asarray(mask_id, ids.dtype), ids[:, None])


def _residual(x, P):
    """(I − P) x for row vectors x (..., D) and a symmetric projector P (D, D)."""
    return x - x @ P


def trigger_tokens(
    p_masked: jax.Array, words: jax.Array, P_C: jax.Array, alpha: float = 0.01
) -> tuple[jax.Array, jax.Array]:
    """``(m, d)``: trigger flags m (B, L) and distances d_i = ‖(I − P_C) p̄_{\\i}‖ (B, L) of the
    masked-prompt embeddings ``p_masked`` (B, L, D) (row i: token i masked); only positions
    where ``words`` is true count and can be triggers (module docstring, (b)).

    The reference keeps a token when d_i < (1 + α) mean; with a single word token the mean is
    empty and the reference's comparison with NaN flags the token, as here."""
    if p_masked.ndim != 3 or words.shape != p_masked.shape[:2]:
        raise ValueError(
            f"p_masked must be (B, L, D) and words (B, L); got {p_masked.shape} and {words.shape}"
        )
    if P_C.shape != (p_masked.shape[-1],) * 2:
        raise ValueError(f"P_C must be (D, D) with D = {p_masked.shape[-1]}, got {P_C.shape}")
    d = jnp.linalg.norm(_residual(p_masked, P_C), axis=-1)
    w = words.astype(d.dtype)
    n = w.sum(-1, keepdims=True)
    mean_others = ((d * w).sum(-1, keepdims=True) - d) / jnp.maximum(n - 1, 1)
    keep = (n > 1) & (d < (1 + alpha) * mean_others)
    return words & ~keep, d


def safree_filter(
    emb: jax.Array,
    p_masked: jax.Array,
    lengths: jax.Array,
    C: jax.Array,
    *,
    alpha: float = 0.01,
    rtol: float = 1e-6,
) -> dict:
    """Steps (a)–(d) of the module docstring for a batch of prompts.

    Args:
      emb: (B, L, D) token embeddings p (the text encoder's last hidden states).
      p_masked: (B, L, D) pooled embeddings of the masked prompts (row i: token i masked; rows
        outside the word positions are ignored).
      lengths: (B,) token counts with SOT and EOT.
      C: (K, D) pooled embeddings of the toxic keywords.
      alpha: α of the trigger test (reference: 0.01).
      rtol: relative singular-value cut of the projectors.

    Returns:
      ``{"embedding": p_safree, "projected": p_proj, "trigger": m (B, L), "distance": d (B, L),
      "beta": β (B,)}``.
    """
    emb, p_masked, C = jnp.asarray(emb), jnp.asarray(p_masked), jnp.asarray(C)
    if emb.ndim != 3 or p_masked.shape != emb.shape:
        raise ValueError(
            f"emb and p_masked must both be (B, L, D); got {emb.shape} and {p_masked.shape}"
        )
    if C.ndim != 2 or C.shape[1] != emb.shape[2]:
        raise ValueError(f"C must be (K, D) with D = {emb.shape[2]}, got {C.shape}")
    lengths = jnp.asarray(lengths)
    if lengths.shape != emb.shape[:1]:
        raise ValueError(f"lengths must be ({emb.shape[0]},), got {lengths.shape}")
    words, attended = token_masks(lengths, emb.shape[1])
    P_C = subspace_projector(C, rtol)
    P_I = subspace_projector(p_masked * words[..., None].astype(p_masked.dtype), rtol)
    m, d = trigger_tokens(p_masked, words, P_C, alpha)
    p_proj = _residual(jnp.einsum("bld,bde->ble", emb, P_I), P_C)
    p_safree = jnp.where(m[..., None], p_proj, emb)
    cos = jnp.sum(p_proj * emb, -1) / jnp.maximum(
        jnp.linalg.norm(p_proj, axis=-1) * jnp.linalg.norm(emb, axis=-1), 1e-12
    )
    a = attended.astype(cos.dtype)
    beta = 1.0 - (cos * a).sum(-1) / jnp.maximum(a.sum(-1), 1)
    return {"embedding": p_safree, "projected": p_proj, "trigger": m, "distance": d, "beta": beta}


def svf_steps(
    beta: jax.Array, gamma: float = 10.0, kappa: float = 5.0, tau: float = 5.333
) -> jax.Array:
    """t′ = round(γ σ(κ (10 β − τ))) (int32), the last 0-based denoising step that uses the
    filtered embedding (module docstring, (d); rounding half to even, as Python's ``round``)."""
    return jnp.round(gamma * jax.nn.sigmoid(kappa * (10.0 * jnp.asarray(beta) - tau))).astype(
        jnp.int32
    )


# --------------------------------------------------------------------------------------------
# Sampling: both embeddings travel together, the denoiser picks one by timestep.


def pack(filtered: jax.Array, original: jax.Array, first: jax.Array, last: jax.Array):
    """(B, 2L + 1, D): ``[filtered; original; control]``, the control row holding the first and
    last 0-based denoising step that use ``filtered`` (in its first two entries)."""
    b, _, D = filtered.shape
    if original.shape != filtered.shape or D < 2:
        raise ValueError(
            f"filtered {filtered.shape} and original {original.shape} must be equal "
            "(B, L, D) shapes with D >= 2"
        )
    control = jnp.zeros((b, 1, D), filtered.dtype)
    control = control.at[:, 0, 0].set(jnp.broadcast_to(first, (b,)).astype(filtered.dtype))
    control = control.at[:, 0, 1].set(jnp.broadcast_to(last, (b,)).astype(filtered.dtype))
    return jnp.concatenate([filtered, original, control], axis=1)


def unpack(packed: jax.Array):
    """Inverse of :func:`pack`: ``(filtered, original, first, last)``."""
    if packed.ndim != 3 or packed.shape[1] % 2 != 1:
        raise ValueError(f"packed must be (B, 2L + 1, D), got shape {packed.shape}")
    L = packed.shape[1] // 2
    return packed[:, :L], packed[:, L : 2 * L], packed[:, 2 * L, 0], packed[:, 2 * L, 1]


def step_index(t: jax.Array, timesteps: jax.Array) -> jax.Array:
    """0-based index of timestep ``t`` in the decreasing sampling sequence ``timesteps``: the
    number of its entries above t (a t between two entries maps to the later step)."""
    return jnp.sum(jnp.asarray(timesteps)[None] > jnp.asarray(t)[..., None], axis=-1)


def select_embedding(packed: jax.Array, t: jax.Array, timesteps: jax.Array) -> jax.Array:
    """(B, L, D): the filtered embedding where first ≤ step_index(t) ≤ last, else the original."""
    filtered, original, first, last = unpack(packed)
    i = step_index(jnp.broadcast_to(t, packed.shape[:1]), timesteps)
    use = (i >= first) & (i <= last)
    return jnp.where(use[:, None, None], filtered, original)


def make_safree_encoder(
    encode_tokens: Callable,
    C: jax.Array,
    *,
    alpha: float = 0.01,
    svf: bool = True,
    gamma: float = 10.0,
    kappa: float = 5.0,
    tau: float = 5.333,
    window: Sequence[int] = (-1, 1001),
    mask_id: int = 0,
    rtol: float = 1e-6,
):
    """``encode(params, ids) -> packed (B, 2L + 1, D)`` for :func:`make_safree_apply`.

    ``encode_tokens(params, ids) -> (last_hidden_state (B, L, D), pooled (B, D))`` is the text
    encoder; ``C`` (K, D) the toxic keywords' pooled embeddings. Lengths are read off the ids
    (EOT is the largest id, CLIP's pooling rule). With ``svf`` the filtered steps are 0 … t′
    (:func:`svf_steps`), otherwise the fixed ``window`` (first, last) (reference ``re_attn_t``,
    default [−1, 1001]: every step). The comparison ``i <= t′`` is the reference pipeline's, so
    t′ + 1 steps are filtered, at least one. Costs one encoder call on B·L masked prompts per
    call; masked prompts are encoded at the padded length (the reference: at the prompt's own
    length; the EOT state is the same under CLIP's causal mask).

    The packed rows ``[p_safree; p; control]`` (2L + 1 rows; the control row holds the first and
    last filtered step) let :func:`make_safree_apply`'s denoiser pick p_safree or p from the
    timestep, so a standard jitted classifier-free-guidance sampler runs SAFREE unchanged. The
    unconditional (empty) prompt is never filtered: it has no word tokens.
    """
    C = jnp.asarray(C)
    lo, hi = (int(w) for w in window)

    def encode(params, ids):
        out = filter_prompts(encode_tokens, params, ids, C, alpha=alpha, mask_id=mask_id, rtol=rtol)
        b = out["embedding"].shape[0]
        if svf:
            first, last = jnp.zeros((b,), jnp.int32), svf_steps(out["beta"], gamma, kappa, tau)
        else:
            first, last = jnp.full((b,), lo), jnp.full((b,), hi)
        return pack(out["embedding"], out["original"], first, last)

    return encode


def make_plain_encoder(encode_tokens: Callable):
    """``encode(params, ids) -> packed`` of the unfiltered embeddings, in the packed form of
    :func:`make_safree_encoder`: the negative prompt of classifier-free guidance, which the
    reference pipeline encodes without projection (``modified_stable_diffusion_pipeline.py``:
    only the prompt half of the batch is filtered)."""

    def encode(params, ids):
        emb, _ = encode_tokens(params, ids)
        zero = jnp.zeros((emb.shape[0],), jnp.int32)
        return pack(emb, emb, zero, zero)

    return encode


def filter_prompts(
    encode_tokens: Callable,
    params,
    ids: jax.Array,
    C: jax.Array,
    *,
    alpha: float = 0.01,
    mask_id: int = 0,
    rtol: float = 1e-6,
) -> dict:
    """:func:`safree_filter` of token ids (B, L) with the text encoder ``encode_tokens(params,
    ids) -> (last_hidden_state, pooled)``: the masked prompts are encoded here, lengths read off
    the ids (EOT is the largest id, CLIP's pooling rule). Adds ``"original"`` (p) and
    ``"lengths"`` to the result."""
    ids = jnp.asarray(ids)
    if ids.ndim != 2:
        raise ValueError(f"ids must be (B, L), got shape {ids.shape}")
    b, L = ids.shape
    emb, _ = encode_tokens(params, ids)
    _, pooled = encode_tokens(params, masked_ids(ids, mask_id).reshape(b * L, L))
    lengths = jnp.argmax(ids, axis=-1) + 1
    out = safree_filter(emb, pooled.reshape(b, L, -1), lengths, C, alpha=alpha, rtol=rtol)
    return {**out, "original": emb, "lengths": lengths}


def make_safree_apply(apply: Callable, timesteps: jax.Array):
    """``apply'(params, x, t, packed) = apply(params, x, t, select_embedding(packed, t, ts))``
    for the sampler's decreasing timesteps ``ts``."""
    ts = jnp.asarray(timesteps)

    def safree_apply(params, x, t, packed):
        return apply(params, x, t, select_embedding(packed, t, ts))

    return safree_apply

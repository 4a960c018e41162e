r"""TRCE: Towards Reliable Malicious Concept Erasure (Chen, Guo, Wang, Zhang, Nie, Liu, 2025).

Reference code ``ddgoodgood/TRCE`` (``run_trce_stage1.py``, ``run_trce_stage2.py``,
``config/stage{1,2}/*_default.yaml``; defaults: docs/erasure.md, "Reference defaults"). Stage 1,
[EoT] mapping (Sec. 3.2; :func:`stage1_edit`): the first [EoT] row of a causal text encoder
carries the whole prompt, so every cross-attention key/value projection is edited to give the
[EoT] rows c_m of malicious prompts the values the original W gives the rows c_s of matched safe
prompts (``closed_form.uce_edit`` with λ = 0, erase weight 1/n and preservation
P = Σ_p s_p c_p c_pᵀ; rows: :func:`mapping_rows`). Stage 2, early-step contrastive fine-tuning
(Sec. 3.3) of the self-attention layers and the cross-attention queries
(:func:`stage2_selection`) on the first ``max_early_step`` of N DDIM steps of the original
model's trajectories for c_m, with ε^± = ε*(x_t, c_±) + w (ε*(x_t, c_±) − ε*(x_t, ∅)),
c_+ = c_s and c_− = c_m:

.. math::

    L_c(\epsilon) = \max\bigl(0,\ \beta\, (\lVert \epsilon - \epsilon^+ \rVert^2
        - \lVert \epsilon - \epsilon^- \rVert^2 + m)\bigr),

    L = \tfrac12 \bigl[L_c(\epsilon_\theta(x_t, c_m))
        + L_c(\epsilon_\theta(x_t, \varnothing))\bigr]
        + \alpha\, \lVert \epsilon_\theta(x_r, \varnothing)
        - \mathrm{sg}[\epsilon_1(x_r, \varnothing)] \rVert^2,

‖·‖² averaged over the latent, ε* the original and ε₁ the stage-1 model, x_r points of the
original model's unconditional trajectories. Deviations: (i) the network sees the timestep τ_n
x_t was sampled to (the reference pairs the latent after step n with a timestep from step n's
bucket [(49−n)·20, (50−n)·20)); (ii) trajectories are sampled inside the loss by the frozen
original; (iii) the [EoT] row is found from the tokenizer's length, not by counting words.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp

from jaxsafe.diffusion import schedulers
from jaxsafe.diffusion.t2i import classifier_free_guidance
from jaxsafe.erasure import closed_form
from jaxsafe.erasure.esd import partial_sample
from jaxsafe.erasure.preservation import unconditional_drift_mse

__all__ = [
    "contrastive_hinge",
    "eot_rows",
    "guided",
    "make_trce_loss",
    "mapping_rows",
    "stage1_edit",
    "stage2_selection",
]


def eot_rows(emb: jax.Array, lengths) -> jax.Array:
    """(N, D) the first [EoT] row of each prompt's embedding ``emb`` (N, L, D); ``lengths`` (N,)
    counts the tokens with [SoT] and [EoT], so the row is ``lengths − 1``."""
    emb = jnp.asarray(emb)
    lengths = jnp.asarray(lengths)
    if emb.ndim != 3:
        raise ValueError(f"emb: expected (N, L, D) text embeddings, got shape {emb.shape}")
    if lengths.shape != emb.shape[:1]:
        raise ValueError(f"lengths: expected ({emb.shape[0]},) token counts, got {lengths.shape}")
    return jnp.take_along_axis(emb, (lengths - 1)[:, None, None].astype(jnp.int32), 1)[:, 0]


def mapping_rows(
    emb_m: jax.Array,
    len_m,
    emb_s: jax.Array,
    len_s,
    token_weights=(0.0, 1.0, 0.0, 0.0),
    keyword=None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The reference's aligned rows of N (malicious, safe) prompt pairs (``prepare_k_v``):
    [SoT] ↔ [SoT], first [EoT] ↔ first [EoT], last row ↔ last row (standing for the L − len
    padding rows after the [EoT]) and each keyword token of the malicious prompt ↔ the safe
    prompt's last row, with weights ``token_weights`` × (1, 1, L − len_m, 1)
    (``token_weight_scale`` × ``weight_base``; TRCE's configs: (0, 1, 0, 0), the [EoT] row alone).

    Args:
      emb_m, emb_s: (N, L, D) embeddings of the malicious and safe prompts; len_m, len_s: (N,)
        token counts with [SoT] and [EoT].
      token_weights: 4 weights ([SoT], [EoT], padding, keyword); 3 means no keyword slot.
      keyword: optional (N, K) positions of the keyword tokens in the malicious prompts, −1 for
        none (rows of weight 0).
    Returns:
      (C_m, C_s, s): (R·N, D), (R·N, D), (R·N,) with R = 3 + K rows per pair, pair-major.
      Zero-weight rows add nothing to the edit.
    """
    emb_m, emb_s = jnp.asarray(emb_m), jnp.asarray(emb_s)
    if emb_m.shape != emb_s.shape or emb_m.ndim != 3:
        raise ValueError(f"emb_m {emb_m.shape} and emb_s {emb_s.shape} must both be (N, L, D)")
    if len(token_weights) not in (3, 4):
        raise ValueError(
            f"token_weights: expected 3 or 4 weights ([SoT], [EoT], padding, "
            f"keyword), got {token_weights}"
        )
    w = tuple(token_weights) + (0.0,) * (4 - len(token_weights))
    n, L, d = emb_m.shape
    len_m, len_s = jnp.asarray(len_m), jnp.asarray(len_s)
    kw = jnp.full((n, 0), -1, jnp.int32) if keyword is None else jnp.asarray(keyword, jnp.int32)
    if kw.ndim != 2 or kw.shape[0] != n:
        raise ValueError(f"keyword: expected (N={n}, K) token positions, got {kw.shape}")
    rows_m = jnp.concatenate(
        [
            emb_m[:, :1],
            eot_rows(emb_m, len_m)[:, None],
            emb_m[:, -1:],
            jnp.take_along_axis(emb_m, jnp.maximum(kw, 0)[..., None], 1),
        ],
        1,
    )
    rows_s = jnp.concatenate(
        [
            emb_s[:, :1],
            eot_rows(emb_s, len_s)[:, None],
            jnp.repeat(emb_s[:, -1:], 1 + kw.shape[1], 1),
        ],
        1,
    )
    base = jnp.concatenate(
        [jnp.ones((n, 2)), (L - len_m)[:, None].astype(jnp.float32), (kw >= 0).astype(jnp.float32)],
        1,
    )
    scale = jnp.asarray(w[:3] + (w[3],) * kw.shape[1], jnp.float32)
    r = 3 + kw.shape[1]
    return rows_m.reshape(r * n, d), rows_s.reshape(r * n, d), (base * scale).reshape(r * n)


def stage1_edit(
    kernels: Mapping[str, jax.Array],
    c_m,
    c_s,
    c_p=None,
    *,
    erase_scale=None,
    preserve_scale: float = 0.01,
    lam: float = 0.0,
    preserve_cov=None,
) -> dict:
    """Stage 1 on every kernel (name -> (d_in, d_out)): malicious rows ``c_m`` (n, d_in) onto
    the current values of the safe rows ``c_s`` (n, d_in) with weights ``erase_scale`` (scalar
    or (n,); default 1/n: the reference averages over pairs), preserved rows ``c_p`` (m, d_in)
    with weight ``preserve_scale`` (a scalar or (m,) weights), λ = ``lam`` (TRCE: 0)."""
    c_m = jnp.asarray(c_m)
    if c_m.ndim != 2 or c_m.shape[0] == 0:
        raise ValueError(f"c_m: expected (n, d_in) rows with n >= 1, got shape {c_m.shape}")
    if erase_scale is None:
        erase_scale = 1.0 / c_m.shape[0]
    return closed_form.uce_edit(
        kernels,
        c_m,
        c_s,
        c_p,
        erase_scale=erase_scale,
        preserve_scale=preserve_scale,
        lam=lam,
        preserve_cov=preserve_cov,
    )


def stage2_selection(component: str = "unet") -> Callable[[str], bool]:
    """Stage 2's trained parameters: every self-attention parameter (``attn1``) and the
    cross-attention query projections (``attn2/to_q``) of ``component``."""
    prefix = f"{component}/" if component else ""

    def sel(name: str) -> bool:
        return name.startswith(prefix) and ("/attn1/" in name or "/attn2/to_q/" in name)

    return sel


def guided(eps_c: jax.Array, eps_u: jax.Array, w: float) -> jax.Array:
    """ε_c + w (ε_c − ε_∅): classifier-free guidance of scale 1 + w (TRCE's ``guidance`` w)."""
    return classifier_free_guidance(eps_u, eps_c, 1.0 + w)


def contrastive_hinge(
    pred: jax.Array,
    prefer: jax.Array,
    reject: jax.Array,
    *,
    margin: float = 0.01,
    beta: float = 1.0,
) -> tuple[jax.Array, jax.Array]:
    """(mean over the batch of max(0, β (d⁺ − d⁻ + m)), fraction of samples inside the margin),
    with d^± the per-sample mean squared distance of ``pred`` (B, ...) to ``prefer`` /
    ``reject`` (targets are not differentiated: stop-gradient)."""
    if not pred.shape == prefer.shape == reject.shape:
        raise ValueError(
            f"pred {pred.shape}, prefer {prefer.shape} and reject {reject.shape} "
            "must have the same shape"
        )
    axes = tuple(range(1, pred.ndim))
    d_pos = jnp.mean((pred - jax.lax.stop_gradient(prefer)) ** 2, axes)
    d_neg = jnp.mean((pred - jax.lax.stop_gradient(reject)) ** 2, axes)
    z = beta * (d_pos - d_neg + margin)
    return jnp.mean(jnp.maximum(z, 0.0)), jnp.mean((z > 0).astype(jnp.float32))


def make_trce_loss(
    eps_theta: Callable,
    eps_star: Callable,
    eps_start: Callable,
    sched: schedulers.SchedulerConfig,
    *,
    latent_shape,
    guidance: float = 15.0,
    margin: float = 0.01,
    beta: float = 1.0,
    preserve_scale: float = 100.0,
    max_early_step: int = 25,
    num_inference_steps: int = 50,
    sample_guidance: float = 3.0,
    batch_size: int = 1,
    reg_batch_size: int = 4,
    uncond_hinge: bool = True,
):
    """Stage 2's loss in the trainer's form ``loss_fn(params, frozen, extra, batch, rng)``.

    Batch: ``c_mal`` and ``c_safe`` (P, L, D) row-aligned prompt embeddings, ``uncond`` (≥ 1, L, D)
    the empty prompt's (its first row is used).
    Metrics: ``hinge_malicious``, ``hinge_uncond``, ``inside_margin`` (fraction of malicious
    samples with a nonzero hinge), ``drift``.

    Args:
      eps_theta: ``eps_theta(params, frozen, x_t, t, emb)``, the model being trained.
      eps_star: ``eps_star(frozen, x_t, t, emb)``, the original model (samples the trajectories,
        gives the contrastive targets).
      eps_start: ``eps_start(frozen, x_t, t, emb)``, the stage-1 model (the regulariser's target).
      sched: the scheduler config; trajectories are DDIM with ``num_inference_steps`` steps and
        CFG ``sample_guidance``; the hinge sees x_{τ_n}, n ~ U{0, …, max_early_step}.
      latent_shape: (H, W, C).
      guidance, margin, beta: w, m, β of the module docstring.
      preserve_scale: α.
      batch_size: malicious/safe pairs per step, drawn uniformly from the batch's rows.
      reg_batch_size: unconditional trajectories per step for the regulariser (0: none).
      uncond_hinge: also apply the hinge to the unconditional prediction (the reference does).
    """
    N = num_inference_steps
    if not 0 <= max_early_step < N:
        raise ValueError(
            f"max_early_step={max_early_step}: expected 0 <= max_early_step < "
            f"num_inference_steps={N}"
        )
    if batch_size < 1 or reg_batch_size < 0:
        raise ValueError(
            f"batch_size must be >= 1 and reg_batch_size >= 0, got {batch_size} and "
            f"{reg_batch_size}"
        )

    def loss_fn(params, frozen, extra, batch, rng):
        c_mal, c_safe = batch["c_mal"], batch["c_safe"]
        if c_mal.shape != c_safe.shape or c_mal.ndim != 3:
            raise ValueError(
                f"batch: c_mal {c_mal.shape} and c_safe {c_safe.shape} must be "
                "row-aligned (P, L, D) embeddings"
            )
        k_i, k_x, k_n, k_xr, k_nr = jax.random.split(rng, 5)
        b = batch_size
        idx = jax.random.randint(k_i, (b,), 0, c_mal.shape[0])
        c_m, c_s = c_mal[idx], c_safe[idx]
        uncond = batch["uncond"][:1]  # (1, L, D); a tiled batch repeats it
        u = jnp.broadcast_to(uncond, c_m.shape)
        sampler = lambda x, t, e: eps_star(frozen, x, t, e)
        n = jax.random.randint(k_n, (), 0, max_early_step + 1)
        x_t, t = partial_sample(
            sampler,
            sched,
            jax.random.normal(k_x, (b, *latent_shape)),
            c_m,
            u,
            sample_guidance,
            N,
            n,
        )
        ref = eps_star(
            frozen,
            jnp.concatenate([x_t] * 3),
            jnp.concatenate([t] * 3),
            jnp.concatenate([c_m, c_s, u]),
        )
        e_m, e_s, e_u = ref[:b], ref[b : 2 * b], ref[2 * b :]
        prefer, reject = guided(e_s, e_u, guidance), guided(e_m, e_u, guidance)
        if uncond_hinge:
            pred = eps_theta(
                params,
                frozen,
                jnp.concatenate([x_t, x_t]),
                jnp.concatenate([t, t]),
                jnp.concatenate([c_m, u]),
            )
            p_m, p_u = pred[:b], pred[b:]
        else:
            p_m = eps_theta(params, frozen, x_t, t, c_m)
        h_m, inside = contrastive_hinge(p_m, prefer, reject, margin=margin, beta=beta)
        metrics = {"hinge_malicious": h_m, "inside_margin": inside}
        loss = h_m
        if uncond_hinge:
            h_u, _ = contrastive_hinge(p_u, prefer, reject, margin=margin, beta=beta)
            loss = (h_m + h_u) / 2
            metrics["hinge_uncond"] = h_u
        if reg_batch_size:
            r = reg_batch_size
            ur = jnp.broadcast_to(uncond, (r, *c_m.shape[1:]))
            n_r = jax.random.randint(k_nr, (), 0, N)
            x_r, t_r = partial_sample(
                sampler, sched, jax.random.normal(k_xr, (r, *latent_shape)), ur, ur, 1.0, N, n_r
            )
            drift = unconditional_drift_mse(
                eps_theta(params, frozen, x_r, t_r, ur), eps_start(frozen, x_r, t_r, ur)
            )
            loss = loss + preserve_scale * drift
            metrics["drift"] = drift
        return loss, (metrics, extra)

    return loss_fn

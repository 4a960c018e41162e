r"""The score-distillation objective of the ESD family, and where its x_t come from.

Erasing Stable Diffusion (ESD; Gandikota, Materzyńska, Fiotto-Kaufman, Bau, "Erasing Concepts
from Diffusion Models", ICCV 2023, eqs. 3–5; reference ``rohitgandikota/erasing``
``train-scripts/train-esd.py``) fine-tunes ε_θ so that, conditioned on the concept c_e, it
predicts the frozen model's noise *negatively guided* away from c_e. In general form,

.. math::

    L(\theta) = \mathbb{E}_{x_t, t}\, \bigl\lVert \epsilon_\theta(x_t, c_e, t)
        - \mathrm{sg}\bigl[\epsilon^*(x_t, c_\mathrm{from}, t)
        - \eta\, \bigl(\epsilon^*(x_t, c_e, t) - \epsilon^*(x_t, \varnothing, t)\bigr)\bigr]
        \bigr\rVert^2,

ε* the frozen original. ESD proper is c_from = ∅, η = 1; an anchor concept as c_from maps c_e
onto it (SPM's erase term, AdvUnlearn's outer term); η = 0, c_from = c_e is a fixed point. x_t
(:func:`partial_sample`, ``source=`` of :func:`make_esd_loss`): ``"trained"`` (ESD) denoises
x_T ~ N(0, I) with the model being trained, guidance 3 towards c_e, for n ~ U{0, …, N−1} of
N = 50 DDIM steps (without gradient), t the timestep τ_n reached; ``"frozen"`` the same with ε*;
``"data"`` forward-noises the batch's ``z0`` at t ~ U{0, …, T−1}.

Deviation: ``train-esd.py`` (at 6eb7dc8, L226–243) queries the networks at a DDPM timestep from
[20k, 20k + 19] while its DDIM loop (which loses its first step and breaks one step early) leaves
z at the noise level of t = 20k − 39: 39–58 DDPM steps noisier than z. Here the networks see the
τ_n that z was sampled to, as the authors' later diffusers port (``esd_sd.py`` L128–129).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from jaxsafe.diffusion import schedulers
from jaxsafe.diffusion.t2i import classifier_free_guidance

__all__ = ["SOURCES", "esd_target", "make_esd_loss", "partial_sample"]

SOURCES = ("trained", "frozen", "data")

# eps(x_t, t, emb) -> prediction; t is a (B,) integer timestep.
EpsFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def esd_target(
    eps_from: jax.Array, eps_e: jax.Array, eps_uncond: jax.Array, eta: float = 1.0
) -> jax.Array:
    """ε*(c_from) − η (ε*(c_e) − ε*(∅)), the distillation target (without the stop-gradient)."""
    return eps_from - eta * (eps_e - eps_uncond)


def partial_sample(
    eps: EpsFn,
    sched: schedulers.SchedulerConfig,
    x_T: jax.Array,
    cond: jax.Array,
    uncond: jax.Array,
    guidance: float,
    num_inference_steps: int,
    n: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """``(x_{τ_n}, τ_n)``: n (traced, 0 ≤ n < N) guided DDIM steps (η = 0) from x_T, the
    timesteps ``τ = schedulers.timesteps(sched, N)``. n = 0 returns x_T itself at τ_0."""
    ts = schedulers.timesteps(sched, num_inference_steps)
    prev = schedulers.previous_timesteps(sched, "ddim", num_inference_steps)
    b = x_T.shape[0]
    emb = jnp.concatenate([jnp.broadcast_to(uncond, cond.shape), cond])

    def body(i, x):
        out = eps(jnp.concatenate([x, x]), jnp.full((2 * b,), ts[i]), emb)
        g = classifier_free_guidance(out[:b], out[b:], guidance)
        return schedulers.ddim_step(sched, g, ts[i], prev[i], x).astype(x.dtype)

    x = jax.lax.fori_loop(
        0, n, body, x_T * schedulers.init_noise_sigma(sched, "ddim", num_inference_steps)
    )
    return jax.lax.stop_gradient(x), jnp.full((b,), ts[n])


def make_esd_loss(
    eps_theta: Callable,
    eps_star: Callable,
    sched: schedulers.SchedulerConfig,
    *,
    eta: float = 1.0,
    source: str = "trained",
    start_guidance: float = 3.0,
    num_inference_steps: int = 50,
    latent_shape=None,
    embed: Callable | None = None,
):
    """The ESD-family loss in the trainer's form ``loss_fn(params, frozen, extra, batch, rng)``.

    Batch: ``c_e`` (B, L, D), ``c_from`` (B, L, D), ``uncond`` (B or 1, L, D) — or their ids,
    with ``embed`` — and ``z0`` (B, H, W, C) for ``source="data"``. Without ``c_from``
    (``ids_from``) the guide is the empty prompt, ε*(c_from) = ε*(∅), and the frozen model runs
    on two conditions, not three (ESD's own setting: its two frozen calls). Metrics:
    ``esd_target_gap`` = ‖ε*(c_e) − target‖² (how far the frozen model is from the target;
    constant in θ).

    Args:
      eps_theta: ``eps_theta(params, frozen, x_t, t, emb)``, the model being trained.
      eps_star: ``eps_star(frozen, x_t, t, emb)``, the frozen original.
      sched: the model's scheduler config (the DDIM sampler of the "trained"/"frozen" sources and
        the forward process of "data").
      eta: η, the negative-guidance scale (ESD: 1).
      source: where x_t comes from (module docstring).
      start_guidance: CFG scale of the partial sampling (ESD: 3).
      num_inference_steps: N DDIM steps of the partial sampling (ESD: 50).
      latent_shape: (H, W, C) of x_T for the sampling sources.
      embed: optional ``embed(params, frozen, ids) -> emb``: when given, the batch holds token ids
        (``ids_e``, ``ids_from``, ``ids_uncond``) and the embeddings are computed inside the loss
        (so a trained text encoder receives gradients); otherwise it holds embeddings.
    """
    if source not in SOURCES:
        raise ValueError(f"source={source!r}; expected one of {SOURCES}")
    if source != "data" and latent_shape is None:
        raise ValueError(f"source={source!r} samples x_T: latent_shape (H, W, C) is required")
    T = sched.num_train_timesteps

    def loss_fn(params, frozen, extra, batch, rng):
        guided = ("c_from" if embed is None else "ids_from") in batch
        if embed is None:
            c_e, uncond = batch["c_e"], batch["uncond"]
            c_from = batch["c_from"] if guided else None
            c_e_star = c_e
        else:
            c_e = embed(params, frozen, batch["ids_e"])
            c_e_star, uncond = (
                jax.lax.stop_gradient(embed(params, frozen, batch[k]))
                for k in ("ids_e", "ids_uncond")
            )
            c_from = (
                jax.lax.stop_gradient(embed(params, frozen, batch["ids_from"])) if guided else None
            )
        b = c_e.shape[0]
        uncond = jnp.broadcast_to(uncond, c_e.shape)
        k_n, k_x, k_t = jax.random.split(rng, 3)
        if source == "data":
            z0 = batch["z0"]
            t = jax.random.randint(k_t, (b,), 0, T)
            x_t = schedulers.add_noise(sched, z0, jax.random.normal(k_x, z0.shape), t)
        else:
            x_T = jax.random.normal(k_x, (b, *latent_shape))
            n = jax.random.randint(k_n, (), 0, num_inference_steps)
            if source == "trained":
                sampler = lambda x, t, e: eps_theta(jax.lax.stop_gradient(params), frozen, x, t, e)
            else:
                sampler = lambda x, t, e: eps_star(frozen, x, t, e)
            x_t, t = partial_sample(
                sampler,
                sched,
                x_T,
                jax.lax.stop_gradient(c_e_star),
                uncond,
                start_guidance,
                num_inference_steps,
                n,
            )
        # One batched call of the frozen model for its conditions.
        conds = [c_e_star, uncond] + ([c_from] if guided else [])
        star = eps_star(
            frozen,
            jnp.concatenate([x_t] * len(conds)),
            jnp.concatenate([t] * len(conds)),
            jnp.concatenate(conds),
        )
        e_e, e_u = star[:b], star[b : 2 * b]
        e_from = star[2 * b :] if guided else e_u
        target = jax.lax.stop_gradient(esd_target(e_from, e_e, e_u, eta))
        pred = eps_theta(params, frozen, x_t, t, c_e)
        loss = jnp.mean((pred - target) ** 2)
        return loss, ({"esd_target_gap": jnp.mean((e_e - target) ** 2)}, extra)

    return loss_fn

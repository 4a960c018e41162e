r"""Score identity Distillation (SiD): a one-step generator distilled data-free from a teacher.

Zhou, Zheng, Wang, Yin, Huang, "Score identity Distillation: Exponentially Fast Distillation of
Pretrained Diffusion Models for One-Step Generation", ICML 2024 (arXiv:2404.04057); reference
code ``mingyuanzhou/SiD`` (``training/sid_loss.py``, ``training/sid_training_loop.py``,
``sid_train.py``, ``run_sid.sh``). Three denoisers of one architecture: the frozen teacher f_φ,
the fake-score network f_ψ and the generator G_θ, the last two initialised from the teacher.
G's sample is x_g = G_θ(z, c) = D_θ(σ_init z; σ_init, c), z ~ N(0, I), σ_init = 2.5. Each
iteration takes one f_ψ step (EDM's denoising loss on stop-gradient x_g), then one G step with
x_t = x_g + σ n, σ = σ(t) EDM's sampling curve at t = u · t_max / 1000, u ~ U(0, 1),
t_max = 800, and per example

.. math::

    L_\theta = \sum_\text{pixels} (f_\phi - f_\psi) \odot
        \bigl((f_\phi - x_g) - \alpha\, (f_\phi - f_\psi)\bigr) / \omega, \qquad
    \omega = \mathrm{sg}\bigl(\mathrm{mean}\, |x_g - f_\phi|\bigr),

α = 1.2, ω floored at 1e-5, f_φ and f_ψ at (x_t; σ, c). Only ω is stop-gradient: the gradient
reaches θ through x_g and, through x_t, the inputs of the frozen f_φ and f_ψ. The generator loss
is scaled by ``lsg`` = 100; Adam β₁ = 0, β₂ = 0.999 for both networks; EMA of G. The teacher's
noise is a :class:`Kernel`: :func:`edm_kernel` (EDM, or PFGM++ of finite D, an extension) or
:func:`vp_kernel` (DDPM / latent diffusion). Deviations: docs/sfd.md, "Decisions and deviations
from the authors' code".
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxsafe.diffusion import edm, pfgmpp

__all__ = [
    "Kernel",
    "SiDTerm",
    "edm_kernel",
    "fake_score_loss",
    "generator_loss",
    "generator_sigma",
    "karras_sigma",
    "make_sid_step",
    "one_step",
    "pair_optimizer",
    "vp_kernel",
]

# denoise(params, x, sigma, cond, dropout_key or None) -> D(x; σ, cond)
Denoise = Callable[[Any, jax.Array, jax.Array, Any, Any], jax.Array]


def karras_sigma(t, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0):
    """σ(t) = (σ_max^{1/ρ} + (1 − t)(σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ: σ(0) = σ_min, σ(1) = σ_max
    (EDM's sampling curve, continuous in t; ``sid_loss.py`` ``generator_loss``)."""
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + (1 - t) * (lo - hi)) ** rho


def generator_sigma(rng, batch: int, tmax: float = 800.0, **curve) -> jax.Array:
    """The generator loss's noise levels: σ(u · t_max / 1000), u ~ U(0, 1), (batch,)."""
    return karras_sigma(jax.random.uniform(rng, (batch,)) * tmax / 1000.0, **curve)


def one_step(denoise: Denoise, params, z, cond, sigma_init: float = 2.5, key=None):
    """x_g = D(σ_init z; σ_init, cond): the one-step generator."""
    sigma = jnp.full((z.shape[0],), sigma_init, z.dtype)
    return denoise(params, sigma_init * z, sigma, cond, key)


def _sum_pixels(x):
    return jnp.sum(x, axis=tuple(range(1, x.ndim)))


def generator_loss(x_g, f_phi, f_psi, alpha: float = 1.2) -> jax.Array:
    """SiD's per-example generator loss (module docstring), summed over pixels, (B,)."""
    axes = tuple(range(1, x_g.ndim))
    omega = jax.lax.stop_gradient(
        jnp.maximum(jnp.mean(jnp.abs(x_g - f_phi), axis=axes, keepdims=True), 1e-5)
    )
    d = f_phi - f_psi
    return _sum_pixels(d * ((f_phi - x_g) - alpha * d) / omega)


def fake_score_loss(
    denoise: Denoise,
    psi,
    x_g,
    cond,
    rng,
    *,
    D=None,
    P_mean: float = -1.2,
    P_std: float = 1.2,
    sigma_data: float = edm.SIGMA_DATA,
    key=None,
):
    """The fake-score loss, (B,): EDM's (PFGM++'s for finite ``D``) denoising loss
    ``pfgmpp.denoising_loss`` of f_ψ on stop-gradient generator samples; ``key`` is f_ψ's
    dropout key."""
    return pfgmpp.denoising_loss(
        lambda x, s, c: denoise(psi, x, s, c, key),
        jax.lax.stop_gradient(x_g),
        rng,
        D=D,
        P_mean=P_mean,
        P_std=P_std,
        sigma_data=sigma_data,
        class_labels=cond,
    )


class SiDTerm(NamedTuple):
    """One batch of a step: ``cond`` for G and f_ψ, ``teacher_cond`` for f_φ, and its weight
    (SiD: one term, the teacher at the same condition, weight 1)."""

    cond: Any
    teacher_cond: Any
    weight: float = 1.0


class Kernel(NamedTuple):
    """How a teacher family adds noise, for :func:`make_sid_step`.

    ``denoise`` always predicts x₀ at the kernel's noise level (σ for EDM, the timestep for
    VP/DDPM).

    Attributes:
      generate: ``generate(denoise, G, z, cond, key)``, the one-step sample x_g.
      levels: ``levels(key, batch)``, the generator loss's noise levels.
      perturb: ``perturb(key, x, levels)``, x_t.
      fake_loss: ``fake_loss(denoise, psi, x_g, cond, key, dropout_key)``, f_ψ's per-example
        loss on stop-gradient samples.
    """

    generate: Callable
    levels: Callable
    perturb: Callable
    fake_loss: Callable


def edm_kernel(
    *,
    sigma_init: float = 2.5,
    tmax: float = 800.0,
    D=None,
    P_mean: float = -1.2,
    P_std: float = 1.2,
    sigma_data: float = edm.SIGMA_DATA,
) -> Kernel:
    """SiD's EDM / PFGM++ setting (module docstring).

    A PFGM++ teacher (augmentation dimension ``D``; None = EDM) perturbs with its own kernel in
    both losses, x_t = x_g + n, n ~ p_r(· | 0), r = σ√D (``pfgmpp.perturbation``); SiD's identity
    is derived for Gaussian perturbations (D → ∞), so a finite D is an extension of this library.
    """
    return Kernel(
        generate=lambda denoise, G, z, cond, key: one_step(denoise, G, z, cond, sigma_init, key),
        levels=lambda key, batch: generator_sigma(key, batch, tmax),
        perturb=lambda key, x, sigma: (
            x + pfgmpp.perturbation(key, x.shape, sigma.astype(x.dtype), D, dtype=x.dtype)
        ),
        fake_loss=lambda denoise, psi, x_g, cond, key, drop: fake_score_loss(
            denoise,
            psi,
            x_g,
            cond,
            key,
            D=D,
            P_mean=P_mean,
            P_std=P_std,
            sigma_data=sigma_data,
            key=drop,
        ),
    )


def vp_kernel(alphas_cumprod, *, t_init: int = 625, t_min: int = 20, t_max: int = 980) -> Kernel:
    r"""SFD's DDPM / latent-diffusion setting (``SD/training/sd_util.py`` ``sid_sd_sampler``,
    ``training_loop.py``; ``DDPM/runners/diffusion.py``): x_g = f(√(1 − ᾱ_{t_init}) z; t_init),
    the pure-noise latent of step t_init; t ~ U{t_min, …, t_max − 1} for both losses;
    x_t = √ᾱ_t x + √(1 − ᾱ_t) ε; f_ψ's loss the reference's ε-MSE ‖ε_ψ − ε‖², written on the
    x₀ prediction as ᾱ_t / (1 − ᾱ_t) · ‖f_ψ − x‖² (the same number)."""
    abar = jnp.asarray(alphas_cumprod, jnp.float32)

    def coef(t, x):
        a = abar[t].reshape((-1,) + (1,) * (x.ndim - 1)).astype(x.dtype)
        return jnp.sqrt(a), jnp.sqrt(1 - a)

    def generate(denoise, G, z, cond, key):
        t = jnp.full((z.shape[0],), t_init, jnp.int32)
        return denoise(G, jnp.sqrt(1 - abar[t_init]).astype(z.dtype) * z, t, cond, key)

    def perturb(key, x, t):
        a, b = coef(t, x)
        return a * x + b * jax.random.normal(key, x.shape, x.dtype)

    def fake_loss(denoise, psi, x_g, cond, key, drop):
        x = jax.lax.stop_gradient(x_g)
        k_t, k_n = jax.random.split(key)
        t = jax.random.randint(k_t, (x.shape[0],), t_min, t_max)
        snr = abar[t] / (1 - abar[t])
        return snr.astype(x.dtype) * _sum_pixels(
            (denoise(psi, perturb(k_n, x, t), t, cond, drop) - x) ** 2
        )

    return Kernel(
        generate=generate,
        levels=lambda key, batch: jax.random.randint(key, (batch,), t_min, t_max),
        perturb=perturb,
        fake_loss=fake_loss,
    )


def pair_optimizer(
    g: optax.GradientTransformation, psi: optax.GradientTransformation
) -> optax.GradientTransformation:
    """The optimizer state of params ``{"G", "psi"}``: ``{"G": g.init, "psi": psi.init}``.
    Its update is not used: :func:`make_sid_step` updates each network with its own."""

    def init(params):
        return {"G": g.init(params["G"]), "psi": psi.init(params["psi"])}

    def update(updates, state, params=None):
        raise NotImplementedError("G and ψ are updated one after the other by sid.make_sid_step")

    return optax.GradientTransformation(init, update)


def make_sid_step(
    denoise: Denoise,
    terms: Callable[[jax.Array], Sequence[SiDTerm]],
    *,
    g_optimizer: optax.GradientTransformation,
    psi_optimizer: optax.GradientTransformation,
    latent_shape: Sequence[int],
    batch_size: int,
    kernel: Kernel | None = None,
    alpha: float = 1.2,
    g_loss_scale: float = 100.0,
    ema_beta: Callable[[jax.Array], jax.Array] | None = None,
    generator_denoise: Denoise | None = None,
):
    """The trainer's ``step_fn(state, batch, rng)`` of SiD (and SFD).

    One f_ψ update, then one G update, each on fresh ``terms(key)`` (conditions drawn per step;
    no data is read, the batch is ignored). ``state.params = {"G", "psi"}``,
    ``state.frozen = {"teacher"}``, ``state.opt_state`` from :func:`pair_optimizer`,
    ``state.extra["ema"]`` the EMA of G. Losses are pixel sums averaged over the batch, as the
    reference's, each term's times its weight; the terms run as one concatenated batch. Keys:
    ``k_psi, k_g = split(rng)``; in each phase ``k_terms, k = split(k_phase)``, then
    ``split(k, 3)`` (f_ψ: z, loss, dropout) or ``split(k, 4)`` (G: z, level, noise, dropout).

    Args:
      denoise: ``denoise(params, x, level, cond, dropout_key)`` of f_φ and f_ψ.
      terms: ``terms(key) -> [SiDTerm, ...]``, the batches of one step.
      g_optimizer: G's optax transform.
      psi_optimizer: f_ψ's optax transform.
      latent_shape: the shape of one z.
      batch_size: samples per term.
      kernel: the teacher's noise (default :func:`edm_kernel` with SiD's settings).
      alpha: α of the generator loss.
      g_loss_scale: the generator loss's factor (the reference's ``lsg``).
      ema_beta: ``ema_beta(step)``, the decay of G's EMA; None keeps no EMA.
      generator_denoise: G's own denoiser where it differs from f_φ's and f_ψ's (SFD's text
        version guides f_φ and f_ψ, not G).
    """
    kernel = kernel or edm_kernel()
    g_denoise = generator_denoise or denoise

    def stacked(key):
        """The terms as one batch (one trace of each network per phase): the conditions
        concatenated and each row's weight, its term's weight over ``batch_size``."""
        ts = list(terms(key))
        cat = lambda xs: None if xs[0] is None else jnp.concatenate(xs)  # noqa: E731
        w = jnp.concatenate([jnp.full((batch_size,), t.weight / batch_size) for t in ts])
        return cat([t.cond for t in ts]), cat([t.teacher_cond for t in ts]), w

    def psi_loss(psi, G, key):
        k_terms, key = jax.random.split(key)
        cond, _, w = stacked(k_terms)
        k_z, k_loss, k_drop = jax.random.split(key, 3)
        z = jax.random.normal(k_z, (w.shape[0],) + tuple(latent_shape))
        x_g = kernel.generate(g_denoise, G, z, cond, None)
        return jnp.sum(w * kernel.fake_loss(denoise, psi, x_g, cond, k_loss, k_drop))

    def g_loss(G, psi, teacher, key):
        k_terms, key = jax.random.split(key)
        cond, teacher_cond, w = stacked(k_terms)
        k_z, k_sigma, k_noise, k_drop = jax.random.split(key, 4)
        z = jax.random.normal(k_z, (w.shape[0],) + tuple(latent_shape))
        x_g = kernel.generate(g_denoise, G, z, cond, k_drop)
        level = kernel.levels(k_sigma, w.shape[0])
        x_t = kernel.perturb(k_noise, x_g, level)
        f_phi = denoise(teacher, x_t, level, teacher_cond, None)
        f_psi = denoise(psi, x_t, level, cond, None)
        return g_loss_scale * jnp.sum(w * generator_loss(x_g, f_phi, f_psi, alpha))

    def step(state, batch, rng):
        del batch
        k_psi, k_g = jax.random.split(rng)
        params, opt = state.params, state.opt_state
        loss_psi, grads = jax.value_and_grad(psi_loss)(params["psi"], params["G"], k_psi)
        updates, opt_psi = psi_optimizer.update(grads, opt["psi"], params["psi"])
        psi = optax.apply_updates(params["psi"], updates)
        loss_g, grads = jax.value_and_grad(g_loss)(params["G"], psi, state.frozen["teacher"], k_g)
        updates, opt_g = g_optimizer.update(grads, opt["G"], params["G"])
        G = optax.apply_updates(params["G"], updates)
        extra = state.extra
        if ema_beta is not None:
            beta = ema_beta(state.step)
            extra = {
                **extra,
                "ema": jax.tree.map(lambda e, p: beta * e + (1 - beta) * p, extra["ema"], G),
            }
        new = state.replace(
            step=state.step + 1,
            params={"G": G, "psi": psi},
            opt_state={"G": opt_g, "psi": opt_psi},
            extra=extra,
        )
        return new, {"loss": loss_g, "loss_fake_score": loss_psi}

    return step

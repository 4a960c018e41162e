r"""SafeGen: text-agnostic erasure by fine-tuning the UNet's self-attention on image triplets.

Li, Yang, Deng, Yan, Chen, Ji, Xu, "SafeGen: Mitigating Sexually Explicit Content Generation in
Text-to-Image Models", ACM CCS 2024 (arXiv:2404.06666, Sec. 4); reference code
``LetterLiGo/SafeGen_CCS2024``, ``examples/text_to_image/train_text_to_image_adjust_sal.py``.
Only the self-attention layers (``attn1``) train, always with the empty prompt ∅, so whatever
prompt asks for it the model can no longer denoise an unsafe image. On triplets (z_u, z_m, z_n)
of latents (an unsafe image, its mosaic, an unrelated normal image), with one t ~ U{0, …, T−1}
per triplet and independent noises ε, ε_n,

.. math::

    L = \lambda_m\, \mathbb{E} \lVert \epsilon_\theta(x_t, t, \varnothing) - \epsilon_m \rVert^2
      + \lambda_p\, \mathbb{E} \lVert \epsilon_\theta(x^n_t, t, \varnothing) - \epsilon_n \rVert^2,
    \qquad x_t = \sqrt{\bar\alpha_t}\, z_u + \sqrt{1 - \bar\alpha_t}\, \epsilon,

x^n_t the same with z_n and ε_n. The mosaic target ε_m (:func:`mosaic_target`): ``"reference"``
(default, the script behind the paper's tables) ε_m = ε + (z_u − z_m), which takes the paper's
shorthand x_t = z + ε literally; ``"paper"`` ε_m = ε + √(ᾱ_t/(1−ᾱ_t)) (z_u − z_m), the noise
whose x̂_0 *is* the mosaic (jaxsafe's derivation, not in the authors' code). Kept from the
reference: the same t for the unsafe and the normal image; the preservation target is the true
noise, not the frozen model's prediction. Left out: the reference also runs the UNet on the
noised mosaic latent but never uses that prediction.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from jaxsafe.diffusion import schedulers

__all__ = ["TARGETS", "make_safegen_loss", "mosaic_target", "pixelate"]

TARGETS = ("reference", "paper")


def _coefs(sched, t, x):
    ab = schedulers.alphas_cumprod(sched)[jnp.asarray(t)]
    ab = ab.reshape(ab.shape + (1,) * (x.ndim - ab.ndim))
    return jnp.sqrt(ab), jnp.sqrt(1.0 - ab)


def mosaic_target(
    sched: schedulers.SchedulerConfig,
    z_u: jax.Array,
    z_m: jax.Array,
    noise: jax.Array,
    t: jax.Array,
    target: str = "reference",
) -> jax.Array:
    """The model-output target ε_m (or v_m, or z_m) of L_m for x_t = √ᾱ_t z_u + √(1−ᾱ_t) ε.

    ``"reference"``: the code's ``target_mosaic = latents − mos_latents + noise``,
    ε_m = ε + (z_u − z_m), whose x̂_0 = z_u − √(1−ᾱ_t)/√ᾱ_t (z_u − z_m) is the mosaic only where
    ᾱ_t = 1/2 (t = 354 of Stable Diffusion's schedule, 258 of the test bed's linear one), short
    of it at lower noise and past it at higher noise. ``"paper"``: the noise that carries z_m to
    the same x_t, ε_m = (x_t − √ᾱ_t z_m)/√(1−ᾱ_t) = ε + √(ᾱ_t/(1−ᾱ_t)) (z_u − z_m), so that
    x̂_0 = z_m; in ε-units an SNR-weighted x_0 loss, ᾱ_t/(1−ᾱ_t) ‖x̂_0 − z_m‖², large at small t
    (√(ᾱ/(1−ᾱ)) reaches 100 at t = 0 of a linear 1e-4 schedule, 34 for Stable Diffusion's; the
    reference's gradient clipping keeps the steps bounded). v-prediction: ``"paper"``
    v_m = √ᾱ_t ε_m − √(1−ᾱ_t) z_m, ``"reference"`` the code's
    ``get_velocity(latents − mos_latents, noise, t)`` = √ᾱ_t ε − √(1−ᾱ_t)(z_u − z_m); sample
    prediction (the target z_m itself) for ``"paper"`` only.

    Args:
      sched: the scheduler config (ᾱ_t and the prediction type).
      z_u: (B, ...) unsafe latents.
      z_m: (B, ...) their mosaics' latents.
      noise: (B, ...) the noise ε of x_t.
      t: (B,) timesteps.
      target: ``"reference"`` or ``"paper"``.
    """
    if target not in TARGETS:
        raise ValueError(f"target={target!r}; expected one of {TARGETS}")
    if z_u.shape != z_m.shape or z_u.shape != noise.shape:
        raise ValueError(
            f"z_u {z_u.shape}, z_m {z_m.shape} and noise {noise.shape} must have the same shape"
        )
    kind = sched.prediction_type
    a, s = _coefs(sched, t, z_u)
    if target == "reference":
        if kind == "epsilon":
            return noise + (z_u - z_m)
        if kind == "v_prediction":
            return a * noise - s * (z_u - z_m)
        raise ValueError(
            f"target='reference' exists for epsilon and v_prediction models only, "
            f"not prediction_type={kind!r}"
        )
    eps_m = noise + (a / s) * (z_u - z_m)  # = (x_t − √ᾱ z_m)/√(1−ᾱ)
    if kind == "epsilon":
        return eps_m
    if kind == "v_prediction":
        return a * eps_m - s * z_m
    return z_m


def _clean_target(sched, z0, noise, t):
    """The ordinary training target of x_t = √ᾱ z0 + √(1−ᾱ) ε for the model's prediction type."""
    if sched.prediction_type == "epsilon":
        return noise
    if sched.prediction_type == "v_prediction":
        return schedulers.velocity(sched, z0, noise, t)
    return z0


def pixelate(images: jax.Array, block: int) -> jax.Array:
    """Block mosaic: every ``block × block`` tile of (N, H, W, C) images replaced by its mean
    (H and W must be multiples of ``block``). The censoring operator of the test-bed triplets."""
    n, h, w, c = images.shape
    if block < 1 or h % block or w % block:
        raise ValueError(f"block={block} must be a positive divisor of the image size {(h, w)}")
    m = images.reshape(n, h // block, block, w // block, block, c).mean(axis=(2, 4))
    return jnp.repeat(jnp.repeat(m, block, axis=1), block, axis=2)


def make_safegen_loss(
    eps_theta: Callable,
    sched: schedulers.SchedulerConfig,
    *,
    weight_mosaic: float = 0.1,
    weight_preserve: float = 0.9,
    target: str = "reference",
    batch_size: int | None = None,
):
    """L = λ_m L_m + λ_p L_p (module docstring) as ``loss_fn(params, frozen, extra, batch, rng)``.

    Batch: ``z_unsafe`` and ``z_mosaic`` (N, H, W, C) paired rows, ``z_normal`` (M, H, W, C),
    ``uncond`` (1, L, D) the empty prompt's embedding (or copies of it). Metrics:
    ``mosaic_loss`` L_m, ``preserve_loss`` L_p.

    Args:
      eps_theta: ``eps_theta(params, frozen, x_t, t, emb)``, the model being trained.
      sched: the model's scheduler config (forward process and prediction type).
      weight_mosaic, weight_preserve: λ_m, λ_p (reference run script: 0.1 and 0.9).
      target: ε_m's form, ``"reference"`` (the authors' code) or ``"paper"`` (module docstring).
      batch_size: when given, each step draws this many triplets (and as many normal images)
        uniformly with replacement from the pools in the batch; otherwise the whole batch is used.
    """
    if target not in TARGETS:
        raise ValueError(f"target={target!r}; expected one of {TARGETS}")
    if target == "reference" and sched.prediction_type == "sample":
        raise ValueError("target='reference' exists for epsilon and v_prediction models only")
    T = sched.num_train_timesteps

    def loss_fn(params, frozen, extra, batch, rng):
        z_u, z_m, z_n = batch["z_unsafe"], batch["z_mosaic"], batch["z_normal"]
        if z_u.shape != z_m.shape:
            raise ValueError(
                f"z_unsafe {z_u.shape} and z_mosaic {z_m.shape} must be paired rows of one shape"
            )
        if z_n.shape[1:] != z_u.shape[1:]:
            raise ValueError(f"z_normal {z_n.shape} must have latents of shape {z_u.shape[1:]}")
        k_i, k_j, k_t, k_e, k_n = jax.random.split(rng, 5)
        if batch_size is not None:
            i = jax.random.randint(k_i, (batch_size,), 0, z_u.shape[0])
            j = jax.random.randint(k_j, (batch_size,), 0, z_n.shape[0])
            z_u, z_m, z_n = z_u[i], z_m[i], z_n[j]
        elif z_n.shape[0] != z_u.shape[0]:
            raise ValueError(
                f"without batch_size, z_normal needs one row per triplet "
                f"({z_u.shape[0]}), got {z_n.shape[0]}"
            )
        b = z_u.shape[0]
        t = jax.random.randint(k_t, (b,), 0, T)
        eps, eps_n = jax.random.normal(k_e, z_u.shape), jax.random.normal(k_n, z_n.shape)
        x_t = schedulers.add_noise(sched, z_u, eps, t)
        x_n = schedulers.add_noise(sched, z_n, eps_n, t)
        uncond = batch["uncond"][:1]  # (k, L, D) copies when tiled to a mesh's batch shards
        emb = jnp.broadcast_to(uncond, (2 * b, *uncond.shape[1:]))
        pred = eps_theta(params, frozen, jnp.concatenate([x_t, x_n]), jnp.concatenate([t, t]), emb)
        target_m = jax.lax.stop_gradient(mosaic_target(sched, z_u, z_m, eps, t, target))
        target_p = _clean_target(sched, z_n, eps_n, t)
        l_m = jnp.mean((pred[:b] - target_m) ** 2)
        l_p = jnp.mean((pred[b:] - target_p) ** 2)
        loss = weight_mosaic * l_m + weight_preserve * l_p
        return loss, ({"mosaic_loss": l_m, "preserve_loss": l_p}, extra)

    return loss_fn

r"""PFGM++: the perturbation kernel for any augmentation dimension D, its prior and its loss.

Xu, Liu, Tian, Tong, Tegmark & Jaakkola, "PFGM++: Unlocking the Potential of Physics-Inspired
Generative Models", ICML 2023 (arXiv:2302.04265), Sec. 4; reference code ``Newbeeer/pfgmpp``
(``training/loss.py::EDMLoss(pfgmv2=True)``, ``generate.py::rand_beta_prime``). N-dimensional
data y is perturbed with the kernel

.. math::

    p_r(\tilde x \mid y) \propto \bigl(\lVert \tilde x - y \rVert^2 + r^2\bigr)^{-(N+D)/2},
    \qquad r = \sigma \sqrt{D},

the alignment that lets PFGM++ reuse EDM's σ schedule, conditioning and loss weight. It is
sampled as the paper does: R = ‖x̃ − y‖ = r √(B / (1 − B)), B ~ Beta(N/2, D/2), times a direction
uniform on the unit sphere (equivalently a multivariate Student-t with D degrees of freedom and
scale σ); D = None (or inf) selects EDM's n = σ ε, the D → ∞ limit. The objective is EDM's with
this noise, L = E_{σ, y, x̃ ~ p_r(· | y)} λ(σ) ‖D_θ(x̃; σ) − y‖². Generation starts from the kernel
centred at 0 at σ_max and integrates EDM's ODE dx/dσ = (x − D(x; σ)) / σ, which PFGM++'s
dx/dr = E[x − y | x̃] / r becomes with r = σ√D (:mod:`jaxsafe.diffusion.samplers`).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jaxsafe.diffusion.edm import (
    SIGMA_DATA,
    _per_pixel,
    as_batch_sigma,
    loss_weight,
    sample_training_sigma,
)

__all__ = [
    "check_D",
    "denoising_loss",
    "perturbation",
    "perturbation_student_t",
    "prior_sample",
    "r_from_sigma",
]


def check_D(D):
    """Returns D as a float, or None for D = ∞ (EDM's Gaussian kernel); refuses anything else."""
    if D is None:
        return None
    msg = f"D must be a static positive number, None or float('inf') (D -> inf is EDM), got {D!r}."
    try:
        D = float(D)
    except (
        TypeError,
        ValueError,
    ):  # includes a traced D: it sets array shapes, so it must be static
        raise ValueError(msg) from None
    if math.isinf(D) and D > 0:
        return None
    if not (math.isfinite(D) and D > 0):
        raise ValueError(msg)
    return D


def r_from_sigma(sigma, D):
    """r = σ √D: PFGM++'s alignment of the augmented radius r with EDM's noise level σ."""
    D = check_D(D)
    if D is None:
        raise ValueError(
            "r = sigma * sqrt(D) is infinite for D=None/inf; the kernel is then N(0, sigma^2 I)."
        )
    return jnp.asarray(sigma, dtype=jnp.result_type(sigma, float)) * math.sqrt(D)


def _check_shape(shape):
    shape = tuple(int(s) for s in shape)
    if len(shape) < 2 or min(shape) < 1:
        raise ValueError(f"shape must be (B, ...) with at least one data axis, got {shape}.")
    return shape, math.prod(shape[1:])


def perturbation(rng, shape, sigma, D=None, *, dtype=None):
    """n with x̃ = y + n ~ p_r(x̃ | y), r = σ√D: R = r √(B/(1−B)) times a uniform direction.

    B ~ Beta(N/2, D/2) is drawn as G_a / (G_a + G_b), G_a ~ Gamma(N/2), G_b ~ Gamma(D/2), which
    is how `jax.random.beta` draws it; the odds B / (1 − B) = G_a / G_b are formed in log space
    rather than from B itself, because 1 − B ≈ D / N cancels catastrophically in float32 for
    small D and large N (the reference computes B in float32 and the odds in float64).

    Args:
      rng: a PRNG key. For D = None/inf the result is exactly σ · jax.random.normal(rng, shape).
      shape: (B, ...); N = prod(shape[1:]) is the data dimension.
      sigma: (B,) noise levels, or a scalar.
      D: augmentation dimension (> 0), or None / float('inf') for EDM's Gaussian.
    """
    shape, N = _check_shape(shape)
    D = check_D(D)
    dtype = jnp.dtype(dtype) if dtype is not None else jnp.result_type(float)
    sigma = _per_pixel(as_batch_sigma(sigma, shape[0], dtype), len(shape))
    if D is None:
        return sigma * jax.random.normal(rng, shape, dtype)
    k_dir, k_a, k_b = jax.random.split(rng, 3)
    log_odds = jax.random.loggamma(k_a, N / 2, (shape[0],), dtype) - jax.random.loggamma(
        k_b, D / 2, (shape[0],), dtype
    )
    R = sigma * math.sqrt(D) * _per_pixel(jnp.exp(0.5 * log_odds), len(shape))
    z = jax.random.normal(k_dir, shape, dtype)
    axes = tuple(range(1, len(shape)))
    return R * z * jax.lax.rsqrt(jnp.sum(z**2, axis=axes, keepdims=True))


def perturbation_student_t(rng, shape, sigma, D, *, dtype=None):
    """The same kernel as a multivariate Student-t: n = σ z √(D / g), z ~ N(0, I_N), g ~ χ²_D.

    Its density ∝ (1 + ‖n‖² / (D σ²))^{−(N+D)/2} ∝ (‖n‖² + r²)^{−(N+D)/2} with r² = D σ².
    An independent construction of `perturbation`, used to cross-check it; D = None/inf gives σ z.
    """
    shape, _ = _check_shape(shape)
    D = check_D(D)
    dtype = jnp.dtype(dtype) if dtype is not None else jnp.result_type(float)
    sigma = _per_pixel(as_batch_sigma(sigma, shape[0], dtype), len(shape))
    if D is None:
        return sigma * jax.random.normal(rng, shape, dtype)
    k_z, k_g = jax.random.split(rng)
    g = 2 * jax.random.gamma(k_g, D / 2, (shape[0],), dtype)  # χ²_D = 2 Gamma(D/2)
    return sigma * jax.random.normal(k_z, shape, dtype) * _per_pixel(jnp.sqrt(D / g), len(shape))


def prior_sample(rng, shape, sigma_max, D=None, *, dtype=None):
    """x_{σ_max} ~ p_{r_max}(· | 0): the generation prior, the kernel centred at 0 at σ_max.

    D = None/inf gives σ_max ε, EDM's latents already multiplied by σ_max (the samplers take the
    prior sample itself, not unit noise).
    """
    shape, _ = _check_shape(shape)
    return perturbation(rng, shape, sigma_max, D, dtype=dtype)


def denoising_loss(
    denoiser,
    y,
    rng,
    *,
    D=None,
    P_mean: float = -1.2,
    P_std: float = 1.2,
    sigma_data: float = SIGMA_DATA,
    class_labels=None,
):
    """Per-example λ(σ) Σ_pixels (D_θ(y + n; σ) − y)², shape (B,); its batch mean is the loss.

    ln σ ~ N(P_mean, P_std²), n ~ p_r(· | 0) with r = σ√D (Gaussian σ ε for D = None), and the
    network conditioned on σ, as in PFGM++'s `EDMLoss(pfgmv2=True)`. EDM's `EDMLoss` returns the
    per-pixel weighted error; its training loop backpropagates `loss.sum() / batch_gpu_total` on
    each GPU and DDP averages over GPUs, i.e. the pixel sum averaged over the global batch: the
    mean of this function's output.

    Args:
      denoiser: `denoiser(x, sigma, class_labels) -> D(x; σ)` with sigma of shape (B,), e.g.
        `lambda x, s, c: edm.denoise(F, x, s, c)`.
      y: clean data, (B, ...).
      rng: split into (key for σ, key for n).
    """
    y = jnp.asarray(y)
    shape, _ = _check_shape(y.shape)
    k_sigma, k_n = jax.random.split(rng)
    sigma = sample_training_sigma(k_sigma, shape[0], P_mean, P_std, dtype=y.dtype)
    n = perturbation(k_n, shape, sigma, D, dtype=y.dtype)
    D_yn = denoiser(y + n, sigma, class_labels)
    if D_yn.shape != y.shape:
        raise ValueError(f"denoiser must return an array of y's shape {y.shape}, got {D_yn.shape}.")
    return loss_weight(sigma, sigma_data) * jnp.sum((D_yn - y) ** 2, axis=tuple(range(1, y.ndim)))

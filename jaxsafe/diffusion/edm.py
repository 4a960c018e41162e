r"""EDM: preconditioning, training noise levels, loss weight and the sampling schedule.

Karras, Aittala, Aila & Laine, "Elucidating the Design Space of Diffusion-Based Generative
Models", NeurIPS 2022 (arXiv:2206.00364), Table 1 and App. B.6; reference code ``NVlabs/edm``
(``training/networks.py::EDMPrecond``, ``training/loss.py::EDMLoss``, ``generate.py``). A raw
network F_θ is wrapped into the denoiser (σ_d = 0.5)

.. math::

    D_\theta(x; \sigma) = c_\mathrm{skip}\, x
        + c_\mathrm{out}\, F_\theta(c_\mathrm{in}\, x;\ c_\mathrm{noise}), \quad
    c_\mathrm{skip} = \frac{\sigma_d^2}{\sigma^2 + \sigma_d^2}, \quad
    c_\mathrm{out} = \frac{\sigma \sigma_d}{\sqrt{\sigma^2 + \sigma_d^2}}, \quad
    c_\mathrm{in} = \frac{1}{\sqrt{\sigma^2 + \sigma_d^2}}, \quad
    c_\mathrm{noise} = \frac{\ln\sigma}{4},

which makes the network's input and effective target unit-variance (App. B.6). Training draws
ln σ ~ N(−1.2, 1.2²) and weights the squared error by λ(σ) = 1 / c_out(σ)²; sampling uses
σ_i = (σ_max^{1/ρ} + i/(N − 1) (σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ for i < N and σ_N = 0 (Eq. 5;
N = 18, ρ = 7, σ_min = 0.002, σ_max = 80 for CIFAR-10).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

__all__ = [
    "SIGMA_DATA",
    "as_batch_sigma",
    "denoise",
    "edm_sigma_steps",
    "ema_beta",
    "ema_update",
    "loss_weight",
    "lr_schedule",
    "nan_to_num_grads",
    "precondition",
    "sample_training_sigma",
]

SIGMA_DATA = 0.5


def _float_dtype(dtype=None):
    return jnp.dtype(dtype) if dtype is not None else jnp.result_type(float)


def as_batch_sigma(sigma, batch: int, dtype=None):
    """Returns σ as a (batch,) array: a scalar is broadcast, a (batch,) array is kept.

    Every diffusion function takes one noise level per example; anything else is a caller bug
    (e.g. a (B, 1, 1, 1) σ in the reference PyTorch layout), so it is refused by name.
    """
    sigma = jnp.asarray(sigma, dtype=_float_dtype(dtype))
    if sigma.ndim == 0:
        return jnp.broadcast_to(sigma, (batch,))
    if sigma.shape != (batch,):
        raise ValueError(
            f"sigma must be a scalar or have shape ({batch},) (one per example), got {sigma.shape}."
        )
    return sigma


def _per_pixel(c, ndim: int):
    """(B,) -> (B, 1, ..., 1) so a per-example coefficient broadcasts over an NHWC batch."""
    return c.reshape(c.shape + (1,) * (ndim - 1))


def precondition(sigma, sigma_data: float = SIGMA_DATA):
    """(c_skip, c_out, c_in, c_noise) of EDM (Karras et al., 2022, Table 1), elementwise in σ."""
    sigma = jnp.asarray(sigma, dtype=jnp.result_type(sigma, float))
    s2 = sigma**2 + sigma_data**2
    c_skip = sigma_data**2 / s2
    c_out = sigma * sigma_data * jax.lax.rsqrt(s2)
    c_in = jax.lax.rsqrt(s2)
    c_noise = jnp.log(sigma) / 4
    return c_skip, c_out, c_in, c_noise


def denoise(F, x, sigma, class_labels=None, *, sigma_data: float = SIGMA_DATA):
    """D(x; σ) = c_skip x + c_out F(c_in x, c_noise, class_labels) (Karras et al., 2022, Eq. 7).

    Args:
      F: the raw network, `F(x_in, c_noise, class_labels) -> array of x's shape`; c_noise has
        shape (B,) as in EDM's `EDMPrecond`, which flattens it before calling the U-Net.
      x: noisy images, (B, H, W, C) or any (B, ...) layout.
      sigma: noise level per example, (B,) or a scalar.
    """
    x = jnp.asarray(x)
    if x.ndim < 1:
        raise ValueError(f"x must have a batch axis, got shape {x.shape}.")
    sigma = as_batch_sigma(sigma, x.shape[0], jnp.result_type(x.dtype, float))
    c_skip, c_out, c_in, c_noise = precondition(sigma, sigma_data)
    F_x = F(_per_pixel(c_in, x.ndim) * x, c_noise, class_labels)
    if F_x.shape != x.shape:
        raise ValueError(f"F must return an array of x's shape {x.shape}, got {F_x.shape}.")
    return _per_pixel(c_skip, x.ndim) * x + _per_pixel(c_out, x.ndim) * F_x


def sample_training_sigma(rng, batch: int, P_mean: float = -1.2, P_std: float = 1.2, *, dtype=None):
    """σ = exp(P_mean + P_std ε), ε ~ N(0, 1): EDM's log-normal training noise levels, (batch,)."""
    eps = jax.random.normal(rng, (batch,), dtype=_float_dtype(dtype))
    return jnp.exp(P_mean + P_std * eps)


def loss_weight(sigma, sigma_data: float = SIGMA_DATA):
    """λ(σ) = (σ² + σ_d²) / (σ σ_d)², which equals 1 / c_out(σ)² (Karras et al., 2022, Table 1)."""
    sigma = jnp.asarray(sigma, dtype=jnp.result_type(sigma, float))
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


def edm_sigma_steps(
    num_steps: int = 18,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
    *,
    dtype=None,
):
    """EDM's sampling noise levels σ_0 = σ_max > ... > σ_{N-1} = σ_min, then σ_N = 0 (Eq. 5).

    Evaluated in NumPy float64 (as EDM does in torch.float64) and only then cast, so the schedule
    is the same whatever precision the sampler runs in. For num_steps = 1 the single level is
    σ_max (the formula's i / (N − 1) is 0/0 there).
    """
    if not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
        raise ValueError(f"num_steps must be an integer >= 1, got {num_steps!r}.")
    if not 0 < sigma_min < sigma_max:
        raise ValueError(
            f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}."
        )
    if not rho > 0:
        raise ValueError(f"rho must be > 0, got {rho}.")
    i = np.arange(num_steps, dtype=np.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    t = (hi + i / max(num_steps - 1, 1) * (lo - hi)) ** rho
    t = np.concatenate([t, [0.0]])
    return jnp.asarray(t, dtype=_float_dtype(dtype))


# ---------------------------------------------------------------------------------------------
# The schedules of EDM's training loop (training/training_loop.py)


def ema_beta(step, batch_size: int, halflife_kimg: float, rampup_ratio: float | None):
    """β_t = 0.5^(B / max(h_t, 1e-8)), h_t = min(halflife_kimg·1000, t·B·rampup_ratio)."""
    h = jnp.asarray(halflife_kimg * 1000.0, jnp.float32)
    if rampup_ratio is not None:
        h = jnp.minimum(h, jnp.asarray(step, jnp.float32) * batch_size * rampup_ratio)
    return 0.5 ** (batch_size / jnp.maximum(h, 1e-8))


def ema_update(ema, params, beta):
    """θ_ema ← β θ_ema + (1 − β) θ (EDM's `p_net.lerp(p_ema, β)`)."""
    return jax.tree.map(lambda e, p: (p + beta * (e - p)).astype(e.dtype), ema, params)


def lr_schedule(lr: float, batch_size: int, rampup_kimg: float):
    """optax schedule of the update count t: lr · min(t B / max(rampup_kimg·1000, 1e-8), 1)."""

    def schedule(count):
        nimg = jnp.asarray(count, jnp.float32) * batch_size
        return lr * jnp.minimum(nimg / max(rampup_kimg * 1000.0, 1e-8), 1.0)

    return schedule


def nan_to_num_grads() -> optax.GradientTransformation:
    """EDM's nan_to_num(nan=0, posinf=1e5, neginf=-1e5) on every gradient entry."""
    return optax.stateless(
        lambda g, _: jax.tree.map(lambda x: jnp.nan_to_num(x, nan=0.0, posinf=1e5, neginf=-1e5), g)
    )

r"""EDM's Heun sampler (with optional churn) and an Euler sampler, for EDM and PFGM++ alike.

Karras et al., "Elucidating the Design Space of Diffusion-Based Generative Models", NeurIPS 2022,
Algorithm 2 (reference ``NVlabs/edm`` ``generate.py::edm_sampler``). The probability-flow ODE
dx/dσ = (x − D(x; σ)) / σ is integrated from σ_0 = σ_max down the schedule of
:func:`jaxsafe.diffusion.edm.edm_sigma_steps` to σ_N = 0. At step i, with
γ_i = min(S_churn / N, √2 − 1) if S_min ≤ σ_i ≤ S_max else 0, and ε ~ N(0, I):

.. math::

    \hat\sigma = \sigma_i (1 + \gamma_i), \quad
    \hat x = x_i + \sqrt{\hat\sigma^2 - \sigma_i^2}\; S_\mathrm{noise}\, \epsilon, \quad
    d = \frac{\hat x - D(\hat x; \hat\sigma)}{\hat\sigma}, \quad
    \tilde x = \hat x + (\sigma_{i+1} - \hat\sigma)\, d,

    x_{i+1} = \hat x + (\sigma_{i+1} - \hat\sigma)\, \tfrac12 (d + d'), \qquad
    d' = \frac{\tilde x - D(\tilde x; \sigma_{i+1})}{\sigma_{i+1}},

with the last step, to σ = 0, plain Euler (x_N = x̃): N steps cost 2N − 1 denoiser evaluations.
PFGM++ (Xu et al., ICML 2023; ``Newbeeer/pfgmpp`` ``generate.py``) uses the same sampler for
every D: its ODE dx/dr = (x − D(x; σ)) / r is this one with r = σ√D, so only the prior (pass
``pfgmpp.prior_sample(..., D)`` as ``latents``) and the trained denoiser differ. The whole run is
one ``lax.fori_loop``, so ``jax.jit`` compiles it once.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jaxsafe.diffusion.edm import edm_sigma_steps

__all__ = ["euler_sampler", "heun_sampler"]

# Caps the churn so the noise level grows by at most a factor √2 per step (EDM Alg. 2).
MAX_CHURN_GAMMA = math.sqrt(2) - 1


def _is_nonzero(v) -> bool:
    """Whether a hyper-parameter switches a random option on; a traced value counts as on."""
    try:
        return float(v) != 0.0
    except (TypeError, jax.errors.ConcretizationTypeError):
        return True


def _sampling_dtype(dtype, latents):
    dtype = jnp.dtype(dtype) if dtype is not None else jnp.asarray(latents).dtype
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"dtype must be a floating dtype, got {dtype}.")
    if dtype == jnp.float64 and not jax.config.jax_enable_x64:
        raise ValueError(
            "dtype=float64 needs x64 enabled: call jax.config.update('jax_enable_x64', True) "
            "or set JAX_ENABLE_X64=1 (otherwise JAX silently samples in float32)."
        )
    return dtype


def _guided_denoiser(denoiser, class_labels, guidance, batch, dtype):
    def call(x, sigma, labels):
        out = denoiser(x, jnp.full((batch,), sigma, dtype), labels)
        if out.shape != x.shape:
            raise ValueError(
                f"denoiser must return an array of the latents' shape {x.shape}, got {out.shape}."
            )
        return out.astype(dtype)

    if guidance is None:
        return lambda x, sigma: call(x, sigma, class_labels)
    if class_labels is None:
        raise ValueError("guidance (classifier-free) needs class_labels; got class_labels=None.")

    def guided(x, sigma):
        return (1 - guidance) * call(x, sigma, None) + guidance * call(x, sigma, class_labels)

    return guided


def _sample(
    denoiser,
    latents,
    *,
    heun,
    num_steps,
    sigma_min,
    sigma_max,
    rho,
    S_churn,
    S_min,
    S_max,
    S_noise,
    class_labels,
    guidance,
    noise_injection_alpha,
    rng,
    dtype,
):
    latents = jnp.asarray(latents)
    if latents.ndim < 1:
        raise ValueError(f"latents must have a batch axis (B, ...), got shape {latents.shape}.")
    dtype = _sampling_dtype(dtype, latents)
    batch = latents.shape[0]
    if class_labels is not None and jnp.shape(class_labels)[:1] != (batch,):
        raise ValueError(
            f"class_labels must have leading dimension {batch}, "
            f"got shape {jnp.shape(class_labels)}."
        )
    churn, inject = _is_nonzero(S_churn), _is_nonzero(noise_injection_alpha)
    if (churn or inject) and rng is None:
        raise ValueError(
            "rng is required when S_churn > 0 or noise_injection_alpha > 0; got rng=None."
        )

    t = edm_sigma_steps(num_steps, sigma_min, sigma_max, rho, dtype=dtype)
    in_window = (S_min <= t[:-1]) & (t[:-1] <= S_max)
    gamma = jnp.where(in_window, jnp.minimum(S_churn / num_steps, MAX_CHURN_GAMMA), 0)
    D = _guided_denoiser(denoiser, class_labels, guidance, batch, dtype)

    def step(i, x, second_order):
        t_cur, t_next = t[i], t[i + 1]
        if churn or inject:
            k_inject, k_churn = jax.random.split(jax.random.fold_in(rng, i))
        if inject:
            x = x + noise_injection_alpha * t_cur * jax.random.normal(k_inject, x.shape, dtype)
        t_hat, x_hat = t_cur, x
        if churn:
            t_hat = t_cur + gamma[i] * t_cur
            # √(σ̂² − σ²) = σ √(γ (2 + γ)): no cancellation (a fused σ̂² − σ² can round below 0
            # at γ = 0).
            std = t_cur * jnp.sqrt(gamma[i] * (2 + gamma[i]))
            x_hat = x + std * S_noise * jax.random.normal(k_churn, x.shape, dtype)
        d_cur = (x_hat - D(x_hat, t_hat)) / t_hat
        x_next = x_hat + (t_next - t_hat) * d_cur
        if second_order:
            d_prime = (x_next - D(x_next, t_next)) / t_next
            x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
        return x_next

    x = jax.lax.fori_loop(0, num_steps - 1, lambda i, x: step(i, x, heun), latents.astype(dtype))
    return step(num_steps - 1, x, False)


def heun_sampler(
    denoiser,
    latents,
    *,
    num_steps: int = 18,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
    S_churn: float = 0.0,
    S_min: float = 0.0,
    S_max: float = float("inf"),
    S_noise: float = 1.0,
    class_labels=None,
    guidance=None,
    noise_injection_alpha: float = 0.0,
    rng=None,
    dtype=None,
):
    """EDM Algorithm 2: Heun steps with an Euler last step, optional churn; returns x at σ = 0.

    Args:
      denoiser: `denoiser(x, sigma, class_labels) -> D(x; σ)`, sigma of shape (B,).
      latents: the prior sample at σ_max, (B, ...): `sigma_max * ε` for EDM, or
        `pfgmpp.prior_sample(rng, shape, sigma_max, D)` for PFGM++ (EDM's generate.py instead
        takes unit noise and multiplies by σ_max itself).
      num_steps, sigma_min, sigma_max, rho: the schedule of `edm.edm_sigma_steps`.
      S_churn, S_min, S_max, S_noise: EDM's stochasticity (off with S_churn = 0, the default).
      class_labels: passed to the denoiser, leading dimension B.
      guidance: classifier-free guidance weight w, or None: the denoiser becomes
        D_w(x; σ) = D(x; σ, None) + w (D(x; σ, labels) − D(x; σ, None)), so w = 0 is the
        unconditional and w = 1 the plain conditional model (Ho & Salimans' scale is w − 1).
        ``None`` labels must mean "unconditional" to the denoiser (e.g. CFG training's null
        label); every evaluation then calls the denoiser twice.
      noise_injection_alpha: α of PFGM++'s robustness probe ("model robustness versus D"), 0 =
        off: before step i = 0..N−1 (σ_0 = σ_max included, before churn) x_i ← x_i + α σ_i ε,
        noise of standard deviation α r_i/√D = α σ_i, as the reference ``generate_alpha.py``
        (``x_cur += randn_like(x_cur) * t_cur * alpha``).
      rng: PRNG key, required when S_churn > 0 or noise_injection_alpha > 0.
      dtype: sampling precision (default: the latents'); float64 needs jax_enable_x64.
    """
    return _sample(
        denoiser,
        latents,
        heun=True,
        num_steps=num_steps,
        sigma_min=sigma_min,
        sigma_max=sigma_max,
        rho=rho,
        S_churn=S_churn,
        S_min=S_min,
        S_max=S_max,
        S_noise=S_noise,
        class_labels=class_labels,
        guidance=guidance,
        noise_injection_alpha=noise_injection_alpha,
        rng=rng,
        dtype=dtype,
    )


def euler_sampler(
    denoiser,
    latents,
    *,
    num_steps: int = 18,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
    class_labels=None,
    guidance=None,
    noise_injection_alpha: float = 0.0,
    rng=None,
    dtype=None,
):
    """First-order Euler integration of the same ODE on the same schedule: N evaluations.

    Takes the arguments of :func:`heun_sampler` except the churn ones (no churn, no second-order
    correction).
    """
    return _sample(
        denoiser,
        latents,
        heun=False,
        num_steps=num_steps,
        sigma_min=sigma_min,
        sigma_max=sigma_max,
        rho=rho,
        S_churn=0.0,
        S_min=0.0,
        S_max=float("inf"),
        S_noise=1.0,
        class_labels=class_labels,
        guidance=guidance,
        noise_injection_alpha=noise_injection_alpha,
        rng=rng,
        dtype=dtype,
    )

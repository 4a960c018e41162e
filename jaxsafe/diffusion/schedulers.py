r"""Discrete-time diffusion schedulers (DDPM, DDIM, Euler) as pure functions, diffusers-compatible.

Forward process (Ho et al., "Denoising Diffusion Probabilistic Models", NeurIPS 2020, eq. 4) with
β_0..β_{T−1} (0-based t, as in diffusers), α_t = 1 − β_t, ᾱ_t = ∏_{s≤t} α_s, and the v target
(Salimans & Ho, "Progressive Distillation", ICLR 2022):

.. math::

    x_t = \sqrt{\bar\alpha_t}\, x_0 + \sqrt{1 - \bar\alpha_t}\, \epsilon, \qquad
    v_t = \sqrt{\bar\alpha_t}\, \epsilon - \sqrt{1 - \bar\alpha_t}\, x_0.

Betas are ``linear``, β = linspace(β_start, β_end, T), or ``scaled_linear`` (latent diffusion),
β = linspace(√β_start, √β_end, T)²; :class:`SchedulerConfig`'s defaults are Stable Diffusion's.
Inference timesteps follow Lin et al., "Common Diffusion Noise Schedules and Sample Steps are
Flawed", WACV 2024, Table 2 (:func:`timesteps`). The steps are DDPM's ancestral step
(:func:`ddpm_step`), DDIM (Song et al., ICLR 2021; :func:`ddim_step`) and Karras et al.'s Euler
step as diffusers' ``EulerDiscreteScheduler`` takes it (:func:`euler_step`); :func:`sample_loop`
runs a whole reverse process. Results match diffusers 0.42.1, quirks included (docs/diffusion.md,
"Discrete-time schedulers").

Deviation: diffusers' ``trailing`` spacing, ``round(arange(T, 0, −T/N)) − 1``, yields N + 1
timesteps ending at −1 for some N (e.g. T = 1000, N = 61); here the first N are kept. Not
implemented (rejected by :meth:`SchedulerConfig.from_dict`): trained_betas, squaredcos_cap_v2,
zero-SNR rescaling, dynamic thresholding, learned variances, Karras/exponential sigmas, Euler
churn.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "KINDS",
    "SchedulerConfig",
    "add_noise",
    "alphas_cumprod",
    "betas",
    "ddim_step",
    "ddpm_step",
    "euler_scale_input",
    "euler_sigmas",
    "euler_step",
    "euler_timesteps",
    "init_noise_sigma",
    "predict_x0",
    "previous_timesteps",
    "sample_loop",
    "timesteps",
    "velocity",
]

KINDS = ("ddim", "ddpm", "euler")
BETA_SCHEDULES = ("linear", "scaled_linear")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
SPACINGS = ("leading", "trailing", "linspace")
# diffusers clamps DDPM's posterior variance before its log/sqrt.
MIN_VARIANCE = 1e-20

# Keys of diffusers scheduler configs whose non-default values change the maths and are not
# implemented here: (key, value(s) that are fine).
_UNSUPPORTED = {
    "trained_betas": (None,),
    "rescale_betas_zero_snr": (False,),
    "thresholding": (False,),
    "variance_type": ("fixed_small", None),
    "timestep_type": ("discrete",),
    "interpolation_type": ("linear",),
    "use_karras_sigmas": (False, None),
    "use_exponential_sigmas": (False, None),
    "use_beta_sigmas": (False, None),
    "final_sigmas_type": ("zero",),
}


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    """A diffusers scheduler config (the fields the maths uses).

    Hashable, so usable as a static argument. The defaults are Stable Diffusion's: T = 1000,
    β_start = 0.00085, β_end = 0.012, ``scaled_linear``, ``steps_offset = 1``,
    ``set_alpha_to_one = False``.
    """

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    prediction_type: str = "epsilon"
    timestep_spacing: str = "leading"
    steps_offset: int = 1
    set_alpha_to_one: bool = False
    clip_sample: bool = False
    clip_sample_range: float = 1.0

    def __post_init__(self):
        if self.num_train_timesteps < 1:
            raise ValueError(f"num_train_timesteps must be >= 1, got {self.num_train_timesteps}.")
        for name, allowed in (
            ("beta_schedule", BETA_SCHEDULES),
            ("prediction_type", PREDICTION_TYPES),
            ("timestep_spacing", SPACINGS),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}.")
        if self.clip_sample_range <= 0:
            raise ValueError(f"clip_sample_range must be > 0, got {self.clip_sample_range}.")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SchedulerConfig:
        """From a diffusers `scheduler_config.json` dict; unknown keys are ignored, unsupported
        options raise ValueError. Missing keys take this class's (Stable Diffusion) defaults, not
        those of the diffusers class the config is loaded into (e.g. EulerDiscreteScheduler's
        timestep_spacing default is 'linspace', DDIMScheduler's set_alpha_to_one default True)."""
        for key, ok in _UNSUPPORTED.items():
            if key in d and d[key] not in ok:
                raise ValueError(
                    f"scheduler config {key}={d[key]!r} is not supported (expected one of {ok})."
                )
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in fields})


def _check_steps(config: SchedulerConfig, num_inference_steps: int):
    if not 1 <= num_inference_steps <= config.num_train_timesteps:
        raise ValueError(
            f"num_inference_steps must be in [1, {config.num_train_timesteps}] "
            f"(num_train_timesteps), got {num_inference_steps}."
        )


@functools.cache
def _np_schedule(config: SchedulerConfig) -> tuple[np.ndarray, np.ndarray]:
    """(β, ᾱ) in float64; the public functions round them to float32 once."""
    T = config.num_train_timesteps
    if config.beta_schedule == "linear":
        b = np.linspace(config.beta_start, config.beta_end, T)
    else:
        b = np.linspace(config.beta_start**0.5, config.beta_end**0.5, T) ** 2
    return b, np.cumprod(1 - b)


def betas(config: SchedulerConfig) -> jax.Array:
    """β_0..β_{T−1}, float32."""
    return jnp.asarray(_np_schedule(config)[0], jnp.float32)


def alphas_cumprod(config: SchedulerConfig) -> jax.Array:
    """ᾱ_t = ∏_{s≤t} (1 − β_s), float32 (T,)."""
    return jnp.asarray(_np_schedule(config)[1], jnp.float32)


def _np_timesteps(config: SchedulerConfig, n: int, dtype) -> np.ndarray:
    _check_steps(config, n)
    T, spacing = config.num_train_timesteps, config.timestep_spacing
    if spacing == "linspace":
        if dtype == np.float32:  # Euler keeps fractional timesteps
            return np.linspace(0, T - 1, n, dtype=np.float32)[::-1].copy()
        return np.linspace(0, T - 1, n)[::-1].round().astype(dtype)
    if spacing == "leading":
        t = (np.arange(n) * (T // n)).round()[::-1].astype(dtype) + config.steps_offset
    else:
        # diffusers' arange (its float steps decide the rounding of .5 ties); it has n + 1 entries
        # for some n, the last being 0 → timestep −1, which is dropped here.
        t = np.round(np.arange(T, 0, -T / n)[:n]).astype(dtype) - 1
    if t.max() > T - 1:
        raise ValueError(
            f"steps_offset={config.steps_offset} pushes the first of num_inference_steps="
            f"{n} leading timesteps to {t.max()}, past num_train_timesteps - 1 = {T - 1}."
        )
    return t


def timesteps(config: SchedulerConfig, num_inference_steps: int) -> jax.Array:
    """The N integer timesteps of DDPM/DDIM, decreasing (diffusers' ``scheduler.timesteps``).

    By ``timestep_spacing`` (Lin et al., WACV 2024, Table 2): ``linspace``
    round(linspace(0, T−1, N)); ``leading`` (0..N−1)·⌊T/N⌋ + steps_offset; ``trailing``
    round(T − i·T/N) − 1, i = 0..N−1. Returns int32 (N,).
    """
    return jnp.asarray(_np_timesteps(config, num_inference_steps, np.int64).astype(np.int32))


def previous_timesteps(config: SchedulerConfig, kind: str, num_inference_steps: int) -> jax.Array:
    """t' for each of `timesteps`: t − ⌊T/N⌋ for DDIM, the next timestep (−1 last) for DDPM.

    DDIM's t − ⌊T/N⌋ whatever the spacing is diffusers' ``DDIMScheduler.step``; for ``linspace``
    or ``trailing`` spacing with T mod N ≠ 0 it is not always the next timestep of the sequence
    (the DDIM paper's τ_{i−1}).
    """
    t = _np_timesteps(config, num_inference_steps, np.int64).astype(np.int32)
    if kind == "ddim":
        return jnp.asarray(t - config.num_train_timesteps // num_inference_steps)
    if kind == "ddpm":
        return jnp.asarray(np.append(t[1:], -1).astype(np.int32))
    raise ValueError(f"kind must be 'ddim' or 'ddpm' for previous_timesteps, got {kind!r}.")


def euler_timesteps(config: SchedulerConfig, num_inference_steps: int) -> jax.Array:
    """EulerDiscreteScheduler's N timesteps, float32 (fractional for 'linspace' spacing)."""
    return jnp.asarray(_np_timesteps(config, num_inference_steps, np.float32))


def euler_sigmas(config: SchedulerConfig, num_inference_steps: int) -> jax.Array:
    """σ at the N Euler timesteps, then σ_N = 0; float32 (N + 1,).

    σ_t = √((1−ᾱ_t)/ᾱ_t), interpolated linearly in t at fractional timesteps.
    """
    return jnp.asarray(_np_euler_sigmas(config, num_inference_steps))


def _np_euler_sigmas(config: SchedulerConfig, n: int) -> np.ndarray:
    ab = _np_schedule(config)[1]
    s = ((1 - ab) / ab) ** 0.5
    t = _np_timesteps(config, n, np.float32)
    return np.append(np.interp(t, np.arange(len(s)), s), 0.0).astype(np.float32)


def init_noise_sigma(config: SchedulerConfig, kind: str, num_inference_steps: int) -> float:
    """Scale of the initial noise x_T = init_noise_sigma · ε.

    1 for DDPM/DDIM; for Euler √(σ_max² + 1) with ``leading`` spacing and σ_max with
    ``linspace`` / ``trailing`` spacing, as diffusers.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}.")
    if kind != "euler":
        return 1.0
    s_max = _np_euler_sigmas(config, num_inference_steps).max()
    if config.timestep_spacing == "leading":
        return float(np.float32((float(s_max) ** 2 + 1) ** 0.5))
    return float(s_max)


def _bcast(c, x):
    """Broadcast a per-sample (or scalar) coefficient over the trailing axes of x."""
    c = jnp.asarray(c)
    return c.reshape(c.shape + (1,) * (jnp.ndim(x) - c.ndim))


def _alpha_bar(config, t, x):
    return _bcast(alphas_cumprod(config)[jnp.asarray(t)], x)


def add_noise(config: SchedulerConfig, x0, noise, t):
    """x_t = √ᾱ_t x_0 + √(1−ᾱ_t) ε; t is a scalar or (B,) integer timestep."""
    ab = _alpha_bar(config, t, x0)
    return ab**0.5 * x0 + (1 - ab) ** 0.5 * noise


def velocity(config: SchedulerConfig, x0, noise, t):
    """v_t = √ᾱ_t ε − √(1−ᾱ_t) x_0 (the v-prediction training target)."""
    ab = _alpha_bar(config, t, x0)
    return ab**0.5 * noise - (1 - ab) ** 0.5 * x0


def _x0_eps(config: SchedulerConfig, x_t, out, ab):
    """(x̂_0, ε̂) from the model output at ᾱ_t, x̂_0 clipped if config.clip_sample, ε̂ not."""
    if config.prediction_type == "epsilon":
        x0, eps = (x_t - (1 - ab) ** 0.5 * out) / ab**0.5, out
    elif config.prediction_type == "v_prediction":
        x0, eps = ab**0.5 * x_t - (1 - ab) ** 0.5 * out, ab**0.5 * out + (1 - ab) ** 0.5 * x_t
    else:
        x0 = out
        eps = (x_t - ab**0.5 * x0) / (1 - ab) ** 0.5
    if config.clip_sample:
        x0 = jnp.clip(x0, -config.clip_sample_range, config.clip_sample_range)
    return x0, eps


def predict_x0(config: SchedulerConfig, x_t, model_output, t):
    r"""x̂_0 from an epsilon / v / sample prediction at timestep t (scalar or (B,)).

    .. math::

        \hat x_0 = \frac{x_t - \sqrt{1 - \bar\alpha_t}\, \hat\epsilon}{\sqrt{\bar\alpha_t}}
        \ \text{(epsilon)}, \qquad
        \hat x_0 = \sqrt{\bar\alpha_t}\, x_t - \sqrt{1 - \bar\alpha_t}\, \hat v
        \ \text{(v_prediction)},

    and the output itself for ``sample``; clamped to ±``clip_sample_range`` if
    ``config.clip_sample``.
    """
    return _x0_eps(config, x_t, model_output, _alpha_bar(config, t, x_t))[0]


def _alpha_bar_prev(config, t_prev, x, final):
    ab = alphas_cumprod(config)[jnp.maximum(jnp.asarray(t_prev), 0)]
    return _bcast(jnp.where(jnp.asarray(t_prev) >= 0, ab, final), x)


def ddim_step(config: SchedulerConfig, model_output, t, t_prev, x_t, *, eta=0.0, noise=None):
    r"""DDIM (Song et al., ICLR 2021, eqs. 12 and 16; their α is our ᾱ) from t to t_prev.

    .. math::

        x_{t'} = \sqrt{\bar\alpha_{t'}}\, \hat x_0
            + \sqrt{1 - \bar\alpha_{t'} - \sigma_t^2}\, \hat\epsilon + \sigma_t z, \qquad
        \sigma_t = \eta \sqrt{\frac{1 - \bar\alpha_{t'}}{1 - \bar\alpha_t}}
            \sqrt{1 - \frac{\bar\alpha_t}{\bar\alpha_{t'}}}.

    t_prev < 0 means past the end: ᾱ_{t'} = 1 if ``set_alpha_to_one`` else ᾱ_0. ``noise`` (z)
    is required for η > 0. With ``clip_sample`` x̂_0 is clamped and ε̂ keeps its unclipped value.
    """
    final = 1.0 if config.set_alpha_to_one else alphas_cumprod(config)[0]
    ab, ab_prev = _alpha_bar(config, t, x_t), _alpha_bar_prev(config, t_prev, x_t, final)
    x0, eps = _x0_eps(config, x_t, model_output, ab)
    sigma = eta * ((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev)) ** 0.5
    x_prev = ab_prev**0.5 * x0 + (1 - ab_prev - sigma**2) ** 0.5 * eps
    if noise is None:
        if not (isinstance(eta, (int, float)) and eta == 0):
            raise ValueError("ddim_step needs noise when eta != 0; got noise=None.")
        return x_prev
    return x_prev + sigma * noise


def ddpm_step(config: SchedulerConfig, model_output, t, t_prev, x_t, noise):
    r"""Ancestral DDPM step (Ho et al. 2020, eqs. 6–7) from t to t_prev, variance "fixed_small".

    .. math::

        x_{t'} = \frac{\sqrt{\bar\alpha_{t'}}\, \beta_t}{1 - \bar\alpha_t}\, \hat x_0
            + \frac{\sqrt{\alpha_t}\, (1 - \bar\alpha_{t'})}{1 - \bar\alpha_t}\, x_t
            + \sqrt{\tilde\beta_t}\, z, \qquad
        \tilde\beta_t = \frac{1 - \bar\alpha_{t'}}{1 - \bar\alpha_t}\, \beta_t,

    with α_t = ᾱ_t/ᾱ_{t'} and β_t = 1 − α_t between the two timesteps, β̃_t clamped at ≥ 1e-20
    and no noise at t = 0; t_prev < 0 means ᾱ_{t'} = 1, as in diffusers.
    """
    ab, ab_prev = _alpha_bar(config, t, x_t), _alpha_bar_prev(config, t_prev, x_t, 1.0)
    alpha, beta = ab / ab_prev, 1 - ab / ab_prev
    x0, _ = _x0_eps(config, x_t, model_output, ab)
    mean = (ab_prev**0.5 * beta / (1 - ab)) * x0 + (alpha**0.5 * (1 - ab_prev) / (1 - ab)) * x_t
    var = jnp.maximum((1 - ab_prev) / (1 - ab) * beta, MIN_VARIANCE)
    return mean + jnp.where(_bcast(jnp.asarray(t) > 0, x_t), var**0.5 * noise, 0)


def euler_scale_input(sigma, x):
    """What the network sees at σ: x / √(σ² + 1) (EulerDiscreteScheduler.scale_model_input)."""
    return x / _bcast((jnp.asarray(sigma) ** 2 + 1) ** 0.5, x)


def euler_step(config: SchedulerConfig, model_output, sigma, sigma_next, x):
    """One Euler step of dx/dσ = (x − x̂_0)/σ from σ to σ_next, x̂_0 from the model output at σ.

    Karras et al., NeurIPS 2022, Alg. 1, as diffusers' ``EulerDiscreteScheduler``: x is the
    variance-exploding variable x_t/√ᾱ_t and σ = √((1−ᾱ_t)/ᾱ_t); x̂_0 = x − σ ε̂ for epsilon and
    −σ/√(σ²+1) v̂ + x/(σ²+1) for v_prediction. ``clip_sample`` is ignored, as diffusers' Euler
    scheduler has no such option.
    """
    s, s_next = _bcast(sigma, x), _bcast(sigma_next, x)
    if config.prediction_type == "epsilon":
        x0 = x - s * model_output
    elif config.prediction_type == "v_prediction":
        x0 = model_output * (-s / (s**2 + 1) ** 0.5) + x / (s**2 + 1)
    else:
        x0 = model_output
    return x + (x - x0) / s * (s_next - s)


def _step_noise(rng, i, shape, dtype):
    """Noise of step i: from one key, or per sample from a (B,) batch of keys, so that a sample's
    noise does not depend on the rest of its batch."""
    if rng.ndim == 0:
        return jax.random.normal(jax.random.fold_in(rng, i), shape, dtype)
    return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, i), shape[1:], dtype))(rng)


def _as_keys(rng, batch):
    rng = jnp.asarray(rng) if not isinstance(rng, jax.Array) else rng
    if not jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key):
        rng = jax.random.wrap_key_data(rng)
    if rng.ndim not in (0, 1) or (rng.ndim == 1 and rng.shape[0] != batch):
        raise ValueError(
            f"rng must be one PRNG key or a batch of {batch} keys (one per sample), "
            f"got key shape {rng.shape}."
        )
    return rng


def sample_loop(
    config: SchedulerConfig,
    kind: str,
    denoise_fn: Callable,
    x_T,
    num_inference_steps: int,
    *,
    eta=0.0,
    rng=None,
    noise=None,
    return_trajectory: bool = False,
):
    """The whole reverse process in one `lax.scan`, as a diffusers pipeline runs `set_timesteps`
    then `scale_model_input` → model → `step` for each timestep.

    Args:
      config: the scheduler config (static).
      kind: 'ddim', 'ddpm' or 'euler'.
      denoise_fn: `denoise_fn(x_in, t) -> model_output` with x_in the scaled model input (x_t
        itself for DDIM/DDPM) and t a scalar timestep (int32 for DDIM/DDPM, float32 for Euler).
      x_T: standard normal noise ε (B, ...); the loop starts from init_noise_sigma · ε.
      num_inference_steps: N (static).
      eta: DDIM's η (0: deterministic). Ignored by the other kinds.
      rng: for DDPM and DDIM with η ≠ 0: one PRNG key, or one key per sample (shape (B,));
        step i uses `normal(fold_in(key, i))` (per sample with a key batch).
      noise: alternatively the per-step noise itself, shape (N, *x_T.shape).
      return_trajectory: also return the N samples after each step, (N, *x_T.shape).

    Returns:
      x_0, or (x_0, trajectory).
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}.")
    x_T = jnp.asarray(x_T)
    if x_T.ndim < 1:
        raise ValueError(f"x_T must have a batch axis (B, ...), got shape {x_T.shape}.")
    dtype = jnp.promote_types(x_T.dtype, jnp.float32)
    n = num_inference_steps
    stochastic = kind == "ddpm" or (
        kind == "ddim" and not (isinstance(eta, (int, float)) and eta == 0)
    )
    if noise is not None:
        if jnp.shape(noise) != (n, *x_T.shape):
            raise ValueError(
                f"noise must have shape (num_inference_steps, *x_T.shape) = {(n, *x_T.shape)}, "
                f"got {jnp.shape(noise)}."
            )
        if rng is not None:
            raise ValueError("pass either rng or noise, not both.")
    elif stochastic:
        if rng is None:
            raise ValueError(
                f"sample_loop(kind={kind!r}, eta={eta}) needs rng (or noise); got rng=None."
            )
        rng = _as_keys(rng, x_T.shape[0])

    def noise_at(i, z):
        if not stochastic:
            return None
        return z if noise is not None else _step_noise(rng, i, x_T.shape, dtype)

    def call(x_in, t):
        out = denoise_fn(x_in, t)
        if out.shape != x_in.shape:
            raise ValueError(
                f"denoise_fn must return the sample's shape {x_in.shape}, got {out.shape}."
            )
        return out.astype(dtype)

    idx = jnp.arange(n)
    zs = noise if noise is not None else idx  # scanned either way; only used when noise is given
    if kind == "euler":
        ts, sig = euler_timesteps(config, n), euler_sigmas(config, n)

        def body(x, xs):
            _, t, s, s_next, _ = xs
            out = call(euler_scale_input(s, x), t)
            x = euler_step(config, out, s, s_next, x)
            return x, (x if return_trajectory else None)

        xs = (idx, ts, sig[:-1], sig[1:], zs)
    else:
        ts, prev = timesteps(config, n), previous_timesteps(config, kind, n)

        def body(x, xs):
            i, t, t_prev, z = xs
            out = call(x, t)
            if kind == "ddim":
                x = ddim_step(config, out, t, t_prev, x, eta=eta, noise=noise_at(i, z))
            else:
                x = ddpm_step(config, out, t, t_prev, x, noise_at(i, z))
            x = x.astype(dtype)
            return x, (x if return_trajectory else None)

        xs = (idx, ts, prev, zs)
    x0, traj = jax.lax.scan(body, x_T.astype(dtype) * init_noise_sigma(config, kind, n), xs)
    return (x0, traj) if return_trajectory else x0

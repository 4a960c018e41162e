"""Weak and strong time-series augmentations of DBPM's SimCLR baseline.

Lan et al. (ICLR 2024, arXiv:2302.03357); the defaults are the authors' code
(``lanxiang1017/DynamicBadPairMining_ICLR24``, ``dataset.py::DataTransform`` with
``config/config_ecg.yaml``: ``scale_ratio 1.1``, ``jitter_ratio 0.8``, ``max_seg 8``), applied
per sample to ``(B, T, C)`` arrays (the reference: ``(C, T)`` per sample):

* weak view, **scaling**: x' = a x, a ~ N(1, 1.1²) of shape (1, T), one factor per time step
  shared by the channels (``Scaling``); ``per_timestep=False`` draws one factor per channel
  (Um et al., 2017, arXiv:1706.00527);
* strong view, **permutation** then **jitter**: n ~ U{2, …, 8} segments (``Permutation``:
  ``np.random.randint(1, max_segments) + 1``), the n − 1 split points drawn without replacement
  from {0, …, T − 3}, concatenated in a uniformly random order, every channel with the same warp
  (``x[:, warp]``); then x' = x + ε, ε ~ N(0, 0.8²) per element.

``variant="ts_tcc"`` gives TS-TCC's ``augmentations.py`` (Eldele et al., IJCAI 2021), which the
paper cites: scaling mean 2 and U{1, …, max_segments − 1} segments (one segment leaves the series
unpermuted). TS-TCC's copy of channel 0 into every channel of the strong view is not reproduced
(docs/dbpm.md, "Decisions and deviations"). Pure JAX, independent randomness per sample.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

__all__ = [
    "VARIANTS",
    "jitter",
    "permutation",
    "permutation_indices",
    "scaling",
    "strong",
    "variant_kwargs",
    "weak",
]

SCALE_SIGMA, SCALE_MEAN, JITTER_SIGMA, MIN_SEGMENTS, MAX_SEGMENTS = 1.1, 1.0, 0.8, 2, 8
#: The parameters that differ between the authors' code ("dbpm") and TS-TCC's.
VARIANTS = {
    "dbpm": dict(scale_mean=1.0, min_segments=2, max_segments=8),
    "ts_tcc": dict(scale_mean=2.0, min_segments=1, max_segments=7),
}


def variant_kwargs(variant: str) -> dict:
    """``scale_mean``, ``min_segments`` and ``max_segments`` of a :data:`VARIANTS` entry."""
    if variant not in VARIANTS:
        raise ValueError(f"augmentation variant {variant!r}; expected one of {tuple(VARIANTS)}")
    return dict(VARIANTS[variant])


def _check_x(x) -> jax.Array:
    x = jnp.asarray(x)
    if x.ndim != 3:
        raise ValueError(f"x must have shape (B, T, C) (batch, time, channels), got {x.shape}.")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(jnp.float32)
    return x


# Jitted so that eager calls compile one program instead of dispatching (and compiling) each
# random op separately; inside an outer jit these are inlined.
@functools.partial(jax.jit, static_argnames=("per_timestep",))
def scaling(
    rng, x, sigma: float = SCALE_SIGMA, mean: float = SCALE_MEAN, per_timestep: bool = True
) -> jax.Array:
    """``a * x`` with ``a ~ N(mean, sigma^2)`` per (sample, time step), or per (sample, channel)."""
    x = _check_x(x)
    b, t, c = x.shape
    shape = (b, t, 1) if per_timestep else (b, 1, c)
    return x * (mean + sigma * jax.random.normal(rng, shape, x.dtype))


@jax.jit
def jitter(rng, x, sigma: float = JITTER_SIGMA) -> jax.Array:
    """``x + eps`` with ``eps ~ N(0, sigma^2)`` i.i.d."""
    x = _check_x(x)
    return x + sigma * jax.random.normal(rng, x.shape, x.dtype)


@functools.partial(jax.jit, static_argnames=("batch", "length", "max_segments", "min_segments"))
def permutation_indices(
    rng, batch: int, length: int, max_segments: int = MAX_SEGMENTS, min_segments: int = MIN_SEGMENTS
) -> jax.Array:
    """``(batch, length)`` int time indices of a random segment permutation per sample, with
    ``U{min_segments, ..., max_segments}`` segments."""
    if not 1 <= min_segments <= max_segments:
        raise ValueError(
            f"segments {min_segments}..{max_segments}; expected 1 <= min_segments <= max_segments."
        )
    if length < max_segments + 1:
        raise ValueError(
            f"series length T={length} must be > max_segments={max_segments} "
            "(split points are drawn without replacement from {0, ..., T - 3})."
        )
    # One draw of uniforms per sample for everything (each threefry call costs compile time).
    u = jax.random.uniform(rng, (batch, 1 + (length - 2) + max_segments))
    span = max_segments - min_segments + 1
    num = min_segments + jnp.minimum(jnp.floor(u[:, 0] * span), span - 1)
    # The indices of the largest of T - 2 i.i.d. uniforms are a uniformly random ordered sample
    # without replacement from {0..T-3}; the first num - 1 of them are the split points.
    _, points = jax.lax.top_k(u[:, 1 : length - 1], max(max_segments - 1, 1))
    used = jnp.arange(points.shape[1])[None, :] < (num - 1)[:, None]
    t = jnp.arange(length)
    # Time step t lies in segment #{split points <= t} (np.split starts a segment at a point).
    segment = jnp.sum(used[:, :, None] & (points[:, :, None] <= t), axis=1)
    # Segment s goes to position rank[s] (argsort of uniforms: a uniform random permutation);
    # sorting by (rank, t) keeps each segment contiguous and in time order.
    rank = jnp.argsort(u[:, length - 1 :], axis=1)
    return jnp.argsort(jnp.take_along_axis(rank, segment, axis=1) * length + t, axis=1)


@functools.partial(jax.jit, static_argnames=("max_segments", "min_segments"))
def permutation(
    rng, x, max_segments: int = MAX_SEGMENTS, min_segments: int = MIN_SEGMENTS
) -> jax.Array:
    """Splits each series into ``U{min_segments..max_segments}`` random segments and
    concatenates them in random order."""
    x = _check_x(x)
    idx = permutation_indices(
        rng,
        batch=x.shape[0],
        length=x.shape[1],
        max_segments=max_segments,
        min_segments=min_segments,
    )
    return jnp.take_along_axis(x, idx[:, :, None], axis=1)


def weak(
    rng,
    x,
    scale_sigma: float = SCALE_SIGMA,
    scale_mean: float = SCALE_MEAN,
    per_timestep: bool = True,
) -> jax.Array:
    """DBPM's weak view: :func:`scaling` (authors' code: sigma 1.1, mean 1, per time step)."""
    return scaling(rng, x, scale_sigma, scale_mean, per_timestep)


@functools.partial(jax.jit, static_argnames=("max_segments", "min_segments"))
def strong(
    rng,
    x,
    jitter_sigma: float = JITTER_SIGMA,
    max_segments: int = MAX_SEGMENTS,
    min_segments: int = MIN_SEGMENTS,
) -> jax.Array:
    """DBPM's strong view: ``jitter(permutation(x))`` (authors' code: 2..8 segments, sigma
    0.8)."""
    k_perm, k_jit = jax.random.split(rng)
    return jitter(k_jit, permutation(k_perm, x, max_segments, min_segments), jitter_sigma)

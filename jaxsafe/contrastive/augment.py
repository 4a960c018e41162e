"""Weak and strong time-series augmentations of DBPM's SimCLR baseline (TS-TCC style).

Lan et al. (ICLR 2024, arXiv:2302.03357) build the two views of an instance with the
augmentations of TS-TCC (Eldele et al., IJCAI 2021), which cite Um et al. (2017,
arXiv:1706.00527). The reference code's ``DataTransform`` (TS-TCC's ``augmentations.py`` with
the parameters fixed) hard-codes:

    weak   = scaling(x; sigma = 1.1)                         jitter_scale_ratio = 1.1
    strong = jitter(permutation(x; max_segments = 8); sigma = 0.8)   max_seg = 8, jitter_ratio = 0.8

* **scaling**: ``x' = a * x`` with ``a ~ N(2, 1.1^2)`` (mean 2 as in the reference's
  ``np.random.normal(loc=2., scale=sigma)``, not Um et al.'s 1). Um et al. draw one factor per
  channel of a window, which is the default here (``a`` of shape ``(B, 1, C)``). The reference
  code draws its factors with shape ``(batch, time)`` and reuses them for every channel, i.e. one
  factor per *time step* shared by the channels (a multiplicative noise); ``per_timestep=True``
  reproduces that.
* **permutation**: the number of segments is ``n ~ U{1, ..., max_segments - 1}``
  (``np.random.randint(1, max_segments)``); for ``n > 1`` the ``n - 1`` split points are drawn
  without replacement from ``{0, ..., T - 3}`` (as the reference; a split at 0 leaves the first
  segment empty, so fewer segments move) and the segments are concatenated in a uniformly
  random order. The reference then keeps only channel 0 (``ret[i] = pat[0, warp]`` broadcasts
  it to every channel, a TS-TCC quirk that makes every channel of a multi-channel strong view,
  e.g. 12-lead ECG, a copy of the first); here every channel is permuted with the same warp.
* **jitter**: ``x' = x + eps``, ``eps ~ N(0, 0.8^2)`` i.i.d. per element.

Arrays are ``(B, T, C)`` (batch, time, channels; the reference uses ``(B, C, T)``). Everything
is pure JAX (jit/vmap-able) and draws independent randomness per sample from ``rng``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

__all__ = ["jitter", "permutation", "permutation_indices", "scaling", "strong", "weak"]

SCALE_SIGMA, SCALE_MEAN, JITTER_SIGMA, MAX_SEGMENTS = 1.1, 2.0, 0.8, 8


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
def scaling(rng, x, sigma: float = SCALE_SIGMA, mean: float = SCALE_MEAN,
            per_timestep: bool = False) -> jax.Array:
    """``a * x`` with ``a ~ N(mean, sigma^2)`` per (sample, channel), or per (sample, step)."""
    x = _check_x(x)
    b, t, c = x.shape
    shape = (b, t, 1) if per_timestep else (b, 1, c)
    return x * (mean + sigma * jax.random.normal(rng, shape, x.dtype))


@jax.jit
def jitter(rng, x, sigma: float = JITTER_SIGMA) -> jax.Array:
    """``x + eps`` with ``eps ~ N(0, sigma^2)`` i.i.d."""
    x = _check_x(x)
    return x + sigma * jax.random.normal(rng, x.shape, x.dtype)


@functools.partial(jax.jit, static_argnames=("batch", "length", "max_segments"))
def permutation_indices(rng, batch: int, length: int,
                        max_segments: int = MAX_SEGMENTS) -> jax.Array:
    """``(batch, length)`` int time indices of a random segment permutation per sample."""
    if max_segments < 2:
        raise ValueError(f"max_segments={max_segments}; expected >= 2 (the number of segments "
                         "is drawn from {1, ..., max_segments - 1}).")
    if length < max_segments:
        raise ValueError(f"series length T={length} must be >= max_segments={max_segments} "
                         "(split points are drawn without replacement from {0, ..., T - 3}).")
    # One draw of uniforms per sample for everything (each threefry call costs compile time).
    u = jax.random.uniform(rng, (batch, 1 + (length - 2) + max_segments))
    num = jnp.minimum(1 + jnp.floor(u[:, 0] * (max_segments - 1)), max_segments - 1)
    # The indices of the largest of T - 2 i.i.d. uniforms are a uniformly random ordered sample
    # without replacement from {0..T-3}; the first num - 1 of them are the split points.
    _, points = jax.lax.top_k(u[:, 1:length - 1], max_segments - 1)
    used = jnp.arange(max_segments - 1)[None, :] < (num - 1)[:, None]
    t = jnp.arange(length)
    # Time step t lies in segment #{split points <= t} (np.split starts a segment at a point).
    segment = jnp.sum(used[:, :, None] & (points[:, :, None] <= t), axis=1)
    # Segment s goes to position rank[s] (argsort of uniforms: a uniform random permutation);
    # sorting by (rank, t) keeps each segment contiguous and in time order.
    rank = jnp.argsort(u[:, length - 1:], axis=1)
    return jnp.argsort(jnp.take_along_axis(rank, segment, axis=1) * length + t, axis=1)


@functools.partial(jax.jit, static_argnames=("max_segments",))
def permutation(rng, x, max_segments: int = MAX_SEGMENTS) -> jax.Array:
    """Splits each series into random segments and concatenates them in random order."""
    x = _check_x(x)
    idx = permutation_indices(rng, batch=x.shape[0], length=x.shape[1],
                              max_segments=max_segments)
    return jnp.take_along_axis(x, idx[:, :, None], axis=1)


def weak(rng, x, scale_sigma: float = SCALE_SIGMA, scale_mean: float = SCALE_MEAN,
         per_timestep: bool = False) -> jax.Array:
    """DBPM's weak view: :func:`scaling` (reference: ``sigma = 1.1``, mean 2)."""
    return scaling(rng, x, scale_sigma, scale_mean, per_timestep)


@functools.partial(jax.jit, static_argnames=("max_segments",))
def strong(rng, x, jitter_sigma: float = JITTER_SIGMA,
           max_segments: int = MAX_SEGMENTS) -> jax.Array:
    """DBPM's strong view: ``jitter(permutation(x))`` (reference: max_seg 8, sigma 0.8)."""
    k_perm, k_jit = jax.random.split(rng)
    return jitter(k_jit, permutation(k_perm, x, max_segments), jitter_sigma)

r"""EDM's non-leaky geometric augmentation, per example and jittable.

Karras et al., "Elucidating the Design Space of Diffusion-Based Generative Models" (NeurIPS 2022),
App. F.2; reference ``NVlabs/edm`` ``training/augment.py::AugmentPipe`` with the options
``train.py --augment=p`` sets (p = 0.12 for CIFAR-10, 0.15 for FFHQ/AFHQ). The denoiser sees the
augmented image y and the 9 labels that describe the transform (all 0 at sampling time, which asks
for un-augmented images); the loss's target is y itself. Per image, in this order, each drawn
independently (w ~ N(0, 1) unless stated):

* x-flip with probability 1/2 (label w ∈ {0, 1}); y-flip, w ~ U{0, 1}, with probability p;
* isotropic scaling by 2^{0.2 w} (label w) and rotation by w ~ U(−π, π) (labels cos w − 1,
  sin w), each with probability p;
* anisotropic scaling by 2^{0.2 w} along an axis rotated by r (r ~ U(−π, π) with probability
  1/2, else 0; labels w cos r, w sin r) and translation by 0.125 (W w_0, H w_1) pixels,
  w ~ N(0, I_2) (labels w_0, w_1), each with probability p.

The geometric part is one inverse matrix G⁻¹ about the image centre, applied as the reference
does: reflect pad, 2x upsampling with the ``sym6`` low-pass filter, bilinear ``grid_sample``,
filtered 2x downsampling, crop. Deviation: the reference pads the batch by the largest margin its
transforms need (capped at W − 1, H − 1); a per-example function cannot have a data-dependent
shape, so the pad is always the cap (reflect padding only grows outward: the same pixels).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["NUM_LABELS", "augment", "geometric_matrix", "warp"]

#: Length of the label vector (the network's ``augment_dim``).
NUM_LABELS = 9
# training/augment.py: wavelets['sym6'], the low-pass filter of the up/down resampling.
SYM6 = np.array(
    [
        0.015404109327027373,
        0.0034907120842174702,
        -0.11799011114819057,
        -0.048311742585633,
        0.4910559419267466,
        0.787641141030194,
        0.3379294217276218,
        -0.07263752278646252,
        -0.021060292512300564,
        0.04472490177066578,
        0.0017677118642428036,
        -0.007800708325034148,
    ],
    np.float32,
)
_HZ_PAD = len(SYM6) // 4


def _translate(tx, ty):
    return jnp.array([[1.0, 0.0, tx], [0.0, 1.0, ty], [0.0, 0.0, 1.0]])


def _scale(sx, sy):
    return jnp.array([[sx, 0.0, 0.0], [0.0, sy, 0.0], [0.0, 0.0, 1.0]])


def _rotate(theta):
    c, s = jnp.cos(theta), jnp.sin(theta)
    return jnp.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def geometric_matrix(
    scale_w,
    rotate_w,
    aniso_w,
    aniso_r,
    translate_w,
    height: int,
    width: int,
    *,
    scale_std: float = 0.2,
    aniso_std: float = 0.2,
    translate_std: float = 0.125,
):
    """``G^{-1}`` (3 x 3, pixel units about the image centre) of the reference's four geometric
    transforms from their drawn parameters (0 = off): ``scale2d_inv(s, s) @ rotate2d_inv(-w)
    @ rotate2d_inv(r) @ scale2d_inv(a, 1/a) @ rotate2d_inv(-r) @ translate2d_inv(t)``."""
    s = jnp.exp2(scale_w * scale_std)
    a = jnp.exp2(aniso_w * aniso_std)
    g = _scale(1 / s, 1 / s) @ _rotate(rotate_w)
    g = g @ _rotate(-aniso_r) @ _scale(1 / a, a) @ _rotate(aniso_r)
    return g @ _translate(
        -translate_w[0] * width * translate_std, -translate_w[1] * height * translate_std
    )


def _grid_sample(image, x, y):
    """Bilinear sample of ``image`` (H, W, C) at pixel coordinates ``x, y`` (any shape), zeros
    outside (``grid_sample(..., padding_mode='zeros')``)."""
    h, w = image.shape[:2]
    x0, y0 = jnp.floor(x), jnp.floor(y)
    out = 0.0
    for dy in (0, 1):
        for dx in (0, 1):
            xi, yi = x0 + dx, y0 + dy
            weight = (1 - jnp.abs(x - xi)) * (1 - jnp.abs(y - yi))
            inside = (xi >= 0) & (xi <= w - 1) & (yi >= 0) & (yi <= h - 1)
            pixel = image[
                jnp.clip(yi, 0, h - 1).astype(jnp.int32), jnp.clip(xi, 0, w - 1).astype(jnp.int32)
            ]
            out = out + jnp.where(inside, weight, 0.0)[..., None] * pixel
    return out


def _upsample(x, axis):
    """Zero insertion then the flipped filter (``conv2d`` with ``Hz[::-1]``, padding 6):
    length L -> 2L."""
    n = x.shape[axis]
    z = jnp.stack([x, jnp.zeros_like(x)], axis=axis + 1)
    z = z.reshape(x.shape[:axis] + (2 * n,) + x.shape[axis + 1 :])
    z = jax.lax.slice_in_dim(z, 0, 2 * n - 1, axis=axis)
    pad = (len(SYM6) + 1) // 2
    return _correlate(z, SYM6[::-1], pad, axis, stride=1)


def _downsample(x, axis):
    """``conv2d`` with ``Hz``, stride 2, padding 5, then the ``Hz_pad`` crop: 2L + 12 -> L."""
    y = _correlate(x, SYM6, (len(SYM6) - 1) // 2, axis, stride=2)
    return jax.lax.slice_in_dim(y, _HZ_PAD, y.shape[axis] - _HZ_PAD, axis=axis)


def _correlate(x, taps, pad, axis, stride):
    """Cross-correlation along ``axis`` with zero padding ``pad``, as ``conv2d`` does."""
    n = x.shape[axis]
    widths = [(0, 0)] * x.ndim
    widths[axis] = (pad, pad)
    xp = jnp.pad(x, widths)
    out_len = (n + 2 * pad - len(taps)) // stride + 1
    out = 0.0
    for k, t in enumerate(taps):
        out = out + float(t) * jax.lax.slice_in_dim(
            xp, k, k + stride * (out_len - 1) + 1, stride, axis=axis
        )
    return out


def warp(image, g_inv):
    """Applies ``G^{-1}`` (pixel units about the centre) to ``image`` (H, W, C) the way the
    reference's "Execute geometric transformations" block does, with the pad at its cap."""
    h, w = image.shape[:2]
    my, mx = h - 1, w - 1
    x = jnp.pad(image, ((my, my), (mx, mx), (0, 0)), mode="reflect")
    x = _upsample(_upsample(x, 1), 0)
    # Output grid: the upsampled (H + 2 Hz_pad) x (W + 2 Hz_pad) image, in 2x pixels; its
    # centre maps through G^{-1} to the padded input's centre (both have centred coordinates).
    oh, ow = (h + 2 * _HZ_PAD) * 2, (w + 2 * _HZ_PAD) * 2
    g = _scale(2, 2) @ g_inv @ _scale(0.5, 0.5)
    g = _translate(-0.5, -0.5) @ g @ _translate(0.5, 0.5)
    ys, xs = jnp.meshgrid(
        jnp.arange(oh, dtype=jnp.float32), jnp.arange(ow, dtype=jnp.float32), indexing="ij"
    )
    # Centred coordinates of output pixel centres, mapped, then back to input pixel indices.
    cx, cy = xs - (ow - 1) / 2, ys - (oh - 1) / 2
    ix = g[0, 0] * cx + g[0, 1] * cy + g[0, 2] + (x.shape[1] - 1) / 2
    iy = g[1, 0] * cx + g[1, 1] * cy + g[1, 2] + (x.shape[0] - 1) / 2
    out = _grid_sample(x, ix, iy)
    return _downsample(_downsample(out, 1), 0)


def augment(
    rng,
    image,
    p: float = 0.12,
    *,
    xflip: float = 1e8,
    yflip: float = 1.0,
    scale: float = 1.0,
    rotate_frac: float = 1.0,
    aniso: float = 1.0,
    translate_frac: float = 1.0,
    aniso_rotate_prob: float = 0.5,
):
    """``(augmented image, labels (9,))`` for one ``(H, W, C)`` image, EDM's ``AugmentPipe``
    with ``train.py --augment=p``'s multipliers (the defaults: ``xflip=1e8, yflip=1, scale=1,
    rotate_frac=1, aniso=1, translate_frac=1``; a transform is gated with probability
    min(1, multiplier · p); module docstring). ``p = 0`` returns the image unchanged and labels
    0 (the x-flip too: its probability is ``xflip * p``)."""
    image = jnp.asarray(image)
    h, w = image.shape[:2]
    k = jax.random.split(rng, 14)

    def gate(key, mult, value):
        return jnp.where(jax.random.uniform(key) < mult * p, value, jnp.zeros_like(value))

    fx = gate(k[1], xflip, jax.random.randint(k[0], (), 0, 2).astype(jnp.float32))
    fy = gate(k[3], yflip, jax.random.randint(k[2], (), 0, 2).astype(jnp.float32))
    image = jnp.where(fx == 1, image[:, ::-1], image)
    image = jnp.where(fy == 1, image[::-1], image)
    ws = gate(k[5], scale, jax.random.normal(k[4], ()))
    wr = gate(k[7], rotate_frac, jax.random.uniform(k[6], (), minval=-1.0, maxval=1.0) * math.pi)
    wa = gate(k[9], aniso, jax.random.normal(k[8], ()))
    ra = jax.random.uniform(k[10], (), minval=-1.0, maxval=1.0) * math.pi
    ra = jnp.where(jax.random.uniform(k[11]) < aniso_rotate_prob, ra, 0.0)
    wt = gate(k[13], translate_frac, jax.random.normal(k[12], (2,)))
    labels = jnp.stack(
        [fx, fy, ws, jnp.cos(wr) - 1, jnp.sin(wr), wa * jnp.cos(ra), wa * jnp.sin(ra), wt[0], wt[1]]
    )
    geometric = (scale, rotate_frac, aniso, translate_frac) != (0, 0, 0, 0) and p > 0
    if geometric:  # the reference resamples every image once any geometric transform is on
        image = warp(image, geometric_matrix(ws, wr, wa, ra, wt, h, w)).astype(image.dtype)
    return image, labels.astype(jnp.float32)

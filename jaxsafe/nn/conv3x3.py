"""3 × 3 convolutions on XLA:CPU: Winograd's F(2 × 2, 3 × 3), or one im2col matrix product.

Why: XLA:CPU's direct convolution runs slower than oneDNN's (the PyTorch references' kernel),
and the text-to-image UNet, the DDPM++ step and the FID Inception spend most of their time in
3 × 3 convolutions (docs/benchmarks.md, "3 × 3 convolutions on XLA:CPU"). On other backends (GPU,
TPU) XLA's convolution is kept (``lax.platform_dependent``).

**Winograd** (Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks", CVPR 2016,
Sec. 4): each 2 × 2 output tile of a stride-1 3 × 3 convolution is

    Y = Aᵀ [ (G g Gᵀ) ⊙ (Bᵀ d B) ] A,

with d the 4 × 4 input tile around it, g the 3 × 3 filter and the constant matrices in the
transforms below; summed over input channels, the ⊙ becomes 16 independent (tiles × C_in) @
(C_in × C_out) matrix products: 16 multiplies per tile and channel pair against the direct
form's 36 (2.25× fewer FLOPs), paid for with a few additions per element. oneDNN and cuDNN offer
the same algorithm. The input gradient is the same transform applied to the output gradient
with the filter rotated by 180° and its channel axes swapped; the filter gradient is the
transform's own transpose (16 (C_in × tiles) @ (tiles × C_out) products, by autodiff).

**im2col**, for small images (fewer than ``MIN_TILES`` tiles: SD's 8 × 8 latents), where the
transforms cost more than they save: the nine shifted copies of the input side by side, times
the (9 C_in × C_out) filter, one matrix product (gradients by autodiff).

Numerics: float32 results differ from the direct sum by a few ulps of the output scale (the
sums are reordered; Winograd F(2 × 2, 3 × 3)'s constants are 0, ±1 and ½, exact in binary).

:func:`conv_general_dilated` has ``lax.conv_general_dilated``'s signature and takes these paths
only for what they cover (NHWC / HWIO, 3 × 3, stride 1, padding 1, no dilation or groups,
float32, at least ``MIN_CHANNELS`` channels; Winograd: even H and W and ``MIN_TILES`` tiles);
anything else is ``lax.conv_general_dilated`` itself. ``nnx.Conv(...,
conv_general_dilated=...)`` uses it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxsafe.nn import conv_dispatch

__all__ = [
    "conv_general_dilated",
    "winograd_conv3x3",
    "im2col_conv3x3",
    "MIN_TILES",
    "MIN_CHANNELS",
]

# Below 64 tiles the transforms' memory traffic outweighs the saved products on XLA:CPU (8 × 8 ×
# 1280 at batch 2, 32 tiles, was slower than XLA; im2col was not); below 128 channels a
# convolution takes milliseconds and the transforms' extra compile time is
# not repaid (docs/benchmarks.md, "3 × 3 convolutions on XLA:CPU").
MIN_TILES = 64
MIN_CHANNELS = 128


# Lavin & Gray's F(2 × 2, 3 × 3) matrices: input Bᵀ, filter G, output Aᵀ.
_BT = ((1, 0, -1, 0), (0, 1, 1, 0), (0, -1, 1, 0), (0, 1, 0, -1))
_G = ((1, 0, 0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0, 0, 1))
_AT = ((1, 1, 1, 0), (0, 1, -1, -1))


def _sandwich(left, right, get):
    """``out[i][j] = Σ_k Σ_n left[i][k] right[j][n] get(k, n)``, each output one expression of
    its few non-zero terms (shared partial sums made XLA materialise them, at several times the
    cost)."""
    out = []
    for li in left:
        row = []
        for rj in right:
            total = None
            for k, a in enumerate(li):
                for n, b in enumerate(rj):
                    if a * b:
                        t = get(k, n)
                        t = t if a * b == 1 else -t if a * b == -1 else (a * b) * t
                        total = t if total is None else total + t
            row.append(total)
        out.append(row)
    return out


_KA = np.kron(np.asarray(_AT, np.float32), np.asarray(_AT, np.float32))


def _input_tiles(x):
    """Bᵀ d B of every 4 × 4 tile d (tiles 2 apart, ``x`` padded by 1), as ``(16, tiles, C)``.

    Written as 16 sums of strided slices: XLA:CPU runs that faster than one gather of the tile
    elements times kron(Bᵀ, Bᵀ), which compiles faster (docs/benchmarks.md)."""
    b, h, w, c = x.shape
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    tiles = _sandwich(_BT, _BT, lambda k, n: xp[:, k : k + h : 2, n : n + w : 2])
    return jnp.stack([t for row in tiles for t in row]).reshape(16, -1, c)


# G g Gᵀ for all 16 (i, j) at once: kron(G, G) (16 × 9) times the 9 taps, one matrix product.
# As additions (16 fusions) it ran slower and compiled slower (docs/benchmarks.md).
_KG = np.kron(np.asarray(_G, np.float32), np.asarray(_G, np.float32))


def _filter(w, transposed):
    """The 16 transformed filters ``(16, C, O)``; ``transposed``: of ``w`` rotated by 180°."""
    taps = jnp.flip(w, (0, 1)) if transposed else w
    return jnp.einsum("pq,qco->pco", _KG, taps.reshape(9, *w.shape[2:]))


def _winograd(x, w, transposed=False):
    """F(2 × 2, 3 × 3) of ``x`` with ``w``, or, ``transposed``, with ``w`` rotated by 180° and its
    channel axes swapped (the input gradient), without materialising that filter."""
    b, h, wd, _ = x.shape
    v = _input_tiles(x)
    # Transposed: contract over u's output axis (a transposed product), since transposing the
    # filter inside the transform's fusions made XLA:CPU read it with a stride of C_out.
    u = _filter(w, transposed)
    m = jnp.einsum("ptc,poc->pto" if transposed else "ptc,pco->pto", v, u)
    m = m.reshape(4, 4, b, h // 2, wd // 2, -1)
    y = _sandwich(_AT, _AT, lambda i, j: m[i, j])  # y[p][q]: output pixels (2a + p, 2b + q)
    y = jnp.stack([jnp.stack(y[p], axis=3) for p in range(2)], axis=2)
    return y.reshape(b, h, wd, -1)


def _winograd_filter_grad(x, g):
    """The filter gradient of ``_winograd(x, ·)`` at output gradient ``g``: the transposes of
    the output and filter transforms around 16 (C_in × tiles) @ (tiles × C_out) products."""
    v = _input_tiles(x)
    # A-transposed output transform of g's 2 × 2 tiles (which do not overlap: a reshape).
    b, h, w, o = g.shape
    tiles = g.reshape(b, h // 2, 2, w // 2, 2, o).transpose(2, 4, 0, 1, 3, 5).reshape(4, -1, o)
    dm = jnp.einsum("qp,qto->pto", _KA, tiles)
    du = jnp.einsum("ptc,pto->pco", v, dm)
    return jnp.einsum("pq,pco->qco", _KG, du).reshape(3, 3, *du.shape[1:])


def _direct(x, w):
    return lax.conv_general_dilated(
        x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


@jax.custom_vjp
def winograd_conv3x3(x: jax.Array, w: jax.Array) -> jax.Array:
    """``conv(x, w)``, NHWC × HWIO, 3 × 3, stride 1, padding 1, by F(2 × 2, 3 × 3).

    ``x``: ``(B, H, W, C)`` with even ``H`` and ``W``; ``w``: ``(3, 3, C, O)``.
    """
    return _winograd(x, w)


def _fwd(x, w):
    return _winograd(x, w), (x, w)


def _bwd(res, g):
    x, w = res
    # The transpose of a stride-1, padding-1 3 × 3 convolution is the same convolution with the
    # filter rotated by 180° and its input/output channels swapped.
    dx = _winograd(g, w, transposed=True)
    dw = _winograd_filter_grad(x, g)
    return dx, dw


winograd_conv3x3.defvjp(_fwd, _bwd)


def im2col_conv3x3(x: jax.Array, w: jax.Array) -> jax.Array:
    """``conv(x, w)``, NHWC × HWIO, 3 × 3, stride 1, padding 1, as one matrix product."""
    b, h, wd, c = x.shape
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    cols = jnp.concatenate([xp[:, k : k + h, n : n + wd] for k in range(3) for n in range(3)], -1)
    return (cols.reshape(-1, 9 * c) @ w.reshape(9 * c, -1)).reshape(b, h, wd, -1)


def _algorithm(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dn, groups, bgroups):
    """The faster form for this convolution on XLA:CPU, or None for XLA's own."""
    if lhs.ndim != 4 or lhs.dtype != jnp.float32 or rhs.dtype != jnp.float32:
        return None
    if tuple(window_strides) != (1, 1) or groups != 1 or bgroups != 1:
        return None
    if any(d is not None and tuple(d) != (1, 1) for d in (lhs_dilation, rhs_dilation)):
        return None
    dn = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dn)
    if dn != lax.conv_dimension_numbers(lhs.shape, rhs.shape, ("NHWC", "HWIO", "NHWC")):
        return None
    if rhs.shape[:2] != (3, 3) or min(lhs.shape[3], rhs.shape[3]) < MIN_CHANNELS:
        return None
    if isinstance(padding, str):
        if padding.upper() != "SAME":
            return None
    elif tuple(map(tuple, padding)) != ((1, 1), (1, 1)):
        return None
    b, h, w, _ = lhs.shape
    if b * h * w < 4 * MIN_TILES:
        return im2col_conv3x3
    if h % 2 or w % 2:
        return None
    return winograd_conv3x3


conv_general_dilated = conv_dispatch.cpu_conv(
    _algorithm,
    """``lax.conv_general_dilated``, with 3 × 3 stride-1 float32 NHWC convolutions computed by
    :func:`winograd_conv3x3` or :func:`im2col_conv3x3` on the CPU backend (see the module
    docstring for when).""",
)

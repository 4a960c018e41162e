"""1-D convolutions on XLA:CPU: Winograd F(6, 3) for wide kernel-3 layers, and the filter
gradient as one matrix product for the rest.

Why: in the training step of the DBPM / SimCLR ResNet-1D, XLA:CPU computes each filter gradient
as a convolution that wants its input with the channels leading, and fuses that transposed copy
with a recomputation of the residual stream feeding it (every BatchNorm, addition and ReLU of
the stage so far). Those fusions took more time than all the convolutions' arithmetic
(docs/benchmarks.md, "The SimCLR ResNet-1D: the filter gradient").

**Winograd** (Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks", CVPR 2016,
Sec. 4): for kernel 3, stride 1, padding 1, at least ``MIN_CHANNELS`` channels in and out and
``MIN_TILES`` tiles in the batch,
each tile of ``m = TILE`` outputs is ``y = Aᵀ [(G g) ⊙ (Bᵀ d)]`` over its ``m + 2`` inputs ``d``;
summed over input channels the ⊙ becomes ``m + 2`` independent (tiles × C) @ (C × O) products,
8 multiplies per 6 outputs against the direct form's 18. The input gradient is the same
transform with the filter flipped and its channel axes swapped; the filter gradient is the
transforms' transposes around ``m + 2`` (C × tiles) @ (tiles × O) products (custom VJP). The
matrices are Cook–Toom's at the points 0, ±1, ±2, ±½, ∞ (:func:`winograd_matrices`); they are
not exact in binary, so results differ from the direct sum by a few 1e-6 of the output scale
(docs/benchmarks.md, "The SimCLR ResNet-1D: Winograd F(6, 3)", measures the whole step's
gradient against float64).

**Everything else** (stride 2, the 1 × 1 shortcuts, the stem, narrower layers): the forward pass
and the input gradient stay XLA's convolutions (they run at the matmul peak), and the filter
gradient of ``y[b, t, o] = Σ_{j, c} x_p[b, s t + j, c] w[j, c, o]`` (``x_p``: ``x`` padded,
``s``: stride) is written out as

    ∂L/∂w[j, c, o] = Σ_{b, t} x_p[b, s t + j, c] g[b, t, o],

the ``k`` strided slices of ``x_p`` side by side (``B T_out × k C``) against ``g``
(``B T_out × O``): one product that contracts the leading axes, which XLA:CPU reads without the
deep fused copy. The sums are reordered, so float32 results differ from XLA's filter gradient by
a few ulps of its scale.

On other backends (GPU, TPU) XLA's convolution is kept (``lax.platform_dependent``), as in
:mod:`jaxsafe.nn.conv3x3`. :func:`conv_general_dilated` has ``lax.conv_general_dilated``'s
signature; it takes these paths for NWC / WIO 1-D convolutions with explicit non-negative
padding, any stride and kernel size, no dilation or groups, in float32; anything else is
``lax.conv_general_dilated`` itself. ``nnx.Conv(..., conv_general_dilated=...)`` uses it.
"""

from __future__ import annotations

import functools
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxsafe.nn import conv_dispatch

__all__ = [
    "conv1d",
    "conv_general_dilated",
    "winograd_conv1d",
    "winograd_matrices",
    "TILE",
    "MIN_CHANNELS",
    "MIN_TILES",
]

_DN = ("NWC", "WIO", "NWC")


def _direct(x, w, stride, padding):
    return lax.conv_general_dilated(x, w, (stride,), (padding,), dimension_numbers=_DN)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv1d(x: jax.Array, w: jax.Array, stride: int, padding: tuple[int, int]) -> jax.Array:
    """``conv(x, w)``: ``x (B, T, C)``, ``w (k, C, O)``, ``stride``, ``padding = (lo, hi)``;
    XLA's convolution, with the filter gradient as one matrix product (module docstring)."""
    return _direct(x, w, stride, padding)


def _fwd(x, w, stride, padding):
    return _direct(x, w, stride, padding), (x, w)


def _bwd(stride, padding, res, g):
    x, w = res
    dx = jax.vjp(lambda x: _direct(x, w, stride, padding), x)[1](g)[0]
    k, t_out = w.shape[0], g.shape[1]
    xp = jnp.pad(x, ((0, 0), padding, (0, 0)))
    span = stride * (t_out - 1) + 1
    # One product over all k taps: separate products per tap were no faster than XLA's own.
    cols = jnp.concatenate([xp[:, j : j + span : stride] for j in range(k)], axis=-1)
    dw = jnp.einsum("btc,bto->co", cols, g).reshape(w.shape)
    return dx, dw


conv1d.defvjp(_fwd, _bwd)


# Cook–Toom points of F(m, 3), in the order they are taken (m + 1 finite points and infinity).
_POINTS = tuple(Fraction(p) for p in ("0", "1", "-1", "2", "-2", "1/2", "-1/2", "3", "-3"))

# Output samples per Winograd tile: F(6, 3), 8 products for 6 outputs against 18. In the
# ResNet-34 step F(6, 3) beat F(4, 3), whose errors were no smaller (docs/benchmarks.md).
TILE = 6
# At 64 channels (T = 1000, batch 128) the transforms cost what the products save: forward and
# input gradient slower than XLA's, filter gradient faster, the three together even.
MIN_CHANNELS = 128
# Below about a thousand tiles (batch × ⌈T / 6⌉) the value and both gradients ran even with the
# other path or slower, and compiled 2-5× longer (docs/benchmarks.md, "Winograd F(6, 3)").
MIN_TILES = 1024


@functools.cache
def winograd_matrices(m: int, r: int = 3) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(Aᵀ, G, Bᵀ)`` of Winograd's F(m, r), exact rationals as float64 arrays.

    ``y = Aᵀ [(G g) ⊙ (Bᵀ d)]`` is the correlation ``y[i] = Σ_k d[i + k] g[k]`` of an input
    tile ``d`` of ``a = m + r − 1`` samples with ``g``, ``i < m`` (Lavin & Gray, CVPR 2016,
    Sec. 4). Built as the transpose of Toom–Cook polynomial multiplication at the points
    ``p_j`` (0, ±1, ±2, ±½, … and ∞): ``G`` evaluates ``g`` at each point, divided by
    ``Π_{l≠j} (p_j − p_l)``; ``Bᵀ``'s rows are the coefficients of ``Π_{l≠j} (x − p_l)``
    (and of ``Π_l (x − p_l)`` for ∞); ``Aᵀ[i, j] = p_jⁱ`` (and 1 for ∞ at ``i = m − 1``).
    """
    a = m + r - 1
    if m < 1 or r < 1 or a - 1 > len(_POINTS):
        raise ValueError(f"F({m}, {r}) needs {a - 1} finite points; {len(_POINTS)} are defined.")
    pts = _POINTS[: a - 1]

    def poly(roots):  # coefficients, lowest degree first, of Π (x − q)
        c = [Fraction(1)]
        for q in roots:
            c = [Fraction(0), *c]
            for i in range(len(c) - 1):
                c[i] -= q * c[i + 1]
        return c

    at = [[p**i for p in pts] + [Fraction(int(i == m - 1))] for i in range(m)]
    g, bt = [], []
    for j, p in enumerate(pts):
        others = [q for q in pts if q != p]
        g.append([p**k / np.prod([p - q for q in others]) for k in range(r)])
        bt.append(poly(others) + [Fraction(0)])
    g.append([Fraction(int(k == r - 1)) for k in range(r)])
    bt.append(poly(pts))
    return tuple(np.array(v, np.float64) for v in (at, g, bt))


def _combine(mat, get):
    """``[Σ_k mat[i, k] get(k) for each row i]``, each row one expression of its non-zero
    terms (XLA fuses it into one pass over the slices ``get(k)``)."""
    out = []
    for row in mat:
        total = None
        for k, a in enumerate(row):
            if a:
                t = get(k)
                t = t if a == 1 else -t if a == -1 else np.float32(a) * t
                total = t if total is None else total + t
        out.append(total)
    return out


def _tiles(x, m):
    """``Bᵀ d`` of every input tile ``d`` (``m + 2`` samples, ``m`` apart; ``x`` padded by 1 and
    to whole tiles), as ``(m + 2, B n, C)`` with ``n = ⌈T / m⌉``."""
    b, t, c = x.shape
    n = -(-t // m)
    xp = jnp.pad(x, ((0, 0), (1, 1 + n * m - t), (0, 0)))
    bt = winograd_matrices(m)[2]
    return jnp.stack(_combine(bt, lambda j: xp[:, j : j + m * n : m])).reshape(m + 2, b * n, c)


def _winograd(x, w, m, transposed=False):
    """F(m, 3) of ``x (B, T, C)`` with ``w (3, C, O)``, or, ``transposed``, with ``w`` flipped
    and its channel axes swapped (the input gradient), contracting ``u``'s other axis instead of
    materialising that filter."""
    at, g, _ = winograd_matrices(m)
    b, t, _ = x.shape
    u = jnp.einsum("pk,kco->pco", g.astype(np.float32), jnp.flip(w, 0) if transposed else w)
    prod = jnp.einsum("ptc,poc->pto" if transposed else "ptc,pco->pto", _tiles(x, m), u)
    prod = prod.reshape(m + 2, b, -(-t // m), -1)
    y = jnp.stack(_combine(at, lambda p: prod[p]), axis=2)  # (B, n, m, O)
    return y.reshape(b, -1, y.shape[-1])[:, :t]


def _winograd_filter_grad(x, g, m):
    """The filter gradient of ``_winograd(x, ·)`` at output gradient ``g``: the transposes of
    the output and filter transforms around ``m + 2`` (C × B n) @ (B n × O) products."""
    at, gm, _ = winograd_matrices(m)
    b, t, o = g.shape
    n = -(-t // m)
    # Outputs past T were sliced off, so their cotangent is zero; g's tiles do not overlap.
    gt = jnp.pad(g, ((0, 0), (0, n * m - t), (0, 0))).reshape(b * n, m, o)
    dm = jnp.stack(_combine(at.T, lambda i: gt[:, i]))
    du = jnp.einsum("ptc,pto->pco", _tiles(x, m), dm)
    return jnp.einsum("pk,pco->kco", gm.astype(np.float32), du)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def winograd_conv1d(x: jax.Array, w: jax.Array, m: int = TILE) -> jax.Array:
    """``conv(x, w)``, NWC × WIO, kernel 3, stride 1, padding 1, by Winograd's F(m, 3).

    ``x``: ``(B, T, C)``, any ``T`` (the last tile is zero-padded); ``w``: ``(3, C, O)``.
    """
    return _winograd(x, w, m)


def _wfwd(x, w, m):
    return _winograd(x, w, m), (x, w)


def _wbwd(m, res, g):
    x, w = res
    # The transpose of a kernel-3, stride-1, padding-1 correlation is the same correlation with
    # the filter flipped and its channel axes swapped.
    return _winograd(g, w, m, transposed=True), _winograd_filter_grad(x, g, m)


winograd_conv1d.defvjp(_wfwd, _wbwd)


def _algorithm(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dn, groups, bgroups):
    """:func:`conv1d` with this stride and padding where it applies, else None."""
    if lhs.ndim != 3 or lhs.dtype != jnp.float32 or rhs.dtype != jnp.float32:
        return None
    if groups != 1 or bgroups != 1 or isinstance(padding, str):
        return None
    if any(d is not None and tuple(d) != (1,) for d in (lhs_dilation, rhs_dilation)):
        return None
    if lax.conv_dimension_numbers(lhs.shape, rhs.shape, dn) != lax.conv_dimension_numbers(
        lhs.shape, rhs.shape, _DN
    ):
        return None
    (lo, hi), (stride,) = padding[0], window_strides
    if min(lo, hi) < 0 or lhs.shape[1] + lo + hi < rhs.shape[0]:
        return None
    if (
        (rhs.shape[0], stride, lo, hi) == (3, 1, 1, 1)
        and min(rhs.shape[1:]) >= MIN_CHANNELS
        and lhs.shape[0] * -(-lhs.shape[1] // TILE) >= MIN_TILES
    ):
        return winograd_conv1d
    return lambda lhs, rhs: conv1d(lhs, rhs, int(stride), (int(lo), int(hi)))


conv_general_dilated = conv_dispatch.cpu_conv(
    _algorithm,
    """``lax.conv_general_dilated``, with float32 NWC 1-D convolutions computed by :func:`conv1d`
    on the CPU backend (see the module docstring for when).""",
)

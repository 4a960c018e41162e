"""1-D convolutions on XLA:CPU whose filter gradient is one matrix product.

Why: in the training step of the DBPM / SimCLR ResNet-1D, XLA:CPU computes each filter gradient
as a convolution that wants its input with the channels leading, and fuses that transposed copy
with a recomputation of the residual stream feeding it (every BatchNorm, addition and ReLU of
the stage so far). Those fusions took more time than all the convolutions' arithmetic
(docs/benchmarks.md, "The SimCLR ResNet-1D: the filter gradient"). Here the forward pass and the
input gradient stay XLA's convolutions (they run at the matmul peak), and the filter gradient of
``y[b, t, o] = Σ_{j, c} x_p[b, s t + j, c] w[j, c, o]`` (``x_p``: ``x`` padded, ``s``: stride)
is written out as

    ∂L/∂w[j, c, o] = Σ_{b, t} x_p[b, s t + j, c] g[b, t, o],

the ``k`` strided slices of ``x_p`` side by side (``B T_out × k C``) against ``g``
(``B T_out × O``): one product that contracts the leading axes, which XLA:CPU reads without the
deep fused copy. On other backends (GPU, TPU) XLA's convolution is kept
(``lax.platform_dependent``), as in :mod:`jaxsafe.nn.conv3x3`.

:func:`conv_general_dilated` has ``lax.conv_general_dilated``'s signature; it takes this path
for NWC / WIO 1-D convolutions with explicit non-negative padding, any stride and kernel size, no
dilation or groups, in float32; anything else is ``lax.conv_general_dilated`` itself.
``nnx.Conv(..., conv_general_dilated=...)`` uses it. The sums are reordered, so float32 results
differ from XLA's filter gradient by a few ulps of its scale.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from jaxsafe.nn import conv_dispatch

__all__ = ["conv1d", "conv_general_dilated"]

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
    return lambda lhs, rhs: conv1d(lhs, rhs, int(stride), (int(lo), int(hi)))


conv_general_dilated = conv_dispatch.cpu_conv(
    _algorithm,
    """``lax.conv_general_dilated``, with float32 NWC 1-D convolutions computed by :func:`conv1d`
    on the CPU backend (see the module docstring for when).""",
)

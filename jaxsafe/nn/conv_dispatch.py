"""Drop-ins for ``lax.conv_general_dilated`` that compute some convolutions another way on the
CPU backend and leave the rest, and every convolution on GPU or TPU, to XLA
(:mod:`jaxsafe.nn.conv3x3`, :mod:`jaxsafe.nn.conv1d`)."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
from jax import lax

_XLA_ONLY = threading.local()


@contextlib.contextmanager
def xla_convolutions() -> Iterator[None]:
    """Within it, the drop-ins trace to ``lax.conv_general_dilated`` on every backend. A program
    traced here counts a model's FLOPs as its direct convolutions do (the benchmarks' model
    FLOP/s), whatever Winograd saves on the CPU. JAX's trace caches are cleared on entry and on
    exit (``jax.clear_caches``), since they do not key on this switch: no function traced outside
    is reused inside, nor the reverse. Compiled executables held by the caller are unaffected."""
    before = getattr(_XLA_ONLY, "on", False)
    jax.clear_caches()
    _XLA_ONLY.on = True
    try:
        yield
    finally:
        _XLA_ONLY.on = before
        jax.clear_caches()


def cpu_conv(algorithm: Callable, doc: str) -> Callable:
    """A function with ``lax.conv_general_dilated``'s signature that runs, on the CPU backend,
    ``algorithm(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
    dimension_numbers, feature_group_count, batch_group_count)``'s result ``f(lhs, rhs)``, and
    XLA's convolution where that is None, on other backends, with a precision, an output
    sharding or a non-float32 preferred element type, and inside :func:`xla_convolutions`."""

    def conv_general_dilated(
        lhs,
        rhs,
        window_strides,
        padding,
        lhs_dilation=None,
        rhs_dilation=None,
        dimension_numbers=None,
        feature_group_count=1,
        batch_group_count=1,
        precision=None,
        preferred_element_type=None,
        out_sharding=None,
    ):
        args = (window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers)
        groups = (feature_group_count, batch_group_count)
        direct = lambda lhs, rhs: lax.conv_general_dilated(
            lhs, rhs, *args, *groups, precision, preferred_element_type, out_sharding=out_sharding
        )
        fast = None if getattr(_XLA_ONLY, "on", False) else algorithm(lhs, rhs, *args, *groups)
        if (
            fast is None
            or out_sharding is not None
            or precision is not None
            or preferred_element_type not in (None, jnp.float32)
        ):
            return direct(lhs, rhs)
        return lax.platform_dependent(lhs, rhs, cpu=fast, default=direct)

    conv_general_dilated.__doc__ = doc
    return conv_general_dilated

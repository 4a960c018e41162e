"""Drop-ins for ``lax.conv_general_dilated`` that compute some convolutions another way on the
CPU backend and leave the rest, and every convolution on GPU or TPU, to XLA
(:mod:`jaxsafe.nn.conv3x3`, :mod:`jaxsafe.nn.conv1d`)."""

from __future__ import annotations

from collections.abc import Callable

import jax.numpy as jnp
from jax import lax


def cpu_conv(algorithm: Callable, doc: str) -> Callable:
    """A function with ``lax.conv_general_dilated``'s signature that runs, on the CPU backend,
    ``algorithm(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
    dimension_numbers, feature_group_count, batch_group_count)``'s result ``f(lhs, rhs)``, and
    XLA's convolution where that is None, on other backends, and with a precision, an output
    sharding or a non-float32 preferred element type."""

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
        fast = algorithm(lhs, rhs, *args, *groups)
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

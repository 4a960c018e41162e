"""3x3 convolutions by Winograd F(2x2, 3x3) and im2col (jaxsafe.nn.conv3x3) against XLA's direct
convolution."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxsafe.nn import conv3x3

DN = ("NHWC", "HWIO", "NHWC")


def direct(x, w, strides=(1, 1), padding=((1, 1), (1, 1)), dn=DN, **kw):
    return jax.lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=dn, **kw)


def rand(key, shape, scale=1.0):
    return scale * jax.random.normal(jax.random.key(key), shape, jnp.float32)


@pytest.mark.parametrize(
    "shape, fn",
    [
        ((2, 8, 12, 16, 24), conv3x3.winograd_conv3x3),
        ((1, 4, 4, 3, 5), conv3x3.winograd_conv3x3),
        ((3, 6, 2, 8, 8), conv3x3.winograd_conv3x3),
        ((2, 5, 7, 16, 24), conv3x3.im2col_conv3x3),
        ((1, 1, 1, 4, 3), conv3x3.im2col_conv3x3),
    ],
)
def test_forward_and_gradients_equal_the_direct_convolution(shape, fn):
    b, h, w_, c, o = shape
    x, w = rand(0, (b, h, w_, c)), rand(1, (3, 3, c, o), 1 / np.sqrt(9 * c))
    g = rand(2, (b, h, w_, o))
    y, vjp = jax.vjp(fn, x, w)
    y_ref, vjp_ref = jax.vjp(direct, x, w)
    # Outputs and gradients are O(1)-O(10): a few float32 ulps of reordering.
    np.testing.assert_allclose(y, y_ref, atol=2e-5 * float(jnp.abs(y_ref).max()))
    for got, want in zip(vjp(g), vjp_ref(g)):
        np.testing.assert_allclose(got, want, atol=2e-5 * float(jnp.abs(want).max()))


def test_a_delta_image_reproduces_the_rotated_filter():
    """conv(δ at (r, s), w)[r - 1 + i, s - 1 + j] = w[2 - i, 2 - j] (cross-correlation)."""
    x = jnp.zeros((1, 6, 6, 1)).at[0, 2, 3, 0].set(1.0)
    w = jnp.arange(1.0, 10.0).reshape(3, 3, 1, 1)
    expected = np.zeros((6, 6), np.float32)
    expected[1:4, 2:5] = np.arange(1.0, 10.0).reshape(3, 3)[::-1, ::-1]
    for fn in (conv3x3.winograd_conv3x3, conv3x3.im2col_conv3x3):
        np.testing.assert_allclose(fn(x, w)[0, :, :, 0], expected, atol=1e-6)


def hlo(fn, *args):
    return jax.jit(fn).lower(*args).as_text()


def test_the_dispatcher_takes_winograd_only_where_it_applies():
    c = conv3x3.MIN_CHANNELS
    x, w = rand(0, (4, 8, 8, c)), rand(1, (3, 3, c, c), 1 / np.sqrt(9 * c))
    conv = lambda x, w, **kw: conv3x3.conv_general_dilated(
        x, w, kw.pop("strides", (1, 1)), kw.pop("padding", ((1, 1), (1, 1))), **kw
    )
    # Eligible (NHWC, 3x3, stride 1, padding 1, float32, 64 tiles, enough channels): on the CPU
    # no convolution is left in the program, and the result is the convolution's.
    assert "convolution" not in hlo(lambda x, w: conv(x, w, dimension_numbers=DN), x, w)
    np.testing.assert_allclose(
        conv(x, w, dimension_numbers=DN),
        direct(x, w),
        atol=2e-5 * float(jnp.abs(direct(x, w)).max()),
    )
    assert "convolution" not in hlo(
        lambda x, w: conv(x, w, padding="SAME", dimension_numbers=DN), x, w
    )
    # Fewer than 4 * MIN_TILES pixels (even or odd sizes): the im2col product.
    for xi in (x[:1], x[:1, :7, :5]):
        lowered = hlo(lambda a, b: conv(a, b, dimension_numbers=DN), xi, w)
        assert "convolution" not in lowered and "dot" in lowered
        ref = direct(xi, w)
        got = conv(xi, w, dimension_numbers=DN)
        np.testing.assert_allclose(got, ref, atol=2e-5 * float(jnp.abs(ref).max()))
    # Everything else is XLA's convolution itself, bit for bit.
    cases = {
        "stride 2": (x, w, dict(strides=(2, 2), dimension_numbers=DN)),
        "padding 0": (x, w, dict(padding=((0, 0), (0, 0)), dimension_numbers=DN)),
        "1x1 filter": (x, w[:1, :1], dict(padding=((0, 0), (0, 0)), dimension_numbers=DN)),
        "odd height": (rand(4, (8, 7, 8, c)), w, dict(dimension_numbers=DN)),
        "few channels": (x[..., : c // 2], w[:, :, : c // 2], dict(dimension_numbers=DN)),
        "groups": (x, w[:, :, : c // 2], dict(dimension_numbers=DN, feature_group_count=2)),
        "NCHW": (
            x.transpose(0, 3, 1, 2),
            w.transpose(3, 2, 0, 1),
            dict(dimension_numbers=("NCHW", "OIHW", "NCHW")),
        ),
    }
    for name, (xi, wi, kw) in cases.items():
        strides, padding = kw.pop("strides", (1, 1)), kw.pop("padding", ((1, 1), (1, 1)))
        f = lambda a, b: conv3x3.conv_general_dilated(a, b, strides, padding, **kw)
        assert "convolution" in hlo(f, xi, wi), name
        ref = jax.lax.conv_general_dilated(xi, wi, strides, padding, **kw)
        np.testing.assert_array_equal(f(xi, wi), ref, err_msg=name)


def test_nnx_conv_with_the_dispatcher_equals_a_plain_conv():
    c = conv3x3.MIN_CHANNELS
    plain = nnx.Conv(c, c, (3, 3), padding=((1, 1), (1, 1)), rngs=nnx.Rngs(0))
    fast = nnx.Conv(
        c,
        c,
        (3, 3),
        padding=((1, 1), (1, 1)),
        conv_general_dilated=conv3x3.conv_general_dilated,
        rngs=nnx.Rngs(0),
    )
    x = rand(3, (4, 8, 8, c))
    want = plain(x)
    np.testing.assert_allclose(fast(x), want, atol=2e-5 * float(jnp.abs(want).max()))

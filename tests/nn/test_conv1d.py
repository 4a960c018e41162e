"""1-D convolutions on XLA:CPU (jaxsafe.nn.conv1d): Winograd's matrices against the correlation
they compute, both paths' values and gradients against NumPy sums written from the definition
and against XLA's own, and the dispatcher's choices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxsafe.nn import conv1d

DN = ("NWC", "WIO", "NWC")


def rand(key, shape, scale=1.0):
    return scale * jax.random.normal(jax.random.key(key), shape, jnp.float32)


def direct(x, w, stride, padding, dn=DN, **kw):
    return jax.lax.conv_general_dilated(x, w, (stride,), (padding,), dimension_numbers=dn, **kw)


def numpy_grads(x, w, r, stride, padding):
    """∂/∂x and ∂/∂w of Σ r · y, y[b, t, o] = Σ_{j, c} x_p[b, s t + j, c] w[j, c, o]: loops
    over the definition, in float64."""
    x, w, r = (np.asarray(a, np.float64) for a in (x, w, r))
    lo, hi = padding
    xp = np.pad(x, ((0, 0), (lo, hi), (0, 0)))
    dxp, dw = np.zeros_like(xp), np.zeros_like(w)
    for t in range(r.shape[1]):
        for j in range(w.shape[0]):
            dw[j] += np.einsum("bc,bo->co", xp[:, stride * t + j], r[:, t])
            dxp[:, stride * t + j] += r[:, t] @ w[j].T
    return dxp[:, lo : lo + x.shape[1]], dw


@pytest.mark.parametrize(
    "t, c, o, k, stride, padding",
    [
        (16, 5, 6, 3, 1, (1, 1)),  # the ResNet's blocks
        (17, 5, 6, 3, 2, (1, 1)),  # a stage's first block, odd length
        (16, 5, 6, 1, 2, (0, 0)),  # its 1 x 1 shortcut
        (20, 3, 4, 7, 1, (3, 3)),  # the stem
        (13, 4, 3, 4, 3, (2, 0)),  # even kernel, asymmetric padding
    ],
)
def test_gradients_equal_the_definition(t, c, o, k, stride, padding):
    x, w = rand(0, (2, t, c)), rand(1, (k, c, o), 1 / np.sqrt(k * c))
    y = conv1d.conv1d(x, w, stride, padding)
    ref = direct(x, w, stride, padding)
    np.testing.assert_array_equal(y, ref)  # the forward pass is XLA's convolution
    r = rand(2, y.shape)
    dx, dw = jax.grad(lambda x, w: jnp.sum(conv1d.conv1d(x, w, stride, padding) * r), (0, 1))(x, w)
    want_dx, want_dw = numpy_grads(x, w, r, stride, padding)
    # Sums of at most 2 * 20 products of O(1) terms: float32 rounding is ~1e-6 of that.
    np.testing.assert_allclose(dx, want_dx, atol=2e-5)
    np.testing.assert_allclose(dw, want_dw, atol=5e-5)


def numpy_conv(x, w, stride, padding):
    """y[b, t, o] = Σ_{j, c} x_p[b, s t + j, c] w[j, c, o], in float64."""
    x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
    xp = np.pad(x, ((0, 0), padding, (0, 0)))
    t_out = (xp.shape[1] - w.shape[0]) // stride + 1
    return np.stack(
        [sum(xp[:, stride * t + j] @ w[j] for j in range(w.shape[0])) for t in range(t_out)], 1
    )


@pytest.mark.parametrize("m", [1, 2, 4, 6, 8])
def test_winograd_matrices_compute_the_correlation(m):
    at, g, bt = conv1d.winograd_matrices(m)
    assert at.shape == (m, m + 2) and g.shape == (m + 2, 3) and bt.shape == (m + 2, m + 2)
    rng = np.random.default_rng(m)
    d, f = rng.integers(-9, 10, (50, m + 2)), rng.integers(-9, 10, (50, 3))
    want = np.stack([np.sum(d[:, i : i + 3] * f, 1) for i in range(m)], 1)
    got = ((f @ g.T) * (d @ bt.T)) @ at.T
    # Integer sums up to 243; the rational constants' float64 rounding leaves ~1e-12 of that.
    np.testing.assert_allclose(got, want, atol=1e-8)
    with pytest.raises(ValueError, match=r"^F\(9, 3\) needs 10 finite points; 9 are defined\.$"):
        conv1d.winograd_matrices(9)


@pytest.mark.parametrize("t, m", [(17, 6), (13, 4), (4, 6)])
def test_winograd_conv1d_and_its_gradients_equal_the_definition(t, m):
    """Any length: the last tile is zero-padded and its extra outputs dropped."""
    x, w = rand(6, (2, t, 5)), rand(7, (3, 5, 4), 1 / np.sqrt(15))
    y = jax.jit(conv1d.winograd_conv1d, static_argnums=2)(x, w, m)
    # Outputs O(1); F(6, 3)'s constants (down to 1/90) cost a few 1e-6 in float32.
    np.testing.assert_allclose(y, numpy_conv(x, w, 1, (1, 1)), atol=3e-5)
    r = rand(8, y.shape)
    grad = jax.grad(lambda x, w: jnp.sum(conv1d.winograd_conv1d(x, w, m) * r), (0, 1))
    dx, dw = jax.jit(grad)(x, w)
    want_dx, want_dw = numpy_grads(x, w, r, 1, (1, 1))
    np.testing.assert_allclose(dx, want_dx, atol=3e-5)
    np.testing.assert_allclose(dw, want_dw, atol=1e-4)


def test_dispatcher_takes_the_matrix_product_only_where_it_applies():
    x, w = rand(3, (2, 12, 8)), rand(4, (3, 8, 8), 0.2)

    def grad_hlo(f, x, w):
        g = jax.grad(lambda x, w: jnp.sum(f(x, w) ** 2), (0, 1))
        return jax.jit(g).lower(x, w).as_text()

    conv = lambda x, w: conv1d.conv_general_dilated(x, w, (1,), ((1, 1),), dimension_numbers=DN)
    # Eligible: the filter gradient has no convolution left (forward and input gradient do).
    lowered = grad_hlo(conv, x, w)
    assert lowered.count("convolution(") == 2 and "dot_general" in lowered
    g = jax.grad(lambda w: jnp.sum(conv(x, w) ** 2))(w)
    g_ref = jax.grad(lambda w: jnp.sum(direct(x, w, 1, (1, 1)) ** 2))(w)
    np.testing.assert_allclose(g, g_ref, atol=1e-5 * float(jnp.abs(g_ref).max()))
    # Everything else is XLA's convolution itself, bit for bit, gradients included.
    cases = {
        "2-D": (
            x[:, None],
            w[None],
            ((1, 1), (1, 1)),
            dict(dimension_numbers=("NHWC", "HWIO", "NHWC")),
        ),
        "SAME string": (x, w, "SAME", dict(dimension_numbers=DN)),
        "dilation": (x, w, ((2, 2),), dict(dimension_numbers=DN, rhs_dilation=(2,))),
        "groups": (x, w[:, :4], ((1, 1),), dict(dimension_numbers=DN, feature_group_count=2)),
        "bfloat16": (
            x.astype(jnp.bfloat16),
            w.astype(jnp.bfloat16),
            ((1, 1),),
            dict(dimension_numbers=DN),
        ),
        "NCW": (
            x.transpose(0, 2, 1),
            w.transpose(2, 1, 0),
            ((1, 1),),
            dict(dimension_numbers=("NCW", "OIW", "NCW")),
        ),
    }
    for name, (xi, wi, padding, kw) in cases.items():
        strides = (1,) * (xi.ndim - 2)
        f = lambda a, b: conv1d.conv_general_dilated(a, b, strides, padding, **kw)
        ref = lambda a, b: jax.lax.conv_general_dilated(a, b, strides, padding, **kw)
        assert grad_hlo(f, xi, wi).count("convolution(") == 3, name
        np.testing.assert_array_equal(f(xi, wi), ref(xi, wi), err_msg=name)


def test_dispatcher_takes_winograd_only_for_wide_kernel3_stride1_padding1():
    """MIN_CHANNELS channels in and out and MIN_TILES tiles: Winograd, no convolution left at
    all; one channel fewer either side, one tile fewer, or stride 2: the matrix-product filter
    gradient (two convolutions)."""
    c, b = conv1d.MIN_CHANNELS, conv1d.MIN_TILES // 4
    x, w = rand(9, (b, 4 * conv1d.TILE, c)), rand(10, (3, c, c), 1 / np.sqrt(3 * c))
    for stride, (xi, wi), want in [
        (1, (x, w), 0),
        (1, (x[..., 1:], w[:, 1:]), 2),
        (1, (x, w[..., 1:]), 2),
        (1, (x[1:], w), 2),
        (2, (x, w), 2),
    ]:
        f = lambda a, b, s=stride: conv1d.conv_general_dilated(
            a, b, (s,), ((1, 1),), dimension_numbers=DN
        )
        g = jax.grad(lambda a, b: jnp.sum(f(a, b) ** 2), (0, 1))
        assert jax.jit(g).lower(xi, wi).as_text().count("convolution(") == want, (stride, wi.shape)
        ref = direct(xi, wi, stride, (1, 1))
        np.testing.assert_allclose(f(xi, wi), ref, atol=1e-5 * float(jnp.abs(ref).max()))


def test_nnx_conv_with_the_dispatcher_equals_a_plain_conv():
    make = lambda **kw: nnx.Conv(8, 6, (3,), (2,), padding=((1, 1),), rngs=nnx.Rngs(0), **kw)
    plain, fast = make(), make(conv_general_dilated=conv1d.conv_general_dilated)
    x = rand(5, (2, 15, 8))
    np.testing.assert_array_equal(fast(x), plain(x))
    loss = lambda m: jnp.sum(jnp.sin(m(x)))
    g_fast = nnx.grad(loss)(fast)["kernel"][...]
    g_plain = nnx.grad(loss)(plain)["kernel"][...]
    np.testing.assert_allclose(g_fast, g_plain, atol=1e-5 * float(jnp.abs(g_plain).max()))


def test_xla_convolutions_traces_the_direct_form_and_model_flops_count_it():
    """Inside ``xla_convolutions`` an eligible convolution is XLA's (the benchmarks count model
    FLOPs so), even for a function already traced outside; outside again it is Winograd's."""
    from benchmarks.common import model_flops

    b, t, c = conv1d.MIN_TILES // 2, 2 * conv1d.TILE, conv1d.MIN_CHANNELS
    x, w = rand(11, (b, t, c)), rand(12, (3, c, c), 1 / np.sqrt(3 * c))

    def f(x, w):
        return conv1d.conv_general_dilated(x, w, (1,), ((1, 1),), dimension_numbers=DN)

    fast = jax.jit(f).lower(x, w).as_text()
    with conv1d.conv_dispatch.xla_convolutions():
        direct_text = jax.jit(f).lower(x, w).as_text()
    assert "convolution(" not in fast and direct_text.count("convolution(") == 1
    assert "convolution(" not in jax.jit(f).lower(x, w).as_text()
    # XLA counts the taps that meet the input: 3 t - 2 per output channel (the two edge taps
    # read padding), c multiply-adds each, for b and c outputs; Winograd would do ~8/18 of that.
    assert model_flops(jax.jit(f).lower, x, w) == 2 * b * c * c * (3 * t - 2)  # an integer

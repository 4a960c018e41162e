"""1-D ResNet encoder: shapes, PyTorch conv/BN conventions against NumPy, parameter count of the
ResNet-34 layout against an independent count, and BatchStat separation for the trainer."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxsafe.nn.resnet1d import (
    BasicBlock1D,
    ProjectionHead,
    ResNet1D,
    apply_with_batch_stats,
    resnet34_1d,
    resnet_small_1d,
)


def count(state) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state))


def torch_resnet_counts(c, widths, blocks, stem_k=7, k=3):
    """(params, batch stats) of the reference's ResNet(BasicBlock, blocks), layer by layer."""
    params = stats = 0

    def conv(cin, cout, kk):
        nonlocal params
        params += cin * cout * kk  # bias=False everywhere in the reference

    def bn(ch):
        nonlocal params, stats
        params += 2 * ch  # weight, bias
        stats += 2 * ch  # running_mean, running_var

    conv(c, widths[0], stem_k)
    bn(widths[0])
    cin = widths[0]
    for stage, (w, n) in enumerate(zip(widths, blocks)):
        for i in range(n):
            stride = 2 if stage > 0 and i == 0 else 1
            conv(cin, w, k)
            bn(w)
            conv(w, w, k)
            bn(w)
            if stride != 1 or cin != w:
                conv(cin, w, 1)
                bn(w)
            cin = w
    return params, stats


def np_conv1d(x, w, stride, pad):
    """PyTorch Conv1d on (B, T, Cin) with kernel (K, Cin, Cout), zero padding `pad` both sides."""
    b, t, _ = x.shape
    k = w.shape[0]
    xp = np.pad(x, ((0, 0), (pad, pad), (0, 0)))
    t_out = (t + 2 * pad - k) // stride + 1
    out = np.zeros((b, t_out, w.shape[2]))
    for o in range(t_out):
        out[:, o] = np.einsum("bkc,kcd->bd", xp[:, o * stride : o * stride + k], w)
    return out


def abstract(make):
    """The model with ShapeDtypeStruct variables: counts and shapes without initialising."""
    return nnx.eval_shape(make)


def out_shape(model, shape):
    graphdef, state = nnx.split(model)
    return jax.eval_shape(
        lambda s, x: nnx.merge(graphdef, s)(x), state, jax.ShapeDtypeStruct(shape, jnp.float32)
    ).shape


@pytest.fixture(scope="module")
def tiny():
    """A small real model: 2 stages, 1 and 2 blocks, with the encoder fc."""
    return ResNet1D(3, widths=(4, 8), blocks=(1, 2), out_features=5, rngs=nnx.Rngs(0))


def test_resnet34_parameter_count_matches_reference_layout():
    model = abstract(lambda: resnet34_1d(12, rngs=nnx.Rngs(0)))
    params = nnx.state(model, nnx.Param)
    stats = nnx.state(model, nnx.BatchStat)
    p, s = torch_resnet_counts(12, (64, 128, 256, 512), (3, 4, 6, 3))
    assert count(params) == p == 7_217_792 + 448 * 12
    assert count(stats) == s
    # 36 BatchNorms in ResNet-34: stem + 16 blocks x 2 + 3 projection shortcuts.
    assert len(jax.tree.leaves(stats)) == 2 * 36
    assert out_shape(model, (2, 37, 12)) == (2, 512) and model.features == 512


@pytest.mark.slow
def test_small_resnet_count_shapes_and_head():
    enc = abstract(lambda: resnet_small_1d(3, out_features=40, rngs=nnx.Rngs(1)))
    p, _ = torch_resnet_counts(3, (16, 32, 64, 128), (3, 4, 6, 3))
    assert count(nnx.state(enc, nnx.Param)) == p + 128 * 40 + 40
    for t in (8, 9, 33):
        assert out_shape(enc, (4, t, 3)) == (4, 40)
    head = ProjectionHead(40, 32, 16, rngs=nnx.Rngs(2))
    assert count(nnx.state(head, nnx.Param)) == 40 * 32 + 32 + 32 * 16 + 16
    chex.assert_shape(head(jnp.ones((4, 40))), (4, 16))


@pytest.mark.slow
def test_tiny_forward_shape(tiny):
    chex.assert_shape(tiny(jnp.ones((2, 11, 3)), use_running_average=True), (2, 5))


def test_stride2_block_matches_numpy_pytorch_padding():
    # Train-mode BN of a fresh block normalises with the batch statistics; compare the first
    # conv + BN + ReLU of a stride-2 block with NumPy (PyTorch padding 1 on both sides).
    blk = BasicBlock1D(2, 3, stride=2, rngs=nnx.Rngs(0))
    x = np.random.default_rng(0).standard_normal((4, 9, 2)).astype(np.float32)
    h = np.asarray(jax.nn.relu(blk.bn1(blk.conv1(x))))
    conv = np_conv1d(x, np.asarray(blk.conv1.kernel[...], np.float64), stride=2, pad=1)
    assert conv.shape == (4, 5, 3)  # ceil(9 / 2)
    mean, var = conv.mean(axis=(0, 1)), conv.var(axis=(0, 1))
    np.testing.assert_allclose(h, np.maximum((conv - mean) / np.sqrt(var + 1e-5), 0), atol=1e-4)
    # PyTorch BN momentum 0.1: running = 0.9 * (0, 1) + 0.1 * batch statistics.
    np.testing.assert_allclose(blk.bn1.mean[...], 0.1 * mean, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(blk.bn1.var[...], 0.9 + 0.1 * var, rtol=1e-4, atol=1e-6)
    # Output of the whole block: shortcut is a stride-2 1x1 conv, also of length 5.
    chex.assert_shape(blk(x), (4, 5, 3))


def test_stem_is_kernel7_stride1_pad3_and_init_is_torch_uniform():
    enc = ResNet1D(2, widths=(4,), blocks=(1,), rngs=nnx.Rngs(0))
    kernel = np.asarray(enc.stem.kernel[...])
    assert kernel.shape == (7, 2, 4)
    assert np.abs(kernel).max() <= 1 / np.sqrt(7 * 2)  # U(+-1/sqrt(fan_in)), fan_in = k Cin
    x = np.random.default_rng(1).standard_normal((3, 10, 2)).astype(np.float32)
    np.testing.assert_allclose(
        enc.stem(x), np_conv1d(x, kernel.astype(np.float64), 1, 3), atol=1e-5
    )


@pytest.mark.slow
def test_batch_stats_are_separate_from_params(tiny):
    graphdef, params, stats, rest = nnx.split(tiny, nnx.Param, nnx.BatchStat, ...)
    assert all(
        isinstance(v, nnx.Param)
        for v in jax.tree.leaves(params, is_leaf=lambda v: isinstance(v, nnx.Variable))
    )
    assert count(stats) == torch_resnet_counts(3, (4, 8), (1, 2))[1]
    assert not jax.tree.leaves(rest)
    x = np.random.default_rng(0).standard_normal((4, 16, 3)).astype(np.float32)

    @jax.jit
    def train_step(params, stats, x):
        def loss(p):
            y, new = apply_with_batch_stats(graphdef, p, stats, rest, lambda m, x: m(x), x)
            return jnp.sum(y**2), new

        return jax.grad(loss, has_aux=True)(params)

    grads, new_stats = train_step(params, stats, x)
    # Same structure as the inputs; gradients only for params, the statistics moved.
    assert jax.tree.structure(grads) == jax.tree.structure(params)
    assert jax.tree.structure(new_stats) == jax.tree.structure(stats)
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
    assert not np.allclose(new_stats["stem_bn"]["mean"][...], 0.0, atol=1e-4)
    assert np.allclose(stats["stem_bn"]["mean"][...], 0.0, atol=0)  # exact: inputs not modified
    # Same statistics as the stateful module call (on a copy: the fixture stays fresh).
    model = nnx.merge(graphdef, params, stats, rest)
    model(x)
    for a, b in zip(jax.tree.leaves(nnx.state(model, nnx.BatchStat)), jax.tree.leaves(new_stats)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_running_average_mode_is_per_sample(tiny):
    x = np.random.default_rng(0).standard_normal((4, 16, 3)).astype(np.float32)
    model = nnx.merge(*nnx.split(tiny))
    # Evaluation uses the running statistics: a sample's features do not depend on the batch.
    full = model(x, use_running_average=True)
    np.testing.assert_allclose(
        model(x[:1], use_running_average=True), full[:1], rtol=1e-5, atol=1e-6
    )
    # Training mode normalises with the batch statistics: they do.
    assert not np.allclose(model(x[:2])[:1], model(x)[:1], atol=1e-4)


def test_bad_input():
    with pytest.raises(ValueError, match=r"widths=\(8, 16\) and blocks=\(1,\) must be"):
        ResNet1D(3, widths=(8, 16), blocks=(1,), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"kernel_size=4, stem_kernel_size=7: expected odd"):
        ResNet1D(3, widths=(8,), blocks=(1,), kernel_size=4, rngs=nnx.Rngs(0))
    enc = ResNet1D(3, widths=(8,), blocks=(1,), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"x must have shape \(B, T, 3\), got \(2, 10, 4\)"):
        enc(jnp.ones((2, 10, 4)))

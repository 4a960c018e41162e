"""Low-rank adapters (jaxsafe.nn.adapters): the branch's maths against numpy, zero
initialisation leaving a UNet's outputs bit-identical, which layers are adapted, per-sample
strength, and the parameter round trip."""

import functools
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxsafe.nn import adapters
from jaxsafe.nn.unet2d_condition import UNet2DConditionConfig, UNet2DConditionModel
from jaxsafe.treepath import named_leaves, path_name

TINY_UNET = {
    "sample_size": 8,
    "block_out_channels": (16, 32),
    "layers_per_block": 1,
    "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": 12,
    "attention_head_dim": 2,
    "norm_num_groups": 4,
}


def randomize(model, names_pred, seed, scale=0.3):
    """Sets the parameters whose name satisfies ``names_pred`` to N(0, scale²) draws."""
    rng = np.random.default_rng(seed)
    state = nnx.state(model, nnx.Param)
    flat, treedef = jax.tree_util.tree_flatten_with_path(state)
    leaves = [
        jnp.asarray(scale * rng.standard_normal(x.shape), x.dtype)
        if names_pred(path_name(p))
        else x
        for p, x in flat
    ]
    nnx.update(model, jax.tree_util.tree_unflatten(treedef, leaves))
    return model


@pytest.fixture(scope="module")
def unet():
    # Built abstractly and filled on the host (eager initialisation compiles op by op).
    graphdef, state = nnx.split(
        nnx.eval_shape(
            lambda: UNet2DConditionModel(UNet2DConditionConfig(**TINY_UNET), rngs=nnx.Rngs(0))
        )
    )
    rng = np.random.default_rng(0)
    return nnx.merge(
        graphdef,
        jax.tree.map(  # biases and norms too
            lambda x: jnp.asarray(0.3 * rng.standard_normal(x.shape), x.dtype), state
        ),
    )


@functools.lru_cache
def _compiled(graphdef):
    @jax.jit
    def apply(state, strength, *args):
        m = nnx.merge(graphdef, state)
        if strength is None:
            return m(*args)
        with adapters.strength(m, strength):
            return m(*args)

    return apply


def run(model, *args, strength=None):
    """``model(*args)`` (with the adapters at ``strength``) as one compiled program, cached per
    graph (eager UNet calls are slow on CPU)."""
    graphdef, state = nnx.split(model)
    return np.asarray(_compiled(graphdef)(state, strength, *args))


@pytest.fixture(scope="module")
def inputs():
    k = jax.random.split(jax.random.key(0), 2)
    return (
        jax.random.normal(k[0], (2, 8, 8, 4)),
        jnp.array([17, 640]),
        jax.random.normal(k[1], (2, 5, 12)),
    )


def params(model):
    return {n: np.asarray(v) for n, v in named_leaves(nnx.state(model, nnx.Param)).items()}


class TestAdapterMaths(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_branch_against_numpy(self):
        rank, alpha = 2, 3.0
        layer = adapters.AdaptedLinear(
            nnx.Linear(5, 7, rngs=nnx.Rngs(0)), rank=rank, alpha=alpha, rngs=nnx.Rngs(1)
        )
        randomize(layer, lambda n: True, seed=1)  # U ≠ 0 and a non-zero bias
        graphdef, state = nnx.split(layer)
        p = params(layer)
        x = np.random.default_rng(2).standard_normal((3, 4, 5)).astype(np.float32)
        s = np.array([0.0, 0.25, 1.0], np.float32)

        @self.variant
        def apply(state, x, s):
            m = nnx.merge(graphdef, state)
            with adapters.strength(m, s):
                return m(x)

        want = (
            x @ p["kernel"]
            + p["bias"]
            + s[:, None, None]
            * (alpha / rank)
            * (x @ p["adapter/down/kernel"])
            @ p["adapter/up/kernel"]
        )
        np.testing.assert_allclose(apply(state, x, s), want, rtol=1e-5, atol=1e-5)
        # The default strength is 1 (the whole branch).
        np.testing.assert_allclose(
            layer(x),
            x @ p["kernel"]
            + p["bias"]
            + (alpha / rank) * (x @ p["adapter/down/kernel"]) @ p["adapter/up/kernel"],
            rtol=1e-5,
            atol=1e-5,
        )

    def test_initialisation(self):
        layer = adapters.AdaptedLinear(nnx.Linear(50, 7, rngs=nnx.Rngs(0)), rngs=nnx.Rngs(1))
        down = np.asarray(layer.adapter.down.kernel[...])
        assert down.shape == (50, 1) and layer.adapter.up.kernel[...].shape == (1, 7)
        np.testing.assert_array_equal(layer.adapter.up.kernel[...], 0.0)
        # PyTorch nn.Linear's default: U(−1/√fan_in, 1/√fan_in), and not all tiny.
        assert np.abs(down).max() <= 1 / np.sqrt(50) and np.abs(down).max() > 0.5 / np.sqrt(50)


@pytest.mark.slow
def test_zero_initialised_adapters_leave_the_unet_bit_identical(unet, inputs):
    adapted = adapters.add_adapters(unet, rank=1, rngs=nnx.Rngs(3))
    np.testing.assert_array_equal(run(adapted, *inputs), run(unet, *inputs))


def test_exactly_the_transformer_block_linears_are_adapted_in_a_copy(unet):
    adapted = adapters.add_adapters(unet, rank=1, rngs=nnx.Rngs(3))
    before, after = params(unet), params(adapted)
    # Base parameters keep their names and values; only adapter parameters are added.
    assert {n: v for n, v in after.items() if "/adapter/" not in n}.keys() == before.keys()
    for n, v in before.items():
        np.testing.assert_array_equal(after[n], v)
    layer = re.compile(
        r"transformer_blocks/\d+/(attn[12]/(to_q|to_k|to_v|to_out/0)"
        r"|ff/net/(0/proj|2))/kernel$"
    )
    expected = {
        n[: -len("kernel")] + f"adapter/{f}/kernel"
        for n in before
        if layer.search(n)
        for f in ("down", "up")
    }
    assert {n for n in after if "/adapter/" in n} == expected
    # 4 transformer blocks (down, mid, 2 up) x (2 attentions x 4 + 2 feed-forward) layers.
    assert len(expected) == 4 * 10 * 2
    # The original UNet is left as it was.
    assert not any(isinstance(m, adapters.AdaptedLinear) for _, m in nnx.iter_graph(unet))


@pytest.mark.slow
def test_strength_zero_is_the_original_per_sample_and_restored(unet, inputs):
    adapted = randomize(
        adapters.add_adapters(unet, rank=1, rngs=nnx.Rngs(3)), adapters.is_adapter_param, seed=4
    )
    base, full = run(unet, *inputs), run(adapted, *inputs)
    assert np.abs(full - base).max() > 1e-3
    np.testing.assert_allclose(
        run(adapted, *inputs, strength=jnp.ones(2)), full, rtol=1e-6, atol=1e-6
    )
    np.testing.assert_allclose(
        run(adapted, *inputs, strength=jnp.zeros(2)), base, rtol=1e-6, atol=1e-6
    )
    # Per sample in one batch: sample 0 with the membrane, sample 1 without.
    mixed = run(adapted, *inputs, strength=jnp.array([1.0, 0.0]))
    np.testing.assert_allclose(mixed[0], full[0], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(mixed[1], base[1], rtol=1e-6, atol=1e-6)
    # Eagerly, the strength is back to 1 after the block.
    with adapters.strength(adapted, 0.5):
        pass
    values = named_leaves(nnx.state(adapted, adapters.AdapterStrength))
    assert len(values) == 40 and all(float(v) == 1.0 for v in values.values())


def test_errors(unet, inputs):
    layer = adapters.AdaptedLinear(nnx.Linear(5, 7, rngs=nnx.Rngs(0)), rngs=nnx.Rngs(1))
    with (
        pytest.raises(ValueError, match=r"strength must be a scalar or \(B,\) with B = 3"),
        adapters.strength(layer, jnp.ones(2)),
    ):
        layer(jnp.ones((3, 5)))
    with (
        pytest.raises(ValueError, match=r"strength must be a scalar or \(B,\), got shape"),
        adapters.strength(layer, jnp.ones((2, 2))),
    ):
        pass
    with pytest.raises(ValueError, match="rank must be a positive integer, got 0"):
        adapters.AdaptedLinear(nnx.Linear(5, 7, rngs=nnx.Rngs(0)), rank=0, rngs=nnx.Rngs(1))
    with pytest.raises(ValueError, match="without an adapter"):
        adapters.AdaptedLinear(layer, rngs=nnx.Rngs(1))
    with pytest.raises(ValueError, match="matches no nnx.Linear"):
        adapters.add_adapters(unet, rngs=nnx.Rngs(0), select=lambda n: False)
    with pytest.raises(ValueError, match="has no adapters"), adapters.strength(unet, 1.0):
        pass


def test_adapter_params_round_trip(unet, inputs):
    a = randomize(
        adapters.add_adapters(unet, rank=1, rngs=nnx.Rngs(3)), adapters.is_adapter_param, seed=5
    )
    b = adapters.add_adapters(unet, rank=1, rngs=nnx.Rngs(6))
    tensors = {k: np.asarray(v) for k, v in adapters.adapter_params(a).items()}
    assert tensors and all("/adapter/" in k for k in tensors)
    adapters.load_adapter_params(b, tensors)
    np.testing.assert_array_equal(run(b, *inputs), run(a, *inputs))
    name = min(tensors)
    with pytest.raises(KeyError, match="missing"):
        adapters.load_adapter_params(b, {k: v for k, v in tensors.items() if k != name})
    with pytest.raises(ValueError, match=re.escape(f"{name}: shape")):
        adapters.load_adapter_params(b, {**tensors, name: np.zeros((1, 1), np.float32)})

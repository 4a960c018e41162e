"""Tests for the grokking models (jaxsafe.nn.mlp.GrokMLP,
jaxsafe.nn.transformer.GrokTransformer)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxsafe.data.algorithmic import modular_arithmetic, one_hot_operands
from jaxsafe.nn import GrokMLP, GrokTransformer

P = 113


def _flat_params(model):
    """{'a/b/c': np.ndarray} of the module's nnx.Param leaves."""
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    return {"/".join(map(str, path)): np.asarray(v[...]) for path, v in flat}


def _abstract_param_count(make):
    """Number of parameters of ``make()``, from shapes only (nnx.eval_shape, no compute)."""
    leaves = jax.tree_util.tree_leaves(nnx.state(nnx.eval_shape(make), nnx.Param))
    return sum(int(np.prod(leaf.shape)) for leaf in leaves)


@pytest.fixture(scope="module")
def transformer():
    """Reference-size transformer in eval mode (dropout off), shared to save compile time."""
    model = GrokTransformer(rngs=nnx.Rngs(5))
    model.eval()
    return model


@pytest.fixture(scope="module")
def data():
    return modular_arithmetic(p=P, op="add", train_fraction=0.4, seed=0)


# ----------------------------------------------------------------------------- MLP


def _numpy_mlp(params, x_float, n_layers, alpha, use_bias=False):
    h = x_float.astype(np.float64)
    for i in range(n_layers):
        h = h @ params[f"layers/{i}/kernel"].astype(np.float64)
        if use_bias:
            h = h + params[f"layers/{i}/bias"].astype(np.float64)
        if i < n_layers - 1:
            h = np.maximum(h, 0.0)
    return alpha * h


def test_mlp_param_names_and_count():
    model = GrokMLP.for_modular(P, rngs=nnx.Rngs(0))
    params = _flat_params(model)
    assert {k: v.shape for k, v in params.items()} == {
        "layers/0/kernel": (226, 200),
        "layers/1/kernel": (200, 200),
        "layers/2/kernel": (200, 113),
    }
    n = sum(v.size for v in params.values())
    assert n == 226 * 200 + 200 * 200 + 200 * 113 == 107_800
    assert n == GrokMLP.num_params((226, 200, 200, 113), use_bias=False)

    n_parity = _abstract_param_count(lambda: GrokMLP(43, 2, use_bias=True, rngs=nnx.Rngs(1)))
    assert n_parity == 43 * 200 + 200 + 200 * 200 + 200 + 200 * 2 + 2
    assert n_parity == GrokMLP.num_params((43, 200, 200, 2), use_bias=True)

    n_deep = _abstract_param_count(lambda: GrokMLP(10, 3, hidden=(7, 5, 4), rngs=nnx.Rngs(0)))
    assert n_deep == 10 * 7 + 7 * 5 + 5 * 4 + 4 * 3


def test_mlp_gather_equals_numpy_one_hot_forward(data):
    alpha = 2.5
    model = GrokMLP.for_modular(P, alpha=alpha, rngs=nnx.Rngs(3))
    params = _flat_params(model)
    x = data["train"]["x"][:257]
    got = np.asarray(model(x))
    want = _numpy_mlp(params, one_hot_operands(x, P), 3, alpha)
    assert got.shape == (257, P)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # the float (one-hot matmul) path gives the same function
    got_float = np.asarray(model(one_hot_operands(x, P)))
    np.testing.assert_allclose(got, got_float, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_mlp_gather_with_bias_and_same_gradients(data):
    model = GrokMLP.for_modular(P, use_bias=True, rngs=nnx.Rngs(4))
    params = _flat_params(model)
    x = data["train"]["x"][:64]
    y = data["train"]["y"][:64]
    np.testing.assert_allclose(
        np.asarray(model(x)),
        _numpy_mlp(params, one_hot_operands(x, P), 3, 1.0, use_bias=True),
        rtol=1e-5,
        atol=1e-5,
    )

    graphdef, state = nnx.split(model, nnx.Param)

    def loss(st, inp):
        logits = nnx.merge(graphdef, st)(inp)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))

    g_int = jax.grad(loss)(state, jnp.asarray(x))
    g_oh = jax.grad(loss)(state, jnp.asarray(one_hot_operands(x, P)))
    for a, b in zip(jax.tree_util.tree_leaves(g_int), jax.tree_util.tree_leaves(g_oh)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_mlp_sparse_parity_float_inputs():
    model = GrokMLP(43, 2, use_bias=True, rngs=nnx.Rngs(0))
    x = np.random.default_rng(0).integers(0, 2, (16, 43)).astype(np.float32)
    np.testing.assert_allclose(
        np.asarray(model(x)),
        _numpy_mlp(_flat_params(model), x, 3, 1.0, use_bias=True),
        rtol=1e-5,
        atol=1e-5,
    )
    with pytest.raises(ValueError, match=r"need vocab_size"):
        model(np.zeros((4, 2), np.int32))
    with pytest.raises(ValueError, match=r"expected \(M, 43\) features"):
        model(np.zeros((4, 42), np.float32))
    with pytest.raises(ValueError, match=r"must equal 2 \* vocab_size"):
        GrokMLP(100, 113, vocab_size=113, rngs=nnx.Rngs(0))


def test_mlp_torch_default_init():
    model = GrokMLP.for_modular(P, use_bias=True, rngs=nnx.Rngs(0))
    params = _flat_params(model)
    for i, fan_in in enumerate((226, 200, 200)):
        bound = 1.0 / np.sqrt(fan_in)
        for name in ("kernel", "bias"):
            w = params[f"layers/{i}/{name}"]
            assert np.abs(w).max() <= bound
            assert np.abs(w).max() > 0.95 * bound  # uses the whole interval
        w = params[f"layers/{i}/kernel"]
        # U(-b, b) has std b / sqrt(3) = 1 / sqrt(3 fan_in)
        np.testing.assert_allclose(w.std(), 1.0 / np.sqrt(3 * fan_in), rtol=0.03, atol=1e-7)
        assert abs(w.mean()) < 0.05 * bound


def test_mlp_alpha_scales_logits(data):
    x = data["test"]["x"][:32]
    base = np.asarray(GrokMLP.for_modular(P, rngs=nnx.Rngs(7))(x))
    scaled = np.asarray(GrokMLP.for_modular(P, alpha=4.0, rngs=nnx.Rngs(7))(x))
    np.testing.assert_allclose(scaled, 4.0 * base, rtol=1e-6, atol=1e-6)
    assert not np.allclose(base, 0.0, atol=1e-4)
    # alpha is static, not a trainable parameter
    assert len(_flat_params(GrokMLP.for_modular(P, alpha=4.0, rngs=nnx.Rngs(7)))) == 3


def test_mlp_jit_and_split_merge_roundtrip(data):
    model = GrokMLP.for_modular(P, rngs=nnx.Rngs(11))
    x = jnp.asarray(data["train"]["x"][:100])
    eager = model(x)
    graphdef, state = nnx.split(model)
    fwd = jax.jit(lambda st, inp: nnx.merge(graphdef, st)(inp))
    np.testing.assert_array_equal(np.asarray(nnx.merge(graphdef, state)(x)), np.asarray(eager))
    np.testing.assert_allclose(np.asarray(fwd(state, x)), np.asarray(eager), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(
        np.asarray(nnx.jit(lambda m, inp: m(inp))(model, x)),
        np.asarray(eager),
        rtol=1e-6,
        atol=1e-6,
    )


# ---------------------------------------------------------------------- Transformer


def _layer_norm(x, scale, bias, eps=1e-5):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * scale + bias


def _numpy_transformer(p, tokens, num_heads, norm_first=False):
    """Independent float64 PyTorch-semantics forward (eval mode), all positions."""
    p = {k: v.astype(np.float64) for k, v in p.items()}
    h = p["embed/embedding"][tokens]  # (M, L, d) -- no positional embedding
    m, length, d = h.shape
    hd = d // num_heads
    pre = "layers/0/"

    def attn(z):
        qkv = z @ p[pre + "attn/in_proj/kernel"] + p[pre + "attn/in_proj/bias"]
        q, k, v = qkv[..., :d], qkv[..., d : 2 * d], qkv[..., 2 * d :]
        out = np.zeros_like(z)
        for hh in range(num_heads):
            sl = slice(hh * hd, (hh + 1) * hd)
            s = q[..., sl] @ np.swapaxes(k[..., sl], -1, -2) / np.sqrt(hd)  # (M, L, L), no mask
            s = np.exp(s - s.max(-1, keepdims=True))
            s = s / s.sum(-1, keepdims=True)
            out[..., sl] = s @ v[..., sl]
        return out @ p[pre + "attn/out_proj/kernel"] + p[pre + "attn/out_proj/bias"]

    def ff(z):
        z = np.maximum(z @ p[pre + "linear1/kernel"] + p[pre + "linear1/bias"], 0.0)
        return z @ p[pre + "linear2/kernel"] + p[pre + "linear2/bias"]

    def ln(z, i):
        return _layer_norm(z, p[pre + f"norm{i}/scale"], p[pre + f"norm{i}/bias"])

    if norm_first:
        h = h + attn(ln(h, 1))
        h = h + ff(ln(h, 2))
    else:
        h = ln(h + attn(h), 1)
        h = ln(h + ff(h), 2)
    return h @ p["head/kernel"] + p["head/bias"]


@pytest.mark.slow
def test_transformer_param_names_and_count(transformer):
    params = _flat_params(transformer)
    shapes = {k: v.shape for k, v in params.items()}
    assert shapes == {
        "embed/embedding": (113, 128),
        "layers/0/attn/in_proj/kernel": (128, 384),
        "layers/0/attn/in_proj/bias": (384,),
        "layers/0/attn/out_proj/kernel": (128, 128),
        "layers/0/attn/out_proj/bias": (128,),
        "layers/0/linear1/kernel": (128, 2048),
        "layers/0/linear1/bias": (2048,),
        "layers/0/linear2/kernel": (2048, 128),
        "layers/0/linear2/bias": (128,),
        "layers/0/norm1/scale": (128,),
        "layers/0/norm1/bias": (128,),
        "layers/0/norm2/scale": (128,),
        "layers/0/norm2/bias": (128,),
        "head/kernel": (128, 113),
        "head/bias": (113,),
    }
    n = sum(v.size for v in params.values())
    # nn.Embedding + TransformerEncoderLayer(128, 4) + nn.Linear(128, 113), counted by hand:
    by_hand = (
        113 * 128  # embedding
        + 3 * 128 * 128
        + 3 * 128  # in_proj weight + bias
        + 128 * 128
        + 128  # out_proj
        + 128 * 2048
        + 2048  # linear1
        + 2048 * 128
        + 128  # linear2
        + 4 * 128  # norm1, norm2
        + 128 * 113
        + 113
    )  # output linear
    assert n == by_hand == 622_065 == GrokTransformer.num_params()
    n_two = _abstract_param_count(
        lambda: GrokTransformer(
            17, 5, d_model=16, num_heads=2, num_layers=2, dim_feedforward=32, rngs=nnx.Rngs(0)
        )
    )
    assert n_two == GrokTransformer.num_params(17, 5, 16, 2, 32)


def test_transformer_torch_default_init(transformer):
    params = _flat_params(transformer)
    d, f = 128, 2048
    np.testing.assert_allclose(
        params["embed/embedding"].std(), 1.0, rtol=0.03, atol=1e-6
    )  # N(0, 1)
    xb = np.sqrt(6.0 / (d + 3 * d))  # xavier_uniform on PyTorch's (3d, d) in_proj_weight
    w = params["layers/0/attn/in_proj/kernel"]
    assert np.abs(w).max() <= xb and np.abs(w).max() > 0.95 * xb
    np.testing.assert_allclose(w.std(), xb / np.sqrt(3), rtol=0.03, atol=1e-7)
    for name in ("attn/in_proj/bias", "attn/out_proj/bias", "norm1/bias", "norm2/bias"):
        assert np.all(params["layers/0/" + name] == 0.0), name
    assert np.all(params["layers/0/norm1/scale"] == 1.0)
    for name, fan_in in (
        ("layers/0/attn/out_proj/kernel", d),
        ("layers/0/linear1/kernel", d),
        ("layers/0/linear1/bias", d),
        ("layers/0/linear2/kernel", f),
        ("layers/0/linear2/bias", f),
        ("head/kernel", d),
        ("head/bias", d),
    ):
        assert np.abs(params[name]).max() <= 1.0 / np.sqrt(fan_in), name
    np.testing.assert_allclose(
        params["layers/0/linear1/kernel"].std(), 1.0 / np.sqrt(3 * d), rtol=0.03, atol=1e-7
    )


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.slow
def test_transformer_matches_numpy_reference(data, norm_first):
    model = GrokTransformer(alpha=1.5, norm_first=norm_first, rngs=nnx.Rngs(5))
    model.eval()  # disable dropout
    x = data["train"]["x"][:40]
    got = np.asarray(model(x))
    assert got.shape == (40, P)
    ref = _numpy_transformer(_flat_params(model), x, num_heads=4, norm_first=norm_first)
    np.testing.assert_allclose(got, 1.5 * ref[:, -1], rtol=2e-4, atol=2e-4)
    np.testing.assert_allclose(
        np.asarray(model(x, all_positions=True)), 1.5 * ref, rtol=2e-4, atol=2e-4
    )


def test_transformer_order_sensitivity_without_positions(transformer):
    model = transformer
    ab = np.array([[3, 50], [7, 9], [100, 1]], np.int32)
    ba = ab[:, ::-1].copy()
    out_ab = np.asarray(model(ab, all_positions=True))
    out_ba = np.asarray(model(ba, all_positions=True))
    # Read at the last token, (a, b) and (b, a) give different logits: the query token
    # differs, so a - b and b - a are distinguishable.
    assert np.abs(out_ab[:, -1] - out_ba[:, -1]).max() > 1e-2
    # No positional embeddings + unmasked attention: swapping the tokens swaps the outputs.
    np.testing.assert_allclose(out_ab[:, 1], out_ba[:, 0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out_ab[:, 0], out_ba[:, 1], rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_transformer_dropout_train_vs_eval(data):
    x = data["train"]["x"][:8]
    model = GrokTransformer(rngs=nnx.Rngs(0))  # dropout 0.1 active by default (train mode)
    a = np.asarray(model(x, rngs=nnx.Rngs(dropout=1)))
    b = np.asarray(model(x, rngs=nnx.Rngs(dropout=2)))
    assert not np.allclose(a, b, atol=1e-5)
    # Keys come only from the call: the same key gives the same masks (pure loss functions).
    np.testing.assert_array_equal(a, np.asarray(model(x, rngs=nnx.Rngs(dropout=1))))
    with pytest.raises(ValueError, match="no `rngs` argument was provided to Dropout"):
        model(x)
    model.eval()
    np.testing.assert_array_equal(np.asarray(model(x)), np.asarray(model(x)))
    no_drop = GrokTransformer(dropout_rate=0.0, rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(np.asarray(no_drop(x)), np.asarray(model(x)))


@pytest.mark.slow
def test_transformer_alpha_dtype_and_errors(data):
    x = data["train"]["x"][:8]
    m1 = GrokTransformer(dropout_rate=0.0, rngs=nnx.Rngs(1))
    m3 = GrokTransformer(dropout_rate=0.0, alpha=3.0, rngs=nnx.Rngs(1))
    np.testing.assert_allclose(np.asarray(m3(x)), 3.0 * np.asarray(m1(x)), rtol=1e-5, atol=1e-5)
    bf = GrokTransformer(dropout_rate=0.0, dtype=jnp.bfloat16, rngs=nnx.Rngs(1))
    assert bf(x).dtype == jnp.bfloat16
    assert _flat_params(bf)["head/kernel"].dtype == np.float32  # params stay float32
    with pytest.raises(ValueError, match=r"integer tokens of shape \(M, L\)"):
        m1(np.zeros((4, 2), np.float32))
    with pytest.raises(ValueError, match=r"divisible by num_heads"):
        GrokTransformer(d_model=10, num_heads=4, rngs=nnx.Rngs(0))


@pytest.mark.slow
def test_transformer_jit_and_split_merge_roundtrip(data, transformer):
    model = transformer
    x = jnp.asarray(data["test"]["x"][:64])
    eager = np.asarray(model(x))
    graphdef, state = nnx.split(model)
    np.testing.assert_array_equal(np.asarray(nnx.merge(graphdef, state)(x)), eager)
    fwd = jax.jit(lambda st, inp: nnx.merge(graphdef, st)(inp))
    np.testing.assert_allclose(np.asarray(fwd(state, x)), eager, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        np.asarray(nnx.jit(lambda m, inp: m(inp))(model, x)), eager, rtol=1e-5, atol=1e-5
    )

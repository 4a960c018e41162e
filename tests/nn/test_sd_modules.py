"""Stable Diffusion NNX modules (jaxsafe.nn.{sd_layers, unet2d_condition, autoencoder_kl,
clip_text}) against numpy re-implementations written here, closed forms and invariants.
Equivalence with diffusers/transformers themselves is in tests/weights/test_torch_equivalence.py.
"""

import math
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from subprocs import run_python

from jaxsafe.nn import sd_layers as L
from jaxsafe.nn.autoencoder_kl import AutoencoderKL, AutoencoderKLConfig
from jaxsafe.nn.clip_text import (
    CLIPTextConfig,
    CLIPTextModel,
    encode_text,
    sd1_clip_config,
    sd2_clip_config,
)
from jaxsafe.nn.unet2d_condition import (
    UNet2DConditionConfig,
    UNet2DConditionModel,
    sd15_unet_config,
    sd21_unet_config,
)
from jaxsafe.parallel import make_mesh, shardings_for
from jaxsafe.treepath import named_leaves

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
TINY_VAE = {
    "block_out_channels": (8, 16),
    "down_block_types": ("DownEncoderBlock2D",) * 2,
    "up_block_types": ("UpDecoderBlock2D",) * 2,
    "layers_per_block": 1,
    "norm_num_groups": 4,
    "sample_size": 8,
}


def random_model(make, seed=0, scale=0.3):
    """``make()`` with every parameter (biases and norm scales included) drawn from
    N(0, scale^2) on the host, so that a wrongly wired bias or scale shows up. Built from
    ``nnx.eval_shape``: eager initialisation compiles one op per shape and is slow on CPU."""
    graphdef, state = nnx.split(nnx.eval_shape(make))
    rng = np.random.default_rng(seed)
    return nnx.merge(
        graphdef,
        jax.tree.map(lambda x: jnp.asarray(scale * rng.standard_normal(x.shape), x.dtype), state),
    )


def params(model):
    return {k: np.asarray(v) for k, v in named_leaves(nnx.state(model, nnx.Param)).items()}


# ------------------------------------------------------------------ numpy reference pieces


def np_group_norm(x, groups, eps, scale, bias):
    b, h, w, c = x.shape
    g = x.reshape(b, h, w, groups, c // groups).astype(np.float64)
    mean = g.mean(axis=(1, 2, 4), keepdims=True)
    var = ((g - mean) ** 2).mean(axis=(1, 2, 4), keepdims=True)
    return ((g - mean) / np.sqrt(var + eps)).reshape(x.shape) * scale + bias


def np_layer_norm(x, eps, scale, bias):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * scale + bias


def np_conv(x, kernel, bias, stride=1, pad=(1, 1, 1, 1)):
    """Cross-correlation of NHWC ``x`` with an HWIO kernel; ``pad`` = (top, bottom, left, right)."""
    kh, kw = kernel.shape[:2]
    x = np.pad(x, ((0, 0), pad[:2], pad[2:], (0, 0)))
    ho, wo = (x.shape[1] - kh) // stride + 1, (x.shape[2] - kw) // stride + 1
    out = np.zeros((x.shape[0], ho, wo, kernel.shape[-1]))
    for i in range(kh):
        for j in range(kw):
            patch = x[:, i : i + stride * ho : stride, j : j + stride * wo : stride]
            out += patch @ kernel[i, j]
    return out + bias


def np_silu(x):
    return x / (1 + np.exp(-x))


def np_attention(x, ctx, wq, wk, wv, wo, bo, heads, bq=0.0, bk=0.0, bv=0.0, causal=False):
    q, k, v = x @ wq + bq, ctx @ wk + bk, ctx @ wv + bv
    b, n, inner = q.shape
    d = inner // heads
    sh = lambda t: t.reshape(b, t.shape[1], heads, d).transpose(0, 2, 1, 3)
    logits = sh(q) @ sh(k).transpose(0, 1, 3, 2) / math.sqrt(d)
    if causal:
        logits = np.where(np.tril(np.ones((n, n), bool)), logits, -np.inf)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    o = (p @ sh(v)).transpose(0, 2, 1, 3).reshape(b, n, inner)
    return o @ wo + bo


# ------------------------------------------------------------------ layers


class TimestepEmbeddingTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_matches_ddpm_formula(self):
        t = np.array([0.0, 1.0, 999.0, 37.5])
        for dim, flip, shift in [(8, True, 0), (8, False, 1), (7, True, 0)]:
            emb = self.variant(
                lambda t, dim=dim, flip=flip, shift=shift: L.get_timestep_embedding(
                    t, dim, flip_sin_to_cos=flip, downscale_freq_shift=shift
                )
            )(t)
            half = dim // 2
            f = np.exp(-np.log(10000.0) * np.arange(half) / (half - shift))
            sin, cos = np.sin(t[:, None] * f), np.cos(t[:, None] * f)
            want = np.concatenate([cos, sin] if flip else [sin, cos], axis=1)
            if dim % 2:
                want = np.pad(want, ((0, 0), (0, 1)))
            np.testing.assert_allclose(emb, want, atol=2e-4)
            assert emb.shape == (4, dim)

    def test_rejects_2d_timesteps(self):
        with pytest.raises(ValueError, match=r"timesteps must have shape \(N,\)"):
            L.get_timestep_embedding(jnp.zeros((2, 1)), 8)


class AttentionTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_cross_attention_matches_numpy(self):
        attn = random_model(
            lambda: L.Attention(8, heads=2, dim_head=3, cross_attention_dim=5, rngs=nnx.Rngs(0))
        )
        p = params(attn)
        assert set(p) == {
            "to_q/kernel",
            "to_k/kernel",
            "to_v/kernel",
            "to_out/0/kernel",
            "to_out/0/bias",
        }  # no q/k/v bias, as in SD's transformer blocks
        assert p["to_k/kernel"].shape == (5, 6)
        x, c = np.random.RandomState(0).randn(2, 4, 8), np.random.RandomState(1).randn(2, 7, 5)
        got = self.variant(lambda x, c: attn(x, c))(
            jnp.asarray(x, jnp.float32), jnp.asarray(c, jnp.float32)
        )
        want = np_attention(
            x,
            c,
            p["to_q/kernel"],
            p["to_k/kernel"],
            p["to_v/kernel"],
            p["to_out/0/kernel"],
            p["to_out/0/bias"],
            heads=2,
        )
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)

    @pytest.mark.slow
    def test_spatial_self_attention_has_groupnorm_and_residual(self):
        attn = random_model(
            lambda: L.Attention(8, heads=1, dim_head=8, bias=True, norm_groups=2, rngs=nnx.Rngs(0))
        )
        p = params(attn)
        x = np.random.RandomState(0).randn(2, 3, 3, 8)
        got = attn(jnp.asarray(x, jnp.float32))
        h = np_group_norm(x, 2, 1e-6, p["group_norm/scale"], p["group_norm/bias"]).reshape(2, 9, 8)
        want = np_attention(
            h,
            h,
            p["to_q/kernel"],
            p["to_k/kernel"],
            p["to_v/kernel"],
            p["to_out/0/kernel"],
            p["to_out/0/bias"],
            heads=1,
            bq=p["to_q/bias"],
            bk=p["to_k/bias"],
            bv=p["to_v/bias"],
        )
        np.testing.assert_allclose(got, want.reshape(x.shape) + x, atol=1e-4, rtol=1e-4)


def test_geglu_feedforward_matches_numpy():
    ff = random_model(lambda: L.FeedForward(6, rngs=nnx.Rngs(0)))
    p = params(ff)
    assert p["net/0/proj/kernel"].shape == (6, 48) and p["net/2/kernel"].shape == (24, 6)
    x = np.random.RandomState(0).randn(3, 6)
    hg = x @ p["net/0/proj/kernel"] + p["net/0/proj/bias"]
    a, g = hg[:, :24], hg[:, 24:]
    from scipy.special import erf

    gelu = 0.5 * g * (1 + erf(g / np.sqrt(2)))
    want = (a * gelu) @ p["net/2/kernel"] + p["net/2/bias"]
    np.testing.assert_allclose(ff(jnp.asarray(x, jnp.float32)), want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("cin,cout", [(4, 8), (8, 8)])
@pytest.mark.slow
def test_resnet_block_matches_numpy(cin, cout):
    block = random_model(
        lambda: L.ResnetBlock2D(cin, cout, temb_channels=5, groups=2, eps=1e-5, rngs=nnx.Rngs(0))
    )
    p = params(block)
    assert ("conv_shortcut/kernel" in p) == (cin != cout)
    rs = np.random.RandomState(0)
    x, temb = rs.randn(2, 5, 5, cin), rs.randn(2, 5)
    h = np_conv(
        np_silu(np_group_norm(x, 2, 1e-5, p["norm1/scale"], p["norm1/bias"])),
        p["conv1/kernel"],
        p["conv1/bias"],
    )
    h = h + (np_silu(temb) @ p["time_emb_proj/kernel"] + p["time_emb_proj/bias"])[:, None, None]
    h = np_conv(
        np_silu(np_group_norm(h, 2, 1e-5, p["norm2/scale"], p["norm2/bias"])),
        p["conv2/kernel"],
        p["conv2/bias"],
    )
    short = (
        x
        if cin == cout
        else np_conv(x, p["conv_shortcut/kernel"], p["conv_shortcut/bias"], pad=(0, 0, 0, 0))
    )
    got = block(jnp.asarray(x, jnp.float32), jnp.asarray(temb, jnp.float32))
    np.testing.assert_allclose(got, short + h, atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("padding,pad", [(1, (1, 1, 1, 1)), (0, (0, 1, 0, 1))])
def test_downsample_padding_conventions(padding, pad):
    # padding=0 is the VAE's asymmetric F.pad(x, (0, 1, 0, 1)) before a stride-2 conv.
    down = random_model(lambda: L.Downsample2D(3, padding=padding, rngs=nnx.Rngs(0)))
    p = params(down)
    x = np.random.RandomState(0).randn(1, 6, 6, 3)
    want = np_conv(x, p["conv/kernel"], p["conv/bias"], stride=2, pad=pad)
    got = down(jnp.asarray(x, jnp.float32))
    assert got.shape == (1, 3, 3, 3)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_upsample_is_nearest_then_conv():
    up = L.Upsample2D(2, rngs=nnx.Rngs(0))
    # Identity kernel at the centre tap: the conv passes the nearest-x2 map through.
    kernel = np.zeros((3, 3, 2, 2), np.float32)
    kernel[1, 1] = np.eye(2)
    nnx.update(up, {"conv": {"kernel": jnp.asarray(kernel), "bias": jnp.zeros(2)}})
    x = np.arange(8, dtype=np.float32).reshape(1, 2, 2, 2)
    got = np.asarray(up(jnp.asarray(x)))
    np.testing.assert_array_equal(
        got[0, :, :, 0], [[0, 0, 2, 2], [0, 0, 2, 2], [4, 4, 6, 6], [4, 4, 6, 6]]
    )


def test_group_norm_rejects_indivisible_channels():
    with pytest.raises(ValueError, match="channels=10 is not divisible by norm_num_groups=4"):
        L.group_norm(10, 4, 1e-5, rngs=nnx.Rngs(0))


def test_sharding_rules():
    def rule(name):
        for pattern, spec in L.SD_SHARDING_RULES:
            if re.search(pattern, name):
                return spec
        return "fsdp"

    for name in [
        "conv_norm_out/scale",
        "down_blocks/0/resnets/0/norm1/bias",
        "mid_block/attentions/0/transformer_blocks/0/norm3/scale",
        "encoder/layers/3/layer_norm2/scale",
        "final_layer_norm/bias",
        "encoder/mid_block/attentions/0/group_norm/scale",
        "conv_in/bias",
    ]:
        assert rule(name) == "replicate", name
    for name in [
        "down_blocks/0/attentions/0/transformer_blocks/0/attn2/to_k/kernel",
        "conv_in/kernel",
        "embeddings/token_embedding/embedding",
        "up_blocks/1/resnets/0/conv_shortcut/kernel",
    ]:
        assert rule(name) == "fsdp", name
    # The rules plug into the shared sharding helper.
    model = nnx.eval_shape(
        lambda: UNet2DConditionModel(UNet2DConditionConfig(**TINY_UNET), rngs=nnx.Rngs(0))
    )
    mesh = make_mesh(data=1, fsdp=1, devices=jax.devices()[:1])
    shardings = shardings_for(nnx.state(model, nnx.Param), mesh, L.SD_SHARDING_RULES)
    assert len(jax.tree.leaves(shardings)) == len(params_shapes(model))


def params_shapes(model):
    return named_leaves(nnx.state(model, nnx.Param))


# ------------------------------------------------------------------ UNet


@pytest.fixture(scope="module")
def tiny_unet():
    cfg = UNet2DConditionConfig(**TINY_UNET)
    return random_model(lambda: UNet2DConditionModel(cfg, rngs=nnx.Rngs(0)), scale=0.1)


def test_unet_parameter_names_and_shapes(tiny_unet):
    shapes = {k: v.shape for k, v in params_shapes(tiny_unet).items()}
    blk = "down_blocks/0/attentions/0/transformer_blocks/0"
    # Cross-attention K/V read the 12-wide text context; Q reads the 16-wide image features.
    assert shapes[f"{blk}/attn2/to_k/kernel"] == (12, 16)
    assert shapes[f"{blk}/attn2/to_v/kernel"] == (12, 16)
    assert shapes[f"{blk}/attn2/to_q/kernel"] == (16, 16)
    assert shapes[f"{blk}/attn1/to_k/kernel"] == (16, 16)
    assert shapes["down_blocks/0/attentions/0/proj_in/kernel"] == (1, 1, 16, 16)  # conv (SD 1)
    assert shapes["time_embedding/linear_1/kernel"] == (16, 64)
    # Up block 0 at the lowest level: resnets see [h (32), skip (32)] then [h (32), skip (16)].
    assert shapes["up_blocks/0/resnets/0/conv1/kernel"] == (3, 3, 64, 32)
    assert shapes["up_blocks/0/resnets/1/conv1/kernel"] == (3, 3, 48, 32)
    assert "up_blocks/0/upsamplers/0/conv/kernel" in shapes
    assert "up_blocks/1/upsamplers/0/conv/kernel" not in shapes
    assert "down_blocks/1/downsamplers/0/conv/kernel" not in shapes
    # Cross-attention blocks: down_blocks/0 (1), mid_block (1), up_blocks/1 (layers + 1 = 2).
    to_kv = [k for k in shapes if re.search(r"attn2/to_[kv]/kernel$", k)]
    assert len(to_kv) == 2 * 4


@nnx.jit
def unet_apply(model, x, t, ctx):
    return model(x, t, ctx)


@pytest.mark.slow
def test_unet_forward_shapes_and_timestep_broadcast(tiny_unet):
    rs = np.random.RandomState(0)
    x = jnp.asarray(rs.randn(2, 8, 8, 4), jnp.float32)
    ctx = jnp.asarray(rs.randn(2, 5, 12), jnp.float32)
    t = jnp.array([10.0, 10.0])
    y = unet_apply(tiny_unet, x, t, ctx)
    assert y.shape == (2, 8, 8, 4)
    np.testing.assert_allclose(unet_apply(tiny_unet, x, jnp.float32(10.0), ctx), y, atol=1e-6)
    # The batch elements are independent (no cross-batch mixing in any norm or attention).
    y_other = unet_apply(tiny_unet, x.at[1].set(0.0), t, ctx)
    np.testing.assert_allclose(y_other[0], y[0], atol=1e-5)
    # Conditioning matters: a different context and a different time change the output.
    assert np.abs(np.asarray(unet_apply(tiny_unet, x, t, ctx[::-1]) - y)).max() > 1e-4
    assert np.abs(np.asarray(unet_apply(tiny_unet, x, t * 50, ctx) - y)).max() > 1e-4


@pytest.mark.slow
def test_unet_bf16_compute_is_close_to_f32(tiny_unet):
    cfg = tiny_unet.config
    bf = random_model(lambda: UNet2DConditionModel(cfg, dtype=jnp.bfloat16, rngs=nnx.Rngs(1)))
    nnx.update(bf, nnx.state(tiny_unet, nnx.Param))
    assert all(v.dtype == jnp.float32 for v in params_shapes(bf).values())
    rs = np.random.RandomState(0)
    x = jnp.asarray(rs.randn(2, 8, 8, 4), jnp.float32)
    ctx = jnp.asarray(rs.randn(2, 5, 12), jnp.float32)
    t = jnp.array([3.0, 3.0])
    y32, y16 = unet_apply(tiny_unet, x, t, ctx), unet_apply(bf, x, t, ctx)
    assert y16.dtype == jnp.bfloat16
    rel = np.linalg.norm(np.asarray(y16, np.float32) - y32) / np.linalg.norm(y32)
    assert rel < 0.05


def test_unet_rejects_bad_inputs(tiny_unet):
    ctx = jnp.zeros((1, 5, 12))
    with pytest.raises(
        ValueError,
        match=r"sample: expected \(B, H, W, 4\) NHWC with H, W "
        r"divisible by 2, got \(1, 4, 8, 8\)",
    ):
        tiny_unet(jnp.zeros((1, 4, 8, 8)), 1.0, ctx)  # NCHW by mistake
    with pytest.raises(ValueError, match=r"encoder_hidden_states: expected \(1, L, 12\)"):
        tiny_unet(jnp.zeros((1, 8, 8, 4)), 1.0, jnp.zeros((1, 5, 7)))


def test_unet_sd2_style_heads_and_linear_projection():
    cfg = UNet2DConditionConfig(
        **{
            **TINY_UNET,
            "attention_head_dim": (2, 4),
            "use_linear_projection": True,
            "down_block_types": ("CrossAttnDownBlock2D",) * 2,
            "up_block_types": ("CrossAttnUpBlock2D",) * 2,
        }
    )
    model = nnx.eval_shape(lambda: UNet2DConditionModel(cfg, rngs=nnx.Rngs(0)))
    # attention_head_dim counts heads (diffusers' naming); up blocks use the reversed tuple.
    assert model.down_blocks[0].attentions[0].transformer_blocks[0].attn2.heads == 2
    assert model.down_blocks[1].attentions[0].transformer_blocks[0].attn2.heads == 4
    assert model.mid_block.attentions[0].transformer_blocks[0].attn1.heads == 4
    assert model.up_blocks[0].attentions[0].transformer_blocks[0].attn1.heads == 4
    assert model.up_blocks[1].attentions[0].transformer_blocks[0].attn1.dim_head == 8
    assert params_shapes(model)["down_blocks/0/attentions/0/proj_in/kernel"].shape == (16, 16)


def test_unet_config_from_dict_and_errors():
    d = {
        "_class_name": "UNet2DConditionModel",
        "some_future_key": 1,
        "act_fn": "silu",
        "block_out_channels": [16, 32],
        "attention_head_dim": [2, 4],
        "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
        "norm_num_groups": 4,
    }
    cfg = UNet2DConditionConfig.from_dict(d)
    assert cfg.block_out_channels == (16, 32) and cfg.heads == (2, 4)
    assert UNet2DConditionConfig.from_dict(cfg.to_diffusers_dict()) == cfg
    with pytest.raises(
        ValueError,
        match=r"up_block_types: unsupported block type\(s\) "
        r"\['AttnUpBlock2D'\]",
    ):
        UNet2DConditionConfig.from_dict({**d, "up_block_types": ["AttnUpBlock2D", "UpBlock2D"]})
    assert UNet2DConditionConfig.from_dict({**d, "only_cross_attention": [False, False]}) == cfg
    with pytest.raises(ValueError, match=r"unsupported only_cross_attention=\[True, False\]"):
        UNet2DConditionConfig.from_dict({**d, "only_cross_attention": [True, False]})
    with pytest.raises(ValueError, match="unsupported class_embed_type='timestep'"):
        UNet2DConditionConfig.from_dict({**d, "class_embed_type": "timestep"})
    with pytest.raises(
        ValueError,
        match=r"attention_head_dim=\(2, 4, 8\) must be an int or "
        r"have 2 entries",
    ):
        UNet2DConditionConfig.from_dict({**d, "attention_head_dim": [2, 4, 8]})
    with pytest.raises(ValueError, match="prediction_type='x0'"):
        UNet2DConditionConfig(prediction_type="x0")


@pytest.mark.slow
def test_full_size_parameter_counts():
    # diffusers' sum(p.numel()) for the hub configs (SD 1.5 UNet is the known 859,520,964).
    def count(make):
        return sum(
            int(np.prod(x.shape))
            for x in jax.tree.leaves(nnx.state(nnx.eval_shape(make), nnx.Param))
        )

    assert count(lambda: UNet2DConditionModel(sd15_unet_config(), rngs=nnx.Rngs(0))) == 859_520_964
    assert count(lambda: UNet2DConditionModel(sd21_unet_config(), rngs=nnx.Rngs(0))) == 865_910_724
    assert count(lambda: AutoencoderKL(AutoencoderKLConfig(), rngs=nnx.Rngs(0))) == 83_653_863
    assert count(lambda: CLIPTextModel(sd1_clip_config(), rngs=nnx.Rngs(0))) == 123_060_480
    assert count(lambda: CLIPTextModel(sd2_clip_config(), rngs=nnx.Rngs(0))) == 340_387_840


# ------------------------------------------------------------------ VAE


@pytest.fixture(scope="module")
def tiny_vae():
    cfg = AutoencoderKLConfig(**TINY_VAE)
    return random_model(lambda: AutoencoderKL(cfg, rngs=nnx.Rngs(0)), scale=0.1)


vae_encode = nnx.jit(lambda m, x: m.encode(x))
vae_decode = nnx.jit(lambda m, z: m.decode(z))
vae_apply = nnx.jit(lambda m, x, rng: m(x, rng))


@pytest.mark.slow
def test_vae_shapes_sampling_and_names(tiny_vae):
    x = jnp.asarray(np.random.RandomState(0).uniform(-1, 1, (2, 8, 8, 3)), jnp.float32)
    mean, logvar = vae_encode(tiny_vae, x)
    assert mean.shape == logvar.shape == (2, 4, 4, 4)
    assert float(logvar.min()) >= -30.0 and float(logvar.max()) <= 20.0
    mode = vae_apply(tiny_vae, x, None)
    np.testing.assert_allclose(mode, vae_decode(tiny_vae, mean), atol=1e-6)
    sample = vae_apply(tiny_vae, x, jax.random.key(0))
    assert sample.shape == (2, 8, 8, 3) and np.abs(np.asarray(sample - mode)).max() > 1e-6
    names = set(params_shapes(tiny_vae))
    attn = "encoder/mid_block/attentions/0"
    for n in [
        f"{attn}/to_q/kernel",
        f"{attn}/to_q/bias",
        f"{attn}/group_norm/scale",
        "quant_conv/kernel",
        "post_quant_conv/kernel",
        "encoder/down_blocks/0/downsamplers/0/conv/kernel",
        "decoder/up_blocks/0/upsamplers/0/conv/kernel",
        "decoder/up_blocks/1/resnets/1/conv2/kernel",
    ]:
        assert n in names, n
    assert "decoder/up_blocks/1/upsamplers/0/conv/kernel" not in names


def test_vae_posterior_sample_is_reparameterised(tiny_vae):
    x = jnp.asarray(np.random.RandomState(1).uniform(-1, 1, (2, 8, 8, 3)), jnp.float32)
    mean, logvar = vae_encode(tiny_vae, x)
    eps = jax.random.normal(jax.random.key(3), mean.shape)
    want = vae_decode(tiny_vae, mean + jnp.exp(0.5 * logvar) * eps)
    np.testing.assert_allclose(vae_apply(tiny_vae, x, jax.random.key(3)), want, atol=1e-5)


def test_vae_rejects_bad_inputs(tiny_vae):
    with pytest.raises(
        ValueError, match=r"x: expected \(B, H, W, 3\) NHWC with H, W divisible by 2"
    ):
        tiny_vae.encode(jnp.zeros((1, 7, 8, 3)))
    with pytest.raises(ValueError, match=r"z: expected \(B, h, w, 4\)"):
        tiny_vae.decode(jnp.zeros((1, 4, 4, 3)))
    with pytest.raises(ValueError, match=r"down_block_types: unsupported block type\(s\)"):
        AutoencoderKLConfig.from_dict({"down_block_types": ["AttnDownEncoderBlock2D"] * 4})


# ------------------------------------------------------------------ CLIP

TINY_CLIP = {
    "vocab_size": 50,
    "hidden_size": 8,
    "intermediate_size": 16,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "max_position_embeddings": 10,
    "eos_token_id": 49,
}


def np_clip(p, ids, cfg):
    """One-layer (or more) CLIP text transformer in numpy, straight from the paper's equations."""
    act = (lambda u: u / (1 + np.exp(-1.702 * u))) if cfg.hidden_act == "quick_gelu" else None
    h = (
        p["embeddings/token_embedding/embedding"][ids]
        + p["embeddings/position_embedding/embedding"][: ids.shape[1]][None]
    )
    for i in range(cfg.num_hidden_layers):

        def q(n, i=i):
            return p[f"encoder/layers/{i}/{n}"]

        a = np_layer_norm(h, cfg.layer_norm_eps, q("layer_norm1/scale"), q("layer_norm1/bias"))
        h = h + np_attention(
            a,
            a,
            q("self_attn/q_proj/kernel"),
            q("self_attn/k_proj/kernel"),
            q("self_attn/v_proj/kernel"),
            q("self_attn/out_proj/kernel"),
            q("self_attn/out_proj/bias"),
            cfg.num_attention_heads,
            bq=q("self_attn/q_proj/bias"),
            bk=q("self_attn/k_proj/bias"),
            bv=q("self_attn/v_proj/bias"),
            causal=True,
        )
        m = np_layer_norm(h, cfg.layer_norm_eps, q("layer_norm2/scale"), q("layer_norm2/bias"))
        h = (
            h
            + act(m @ q("mlp/fc1/kernel") + q("mlp/fc1/bias")) @ q("mlp/fc2/kernel")
            + q("mlp/fc2/bias")
        )
    return np_layer_norm(
        h, cfg.layer_norm_eps, p["final_layer_norm/scale"], p["final_layer_norm/bias"]
    )


class CLIPTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_forward_matches_numpy_and_pools_at_first_eot(self):
        cfg = CLIPTextConfig(**TINY_CLIP)
        model = random_model(lambda: CLIPTextModel(cfg, rngs=nnx.Rngs(0)))
        ids = np.array([[3, 7, 49, 49, 49], [3, 49, 5, 6, 49]])
        out = self.variant(lambda i: model(i))(jnp.asarray(ids, jnp.int32))
        want = np_clip(params(model), ids, cfg)
        np.testing.assert_allclose(out["last_hidden_state"], want, atol=1e-4, rtol=1e-4)
        np.testing.assert_allclose(out["pooler_output"], want[[0, 1], [2, 1]], atol=1e-4, rtol=1e-4)

    def test_legacy_pooling_uses_argmax_when_eos_is_2(self):
        cfg = CLIPTextConfig(**{**TINY_CLIP, "eos_token_id": 2})
        model = random_model(lambda: CLIPTextModel(cfg, rngs=nnx.Rngs(0)))
        ids = jnp.array([[0, 2, 40, 1, 1]], jnp.int32)
        out = model(ids)
        np.testing.assert_array_equal(out["pooler_output"], out["last_hidden_state"][:, 2])

    @pytest.mark.slow
    def test_causal_mask(self):
        cfg = CLIPTextConfig(**{**TINY_CLIP, "num_hidden_layers": 2})
        model = random_model(lambda: CLIPTextModel(cfg, rngs=nnx.Rngs(0)))
        a = model(jnp.array([[1, 2, 3, 4, 5]]))["last_hidden_state"]
        b = model(jnp.array([[1, 2, 3, 9, 9]]))["last_hidden_state"]
        np.testing.assert_allclose(a[:, :3], b[:, :3], atol=1e-6)
        assert np.abs(np.asarray(a[:, 3:] - b[:, 3:])).max() > 1e-3

    @pytest.mark.slow
    def test_penultimate_equals_truncated_model(self):
        # SD 2's conditioning: final LN of layer N-1 of an N-layer tower == last_hidden_state of
        # the same tower truncated to N-1 layers (what the 23-layer hub checkpoint is).
        cfg3 = CLIPTextConfig(**{**TINY_CLIP, "num_hidden_layers": 3, "hidden_act": "gelu"})
        full = random_model(lambda: CLIPTextModel(cfg3, rngs=nnx.Rngs(0)))
        cfg2 = CLIPTextConfig(**{**TINY_CLIP, "num_hidden_layers": 2, "hidden_act": "gelu"})
        cut = random_model(lambda: CLIPTextModel(cfg2, rngs=nnx.Rngs(1)))
        cut.embeddings, cut.final_layer_norm = full.embeddings, full.final_layer_norm
        cut.encoder.layers = nnx.List([full.encoder.layers[0], full.encoder.layers[1]])
        ids = jnp.array([[4, 8, 15, 16, 23, 42]])
        hs = full(ids, output_hidden_states=True)["hidden_states"]
        assert len(hs) == 4
        np.testing.assert_allclose(
            encode_text(full, ids, penultimate=True), encode_text(cut, ids), atol=1e-5
        )
        assert np.abs(np.asarray(encode_text(full, ids) - encode_text(cut, ids))).max() > 1e-3

    def test_config_and_input_errors(self):
        cfg = CLIPTextConfig.from_dict(
            {
                "hidden_size": 8,
                "num_attention_heads": 2,
                "architectures": ["CLIPTextModel"],
                "projection_dim": 3,
            }
        )
        assert cfg.hidden_size == 8 and cfg.vocab_size == 49408
        with pytest.raises(ValueError, match=r"hidden_act='relu'; expected one of"):
            CLIPTextConfig(hidden_act="relu")
        model = random_model(lambda: CLIPTextModel(CLIPTextConfig(**TINY_CLIP), rngs=nnx.Rngs(0)))
        with pytest.raises(ValueError, match=r"input_ids: expected integer \(B, L\) with L <= 10"):
            model(jnp.zeros((1, 11), jnp.int32))
        with pytest.raises(ValueError, match=r"input_ids: expected integer"):
            model(jnp.zeros((1, 3), jnp.float32))


def test_sd_clip_configs():
    assert sd1_clip_config().hidden_act == "quick_gelu" and sd1_clip_config().hidden_size == 768
    c2 = sd2_clip_config()
    assert (c2.hidden_size, c2.num_hidden_layers, c2.num_attention_heads, c2.hidden_act) == (
        1024,
        23,
        16,
        "gelu",
    )


FSDP_SNIPPET = """
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
from jaxsafe.nn.sd_layers import SD_SHARDING_RULES
from jaxsafe.nn.unet2d_condition import UNet2DConditionConfig, UNet2DConditionModel
from jaxsafe.parallel import make_mesh, shardings_for
from jaxsafe.treepath import named_leaves
assert len(jax.devices()) == 4
cfg = UNet2DConditionConfig(**{cfg!r})
graphdef, state = nnx.split(nnx.eval_shape(lambda: UNet2DConditionModel(cfg, rngs=nnx.Rngs(0))))
rng = np.random.default_rng(0)
state = jax.tree.map(lambda x: jnp.asarray(0.1 * rng.standard_normal(x.shape), x.dtype), state)
mesh = make_mesh(data=1, fsdp=4)
shardings = shardings_for(state, mesh, SD_SHARDING_RULES)
specs = {{k: tuple(s.spec) for k, s in named_leaves(shardings).items()}}
attn = "down_blocks/0/attentions/0/transformer_blocks/0"
assert "fsdp" in specs[attn + "/ff/net/0/proj/kernel"], specs[attn + "/ff/net/0/proj/kernel"]
assert "fsdp" in specs["up_blocks/0/resnets/0/conv1/kernel"]
assert all(a is None for a in specs["up_blocks/0/resnets/0/norm1/scale"])
assert all(a is None for a in specs[attn + "/attn2/to_out/0/bias"])
sharded = jax.device_put(state, shardings)
fwd = jax.jit(lambda s, x, t, c: nnx.merge(graphdef, s)(x, t, c))
x = jnp.asarray(rng.standard_normal((4, 8, 8, 4)), jnp.float32)
c = jnp.asarray(rng.standard_normal((4, 5, 12)), jnp.float32)
t = jnp.array([1.0, 10.0, 100.0, 999.0])
want = np.asarray(nnx.merge(graphdef, state)(x, t, c))
got = np.asarray(fwd(sharded, x, t, c))
np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
print("SNIPPET-OK")
"""


@pytest.mark.slow
def test_fsdp_sharded_unet_matches_unsharded():
    proc = run_python(FSDP_SNIPPET.format(cfg=TINY_UNET), n_devices=4, timeout=900)
    assert "SNIPPET-OK" in proc.stdout, proc.stdout[-3000:]

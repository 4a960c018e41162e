"""jaxsafe's SD modules against the reference implementations (diffusers UNet2DConditionModel /
AutoencoderKL, transformers CLIPTextModel): tiny random models saved by the reference with
``save_pretrained`` and loaded by jaxsafe give the same outputs, and models saved by jaxsafe load
in diffusers/transformers (also as a whole StableDiffusionPipeline) with the same outputs.
NCHW <-> NHWC transposes happen here, on inputs and outputs."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxsafe.nn.clip_text import encode_text
from jaxsafe.weights import (
    CheckpointError,
    load_pipeline,
    load_text_encoder,
    load_unet,
    load_vae,
    save_pipeline,
)

torch = pytest.importorskip(
    "torch", reason="reference checks need torch: pip install -e '.[torch]'"
)
diffusers = pytest.importorskip("diffusers", reason="reference checks need diffusers")
transformers = pytest.importorskip("transformers", reason="reference checks need transformers")


pytestmark = pytest.mark.slow  # importing diffusers alone takes ~10 s

TOL = 1e-4

SD1_UNET = {
    "sample_size": 16,
    "block_out_channels": (32, 64),
    "layers_per_block": 2,
    "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": 32,
    "attention_head_dim": 4,
    "norm_num_groups": 8,
}
# SD 2.x style: linear projections, per-level heads (diffusers' attention_head_dim), attention at
# both levels, two transformer layers per block, upcast attention.
SD2_UNET = {
    "sample_size": 16,
    "block_out_channels": (32, 64),
    "layers_per_block": 1,
    "down_block_types": ("CrossAttnDownBlock2D",) * 2,
    "up_block_types": ("CrossAttnUpBlock2D",) * 2,
    "cross_attention_dim": 24,
    "attention_head_dim": (2, 4),
    "use_linear_projection": True,
    "norm_num_groups": 16,
    "transformer_layers_per_block": 2,
    "upcast_attention": True,
}
VAE = {
    "block_out_channels": (16, 32),
    "down_block_types": ("DownEncoderBlock2D",) * 2,
    "up_block_types": ("UpDecoderBlock2D",) * 2,
    "layers_per_block": 2,
    "norm_num_groups": 8,
    "latent_channels": 4,
    "sample_size": 16,
}


def perturb(module, seed=0, scale=0.05):
    """Adds noise to every parameter so zero biases / unit norm scales are exercised too."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return module.eval()


def nchw(x):
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def nhwc(t):
    return np.asarray(t.detach().numpy()).transpose(0, 2, 3, 1)


def assert_close(got, want, tol=TOL):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape
    err = np.abs(got - want).max()
    assert err < tol * max(1.0, np.abs(want).max()), f"max abs error {err}"


def unet_inputs(cross_dim, seed=0):
    rs = np.random.RandomState(seed)
    return (
        rs.randn(2, 16, 16, 4).astype(np.float32),
        np.array([7.0, 801.0], np.float32),
        rs.randn(2, 6, cross_dim).astype(np.float32),
    )


def torch_unet_out(ref, x, t, c):
    with torch.no_grad():
        return nhwc(ref(nchw(x), torch.from_numpy(t), torch.from_numpy(c)).sample)


@nnx.jit
def jax_unet_out(model, x, t, c):
    return model(x, t, c)


@pytest.mark.parametrize("kwargs", [SD1_UNET, SD2_UNET], ids=["sd1_conv_proj", "sd2_linear_proj"])
def test_unet_matches_diffusers_both_ways(kwargs, tmp_path):
    ref = perturb(diffusers.UNet2DConditionModel(**kwargs))
    ref.save_pretrained(tmp_path / "ref")
    model, cfg = load_unet(tmp_path / "ref")
    assert cfg.heads == ((4, 4) if kwargs is SD1_UNET else (2, 4))
    x, t, c = unet_inputs(kwargs["cross_attention_dim"])
    want = torch_unet_out(ref, x, t, c)
    assert_close(jax_unet_out(model, x, t, c), want)

    # Edit in jaxsafe (as erasure methods do: scale a cross-attention value projection), save,
    # load in diffusers: the reference sees the edit.
    path = "down_blocks/0/attentions/0/transformer_blocks/0/attn2/to_v/kernel"
    v = model.down_blocks[0].attentions[0].transformer_blocks[0].attn2.to_v.kernel
    v.value = 0.5 * v.value
    save_pipeline({"unet": model}, tmp_path / "ours")
    back = diffusers.UNet2DConditionModel.from_pretrained(tmp_path / "ours", subfolder="unet")
    back.eval()
    w = back.down_blocks[0].attentions[0].transformer_blocks[0].attn2.to_v.weight
    np.testing.assert_array_equal(w.detach().numpy().T, np.asarray(v.value), err_msg=path)
    edited = torch_unet_out(back, x, t, c)
    assert_close(jax_unet_out(model, x, t, c), edited)
    assert np.abs(edited - want).max() > 1e-3
    assert back.config.upcast_attention == kwargs.get("upcast_attention", False)


@pytest.mark.parametrize("mid_attention", [True, False], ids=["sd", "no_mid_attention"])
def test_vae_matches_diffusers_both_ways(mid_attention, tmp_path):
    ref = perturb(diffusers.AutoencoderKL(**VAE, mid_block_add_attention=mid_attention))
    ref.save_pretrained(tmp_path / "vae")
    model, cfg = load_vae(tmp_path / "vae")
    assert cfg.scaling_factor == ref.config.scaling_factor  # exact: round trip through config.json
    x = np.random.RandomState(0).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
    with torch.no_grad():
        post = ref.encode(nchw(x)).latent_dist
        rec = nhwc(ref.decode(post.mean).sample)
    mean, logvar = nnx.jit(lambda m, x: m.encode(x))(model, x)
    assert_close(mean, nhwc(post.mean))
    assert_close(logvar, nhwc(post.logvar))
    assert_close(nnx.jit(lambda m, z: m.decode(z))(model, mean), rec)

    save_pipeline({"vae": model}, tmp_path / "ours")
    back = diffusers.AutoencoderKL.from_pretrained(tmp_path / "ours", subfolder="vae").eval()
    with torch.no_grad():
        rec_back = nhwc(back.decode(back.encode(nchw(x)).latent_dist.mean).sample)
    assert_close(rec_back, rec)


@pytest.mark.parametrize(
    "act,eos", [("quick_gelu", 2), ("gelu", 49)], ids=["sd1_legacy_eos", "sd2_gelu"]
)
def test_clip_matches_transformers_both_ways(act, eos, tmp_path):
    torch.manual_seed(0)
    hf_cfg = transformers.CLIPTextConfig(
        vocab_size=50,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=12,
        hidden_act=act,
        eos_token_id=eos,
        bos_token_id=0,
        pad_token_id=1,
    )
    ref = perturb(transformers.CLIPTextModel(hf_cfg))
    ref.save_pretrained(tmp_path / "te")
    model, cfg = load_text_encoder(tmp_path / "te")
    assert (cfg.hidden_act, cfg.eos_token_id) == (act, eos)
    # EOT (49, the largest id, as in CLIP's vocabulary) then padding.
    ids = np.array([[48, 5, 7, 49, 49, 49, 49], [48, 3, 4, 5, 6, 49, 1]])
    with torch.no_grad():
        out = ref(torch.from_numpy(ids), output_hidden_states=True)
    ours = model(jnp.asarray(ids, jnp.int32), output_hidden_states=True)
    assert_close(ours["last_hidden_state"], out.last_hidden_state.numpy())
    assert_close(ours["pooler_output"], out.pooler_output.numpy())
    assert len(ours["hidden_states"]) == len(out.hidden_states) == 4
    for a, b in zip(ours["hidden_states"], out.hidden_states):
        assert_close(a, b.numpy())
    with torch.no_grad():
        penult = ref.final_layer_norm(out.hidden_states[-2]).numpy()
    assert_close(encode_text(model, jnp.asarray(ids), penultimate=True), penult)

    save_pipeline({"text_encoder": model}, tmp_path / "ours")
    keys = json.loads((tmp_path / "ours" / "text_encoder" / "config.json").read_text())
    assert keys["hidden_act"] == act
    back = transformers.CLIPTextModel.from_pretrained(tmp_path / "ours" / "text_encoder").eval()
    with torch.no_grad():
        again = back(torch.from_numpy(ids))
    assert_close(again.last_hidden_state.numpy(), out.last_hidden_state.numpy())
    assert_close(again.pooler_output.numpy(), out.pooler_output.numpy())


def test_saved_pipeline_loads_as_stable_diffusion_pipeline(tmp_path):
    """save_pipeline output is a complete diffusers folder: StableDiffusionPipeline loads it."""
    from test_diffusers_loading import write_tiny_clip_tokenizer

    src = tmp_path / "src"
    unet = perturb(diffusers.UNet2DConditionModel(**SD1_UNET))
    unet.save_pretrained(src / "unet")
    perturb(diffusers.AutoencoderKL(**VAE), seed=1).save_pretrained(src / "vae")
    hf_cfg = transformers.CLIPTextConfig(
        vocab_size=55,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=12,
        eos_token_id=54,
        bos_token_id=53,
        pad_token_id=54,
    )
    perturb(transformers.CLIPTextModel(hf_cfg), seed=2).save_pretrained(src / "text_encoder")
    write_tiny_clip_tokenizer(src / "tokenizer")
    diffusers.DDIMScheduler(
        prediction_type="v_prediction", clip_sample=False, steps_offset=1
    ).save_pretrained(src / "scheduler")
    (src / "model_index.json").write_text(
        json.dumps(
            {
                "_class_name": "StableDiffusionPipeline",
                "unet": ["diffusers", "UNet2DConditionModel"],
                "vae": ["diffusers", "AutoencoderKL"],
                "text_encoder": ["transformers", "CLIPTextModel"],
                "tokenizer": ["transformers", "CLIPTokenizer"],
                "scheduler": ["diffusers", "DDIMScheduler"],
                "safety_checker": [None, None],
                "feature_extractor": [None, None],
            }
        )
    )

    comps = load_pipeline(src)
    assert set(comps) == {
        "unet",
        "vae",
        "text_encoder",
        "tokenizer",
        "scheduler_config",
        "model_index",
    }
    assert comps["unet"].config.prediction_type == "v_prediction"
    save_pipeline(comps, tmp_path / "out")
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(tmp_path / "out", safety_checker=None)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    x, t, c = unet_inputs(32, seed=3)
    assert_close(torch_unet_out(pipe.unet.eval(), x, t, c), torch_unet_out(unet, x, t, c))
    ids = pipe.tokenizer("a cat", padding="max_length", max_length=12, return_tensors="np")[
        "input_ids"
    ]
    with torch.no_grad():
        want = pipe.text_encoder.eval()(torch.from_numpy(ids)).last_hidden_state.numpy()
    assert_close(encode_text(comps["text_encoder"], jnp.asarray(ids)), want)


def test_mismatched_reference_checkpoint_names_the_tensor(tmp_path):
    # A diffusers checkpoint whose config.json disagrees with its weights (context width 32 in
    # the weights, 24 in the config): the cross-attention key projection is named.
    diffusers.UNet2DConditionModel(**SD1_UNET).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "cross_attention_dim": 24}))
    with pytest.raises(
        CheckpointError,
        match=r"tensor 'down_blocks\.0\.attentions\.0\."
        r"transformer_blocks\.0\.attn2\.to_k\.weight' has "
        r"shape \(32, 32\), expected \(32, 24\)",
    ):
        load_unet(tmp_path)


def test_time_free_unet_matches_diffusers_without_its_time_path(tmp_path):
    # OMS's UNet2DConditionWoCTModel is diffusers' UNet2DConditionModel with the time embedding
    # and every resnet's time_emb_proj removed (unet_2d_condition_woct.py U:283-287, U:640):
    # the reference is that model with those modules deleted, saved under the WoCT class name.
    from safetensors.torch import save_file

    ref = perturb(diffusers.UNet2DConditionModel(**SD1_UNET))
    del ref.time_embedding
    ref.time_embedding = lambda *args, **kwargs: None
    for m in ref.modules():
        if isinstance(m, diffusers.models.resnet.ResnetBlock2D):
            del m.time_emb_proj
            m.time_emb_proj = None
    d = tmp_path / "oms_module"
    d.mkdir()
    config = {**dict(ref.config), "_class_name": "UNet2DConditionWoCTModel"}
    (d / "config.json").write_text(json.dumps(config, default=list))
    save_file(
        {k: v.contiguous() for k, v in ref.state_dict().items()},
        str(d / "diffusion_pytorch_model.safetensors"),
    )
    model, cfg = load_unet(tmp_path, component="oms_module", time_conditioning=False)
    assert not cfg.time_conditioning
    x, t, c = unet_inputs(SD1_UNET["cross_attention_dim"])
    want = torch_unet_out(ref, x, t, c)  # the timestep reaches nothing
    assert_close(nnx.jit(lambda m, x, c: m(x, None, c))(model, x, c), want)
    with pytest.raises(ValueError, match="_class_name='UNet2DConditionWoCTModel', expected"):
        load_unet(tmp_path / "oms_module")


def test_unet_matches_diffusers_through_the_cpus_fast_3x3_convolutions(tmp_path, monkeypatch):
    """jaxsafe.nn.conv3x3 at this test's small widths: with its channel threshold lowered, the
    16 x 16 level's 3 x 3 convolutions run Winograd and the 8 x 8 level's im2col (2 x 64 pixels),
    and the UNet still equals diffusers'."""
    from jaxsafe.nn import conv3x3

    ref = perturb(diffusers.UNet2DConditionModel(**SD1_UNET))
    ref.save_pretrained(tmp_path / "ref")
    model, _ = load_unet(tmp_path / "ref")
    x, t, c = unet_inputs(SD1_UNET["cross_attention_dim"])

    def lowered():  # a new function each time: no trace cached under other thresholds
        return jax.jit(lambda x, t, c: model(x, t, c)).lower(x, t, c)

    direct = lowered().as_text().count("stablehlo.convolution")
    monkeypatch.setattr(conv3x3, "MIN_CHANNELS", 1)
    fast = lowered()
    remaining = fast.as_text().count("stablehlo.convolution")
    # 1x1 and stride-2 convolutions stay XLA's; at least the resnets' 3x3s moved.
    assert remaining <= direct - 8, (direct, remaining)
    assert_close(fast.compile()(x, t, c), torch_unet_out(ref, x, t, c))

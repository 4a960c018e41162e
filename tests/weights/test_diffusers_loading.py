"""diffusers-layout loading/saving (jaxsafe.weights) without torch: file layout and PyTorch
names/shapes checked against conversions written here in numpy, round trips, and the errors for
missing, corrupted and mismatched checkpoints. Reference-library checks are in
test_torch_equivalence.py."""

import json
import string
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from jaxsafe.nn.autoencoder_kl import AutoencoderKL, AutoencoderKLConfig
from jaxsafe.nn.clip_text import CLIPTextConfig, CLIPTextModel
from jaxsafe.nn.unet2d_condition import UNet2DConditionConfig, UNet2DConditionModel
from jaxsafe.treepath import named_leaves
from jaxsafe.weights import (
    CheckpointError,
    load_pipeline,
    load_text_encoder,
    load_tokenizer,
    load_unet,
    load_vae,
    save_pipeline,
    save_text_encoder,
    save_unet,
    save_vae,
)
from jaxsafe.weights.convert import torch_key

UNET = UNet2DConditionConfig(
    sample_size=8,
    block_out_channels=(16, 32),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=12,
    attention_head_dim=2,
    norm_num_groups=4,
)
VAE = AutoencoderKLConfig(
    block_out_channels=(8, 16),
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    layers_per_block=1,
    norm_num_groups=4,
    sample_size=8,
)
CLIP = CLIPTextConfig(
    vocab_size=60,
    hidden_size=8,
    intermediate_size=16,
    num_hidden_layers=2,
    num_attention_heads=2,
    max_position_embeddings=10,
    eos_token_id=55,
)


def params(model):
    return {k: np.asarray(v) for k, v in named_leaves(nnx.state(model, nnx.Param)).items()}


def numpy_torch_layout(name, x):
    """Independent statement of the PyTorch layout: Linear (out, in), Conv2d OIHW."""
    if name.endswith("kernel") and x.ndim == 2:
        return x.T
    if name.endswith("kernel") and x.ndim == 4:
        return np.transpose(x, (3, 2, 0, 1))
    return x


def random_model(make, seed):
    """``make()`` with N(0, 0.1^2) parameters drawn on the host (eager init is slow on CPU)."""
    graphdef, state = nnx.split(nnx.eval_shape(make))
    rng = np.random.default_rng(seed)
    return nnx.merge(
        graphdef,
        jax.tree.map(lambda x: jnp.asarray(0.1 * rng.standard_normal(x.shape), x.dtype), state),
    )


@pytest.fixture(scope="module")
def models():
    return {
        "unet": random_model(lambda: UNet2DConditionModel(UNET, rngs=nnx.Rngs(0)), 0),
        "vae": random_model(lambda: AutoencoderKL(VAE, rngs=nnx.Rngs(0)), 1),
        "text_encoder": random_model(lambda: CLIPTextModel(CLIP, rngs=nnx.Rngs(0)), 2),
    }


@pytest.fixture(scope="module")
def pipeline_dir(models, tmp_path_factory):
    folder = tmp_path_factory.mktemp("pipe")
    save_pipeline(
        {
            **models,
            "scheduler_config": {"_class_name": "DDIMScheduler", "prediction_type": "v_prediction"},
        },
        folder,
    )
    return folder


@pytest.mark.slow
def test_layout_names_and_shapes_are_pytorch(models, pipeline_dir):
    index = json.loads((pipeline_dir / "model_index.json").read_text())
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert index["vae"] == ["diffusers", "AutoencoderKL"]
    assert index["text_encoder"] == ["transformers", "CLIPTextModel"]
    assert index["scheduler"] == ["diffusers", "DDIMScheduler"]
    sd = load_file(pipeline_dir / "unet" / "diffusion_pytorch_model.safetensors")
    p = params(models["unet"])
    key = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"
    assert sd[key].shape == (16, 12)  # (out, in): 12-wide text context in
    np.testing.assert_array_equal(
        sd[key], p["down_blocks/0/attentions/0/transformer_blocks/0/attn2/to_k/kernel"].T
    )
    assert sd["conv_in.weight"].shape == (16, 4, 3, 3)
    assert sd["down_blocks.0.resnets.0.norm1.weight"].shape == (16,)
    assert sd["down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2.weight"].shape == (16, 64)
    assert len(sd) == len(p)
    for name, x in p.items():
        np.testing.assert_array_equal(sd[torch_key(name)], numpy_torch_layout(name, x))
    cfg = json.loads((pipeline_dir / "unet" / "config.json").read_text())
    assert cfg["_class_name"] == "UNet2DConditionModel" and cfg["block_out_channels"] == [16, 32]
    assert "prediction_type" not in cfg  # a scheduler property in diffusers
    te = load_file(pipeline_dir / "text_encoder" / "model.safetensors")
    assert te["text_model.embeddings.token_embedding.weight"].shape == (60, 8)
    assert te["text_model.encoder.layers.1.self_attn.q_proj.weight"].shape == (8, 8)
    te_cfg = json.loads((pipeline_dir / "text_encoder" / "config.json").read_text())
    assert te_cfg["architectures"] == ["CLIPTextModel"] and te_cfg["eos_token_id"] == 55
    vae = load_file(pipeline_dir / "vae" / "diffusion_pytorch_model.safetensors")
    assert vae["encoder.mid_block.attentions.0.to_q.weight"].shape == (16, 16)
    assert vae["encoder.down_blocks.0.downsamplers.0.conv.weight"].shape == (8, 8, 3, 3)


def test_pipeline_round_trip(models, pipeline_dir):
    loaded = load_pipeline(pipeline_dir)
    assert set(loaded) == {"unet", "vae", "text_encoder", "scheduler_config", "model_index"}
    for name in ("unet", "vae", "text_encoder"):
        a, b = params(models[name]), params(loaded[name])
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    # prediction_type is read from scheduler/scheduler_config.json.
    assert loaded["unet"].config.prediction_type == "v_prediction"
    assert loaded["unet"].config == UNET.__class__(
        **{**UNET.__dict__, "prediction_type": "v_prediction"}
    )
    assert loaded["vae"].config == VAE and loaded["text_encoder"].config == CLIP
    only = load_pipeline(pipeline_dir, components=["vae"])
    assert set(only) == {"vae", "scheduler_config", "model_index"}


@pytest.mark.slow
def test_component_folders_and_dtypes(models, pipeline_dir):
    unet, cfg = load_unet(pipeline_dir / "unet", param_dtype=jnp.bfloat16, dtype=jnp.bfloat16)
    assert cfg.prediction_type == "v_prediction"  # found in the sibling scheduler/ folder
    leaf = params(unet)["conv_in/kernel"]
    assert leaf.dtype == jnp.bfloat16
    want = params(models["unet"])["conv_in/kernel"].astype(jnp.bfloat16)
    np.testing.assert_array_equal(leaf, want)
    _, vcfg = load_vae(pipeline_dir / "vae")
    assert vcfg.scaling_factor == 0.18215  # exact: a float read back from config.json
    _, tcfg = load_text_encoder(pipeline_dir / "text_encoder")
    assert tcfg == CLIP


def test_missing_components_are_absent(models, tmp_path):
    hub_index = {
        "_name_or_path": "runwayml/stable-diffusion-v1-5",
        "safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"],
        "unet": ["diffusers", "UNet2DConditionModel"],
    }
    save_pipeline({"vae": models["vae"], "model_index": hub_index}, tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    # Entries for components not written are dropped; plain settings are kept.
    assert index["safety_checker"] == [None, None] and "unet" not in index
    assert index["_name_or_path"] == "runwayml/stable-diffusion-v1-5"
    loaded = load_pipeline(tmp_path)
    assert set(loaded) == {"vae", "model_index"}


def test_missing_folder_and_index(tmp_path):
    with pytest.raises(FileNotFoundError, match="pipeline folder .*nope.* not found"):
        load_pipeline(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="model_index.json.* not found"):
        load_pipeline(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"unet: neither .*unet/config.json"):
        load_unet(tmp_path)
    with pytest.raises(ValueError, match=r"components: unknown \['safety_checker'\]"):
        (tmp_path / "model_index.json").write_text("{}")
        load_pipeline(tmp_path, components=["safety_checker"])


def _copy_vae(models, folder):
    save_vae(models["vae"], VAE, folder)
    return folder / "diffusion_pytorch_model.safetensors"


def test_truncated_safetensors_names_the_file(models, tmp_path):
    f = _copy_vae(models, tmp_path)
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(
        CheckpointError,
        match=r"diffusion_pytorch_model.safetensors: cannot read "
        r"safetensors file .*truncated or corrupted",
    ):
        load_vae(tmp_path)


@pytest.mark.slow
def test_missing_unexpected_and_misshaped_tensors(models, tmp_path):
    f = _copy_vae(models, tmp_path)
    sd = dict(load_file(f))
    name = "decoder.conv_out.weight"

    bad = {k: v for k, v in sd.items() if k != name}
    save_file(bad, f)
    with pytest.raises(CheckpointError, match=r"missing tensor\(s\) 'decoder.conv_out.weight'"):
        load_vae(tmp_path)

    save_file({**sd, "decoder.extra.weight": np.zeros(3, np.float32)}, f)
    with pytest.raises(CheckpointError, match=r"unexpected tensor\(s\) 'decoder.extra.weight'"):
        load_vae(tmp_path)

    save_file({**sd, name: np.zeros((3, 8, 3, 2), np.float32)}, f)
    with pytest.raises(
        CheckpointError,
        match=r"tensor 'decoder.conv_out.weight' has shape "
        r"\(3, 8, 3, 2\), expected \(3, 8, 3, 3\)",
    ):
        load_vae(tmp_path)


def test_legacy_vae_attention_names_load(models, tmp_path):
    f = _copy_vae(models, tmp_path)
    sd = dict(load_file(f))
    legacy = {}
    for k, v in sd.items():
        for new, old in (
            (".to_q.", ".query."),
            (".to_k.", ".key."),
            (".to_v.", ".value."),
            (".to_out.0.", ".proj_attn."),
        ):
            k = k.replace(new, old)
        # Original-LDM attention weights were 1x1 convs.
        legacy[k] = v[:, :, None, None] if (".query.weight" in k or ".proj_attn.weight" in k) else v
    assert "encoder.mid_block.attentions.0.query.weight" in legacy
    save_file(legacy, f)
    vae, _ = load_vae(tmp_path)
    for k, x in params(models["vae"]).items():
        np.testing.assert_array_equal(params(vae)[k], x, err_msg=k)


def test_pickled_weights_are_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(VAE.to_diffusers_dict()))
    (tmp_path / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x02")
    with pytest.raises(
        CheckpointError,
        match=r"diffusion_pytorch_model.bin: pickled PyTorch "
        r"weights are not supported",
    ):
        load_vae(tmp_path)
    (tmp_path / "diffusion_pytorch_model.bin").unlink()
    with pytest.raises(
        FileNotFoundError,
        match=r"no weights in .*expected "
        r"'diffusion_pytorch_model.safetensors'",
    ):
        load_vae(tmp_path)


def test_sharded_fp16_variant_and_unprefixed_clip(models, tmp_path):
    # A text encoder split in two fp16 shards with an index, keys without 'text_model.' and with
    # the old position_ids buffer: all forms found on the hub.
    save_text_encoder(models["text_encoder"], CLIP, tmp_path)
    sd = {
        k.removeprefix("text_model."): v.astype(np.float16)
        for k, v in load_file(tmp_path / "model.safetensors").items()
    }
    sd["embeddings.position_ids"] = np.arange(10, dtype=np.int64)[None]
    (tmp_path / "model.safetensors").unlink()
    keys = sorted(sd)
    shards = {
        "model-00001-of-00002.fp16.safetensors": keys[::2],
        "model-00002-of-00002.fp16.safetensors": keys[1::2],
    }
    for fname, ks in shards.items():
        save_file({k: sd[k] for k in ks}, tmp_path / fname)
    (tmp_path / "model.fp16.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": {k: f for f, ks in shards.items() for k in ks}})
    )
    te, _ = load_text_encoder(tmp_path, variant="fp16")
    for k, x in params(models["text_encoder"]).items():
        got = params(te)[k]
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, x.astype(np.float16).astype(np.float32), err_msg=k)


def test_wrong_class_is_rejected(tmp_path, models):
    save_unet(models["unet"], UNET, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "_class_name": "UNet2DModel"}))
    with pytest.raises(
        ValueError,
        match=r"_class_name='UNet2DModel', expected "
        r"'UNet2DConditionModel'",
    ):
        load_unet(tmp_path)
    with pytest.raises(ValueError, match="save_unet: config does not match model.config"):
        save_unet(models["unet"], UNet2DConditionConfig(), tmp_path)


def write_tiny_clip_tokenizer(folder: Path) -> dict:
    """A CLIP BPE vocabulary of lowercase letters, one merge ('c a'), and the two specials."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab = {c: i for i, c in enumerate(string.ascii_lowercase)}
    vocab.update({c + "</w>": 26 + i for i, c in enumerate(string.ascii_lowercase)})
    vocab.update({"ca": 52, "<|startoftext|>": 53, "<|endoftext|>": 54})
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\nc a\n")
    return vocab


def test_tokenizer(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer files not found"):
        load_tokenizer(tmp_path)
    vocab = write_tiny_clip_tokenizer(tmp_path / "tokenizer")
    tok = load_tokenizer(tmp_path)
    ids = tok("A cat", padding="max_length", max_length=7)["input_ids"]
    bos, eos = vocab["<|startoftext|>"], vocab["<|endoftext|>"]
    # Lower-cased, 'c a' merged, end-of-word suffixes, padded with EOT (SD 1.x convention).
    assert ids == [bos, vocab["a</w>"], vocab["ca"], vocab["t</w>"], eos, eos, eos]


def test_tokenizer_loads_without_torch(tmp_path):
    """transformers is a core dependency and torch is not: a real SD folder's CLIP tokenizer
    loads, and tokenises, in a process where importing torch fails."""
    vocab = write_tiny_clip_tokenizer(tmp_path / "tokenizer")
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from jaxsafe.weights.diffusers import load_tokenizer\n"
        f"tok = load_tokenizer({str(tmp_path)!r})\n"
        "print(tok('A cat', padding='max_length', max_length=7)['input_ids'])\n"
        "import torch\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    # The last line proves torch really was unimportable in that process.
    assert "import of torch halted" in out.stderr, out.stderr
    bos, eos = vocab["<|startoftext|>"], vocab["<|endoftext|>"]
    expected = [bos, vocab["a</w>"], vocab["ca"], vocab["t</w>"], eos, eos, eos]
    assert out.stdout.strip() == str(expected), out.stderr


def test_unreadable_tokenizer_files_are_one_clear_error(tmp_path):
    (tmp_path / "vocab.json").write_text("{not json")
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    with pytest.raises(
        ValueError,
        match=r"tokenizer files in '.*' cannot be read as a CLIP "
        "tokenizer",
    ):
        load_tokenizer(tmp_path)

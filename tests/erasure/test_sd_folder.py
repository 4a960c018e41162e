"""Erasure on a Stable-Diffusion-layout folder (VAE, CLIP BPE tokenizer) rather than the test bed:
a tiny random one built here, edited by the launcher and written back in the same layout."""

import json
import os
import string
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxsafe.nn.autoencoder_kl import AutoencoderKL, AutoencoderKLConfig
from jaxsafe.nn.clip_text import CLIPTextConfig, CLIPTextModel
from jaxsafe.nn.unet2d_condition import UNet2DConditionConfig, UNet2DConditionModel
from jaxsafe.weights.convert import read_safetensors
from jaxsafe.weights.diffusers import save_pipeline

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
    sample_size=16,
)
CLIP = CLIPTextConfig(
    vocab_size=60,
    hidden_size=12,
    intermediate_size=24,
    num_hidden_layers=2,
    num_attention_heads=2,
    max_position_embeddings=10,
    eos_token_id=54,
)


def _random(make, seed):
    graphdef, state = nnx.split(nnx.eval_shape(make))
    rng = np.random.default_rng(seed)
    return nnx.merge(
        graphdef,
        jax.tree.map(lambda x: jnp.asarray(0.1 * rng.standard_normal(x.shape), x.dtype), state),
    )


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sd")
    save_pipeline(
        {
            "unet": _random(lambda: UNet2DConditionModel(UNET, rngs=nnx.Rngs(0)), 0),
            "vae": _random(lambda: AutoencoderKL(VAE, rngs=nnx.Rngs(0)), 1),
            "text_encoder": _random(lambda: CLIPTextModel(CLIP, rngs=nnx.Rngs(0)), 2),
            "scheduler_config": {"_class_name": "DDIMScheduler"},
        },
        folder,
    )
    # A letters-only CLIP BPE vocabulary; listed in model_index.json like a hub folder's.
    tok = folder / "tokenizer"
    tok.mkdir()
    vocab = {c: i for i, c in enumerate(string.ascii_lowercase)}
    vocab |= {c + "</w>": 26 + i for i, c in enumerate(string.ascii_lowercase)}
    vocab |= {"<|startoftext|>": 53, "<|endoftext|>": 54}
    (tok / "vocab.json").write_text(json.dumps(vocab))
    (tok / "merges.txt").write_text("#version: 0.2\n")
    index = json.loads((folder / "model_index.json").read_text())
    index["tokenizer"] = ["transformers", "CLIPTokenizer"]
    (folder / "model_index.json").write_text(json.dumps(index))
    return str(folder)


def _weights(folder, rel):
    return {k: np.asarray(v) for k, v in read_safetensors([Path(folder, rel)]).items()}


@pytest.mark.slow
def test_load_reads_vae_and_clip_tokenizer(sd_folder):
    from jaxsafe.diffusion import pipeline

    pipe = pipeline.load(sd_folder)
    assert not pipe.testbed and pipe.latent_shape == (8, 8, 4)
    ids = pipe.tokenize(["a b", ""])
    assert ids.shape == (2, 10) and ids[0, 0] == 53 and ids[0, 3] == 54
    np.testing.assert_array_equal(pipe.lengths(["a b", ""]), [4, 2])
    images = pipe.decode(jnp.zeros((1, 8, 8, 4)))
    assert images.shape == (1, 16, 16, 3) and float(jnp.abs(images).max()) <= 1.0


@pytest.mark.slow
def test_uce_writes_an_edited_sd_folder(sd_folder, tmp_path):
    from configs.erasure import uce
    from experiments import run_experiment as erase
    from jaxsafe.diffusion import pipeline

    c = uce.get_config()
    c.model.folder = sd_folder
    c.concepts.update(erase=("xyz",), preserve=("abc",))
    summary = erase(c, str(tmp_path))
    out = summary["export"]
    unet = os.path.join("unet", "diffusion_pytorch_model.safetensors")
    before, after = _weights(sd_folder, unet), _weights(out, unet)
    changed = {k for k in before if not np.array_equal(before[k], after[k])}
    assert changed == {k for k in before if ".attn2.to_k." in k or ".attn2.to_v." in k}
    for rel in (
        "vae/diffusion_pytorch_model.safetensors",
        "tokenizer/vocab.json",
        "text_encoder/model.safetensors",
    ):
        assert Path(out, rel).read_bytes() == Path(sd_folder, rel).read_bytes()
    assert "target_accuracy" not in summary  # no oracle outside the test bed
    assert not pipeline.load(out).testbed

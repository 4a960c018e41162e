"""Hub ids resolve through a hub-cache layout built here, with the hub's offline mode on."""

import json
import shutil

import numpy as np
import pytest
from huggingface_hub import constants as hub_constants

from jaxsafe.diffusion import pipeline
from jaxsafe.weights import convert, hub

MAIN, V1 = "a" * 40, "b" * 40
UNET = "unet/diffusion_pytorch_model.safetensors"


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """``models--testorg--tiny-testbed`` with the shipped test bed as the snapshot of ``main``
    and, with the UNet's ``conv_in.bias`` raised by 1, of tag ``v1``."""
    root = tmp_path / "hub"
    repo = root / "models--testorg--tiny-testbed"
    for sha, ref in ((MAIN, "main"), (V1, "v1")):
        shutil.copytree(pipeline.SHIPPED_TESTBED, repo / "snapshots" / sha)
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(sha)
    v1_unet = repo / "snapshots" / V1 / UNET
    tensors = convert.read_safetensors(v1_unet)
    tensors["conv_in.bias"] = tensors["conv_in.bias"] + np.float32(1.0)
    convert.write_safetensors(tensors, v1_unet)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(root))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return root, repo


def test_folders_pass_through_and_ids_are_recognised(tmp_path):
    assert hub.resolve(str(tmp_path)) == str(tmp_path)
    assert hub.is_hub_id("CompVis/stable-diffusion-v1-4")
    assert hub.is_hub_id("stabilityai/sd-turbo@fp16-branch")
    assert not hub.is_hub_id("/abs/path") and not hub.is_hub_id("single")
    assert not hub.is_hub_id(str(pipeline.SHIPPED_TESTBED))


def test_hub_id_loads_from_the_cache_offline(cache):
    root, repo = cache
    assert hub.resolve("testorg/tiny-testbed") == str(repo / "snapshots" / MAIN)
    assert hub.resolve("testorg/tiny-testbed@v1") == str(repo / "snapshots" / V1)
    assert hub.resolve("testorg/tiny-testbed", revision=V1) == str(repo / "snapshots" / V1)
    from_hub = pipeline.load("testorg/tiny-testbed")
    from_folder = pipeline.load(pipeline.SHIPPED_TESTBED)
    assert from_hub.folder == str(repo / "snapshots" / MAIN)
    a = convert.model_params(from_hub.model.unet)
    b = convert.model_params(from_folder.model.unet)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]))


def _shipped_bias():
    return convert.read_safetensors(f"{pipeline.SHIPPED_TESTBED}/{UNET}")["conv_in.bias"]


def test_load_pipeline_takes_a_hub_id_and_its_revision(cache):
    from jaxsafe.weights import diffusers

    shipped = _shipped_bias()
    load = lambda spec, **kw: diffusers.load_pipeline(spec, components=("unet",), **kw)  # noqa: E731
    bias = lambda parts: np.asarray(parts["unet"].conv_in.bias[...])  # noqa: E731
    np.testing.assert_allclose(bias(load("testorg/tiny-testbed")), shipped, rtol=0, atol=1e-7)
    for kw in ({"revision": "v1"}, {"revision": V1}):
        np.testing.assert_allclose(
            bias(load("testorg/tiny-testbed", **kw)), shipped + 1.0, rtol=0, atol=1e-6
        )
    np.testing.assert_allclose(
        bias(load("testorg/tiny-testbed@v1", revision="v1")), shipped + 1.0, rtol=0, atol=1e-6
    )
    with pytest.raises(
        ValueError,
        match=r"^'testorg/tiny-testbed@v1': revision 'v1' in the id and revision='main' differ$",
    ):
        load("testorg/tiny-testbed@v1", revision="main")


def test_missing_hub_model_names_id_revision_and_cache(cache):
    root, _ = cache
    with pytest.raises(FileNotFoundError) as e:
        pipeline.load("testorg/absent@v2", variant="fp16")
    assert str(e.value) == (
        "'testorg/absent@v2' is no folder, and the hub model 'testorg/absent' (revision v2, "
        f"variant fp16) is not in the cache {str(root)!r}, and the hub's offline mode is on "
        "(HF_HUB_OFFLINE); download it where there is network "
        "(`hf download testorg/absent --revision v2`) or pass a local folder"
    )
    with pytest.raises(ValueError, match="revision 'v1' in the id and revision='v2' differ"):
        hub.resolve("testorg/tiny-testbed@v1", revision="v2")


def test_only_what_jaxsafe_reads_is_downloaded():
    from fnmatch import fnmatch

    # A Stable Diffusion repository's files (CompVis/stable-diffusion-v1-4's layout, one UNet
    # sharded) and an SPM export's: which each variant fetches.
    files = [
        "model_index.json",
        "sd-v1-4.ckpt",
        "scheduler/scheduler_config.json",
        "tokenizer/vocab.json",
        "tokenizer/merges.txt",
        "text_encoder/config.json",
        "text_encoder/model.safetensors",
        "text_encoder/model.fp16.safetensors",
        "text_encoder/pytorch_model.bin",
        "unet/diffusion_pytorch_model.safetensors.index.json",
        "unet/diffusion_pytorch_model-00001-of-00002.safetensors",
        "unet/diffusion_pytorch_model-00002-of-00002.safetensors",
        "unet/diffusion_pytorch_model.fp16.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.fp16.safetensors",
        "vae/diffusion_pytorch_model.bin",
        "safety_checker/config.json",
        "safety_checker/model.safetensors",
        "safety_checker/model.fp16.safetensors",
        "latent/patch_pca.npz",
        "spm.json",
        "spm_adapter.safetensors",
    ]
    fetched = lambda v: {f for f in files if any(fnmatch(f, p) for p in hub.allow_patterns(v))}  # noqa: E731
    small = {
        "model_index.json",
        "scheduler/scheduler_config.json",
        "tokenizer/vocab.json",
        "tokenizer/merges.txt",
        "text_encoder/config.json",
        "unet/diffusion_pytorch_model.safetensors.index.json",
        "safety_checker/config.json",
        "latent/patch_pca.npz",
        "spm.json",
        "spm_adapter.safetensors",
    }
    assert fetched(None) == small | {
        "text_encoder/model.safetensors",
        "unet/diffusion_pytorch_model-00001-of-00002.safetensors",
        "unet/diffusion_pytorch_model-00002-of-00002.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
    }
    assert fetched("fp16") == small | {
        "text_encoder/model.fp16.safetensors",
        "unet/diffusion_pytorch_model.fp16.safetensors",
        "vae/diffusion_pytorch_model.fp16.safetensors",
    }


def test_config_model_block_takes_id_revision_and_variant(cache):
    import ml_collections

    root, repo = cache
    block = ml_collections.ConfigDict(
        dict(folder="testorg/tiny-testbed", revision="v1", variant="")
    )
    assert pipeline.from_config(block).folder == str(repo / "snapshots" / V1)
    # The cached snapshot has no fp16 weights and the hub is offline: the error names the id,
    # revision, variant, cache and the files it lacks (the test bed has no vae).
    block.variant = "fp16"
    with pytest.raises(FileNotFoundError) as e:
        pipeline.from_config(block)
    assert str(e.value) == (
        "'testorg/tiny-testbed' is no folder, and the hub model 'testorg/tiny-testbed' "
        f"(revision v1, variant fp16) is in the cache {str(root)!r} without "
        "unet/diffusion_pytorch_model.fp16.safetensors, text_encoder/model.fp16.safetensors, "
        "and the hub's offline mode is on (HF_HUB_OFFLINE); download it where there is "
        "network (`hf download testorg/tiny-testbed --revision v1`) or pass a local folder"
    )


def test_a_cached_snapshot_without_the_variant_is_downloaded_when_online(
    cache, tmp_path, monkeypatch
):
    """With the network allowed, a snapshot that lacks the variant's weights falls through to
    ``snapshot_download`` of only what jaxsafe reads (faked here: nothing is downloaded)."""
    import huggingface_hub

    _, repo = cache
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    real, calls = huggingface_hub.snapshot_download, []
    downloaded = tmp_path / "downloaded"

    def fake(repo_id, **kw):
        calls.append((repo_id, kw))
        return real(repo_id, **kw) if kw.get("local_files_only") else str(downloaded)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    # The cached snapshot holds the plain weights: no download.
    assert hub.resolve("testorg/tiny-testbed@v1") == str(repo / "snapshots" / V1)
    assert [kw.get("local_files_only") for _, kw in calls] == [True]
    calls.clear()
    assert hub.resolve("testorg/tiny-testbed", revision="v1", variant="fp16") == str(downloaded)
    assert [(r, kw.get("local_files_only"), kw["revision"]) for r, kw in calls] == [
        ("testorg/tiny-testbed", True, "v1"),
        ("testorg/tiny-testbed", None, "v1"),
    ]
    patterns = calls[1][1]["allow_patterns"]
    assert {
        "unet/diffusion_pytorch_model.fp16.safetensors",
        "text_encoder/model.fp16.safetensors",
        "vae/diffusion_pytorch_model.fp16.safetensors",
    } <= set(patterns)
    assert not any(p.endswith((".bin", ".ckpt")) or p == "*/*.safetensors" for p in patterns)


def test_missing_weights_reads_the_index_and_its_shards(tmp_path):
    (tmp_path / "unet").mkdir()
    index = {"unet": ["diffusers", "UNet2DConditionModel"], "vae": [None, None]}
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    assert hub.missing_weights(str(tmp_path), None) == [UNET]
    shards = {"a": "diffusion_pytorch_model-00001-of-00002.safetensors"}
    shards["b"] = "diffusion_pytorch_model-00002-of-00002.safetensors"
    (tmp_path / (UNET + ".index.json")).write_text(json.dumps({"weight_map": shards}))
    (tmp_path / "unet" / shards["a"]).write_bytes(b"")
    assert hub.missing_weights(str(tmp_path), None) == ["unet/" + shards["b"]]
    (tmp_path / "unet" / shards["b"]).write_bytes(b"")
    assert hub.missing_weights(str(tmp_path), None) == []
    assert hub.missing_weights(str(tmp_path), "fp16") == [
        "unet/diffusion_pytorch_model.fp16.safetensors"
    ]
    assert hub.missing_weights(str(tmp_path / "unet"), None) == ["model_index.json"]

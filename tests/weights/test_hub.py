"""Hub ids resolve through a hub-cache layout built here, with the hub's offline mode on."""

import shutil

import numpy as np
import pytest

pytest.importorskip("huggingface_hub")
from huggingface_hub import constants as hub_constants  # noqa: E402

from jaxsafe.diffusion import pipeline  # noqa: E402
from jaxsafe.weights import convert, hub  # noqa: E402

MAIN, V1 = "a" * 40, "b" * 40


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """``models--testorg--tiny-testbed`` with the shipped test bed as the snapshot of ``main``
    and, with a different model_index marker, of tag ``v1``."""
    root = tmp_path / "hub"
    repo = root / "models--testorg--tiny-testbed"
    for sha, ref in ((MAIN, "main"), (V1, "v1")):
        shutil.copytree(pipeline.SHIPPED_TESTBED, repo / "snapshots" / sha)
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(sha)
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


def test_missing_hub_model_names_id_revision_and_cache(cache):
    root, _ = cache
    with pytest.raises(FileNotFoundError) as e:
        pipeline.load("testorg/absent@v2")
    msg = str(e.value)
    assert "hub model 'testorg/absent' (revision v2) is not in the cache" in msg
    assert repr(str(root)) in msg and "offline mode is on" in msg
    with pytest.raises(ValueError, match="revision 'v1' in the id and revision='v2' differ"):
        hub.resolve("testorg/tiny-testbed@v1", revision="v2")


def test_only_what_jaxsafe_reads_is_downloaded():
    assert hub.allow_patterns(None) == [
        "model_index.json",
        "*/*.json",
        "*/*.txt",
        "*/*.npz",
        "*/*.safetensors",
    ]
    assert hub.allow_patterns("fp16")[-1] == "*/*.fp16.safetensors"


def test_config_model_block_takes_id_revision_and_variant(cache):
    import ml_collections

    _, repo = cache
    block = ml_collections.ConfigDict(
        dict(folder="testorg/tiny-testbed", revision="v1", variant="")
    )
    assert pipeline.from_config(block).folder == str(repo / "snapshots" / V1)
    block.variant = "fp16"  # the test bed has no fp16 weights: the loader names the file
    with pytest.raises(
        FileNotFoundError,
        match=r"expected 'diffusion_pytorch_model\.fp16\."
        r"safetensors'",
    ):
        pipeline.from_config(block)

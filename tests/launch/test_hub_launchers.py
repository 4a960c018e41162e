"""The launchers take Hugging Face hub ids, offline, from a hub-cache layout built here
(``models--<org>--<name>/{refs,snapshots}``): ``launch.attack``'s ``--model`` (with
``--revision`` / ``--variant``) and an export's own sampler, and ``launch.erase``'s
``--config.model.folder``."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from huggingface_hub import constants as hub_constants

from jaxsafe.diffusion import pipeline
from jaxsafe.weights import convert

ROOT = Path(__file__).resolve().parents[2]
MAIN, V1, EXPORT = "a" * 40, "b" * 40, "c" * 40
UNET = "unet/diffusion_pytorch_model.safetensors"
TEXT = "text_encoder/model.safetensors"


def _snapshot(root: Path, repo_id: str, ref: str, sha: str) -> Path:
    repo = root / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / sha
    shutil.copytree(pipeline.SHIPPED_TESTBED, snap)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / ref).write_text(sha)
    return snap


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """``testorg/tiny-testbed``: the shipped test bed at ``main`` and, with the UNet's
    ``conv_in.bias`` raised by 1, at tag ``v1``; ``testorg/safree-export``: a SAFREE export
    (``safree.json`` next to the model) at ``main``. The hub's offline mode is on."""
    root = tmp_path / "hub"
    _snapshot(root, "testorg/tiny-testbed", "main", MAIN)
    v1 = _snapshot(root, "testorg/tiny-testbed", "v1", V1)
    tensors = convert.read_safetensors(v1 / UNET)
    tensors["conv_in.bias"] = tensors["conv_in.bias"] + np.float32(1.0)
    convert.write_safetensors(tensors, v1 / UNET)
    export = _snapshot(root, "testorg/safree-export", "main", EXPORT)
    (export / "safree.json").write_text(json.dumps({"method": "SAFREE"}))
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(root))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return root


def _snap(root: Path, repo_id: str, sha: str) -> str:
    return str(root / ("models--" + repo_id.replace("/", "--")) / "snapshots" / sha)


def test_attack_resolves_a_hub_id_before_looking_on_disk(cache, tmp_path, monkeypatch):
    from launch import attack
    from launch import robustness_table as rt

    tiny = "testorg/tiny-testbed"
    assert attack.model_folder(tiny) == _snap(cache, tiny, MAIN)
    assert attack.model_folder(tiny, revision="v1") == _snap(cache, tiny, V1)
    assert attack.model_folder(tiny + "@v1", revision="", variant="") == _snap(cache, tiny, V1)
    # The export on the hub is recognised by its files, from its id or from model_folder's path.
    export = _snap(cache, "testorg/safree-export", EXPORT)
    assert attack.model_folder("testorg/safree-export") == export
    assert rt.own_sampler_method("testorg/safree-export") == "SAFREE"
    assert rt.own_sampler_method(export) == "SAFREE"
    assert rt.own_sampler_method(tiny, revision="v1") is None
    # A folder with --revision, and a variant the cached snapshot lacks: one line each.
    with pytest.raises(
        ValueError,
        match=f"^--revision=v1: --model '{tmp_path}' is a folder, not a hub id$",
    ):
        attack.model_folder(str(tmp_path), revision="v1")
    with pytest.raises(
        FileNotFoundError,
        match=r"\(revision v1, variant fp16\) is in the cache .* without "
        r"unet/diffusion_pytorch_model\.fp16\.safetensors",
    ):
        attack.model_folder(tiny, revision="v1", variant="fp16")
    # An erasure workdir's export/ is still found in a folder that is not a hub id.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ws" / "export").mkdir(parents=True)
    assert attack.model_folder("ws") == os.path.join("ws", "export")


def _env(cache: Path) -> dict:
    return dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        PYTHONUNBUFFERED="1",
        HF_HUB_OFFLINE="1",
        HF_HUB_CACHE=str(cache),
    )


def _erase(cache: Path, workdir: Path, *overrides: str):
    cmd = [
        sys.executable,
        "-m",
        "launch.erase",
        "--config=configs/erasure/uce.py:smoke",
        f"--workdir={workdir}",
        "--config.eval.enabled=False",
        *overrides,
    ]
    return subprocess.run(
        cmd, cwd=ROOT, env=_env(cache), capture_output=True, text=True, timeout=300
    )


def _weights(path) -> dict:
    return {k: np.asarray(v) for k, v in convert.read_safetensors(path).items()}


@pytest.mark.slow
def test_erase_takes_a_hub_id_with_its_revision(cache, tmp_path):
    """UCE (smoke) on ``testorg/tiny-testbed`` at ``v1``: the export is v1's model (its raised
    ``conv_in.bias``, not main's) with only the cross-attention keys and values edited."""
    r = _erase(
        cache,
        tmp_path / "w",
        "--config.model.folder=testorg/tiny-testbed",
        "--config.model.revision=v1",
    )
    assert r.returncode == 0, r.stderr[-2000:]
    out = tmp_path / "w" / "export"
    v1 = Path(_snap(cache, "testorg/tiny-testbed", V1))
    before, after = _weights(v1 / UNET), _weights(out / UNET)
    assert before.keys() == after.keys()
    changed = {k for k in before if not np.array_equal(before[k], after[k])}
    assert changed == {k for k in before if ".attn2.to_k." in k or ".attn2.to_v." in k}
    shipped = _weights(Path(pipeline.SHIPPED_TESTBED) / UNET)["conv_in.bias"]
    np.testing.assert_allclose(after["conv_in.bias"], shipped + 1.0, rtol=0, atol=1e-6)
    text_v1, text_out = _weights(v1 / TEXT), _weights(out / TEXT)
    assert all(np.array_equal(text_v1[k], text_out[k]) for k in text_v1)


def test_erase_names_the_hub_model_it_cannot_find_offline(cache, tmp_path):
    r = _erase(
        cache,
        tmp_path / "w",
        "--config.model.folder=testorg/tiny-testbed",
        "--config.model.variant=fp16",
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert [line for line in r.stderr.splitlines() if line.startswith("erase: error:")] == [
        "erase: error: 'testorg/tiny-testbed' is no folder, and the hub model "
        f"'testorg/tiny-testbed' (revision main, variant fp16) is in the cache {str(cache)!r} "
        "without unet/diffusion_pytorch_model.fp16.safetensors, "
        "text_encoder/model.fp16.safetensors, and the hub's offline mode is on "
        "(HF_HUB_OFFLINE); download it where there is network "
        "(`hf download testorg/tiny-testbed`) or pass a local folder"
    ]
    assert not (tmp_path / "w" / "export").exists()

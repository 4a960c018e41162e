"""The erasure methods whose end-to-end tests run in-process (SPM's and RECE's inspect the
training state or take a scorer from the test) and the original, on a simulated 8-device mesh
(smoke settings, the tiny test-bed model of the `tiny_folder` fixture): SPM shards its fixed
prompt batches over the mesh's 8 batch shards, and evaluation generates on the mesh. The other
methods' end-to-end tests run on 8 devices themselves (the `erase_on_8_devices` fixture)."""

import json
import os

import pytest
from subprocs import run_python

SCRIPT = """
import json, os, sys
import jax
import numpy as np
from experiments import run_experiment

assert jax.device_count() == 8, jax.devices()
out_dir, folder = sys.argv[1:3]
results = {}
for method in sys.argv[3:]:
    module = __import__(f"configs.erasure.{method}", fromlist=["get_config"])
    config = module.get_config("smoke")
    config.model.folder = folder
    config.eval.update(samples_per_concept=1, fid_samples=8, heldout_examples=8)
    s = run_experiment(config, f"{out_dir}/{method}")
    from jaxsafe.weights.convert import read_safetensors
    changed = []
    for part, f in (("unet", "diffusion_pytorch_model.safetensors"),
                    ("text_encoder", "model.safetensors")):
        a = read_safetensors([os.path.join(folder, part, f)])
        b = read_safetensors([os.path.join(s["export"], part, f)])
        if any(not np.array_equal(np.asarray(a[k]), np.asarray(b[k])) for k in a):
            changed.append(part)
    results[method] = {"export": s["export"], "acc_red": s["acc/red"],
                       "oracle_fd": s["oracle_fd"], "changed": changed}
print("RESULTS " + json.dumps(results))
"""


def _run(tmp_path, folder, methods):
    p = run_python(SCRIPT, tmp_path, folder, *methods, n_devices=8, timeout=1500)
    line = next(x for x in p.stdout.splitlines() if x.startswith("RESULTS "))
    return json.loads(line.removeprefix("RESULTS "))


@pytest.mark.slow
def test_spm_rece_and_the_original_run_on_eight_devices(tmp_path, tiny_folder):
    """Each 8-device run edits exactly the network it is meant to (RECE the UNet; nothing for
    SPM, whose adapters ship in their own file, and the original) and reports the test-bed
    metrics."""
    methods = ("spm", "rece", "original")
    results = _run(tmp_path, tiny_folder, methods)
    assert sorted(results) == sorted(methods)
    expected = {"rece": ["unet"], "spm": [], "original": []}
    assert {m: r["changed"] for m, r in results.items()} == {m: expected[m] for m in methods}
    for m, r in results.items():
        assert os.path.isdir(r["export"]), m
        assert 0.0 <= r["acc_red"] <= 1.0 and r["oracle_fd"] >= 0.0, (m, r)
        with open(os.path.join(tmp_path, m, "summary.json")) as f:
            assert json.load(f)["experiment"] == f"erase_{m}"

"""The erasure methods whose end-to-end tests run in-process (SPM's and RECE's inspect the
training state or take a scorer from the test) and the original, on a simulated 8-device mesh
(smoke settings, the tiny test-bed model of the `tiny_folder` fixture): SPM shards its fixed
prompt batches over the mesh's 8 batch shards, and evaluation generates on the mesh. The other
methods' end-to-end tests run on 8 devices themselves (the `erase_on_8_devices` fixture)."""

import os

import numpy as np
import pytest

from jaxsafe.weights.convert import read_safetensors

PARTS = {
    "unet": os.path.join("unet", "diffusion_pytorch_model.safetensors"),
    "text_encoder": os.path.join("text_encoder", "model.safetensors"),
}


@pytest.mark.slow
@pytest.mark.parametrize(
    "method, edited",
    [("spm", []), ("rece", ["unet"]), ("original", [])],
)
def test_spm_rece_and_the_original_run_on_eight_devices(
    tmp_path, tiny_folder, erase_on_8_devices, method, edited
):
    """The 8-device run edits exactly the network it is meant to (RECE the UNet; nothing for
    SPM, whose adapters ship in their own file, and the original); the fixture checks the
    test-bed metrics."""
    summary = erase_on_8_devices(method)
    assert os.path.isdir(summary["export"])
    changed = []
    for part, rel in PARTS.items():
        a = read_safetensors([os.path.join(tiny_folder, rel)])
        b = read_safetensors([os.path.join(summary["export"], rel)])
        if any(not np.array_equal(np.asarray(a[k]), np.asarray(b[k])) for k in a):
            changed.append(part)
    assert changed == edited

"""One More Step trained through the trainer on the shipped lightness test bed: the frozen text
encoder, the export equal to the trained EMA weights, and the measurement's data reference."""

import importlib

import numpy as np
import pytest
from flax import nnx

from experiments import run_experiment
from jaxsafe import train
from jaxsafe.diffusion import oms, pipeline
from jaxsafe.treepath import named_leaves

# The module fixtures train once: with `--dist loadgroup` (.ci/run) this module's tests share
# one worker.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("oms_run")]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("oms")
    c = importlib.import_module("configs.oms.testbed").get_config("smoke")
    return str(workdir), run_experiment(c, str(workdir))


def test_oms_trains_its_module_only_and_exports_the_ema_weights(run):
    workdir, summary = run
    _, tree = train.load_arrays(f"{workdir}/checkpoints")
    base = pipeline.load(pipeline.LIGHTNESS_TESTBED)
    loaded = oms.load(f"{workdir}/export", latent_channels=12)
    # The text encoder is the base model's, frozen; the module is the run's EMA.
    te = named_leaves(nnx.state(loaded.model.text_encoder, nnx.Param))
    for k, v in named_leaves(nnx.state(base.model.text_encoder, nnx.Param)).items():
        np.testing.assert_array_equal(np.asarray(te[k]), np.asarray(v), k)
    unet = named_leaves(nnx.state(loaded.model.unet, nnx.Param))
    ema = {k.removeprefix("unet/"): v for k, v in named_leaves(tree["extra"]["ema"]).items()}
    assert set(ema) == set(unet) and not set(named_leaves(tree["params"])) - {
        f"unet/{k}" for k in unet
    }
    for k in unet:
        np.testing.assert_array_equal(np.asarray(unet[k]), ema[k], k)
    assert not loaded.model.unet.config.time_conditioning


def test_the_summary_measures_four_samplers_and_the_worlds_brightness(run):
    _, summary = run
    for name in ("base", "oms", "control", "unnamed"):
        for w in ("black", "white"):
            assert 0 <= summary[f"{name}/brightness/{w}"] <= 255
            assert 0 <= summary[f"{name}/shape/{w}"] <= 1
    # The lightness world's real images: 10..40 and 235..255 backgrounds under a shape.
    assert summary["data/brightness/black"] < 60 and summary["data/brightness/white"] > 200
    assert 0 <= summary["data/shape/black"] <= 1 and 0 <= summary["data/colour/white"] <= 1

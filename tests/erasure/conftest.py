"""Shared fixtures: a tiny random-initialised test-bed model exported in the diffusers layout
(the `smoke` architecture of configs/t2i/testbed.py), loaded as an erasure `Pipeline`; and a
method's smoke run on a simulated 8-device mesh."""

import json

import pytest
from subprocs import run_python


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory):
    from configs.t2i import testbed as testbed_config
    from experiments import t2i_testbed as tb
    from jaxsafe.data import shapes
    from jaxsafe.train import split_model

    c = testbed_config.get_config("smoke")
    graphdef, params, frozen = split_model(tb.build_model(c, shapes.tokenizer(c.data.max_length)))
    folder = str(tmp_path_factory.mktemp("tiny_testbed"))
    tb.export(c, graphdef, params, frozen, folder)
    return folder


@pytest.fixture
def tiny_pipe(tiny_folder):
    from jaxsafe.diffusion import pipeline

    return pipeline.load(tiny_folder)


_EIGHT_DEVICES = """
import json, sys
import jax
from experiments import run_experiment
assert jax.device_count() == 8, jax.devices()
method, folder, workdir, overrides = sys.argv[1:]
config = __import__(f"configs.erasure.{method}", fromlist=["get_config"]).get_config("smoke")
config.model.folder = folder
config.eval.update(samples_per_concept=1, fid_samples=8, heldout_examples=8)
config.update_from_flattened_dict(json.loads(overrides))
print("SUMMARY " + json.dumps(run_experiment(config, workdir)))
"""


@pytest.fixture
def erase_on_8_devices(tiny_folder, tmp_path):
    """``run(method, overrides)``: `run_experiment` of the method's smoke config on `tiny_folder`
    in a fresh process with 8 simulated devices (the trained methods shard their fixed prompt
    batches over the mesh's 8 batch shards, a one-row batch is tiled, and evaluation generates
    on the mesh), into ``workdir`` (default `tmp_path`); returns the summary after checking the
    evaluation's metrics.
    ``overrides``: dotted config keys. Each method's end-to-end test runs here, so the suite
    pays for one smoke run per method, not one on one device and another on eight."""

    def run(method: str, overrides: dict | None = None, workdir=None) -> dict:
        overrides = overrides or {}
        p = run_python(
            _EIGHT_DEVICES,
            method,
            tiny_folder,
            workdir or tmp_path,
            json.dumps(overrides),
            n_devices=8,
            timeout=900,
        )
        line = next(x for x in p.stdout.splitlines() if x.startswith("SUMMARY "))
        summary = json.loads(line.removeprefix("SUMMARY "))
        assert summary["experiment"] == f"erase_{method}"
        if overrides.get("eval.enabled", True):
            assert 0.0 <= summary["acc/red"] <= 1.0 and summary["oracle_fd"] >= 0.0, summary
        return summary

    return run

"""The launcher end to end, in subprocesses: kill/resume, pre-emption, config errors, 8 simulated
devices and two `jax.distributed` processes, on the grokking smoke config."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxsafe import train

# Its module fixtures train reference runs once: with `--dist loadgroup` (.ci/run) all of this
# module's tests share one worker, so they are not trained twice.
pytestmark = pytest.mark.xdist_group("launcher_runs")

REPO = Path(__file__).resolve().parents[2]
CONFIG = "--config=configs/grokking/perp_adamw.py:smoke"
LONG = ["--config.train.num_steps=4000", "--config.train.steps_per_call=1",
        "--config.train.checkpoint_every=100", "--config.train.log_every=100",
        "--config.train.eval_every=0", "--config.train.keep_checkpoints=2"]


def env(devices=1):
    e = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    e["XLA_FLAGS"] = e.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={devices}"
    return e


def launch(workdir, *flags, devices=1):
    return subprocess.Popen([sys.executable, "-m", "launch.train", CONFIG, f"--workdir={workdir}", *flags],
                            cwd=REPO, env=env(devices), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def run(workdir, *flags, devices=1, timeout=300):
    p = launch(workdir, *flags, devices=devices)
    out, _ = p.communicate(timeout=timeout)
    assert p.returncode == 0, out[-4000:]
    return out


def final_params(workdir):
    step, tree = train.load_arrays(str(Path(workdir) / "checkpoints"))
    return step, tree["params"]


def leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def wait_for_checkpoint(workdir, proc, min_step, timeout=120):
    ckpt = Path(workdir) / "checkpoints"
    t0 = time.time()
    while time.time() - t0 < timeout:
        steps = [int(d.name) for d in ckpt.iterdir() if d.name.isdigit()] if ckpt.exists() else []
        if steps and max(steps) >= min_step:
            return
        assert proc.poll() is None, "run ended before it could be interrupted"
        time.sleep(0.02)
    raise TimeoutError("no checkpoint appeared")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted long run every interrupted one must reproduce."""
    workdir = tmp_path_factory.mktemp("reference")
    run(workdir, *LONG)
    return final_params(workdir)


def test_misspelt_override_fails_clearly(tmp_path):
    p = launch(tmp_path, "--config.optimizer.lrr=0.1")
    out, _ = p.communicate(timeout=120)
    assert p.returncode != 0
    assert 'Did you mean "lr" instead of "lrr"?' in out


def test_unknown_config_argument_fails_clearly(tmp_path):
    p = subprocess.Popen([sys.executable, "-m", "launch.train",
                          "--config=configs/grokking/perp_adamw.py:huge", f"--workdir={tmp_path}"],
                         cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out, _ = p.communicate(timeout=120)
    assert p.returncode != 0
    assert "config argument 'huge'; expected one of ('paper', 'cpu', 'smoke')" in out


@pytest.mark.slow
def test_sigkill_then_rerun_matches_uninterrupted(tmp_path, reference):
    proc = launch(tmp_path, *LONG)
    wait_for_checkpoint(tmp_path, proc, 500)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    killed_at, _ = final_params(tmp_path)
    assert 500 <= killed_at < 4000
    out = run(tmp_path, *LONG)
    assert f"resumed from {tmp_path}/checkpoints at step {killed_at}" in out
    step, params = final_params(tmp_path)
    ref_step, ref_params = reference
    assert step == ref_step == 4000
    for a, b in zip(leaves(params), leaves(ref_params), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_sigterm_saves_then_rerun_matches_uninterrupted(tmp_path, reference):
    proc = launch(tmp_path, *LONG)
    wait_for_checkpoint(tmp_path, proc, 300)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-3000:]
    stopped_at, _ = final_params(tmp_path)
    assert f"pre-empted at step {stopped_at}; checkpoint saved" in out
    assert stopped_at < 4000  # the pre-emption save, usually off the every-100-steps schedule
    run(tmp_path, *LONG)
    step, params = final_params(tmp_path)
    assert step == 4000
    for a, b in zip(leaves(params), leaves(reference[1]), strict=True):
        np.testing.assert_array_equal(a, b)


SHORT = ["--config.train.num_steps=40", "--config.train.fsdp_min_size=1"]


def assert_close_params(a, b):
    for x, y in zip(leaves(a), leaves(b), strict=True):
        np.testing.assert_allclose(x, y, rtol=2e-4, atol=2e-6)


@pytest.fixture(scope="module")
def one_device(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("one_device")
    run(workdir, *SHORT)
    return final_params(workdir)[1]


@pytest.mark.slow
def test_eight_devices_data_and_fsdp_match_one_device(tmp_path, one_device):
    out = run(tmp_path, *SHORT, "--config.mesh.data=4", "--config.mesh.fsdp=2", devices=8)
    assert "params: 3 tensors, 3 sharded over fsdp" in out
    assert "{'data': 4, 'fsdp': 2}" in out
    assert_close_params(final_params(tmp_path)[1], one_device)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path, one_device):
    port = free_port()
    procs = [launch(tmp_path, *SHORT, f"--coordinator_address=127.0.0.1:{port}",
                    "--num_processes=2", f"--process_id={i}", "--config.mesh.fsdp=2", devices=2)
             for i in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-4000:]
    assert "process 0/2, 2 local / 4 global devices" in outs[0]
    assert "process 1/2, 2 local / 4 global devices" in outs[1]
    assert_close_params(final_params(tmp_path)[1], one_device)

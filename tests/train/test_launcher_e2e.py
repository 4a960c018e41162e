"""The launcher end to end, in subprocesses: kill/resume, pre-emption, config errors, 8 simulated
devices and two `jax.distributed` processes, on the grokking smoke config."""

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from subprocs import device_env, free_port

from jaxsafe import train

# Its module fixtures train reference runs once: with `--dist loadgroup` (.ci/run) all of this
# module's tests share one worker, so they are not trained twice.
pytestmark = pytest.mark.xdist_group("launcher_runs")

REPO = Path(__file__).resolve().parents[2]
CONFIG = "--config=configs/grokking/perp_adamw.py:smoke"
LONG = [
    "--config.train.num_steps=4000",
    "--config.train.steps_per_call=1",
    "--config.train.checkpoint_every=100",
    "--config.train.log_every=100",
    "--config.train.eval_every=0",
    "--config.train.keep_checkpoints=2",
]


def env(devices=1):
    return device_env(devices, PYTHONUNBUFFERED="1")


def launch(workdir, *flags, devices=1):
    return subprocess.Popen(
        [sys.executable, "-m", "launch.train", CONFIG, f"--workdir={workdir}", *flags],
        cwd=REPO,
        env=env(devices),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


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
    p = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "launch.train",
            "--config=configs/grokking/perp_adamw.py:huge",
            f"--workdir={tmp_path}",
        ],
        cwd=REPO,
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    out, _ = p.communicate(timeout=120)
    assert p.returncode != 0
    assert "config argument 'huge'; expected one of ('paper', 'cpu', 'smoke')" in out


def latest_step(workdir):
    ckpt = Path(workdir) / "checkpoints"
    return (
        max([int(d.name) for d in ckpt.iterdir() if d.name.isdigit()], default=0)
        if ckpt.exists()
        else 0
    )


def in_flight_saves(workdir):
    ckpt = Path(workdir) / "checkpoints"
    return [d.name for d in ckpt.iterdir() if "tmp" in d.name] if ckpt.exists() else []


def wait_for_save_in_flight(workdir, proc, timeout=120):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if in_flight_saves(workdir):
            return
        assert proc.poll() is None, "run ended before a save could be interrupted"
        time.sleep(0.001)
    raise TimeoutError("no asynchronous save seen")


KILLS = 10


@pytest.mark.slow
def test_ten_sigkills_then_rerun_matches_uninterrupted(tmp_path, reference):
    """The same run SIGKILLed 10 times, then finished: bit-identical to the reference, and no
    kill ever left a checkpoint that fails its checksums. The moments, in turn: a random time
    in start-up or compilation; a random moment 100-500 steps into training; the moment an
    asynchronous save is being written."""
    rng = np.random.default_rng(0)
    mid_save, progressed = 0, 0
    for i in range(KILLS):
        before = latest_step(tmp_path)
        proc = launch(tmp_path, *LONG)
        if i % 3 == 0:
            time.sleep(rng.uniform(0.5, 6.0))
        elif i % 3 == 1:
            wait_for_checkpoint(tmp_path, proc, before + 100 * int(rng.integers(1, 6)))
            time.sleep(rng.uniform(0.0, 0.3))
        else:
            wait_for_save_in_flight(tmp_path, proc)
        mid_save += bool(in_flight_saves(tmp_path))
        assert proc.poll() is None, "the run ended before its kill"
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
        progressed += latest_step(tmp_path) > before
    out = run(tmp_path, *LONG)
    step, params = final_params(tmp_path)
    assert step == reference[0] == 4000
    for a, b in zip(leaves(params), leaves(reference[1]), strict=True):
        np.testing.assert_array_equal(a, b)
    names = sorted(d.name for d in (tmp_path / "checkpoints").iterdir())
    assert not [n for n in names if not n.isdigit()], names  # no .corrupt, no leftover tmp
    assert "damaged" not in out and "corrupt" not in out
    assert mid_save >= 3
    print(
        f"fault injection: {KILLS} SIGKILLs, {mid_save} during an asynchronous save, "
        f"{progressed} after new progress; resumed bit-identical, 0 damaged checkpoints"
    )


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


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path, one_device):
    port = free_port()
    procs = [
        launch(
            tmp_path,
            *SHORT,
            f"--coordinator_address=127.0.0.1:{port}",
            "--num_processes=2",
            f"--process_id={i}",
            "--config.mesh.fsdp=2",
            devices=2,
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-4000:]
    assert "process 0/2, 2 local / 4 global devices" in outs[0]
    assert "process 1/2, 2 local / 4 global devices" in outs[1]
    assert_close_params(final_params(tmp_path)[1], one_device)


@pytest.mark.slow
def test_killed_process_stops_the_survivor_clearly_and_a_restart_resumes(tmp_path):
    """SIGKILL one of two `jax.distributed` processes: the other prints one line naming it and
    exits with status 75 within the watchdog's bound (heartbeat 20 s: 5 s, polled every 1 s),
    instead of waiting in its next collective; restarting both resumes from the checkpoint."""
    args = [
        "--config.train.num_steps=400",
        "--config.train.checkpoint_every=50",
        "--config.train.log_every=50",
        "--config.train.eval_every=0",
        "--config.train.fsdp_min_size=1",
        "--config.mesh.fsdp=2",
        "--heartbeat_timeout=20",
    ]

    def start():
        port = free_port()
        return [
            launch(
                tmp_path,
                *args,
                f"--coordinator_address=127.0.0.1:{port}",
                "--num_processes=2",
                f"--process_id={i}",
                devices=2,
            )
            for i in range(2)
        ]

    procs = start()
    wait_for_checkpoint(tmp_path, procs[0], 100)
    procs[1].send_signal(signal.SIGKILL)
    t0 = time.time()
    out, _ = procs[0].communicate(timeout=120)
    waited = time.time() - t0
    procs[1].communicate(timeout=60)
    assert procs[0].returncode == 75, out[-3000:]
    assert "Traceback" not in out
    errors = [line for line in out.splitlines() if "error:" in line]
    assert len(errors) == 1, errors
    assert re.fullmatch(
        r"train: error: process 1 of 2 sent no heartbeat for \d+ s: it has "
        r"probably died; stopping process 0 too \(rerun all 2 processes to "
        r"resume from the last checkpoint\)",
        errors[0],
    ), errors[0]
    assert waited < 30
    killed_at, _ = final_params(tmp_path)
    procs = start()
    outs = [p.communicate(timeout=300)[0] for p in procs]
    for p, o in zip(procs, outs):
        assert p.returncode == 0, o[-4000:]
    assert f"resumed from {tmp_path}/checkpoints at step {killed_at}" in outs[0]
    assert final_params(tmp_path)[0] == 400
    print(
        f"fault injection: process 1 of 2 SIGKILLed; process 0 stopped {waited:.1f} s later "
        f"(exit 75, one line); the restart of both resumed at step {killed_at} and finished"
    )

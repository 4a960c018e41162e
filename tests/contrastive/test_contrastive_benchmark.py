"""benchmarks/contrastive.py (`common.stacked_batch`) feeds each K as the trainer does: one
batch as it is at K = 1 (the K = 1 run used to keep a leading axis of 1 and fail), K batches
stacked otherwise."""

import os
import subprocess
import sys

import numpy as np
import pytest

from benchmarks.common import stacked_batch
from jaxsafe import parallel

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_batches_are_stacked_only_beyond_one_step():
    data = [{"x": np.full((4, 5, 3), s, np.float32)} for s in range(3)]
    mesh = parallel.make_mesh()
    one = stacked_batch(data, 1, mesh)
    assert one["x"].shape == (4, 5, 3)
    three = stacked_batch(data, 3, mesh)
    assert three["x"].shape == (3, 4, 5, 3)
    np.testing.assert_array_equal(np.asarray(three["x"])[:, 0, 0, 0], [0.0, 1.0, 2.0])


@pytest.mark.slow
def test_the_benchmark_runs_at_one_step_per_call():
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.contrastive",
            "--k=1",
            # The smoke network: the K = 1 batch path is the test, not the ResNet's compile time
            # (the default har.py:cpu network took 44 s of which 34 s compiling).
            "--config=configs/dbpm/har.py:smoke",
            "--data=synthetic:64,32,3,2",
            "--batch_size=16",
            "--rounds=1",
            "--calls=1",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [line for line in r.stdout.splitlines() if " K=1 " in line]
    assert [line.split()[0] for line in rows] == ["simclr", "simclr+dbpm"]
    assert "DBPM overhead at K=1:" in r.stdout

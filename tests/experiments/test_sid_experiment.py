"""SiD / SFD distillation of a smoke digits teacher through the trainer: the three networks'
roles, the evaluator's per-label accuracies, and exact resume of the three-network state."""

import importlib

import chex
import jax
import numpy as np
import pytest

from experiments import run_experiment
from jaxsafe import train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("sid_teacher")
    c = importlib.import_module("configs.pfgmpp.cifar10_cond_edm").get_config("smoke")
    c.train.update(num_steps=8, eval_every=0, checkpoint_every=8)
    c.eval.num_samples = 0
    # launch.train writes config.json; the distillation reads the teacher's from it.
    (workdir / "config.json").write_text(c.to_json_best_effort(indent=2, sort_keys=True))
    run_experiment(c, str(workdir))
    return str(workdir)


def sfd_config(teacher, steps):
    c = importlib.import_module("configs.sid.sfd_cifar10").get_config("smoke")
    c.teacher.workdir = teacher
    c.train.num_steps = steps
    return c


def test_sfd_trains_g_and_psi_keeps_the_teacher_and_reports_per_label(teacher, tmp_path):
    summary = run_experiment(sfd_config(teacher, 4), str(tmp_path))
    assert {f"acc/{k}" for k in range(10)} <= set(summary) and "fd" in summary
    assert "teacher_fd" in summary
    _, tree = train.load_arrays(str(tmp_path / "checkpoints"))
    _, t_tree = train.load_arrays(f"{teacher}/checkpoints")
    # The frozen teacher is the teacher run's EMA; G and ψ started there and moved apart.
    chex.assert_trees_all_equal(tree["frozen"]["teacher"], t_tree["extra"]["ema"])
    g, psi = (jax.tree.leaves(tree["params"][k]) for k in ("G", "psi"))
    t = jax.tree.leaves(t_tree["extra"]["ema"])
    assert any(not np.array_equal(a, b) for a, b in zip(g, t))
    assert any(not np.array_equal(a, b) for a, b in zip(psi, t))
    assert any(not np.array_equal(a, b) for a, b in zip(g, psi))


def test_resume_after_a_stop_is_bit_identical_for_the_three_networks(teacher, tmp_path):
    run_experiment(sfd_config(teacher, 4), str(tmp_path / "straight"))
    for steps in (2, 4):  # stopped at the step-2 checkpoint, then rerun in the same workdir
        run_experiment(sfd_config(teacher, steps), str(tmp_path / "resumed"))
    _, a = train.load_arrays(str(tmp_path / "straight" / "checkpoints"))
    _, b = train.load_arrays(str(tmp_path / "resumed" / "checkpoints"))
    for part in ("params", "opt_state", "extra", "frozen"):
        chex.assert_trees_all_equal(a[part], b[part])


def test_teacher_workdir_is_required(tmp_path):
    c = importlib.import_module("configs.sid.cifar10_cond").get_config("smoke")
    with pytest.raises(ValueError, match="config.teacher.workdir: the launch.train run directory"):
        run_experiment(c, str(tmp_path))
    c = importlib.import_module("configs.sid.sfd_cifar10").get_config("smoke")
    c.teacher.workdir, c.sfd.override = "x", (1, 2)
    from experiments import sid

    with pytest.raises(ValueError, match=r"sfd.forget \(0,\) and sfd.override \(1, 2\) must pair"):
        sid.forget_map(c)

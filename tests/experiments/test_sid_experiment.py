"""SiD / SFD distillation of a smoke digits teacher through the trainer: the three networks'
roles, the evaluator's per-label accuracies, and exact resume of the three-network state."""

import importlib

import chex
import jax
import numpy as np
import pytest

from experiments import run_experiment
from jaxsafe import train
from jaxsafe.treepath import named_leaves

# The module fixtures train once: with `--dist loadgroup` (.ci/run) this module's tests share
# one worker.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("sid_teacher")]


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


@pytest.fixture(scope="module")
def sfd_run(teacher, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("sfd_run")
    return str(workdir), run_experiment(sfd_config(teacher, 4), str(workdir))


def test_sfd_trains_g_and_psi_keeps_the_teacher_and_reports_per_label(teacher, sfd_run):
    workdir, summary = sfd_run
    assert {f"acc/{k}" for k in range(10)} <= set(summary) and "fd" in summary
    assert "teacher_fd" in summary and set(summary) >= {"override/0"}
    _, tree = train.load_arrays(f"{workdir}/checkpoints")
    _, t_tree = train.load_arrays(f"{teacher}/checkpoints")
    # The frozen teacher is the teacher run's EMA; G and ψ started there and moved apart.
    chex.assert_trees_all_equal(tree["frozen"]["teacher"], t_tree["extra"]["ema"])
    g, psi = (jax.tree.leaves(tree["params"][k]) for k in ("G", "psi"))
    t = jax.tree.leaves(t_tree["extra"]["ema"])
    assert any(not np.array_equal(a, b) for a, b in zip(g, t))
    assert any(not np.array_equal(a, b) for a, b in zip(psi, t))
    assert any(not np.array_equal(a, b) for a, b in zip(g, psi))


def test_two_stage_starts_g_from_the_runs_ema_and_psi_from_its_fake_score(teacher, sfd_run):
    from experiments import sid

    c = sfd_config(teacher, 4)
    _, _, params, _ = sid.teacher(c)
    c.init.workdir = sfd_run[0]
    G, psi = sid.stage_one(c, params)
    _, tree = train.load_arrays(f"{sfd_run[0]}/checkpoints")
    for got, want in ((G, tree["extra"]["ema"]), (psi, tree["params"]["psi"])):
        got, want = named_leaves(got), named_leaves(want)
        assert set(got) == set(want)
        for name in want:
            np.testing.assert_array_equal(np.asarray(got[name]), np.asarray(want[name]), name)
    c.init.workdir = teacher  # a pfgmpp run has an EMA but no fake score
    with pytest.raises(ValueError, match="not a run of experiments/sid.py"):
        sid.stage_one(c, params)


def test_resume_after_a_stop_is_bit_identical_for_the_three_networks(teacher, sfd_run, tmp_path):
    straight, _ = sfd_run  # 4 steps without a stop
    for steps in (2, 4):  # stopped at the step-2 checkpoint, then rerun in the same workdir
        run_experiment(sfd_config(teacher, steps), str(tmp_path / "resumed"))
    _, a = train.load_arrays(f"{straight}/checkpoints")
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

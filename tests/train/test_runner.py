"""The one runner, ``experiments.run_experiment``, with an experiment that ``build``s a task for
the trainer and one that ``edit``s: what it writes, in which order, and what it hands on."""

import json
import os
import types

import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

import experiments
from jaxsafe import train


def _config(name):
    return ml_collections.ConfigDict(
        dict(
            experiment=name,
            variant="test",
            mesh=dict(data=-1, fsdp=1),
            train=dict(
                num_steps=6,
                steps_per_call=1,
                log_every=2,
                eval_every=0,
                checkpoint_every=3,
                keep_checkpoints=2,
                seed=0,
                async_checkpointing=False,
                fsdp_min_size=1,
            ),
        )
    )


@pytest.fixture
def fake(monkeypatch):
    """Registers modules under fake experiment names."""
    modules = {}
    monkeypatch.setattr(experiments, "get", lambda name: modules[name])
    return modules


def test_an_edit_experiment(fake, tmp_path):
    seen = {}

    def edit(config, workdir):
        # config.json is written before anything runs.
        with open(os.path.join(workdir, "config.json")) as f:
            seen["config"] = json.load(f)
        return {"erase_seconds": 0.5, "value": np.float32(2.5)}

    fake["editor"] = types.SimpleNamespace(edit=edit)
    summary = experiments.run_experiment(_config("editor"), str(tmp_path))
    assert seen["config"]["experiment"] == "editor"
    assert summary["experiment"] == "editor" and summary["variant"] == "test"
    assert summary["value"] == 2.5 and summary["erase_seconds"] == 0.5
    assert summary["run_seconds"] >= 0
    with open(tmp_path / "summary.json") as f:
        assert json.load(f) == pytest.approx(summary, abs=0)  # exact: the same numbers


def test_a_build_experiment_trains_then_summarizes_with_the_workdir(fake, tmp_path):
    target = jnp.array([1.0, -2.0])

    def build(config, mesh):
        assert mesh.shape["data"] >= 1
        loss = lambda p, f, e, b, r: (jnp.sum((p["w"] - target) ** 2), ({}, e))
        return train.Task(
            graphdef=None,
            params={"w": jnp.zeros(2)},
            frozen={},
            optimizer=optax.sgd(0.25),
            loss_fn=loss,
            train_data={"x": np.zeros((1, 1), np.float32)},
        )

    calls = []

    def summarize(config, state, task, workdir):
        calls.append(workdir)
        # Six steps of gradient descent at lr 0.25 on ‖w − a‖²: w = a (1 − 0.5⁶).
        np.testing.assert_allclose(state.params["w"], target * (1 - 0.5**6), atol=1e-6)
        return {"step": int(state.step)}

    fake["trainer"] = types.SimpleNamespace(build=build, summarize=summarize)
    summary = experiments.run_experiment(_config("trainer"), str(tmp_path))
    assert calls == [str(tmp_path)] and summary["step"] == 6
    assert os.path.isdir(tmp_path / "checkpoints")
    # A rerun resumes from the final checkpoint and trains no further.
    assert experiments.run_experiment(_config("trainer"), str(tmp_path))["step"] == 6


def test_a_preempted_run_writes_no_summary_and_a_rerun_finishes(fake, tmp_path, monkeypatch):
    import signal

    import jax

    def sigterm_at_step_2(step):
        if int(step) == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    def build(config, mesh):
        def loss(p, f, e, b, r):
            return jnp.sum((p["w"] - 1.0) ** 2), ({}, e)

        def after(st):  # SIGTERM during step 2: the trainer saves there and stops
            jax.debug.callback(sigterm_at_step_2, st.step)
            return st.extra

        return train.Task(
            graphdef=None,
            params={"w": jnp.zeros(2)},
            frozen={},
            optimizer=optax.sgd(0.25),
            loss_fn=loss,
            train_data={"x": np.zeros((1, 1), np.float32)},
            after_update=after,
        )

    fake["trainer"] = types.SimpleNamespace(build=build, summarize=lambda *a: {"done": True})
    out = experiments.run_experiment(_config("trainer"), str(tmp_path))
    assert out == {"experiment": "trainer", "preempted_at": 2}
    assert not (tmp_path / "summary.json").exists()
    # The rerun resumes at step 2 (no SIGTERM after it) and finishes with a summary.
    assert experiments.run_experiment(_config("trainer"), str(tmp_path))["done"] is True
    assert (tmp_path / "summary.json").exists()


def test_an_experiment_with_neither_is_refused(fake, tmp_path):
    fake["empty"] = types.SimpleNamespace()
    with pytest.raises(ValueError, match="experiment 'empty' defines neither build nor edit"):
        experiments.run_experiment(_config("empty"), str(tmp_path))


def test_every_experiment_module_is_one_kind_and_imports_no_other():
    import ast

    root = os.path.dirname(experiments.__file__)
    for name in experiments.available():
        tree = ast.parse(open(os.path.join(root, f"{name}.py"), encoding="utf-8").read())
        defs = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
        assert ("build" in defs) != ("edit" in defs), name
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                assert not node.module.startswith("experiments"), (name, node.module)
                if node.module == "experiments":
                    raise AssertionError(name)
            if isinstance(node, ast.Import):
                assert not any(a.name.startswith("experiments") for a in node.names), name

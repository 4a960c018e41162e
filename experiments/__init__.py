"""Experiments: each module assembles a method's pieces from its config for the one runner.

An experiment module ``experiments/<name>.py`` defines either

* ``build(config, mesh) -> Task``: the generic trainer (``jaxsafe.train.run``) trains the task,
  then the optional ``summarize(config, state, task, workdir) -> dict`` reports on it; or
* ``edit(config, workdir) -> dict``: experiments that do not train (closed-form editors,
  training-free methods, evaluations of a fixed model) do their work and report;

and optionally ``resolve(config) -> config``: a pure function returning a copy of the config with
its derived values filled in (DBPM's epoch-based step counts), called before ``config.json`` is
written, so that file is the config the run used. Nothing else writes into a config.

``config.experiment = '<name>'`` selects it; :func:`run_experiment` runs either kind. Nothing in
``jaxsafe/`` imports from here, and no experiment imports another.
"""

import dataclasses
import importlib
import json
import os
import pkgutil
import time

from jaxsafe import parallel, train


def available() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))


def get(name: str):
    if name not in available():
        raise ValueError(f"unknown experiment {name!r}; known: {', '.join(available())}")
    return importlib.import_module(f"experiments.{name}")


def _write_atomic(path: str, text: str) -> None:
    """Temporary file + rename: a killed run never leaves a half-written file."""
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def _plain(x):
    """JSON form of numpy / jax values in a summary."""
    return x.tolist() if hasattr(x, "tolist") else str(x)


def run_experiment(config, workdir: str) -> dict:
    """Runs the experiment ``config.experiment`` in ``workdir``: resolves the config (the
    module's optional ``resolve``; ``config`` itself is never changed) and writes it to
    ``config.json`` before anything runs, then ``edit``s, or ``build``s, trains (resuming from
    the workdir's latest checkpoint; ``config.sharding_rules`` go before the task's own rules, so
    they win) and ``summarize``s; writes the summary, with the wall-clock time of ``edit``
    (whatever it does, evaluation included; an edit reports its own ``erase_seconds``) or of
    build + training (``summarize`` excluded) as ``run_seconds``, to ``summary.json`` and returns
    it. A pre-empted run (SIGTERM: the trainer saved a checkpoint and stopped early) writes no
    summary, which would pass for the finished run's, and returns
    ``{"experiment", "preempted_at": step}``; a rerun resumes."""
    module = get(config.experiment)
    if not hasattr(module, "edit") and not hasattr(module, "build"):
        raise ValueError(f"experiment {config.experiment!r} defines neither build nor edit")
    if hasattr(module, "resolve"):
        config = module.resolve(config)
    rules = config.get("sharding_rules", ())
    if hasattr(module, "edit"):
        if rules:
            raise ValueError(
                f"config.sharding_rules: experiment {config.experiment!r} edits and trains "
                "nothing, so it has no train state to shard; leave them empty"
            )
    else:
        mesh = parallel.make_mesh(config.mesh.data, config.mesh.fsdp)
        rules = parallel.rules_from_config(rules, mesh.axis_names)
    os.makedirs(workdir, exist_ok=True)
    written = config.to_json_best_effort(indent=2, sort_keys=True)
    if parallel.is_primary():
        _write_atomic(os.path.join(workdir, "config.json"), written)
    t0 = time.perf_counter()
    if hasattr(module, "edit"):
        summary = dict(module.edit(config, workdir))
        seconds = time.perf_counter() - t0
    else:
        task = module.build(config, mesh)
        if config.to_json_best_effort(indent=2, sort_keys=True) != written:
            raise RuntimeError(
                f"experiment {config.experiment!r}: build wrote into its config, so config.json "
                "is not the config the run uses; derive values in a `resolve(config)` hook"
            )
        if rules:
            task = dataclasses.replace(task, sharding_rules=[*rules, *task.sharding_rules])
        state = train.run(task, config.train, workdir, mesh)
        seconds = time.perf_counter() - t0
        step = int(parallel.fetch(state.step))
        if step < config.train.num_steps:
            # Pre-empted (SIGTERM): the checkpoint is saved; a summary of the unfinished model
            # would pass for the finished run's, so none is written. A rerun resumes.
            return {"experiment": config.experiment, "preempted_at": step}
        summary = (
            dict(module.summarize(config, state, task, workdir))
            if hasattr(module, "summarize")
            else {}
        )
    summary = {
        "experiment": config.experiment,
        "variant": config.get("variant", ""),
        "run_seconds": seconds,
        **summary,
    }
    if parallel.is_primary():
        _write_atomic(
            os.path.join(workdir, "summary.json"),
            json.dumps(summary, indent=1, sort_keys=True, default=_plain),
        )
    return summary

"""Experiments: each module builds a `jaxsafe.train.Task` from a config.

An experiment module defines `build(config, mesh) -> Task` and may define
`summarize(config, state, task) -> dict` for the final report. `config.experiment` names it.
"""

import importlib

from jaxsafe import parallel, train

EXPERIMENTS = ("grokking",)


def get(name: str):
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; known: {', '.join(EXPERIMENTS)}")
    return importlib.import_module(f"experiments.{name}")


def run_experiment(config, workdir: str) -> dict:
    """Builds the mesh and the task named by `config.experiment`, trains, summarises."""
    module = get(config.experiment)
    mesh = parallel.make_mesh(config.mesh.data, config.mesh.fsdp)
    task = module.build(config, mesh)
    state = train.run(task, config.train, workdir, mesh)
    return module.summarize(config, state, task) if hasattr(module, "summarize") else {}

"""Experiments: each module builds a `jaxsafe.train.Task` from a config.

An experiment module `experiments/<name>.py` defines `build(config, mesh) -> Task` and may define
`summarize(config, state, task) -> dict` for the final report. `config.experiment = '<name>'`
selects it; nothing in `jaxsafe/` imports from here.
"""

import importlib
import pkgutil

from jaxsafe import parallel, train


def available() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))


def get(name: str):
    if name not in available():
        raise ValueError(f"unknown experiment {name!r}; known: {', '.join(available())}")
    return importlib.import_module(f"experiments.{name}")


def run_experiment(config, workdir: str) -> dict:
    """Builds the mesh and the task named by `config.experiment`, trains, summarises."""
    module = get(config.experiment)
    mesh = parallel.make_mesh(config.mesh.data, config.mesh.fsdp)
    task = module.build(config, mesh)
    state = train.run(task, config.train, workdir, mesh)
    return module.summarize(config, state, task) if hasattr(module, "summarize") else {}

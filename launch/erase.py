r"""Erases concepts from a text-to-image model: any method of ``configs/erasure/``.

    python -m launch.erase --config=configs/erasure/uce.py:cpu --workdir=/tmp/uce_square
    python -m launch.erase --config=configs/erasure/esd.py --workdir=/tmp/esd_nudity \
        --config.model.folder=/path/to/stable-diffusion-v1-4

The model is a diffusers-layout folder (``--config.model.folder``; the ``cpu``/``smoke``
variants default to the shipped test-bed model). The edited model is written to
``<workdir>/export`` in the same layout (or the method's adapter file next to a copy of the
original), with ``<workdir>/erasure.json``: the method, the wall-clock time of the erasure and,
on the test bed, the erasure metrics (docs/erasure.md).

Trained methods (ESD, SPM, AdvUnlearn, SafeGen, TRCE's second stage) go through the generic
trainer: a rerun in the same workdir resumes from the latest checkpoint. Closed-form and
training-free methods (UCE, RECE, SAFREE) define ``edit(config, workdir)``.
"""

import json
import os
import time

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Erasure config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, the edited model "
                               "and metrics.")
flags.mark_flags_as_required(["config", "workdir"])


def erase(config, workdir: str) -> dict:
    """Runs the method of ``config`` (module docstring); returns and writes its summary."""
    from experiments import get
    from jaxsafe import parallel, train

    module = get(config.experiment)
    os.makedirs(workdir, exist_ok=True)
    t0 = time.perf_counter()
    if hasattr(module, "edit"):
        summary = dict(module.edit(config, workdir))
        seconds = summary.pop("erase_seconds", time.perf_counter() - t0)
    else:
        mesh = parallel.make_mesh(config.mesh.data, config.mesh.fsdp)
        task = module.build(config, mesh)
        state = train.run(task, config.train, workdir, mesh)
        seconds = time.perf_counter() - t0
        summary = dict(module.summarize(config, state, task, workdir))
    summary = {"experiment": config.experiment, "variant": config.variant,
               "erase": list(config.concepts.erase), "erase_seconds": seconds, **summary}
    if parallel.is_primary():
        with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
            f.write(config.to_json_best_effort(indent=2, sort_keys=True))
        with open(os.path.join(workdir, "erasure.json"), "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=1, sort_keys=True, default=float)
    return summary


def main(argv):
    from jaxsafe.train.metrics import quiet_orbax

    quiet_orbax()
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    summary = erase(_CONFIG.value, _WORKDIR.value)
    logging.info("erasure: %s", json.dumps(summary, sort_keys=True, default=float))
    print(json.dumps(summary, indent=1, sort_keys=True, default=float))


if __name__ == "__main__":
    app.run(main)

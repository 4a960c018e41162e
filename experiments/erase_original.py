"""No erasure: evaluates (and re-exports) the loaded model, for the reference row of the tables.
Config: ``configs/erasure/original.py``."""

import os

from flax import nnx

from experiments import _erasure


def edit(config, workdir: str) -> dict:
    pipe = _erasure.load(config.model.folder or None)
    out = {"erase_seconds": 0.0, "export": _erasure.save(pipe, os.path.join(workdir, "export"))}
    if config.eval.enabled and pipe.testbed:
        graphdef, state = nnx.split(pipe.model)
        out.update(_erasure.evaluate_model(config, pipe, graphdef, (state,)))
    return out

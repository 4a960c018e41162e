"""No erasure: evaluates (and re-exports) the loaded model, for the reference row of the tables.
Config: ``configs/erasure/original.py``."""

import os

from flax import nnx

from jaxsafe.diffusion import pipeline
from jaxsafe.erasure import evaluation


def edit(config, workdir: str) -> dict:
    pipe = pipeline.from_config(config.model)
    out = {"erase_seconds": 0.0, "export": pipeline.save(pipe, os.path.join(workdir, "export"))}
    if config.eval.enabled and pipe.testbed:
        graphdef, state = nnx.split(pipe.model)
        out.update(evaluation.evaluate_model(config, pipe, graphdef, (state,)))
    return out

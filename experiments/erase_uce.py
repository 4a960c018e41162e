r"""UCE (Gandikota et al., WACV 2024): closed-form edit of every cross-attention key/value
projection (``jaxsafe.erasure.closed_form.uce_edit``), no training. Token rows:
``jaxsafe.erasure.model.erase_rows`` / ``preserve_rows``. Config: ``configs/erasure/uce.py``."""

from __future__ import annotations

import os
import time

from flax import nnx

from jaxsafe.diffusion import pipeline
from jaxsafe.erasure import evaluation
from jaxsafe.erasure import model as em


def edit(config, workdir: str) -> dict:
    pipe = pipeline.from_config(config.model)
    t0 = time.perf_counter()
    new = em.uce_edit(pipe, config.concepts, config.uce)
    seconds = time.perf_counter() - t0
    em.set_kernels(pipe.model, new)
    out = {
        "erase_seconds": seconds,
        "edited_tensors": len(new),
        "export": pipeline.save(pipe, os.path.join(workdir, "export"), unet=pipe.model.unet),
    }
    if config.eval.enabled and pipe.testbed:
        graphdef, state = nnx.split(pipe.model)
        out.update(evaluation.evaluate_model(config, pipe, graphdef, (state,)))
    return out

r"""UCE (Gandikota et al., WACV 2024): closed-form edit of every cross-attention key/value
projection (``jaxsafe.erasure.closed_form.uce_edit``), no training.

Prompts: the concept words put into ``concepts.templates`` (each erased prompt paired with the
same template holding the guide). Token rows: each erased prompt's rows from its last word token to the end, aligned with the
guide prompt's (``aligned_tail``); preserved prompts contribute their own rows from their last
word token, mapped to their current values. Config: ``configs/erasure/uce.py``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence

import jax
import numpy as np

from experiments import _erasure
from jaxsafe.erasure import closed_form


def erase_rows(pipe: _erasure.Pipeline, pairs: Sequence[tuple[str, str]]):
    """(C_e, C_guide): the aligned token rows of every (erased, guide) prompt pair, stacked."""
    prompts = [a for a, _ in pairs] + [b for _, b in pairs]
    emb, lens = np.asarray(pipe.embed(prompts)), pipe.lengths(prompts)
    n = len(pairs)
    rows = [closed_form.aligned_tail(emb[i], lens[i], emb[n + i], lens[n + i]) for i in range(n)]
    return np.concatenate([a for a, _ in rows]), np.concatenate([b for _, b in rows])


def preserve_rows(pipe: _erasure.Pipeline, preserve: Sequence[str]):
    """Token rows of the preserved prompts (None for none)."""
    if not preserve:
        return None
    emb, lens = np.asarray(pipe.embed(list(preserve))), pipe.lengths(list(preserve))
    return np.concatenate([closed_form.aligned_tail(e, n, e, n)[0] for e, n in zip(emb, lens)])


def edit(config, workdir: str) -> dict:
    pipe = _erasure.load(config.model.folder or None)
    u, concepts = config.uce, config.concepts
    t0 = time.perf_counter()
    c_e, c_g = erase_rows(pipe, _erasure.prompt_pairs(concepts))
    c_p = preserve_rows(pipe, _erasure.expand(concepts.templates, _erasure.preserve_words(concepts)))
    ks = _erasure.kernels(pipe.model)
    new = jax.jit(lambda k: closed_form.uce_edit(
        k, c_e, c_g, c_p, erase_scale=u.erase_scale,
        preserve_scale=u.preserve_scale if u.preserve_scale > 0 else None, lam=u.lam))(ks)
    new = jax.block_until_ready(new)
    seconds = time.perf_counter() - t0
    _erasure.set_kernels(pipe.model, new)
    out = {"erase_seconds": seconds, "edited_tensors": len(new),
           "export": _erasure.save(pipe, os.path.join(workdir, "export"), unet=pipe.model.unet)}
    if config.eval.enabled and pipe.testbed:
        from flax import nnx

        graphdef, state = nnx.split(pipe.model)
        out.update(_erasure.evaluate_model(config, pipe, graphdef, (state,)))
    return out

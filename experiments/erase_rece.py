r"""RECE (Gong et al., ECCV 2024): a UCE edit, then rounds of closed-form adversarial embeddings
and UCE edits of every cross-attention key/value projection (``jaxsafe.erasure.rece``), the
round kept chosen by a score of each round's model. No training.

Prompts and token rows are UCE's (``jaxsafe.erasure.prompts.prompt_pairs``,
``jaxsafe.erasure.model.erase_rows`` / ``preserve_rows``): each erased concept and its guide in
every ``concepts.templates`` form (the paper: the words alone), the erased prompt's rows from
its last word token on aligned with the guide's; RECE's retain set is the empty prompt plus the
``concepts.preserve`` prompts (the reference's ``retain_texts``).

Scores (``rece.scorer``): ``""`` on the test bed is the oracle's accuracy of the erased concepts
on prompts and seeds of ``rece.score_seed`` (not the evaluation's ``eval.seed``); with
``rece.other_tolerance > 0`` a round is admissible only if the mean accuracy of every other
test-bed concept (:func:`other_concepts`) stays within that of the starting (UCE) model. A user
scorer is ``"package.module:function"``, called as ``function(config, pipe)`` with ``pipe.model``
holding the round's edit, returning a score (lower is better for ``select = "min"``) or
``(score, admissible)``. With no scorer (a real model and no function given) the last round is
kept. Config: ``configs/erasure/rece.py``.
"""

from __future__ import annotations

import importlib
import os
import time

import jax
import numpy as np
from absl import logging
from flax import nnx

from jaxsafe.diffusion import pipeline
from jaxsafe.erasure import evaluation, prompts, rece
from jaxsafe.erasure import model as em


def other_concepts(erase) -> list[str]:
    """Every test-bed concept word but the erased ones and their synonyms: what a round must not
    damage. The erased attribute's other values alone (the preserve set) missed rounds that drew
    every colour and background wrong while erasing a shape (docs/erasure.md)."""
    from jaxsafe.data import shapes

    gone = {shapes.CONCEPTS[w] for w in erase}
    return [w for w, key in shapes.CONCEPTS.items() if key not in gone]


def _testbed_scorer(config, pipe):
    """Oracle accuracy of the erased concepts (and admissibility by the preserved ones)."""
    from jaxsafe.data import shapes_metrics
    from jaxsafe.nn import oracle as oracle_lib

    r = config.rece
    oracle = oracle_lib.load()
    generate = None
    others = other_concepts(config.concepts.erase) if r.other_tolerance > 0 else []
    first_other = []

    def accuracy(gen, words):
        return float(
            np.mean(
                [
                    shapes_metrics.concept_accuracy(
                        gen, oracle, w, k=r.score_samples, seed=r.score_seed
                    )["accuracy"]
                    for w in words
                ]
            )
        )

    def score(kernels):
        nonlocal generate
        em.set_kernels(pipe.model, kernels)
        graphdef, state = nnx.split(pipe.model)
        if generate is None:
            generate = pipeline.generator(pipe, graphdef, **dict(config.sampling))
        gen = lambda c, s: generate((state,), c, s)
        target = accuracy(gen, config.concepts.erase)
        if not others:
            return target
        other = accuracy(gen, others)
        if not first_other:
            first_other.append(other)
        logging.info("rece: target %.3f other %.3f", target, other)
        return target, other >= first_other[0] - r.other_tolerance

    return score


def _user_scorer(config, pipe):
    module, _, name = config.rece.scorer.partition(":")
    if not name:
        raise ValueError(f"rece.scorer={config.rece.scorer!r}: expected 'package.module:function'")
    fn = getattr(importlib.import_module(module), name)

    def score(kernels):
        em.set_kernels(pipe.model, kernels)
        return fn(config, pipe)

    return score


def scorer(config, pipe):
    """The round score of the config (module docstring), or None."""
    if config.rece.scorer:
        return _user_scorer(config, pipe)
    if pipe.testbed:
        return _testbed_scorer(config, pipe)
    logging.warning(
        "rece: no scorer for a non-test-bed model (set rece.scorer): keeping the last round"
    )
    return None


def edit(config, workdir: str) -> dict:
    pipe = pipeline.from_config(config.model)
    r, concepts = config.rece, config.concepts
    t0 = time.perf_counter()
    c_e, c_g = em.erase_rows(pipe, prompts.prompt_pairs(concepts))
    keep = prompts.expand(concepts.templates, prompts.preserve_words(concepts))
    original = em.kernels(pipe.model)
    start = em.uce_edit(pipe, concepts, config.uce) if r.init_uce else original
    retain = ([""] if r.preserve_empty else []) + keep
    c_p = em.preserve_rows(pipe, retain)
    score = scorer(config, pipe)
    result = rece.iterate(
        start,
        original,
        c_e,
        c_g,
        c_p,
        rounds=r.rounds,
        lam_emb=r.lam_emb,
        lam=r.lam,
        erase_scale=r.erase_scale,
        preserve_scale=r.preserve_scale,
        score=score,
        select=r.select if score is not None else "last",
        stop_at=r.stop_at if r.stop_at >= 0 else None,
    )
    new = jax.block_until_ready(result.kernels)
    seconds = time.perf_counter() - t0
    em.set_kernels(pipe.model, new)
    out = {
        "erase_seconds": seconds,
        "edited_tensors": len(new),
        "best_round": result.best_round,
        "rounds_run": len(result.scores) - 1,
        "round_scores": result.scores,
        "round_admissible": result.admissible,
        "export": pipeline.save(pipe, os.path.join(workdir, "export"), unet=pipe.model.unet),
    }
    if config.eval.enabled and pipe.testbed:
        graphdef, state = nnx.split(pipe.model)
        out.update(evaluation.evaluate_model(config, pipe, graphdef, (state,)))
    return out

"""SAFREE (Yoon et al., ICLR 2025): training-free filtering of the prompt embeddings at sampling
time (``jaxsafe.erasure.safree``). Nothing is trained: ``edit`` writes ``<workdir>/export``, a
copy of the model with ``safree.json`` (the settings and toxic keywords a SAFREE sampler needs),
and on the test bed evaluates generation with SAFREE active. Config: ``configs/erasure/safree.py``.
"""

from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxsafe.diffusion import pipeline, schedulers
from jaxsafe.erasure import evaluation, prompts, safree


def settings(config) -> dict:
    """What ``safree.json`` holds: the keywords of the toxic subspace and the filter's settings."""
    s = config.safree
    return {
        "method": "SAFREE",
        "keywords": keywords(config),
        "negative_prompt": negative_prompt(config),
        "alpha": s.alpha,
        "svf": s.svf,
        "gamma": s.gamma,
        "kappa": s.kappa,
        "tau": s.tau,
        "window": list(s.window),
        "mask_id": s.mask_id,
        "pooling": s.pooling,
        "latent_re_attention": False,
    }


POOLINGS = ("eot", "mean")


def _sentence(out, ids, pooling: str):
    """The prompt embedding: CLIP's pooled EOT state (the paper's) or the mean of the attended
    token states (SOT … EOT)."""
    if pooling == "eot":
        return out["pooler_output"]
    h = out["last_hidden_state"]
    att = (jnp.arange(ids.shape[1])[None] <= jnp.argmax(ids, axis=-1)[:, None]).astype(h.dtype)
    return (h * att[..., None]).sum(1) / att.sum(1, keepdims=True)


def keywords(config) -> list[str]:
    """``safree.keywords``, or by default (test bed) ``prompts.testbed_keywords`` of the erased
    concepts."""
    if config.safree.keywords:
        return list(config.safree.keywords)
    return prompts.testbed_keywords(list(config.concepts.erase))


def negative_prompt(config) -> str:
    """The negative prompt of classifier-free guidance (``safree.negative_prompt``):
    ``"{keywords}"`` = the keywords joined by ", ", as the released ``generate_safree.py`` does;
    ``"{concepts}"`` = the erased concepts and their synonyms joined by spaces (the test bed's
    tokenizer has no comma and 12 positions); any other string as it is ("" = the empty prompt,
    the paper's text)."""
    from jaxsafe.data import shapes

    neg = config.safree.negative_prompt
    if neg == "{keywords}":
        return ", ".join(keywords(config))
    if neg == "{concepts}":
        erase = list(config.concepts.erase)
        return " ".join(erase + [w for w, c in shapes.SYNONYMS.items() if c in erase])
    return neg


def toxic_embeddings(pipe, words, pooling: str = "eot") -> jax.Array:
    """(K, D) prompt embeddings of the toxic keywords (the subspace C)."""
    if not words:
        raise ValueError("safree.keywords: at least one toxic concept keyword is required")
    if pooling not in POOLINGS:
        raise ValueError(f"safree.pooling={pooling!r}; expected one of {POOLINGS}")
    ids = jnp.asarray(pipe.tokenize(list(words)))
    return nnx.jit(lambda te, i: _sentence(te(i), i, pooling))(pipe.model.text_encoder, ids)


def sampling_timesteps(pipe, config) -> jax.Array:
    s = config.sampling
    if s.kind == "euler":
        return schedulers.euler_timesteps(pipe.scheduler, s.num_inference_steps)
    return schedulers.timesteps(pipe.scheduler, s.num_inference_steps)


def _encode_tokens(graphdef, pooling: str = "eot"):
    def encode_tokens(state, ids):
        out = nnx.merge(graphdef, *state).text_encoder(ids)
        return out["last_hidden_state"], _sentence(out, ids, pooling)

    return encode_tokens


def safree_functions(config, pipe, graphdef, C):
    """``(apply, encode, encode_negative)`` of the model ``nnx.merge(graphdef, *state)`` with
    SAFREE active against the toxic subspace of ``C`` (K, D), for ``pipeline.make_generator``:
    prompts are filtered, the negative prompt is not (the reference pipeline)."""
    s = config.safree
    encode = safree.make_safree_encoder(
        _encode_tokens(graphdef, s.pooling),
        C,
        alpha=s.alpha,
        svf=s.svf,
        gamma=s.gamma,
        kappa=s.kappa,
        tau=s.tau,
        window=tuple(s.window),
        mask_id=s.mask_id,
    )
    apply = safree.make_safree_apply(
        lambda st, x, t, e: nnx.merge(graphdef, *st)(x, t, e), sampling_timesteps(pipe, config)
    )
    return apply, encode, safree.make_plain_encoder(_encode_tokens(graphdef, s.pooling))


def _word(pipe, tok: int) -> str:
    t = pipe.tokenizer
    if pipe.testbed:
        return t.decode([t.bos_token_id, tok, t.eos_token_id])
    return t.convert_ids_to_tokens(tok)


def probe(config, pipe, graphdef, state, C, captions) -> dict:
    """Trigger statistics of ``captions``: the fraction with a trigger token, the fraction of
    word tokens flagged, the mean number of filtered steps (with the self-validating filter) and
    the count of each flagged word."""
    s, n = config.safree, config.sampling.num_inference_steps
    ids = np.asarray(pipe.tokenize(captions))
    run = jax.jit(
        lambda st, i: safree.filter_prompts(
            _encode_tokens(graphdef, s.pooling), st, i, C, alpha=s.alpha, mask_id=s.mask_id
        )
    )
    out = run(state, jnp.asarray(ids))
    m, lengths = np.asarray(out["trigger"]), np.asarray(out["lengths"])
    if s.svf:
        steps = (
            np.minimum(np.asarray(safree.svf_steps(out["beta"], s.gamma, s.kappa, s.tau)), n - 1)
            + 1
        )
    else:
        steps = np.full(len(ids), max(0, min(s.window[1], n - 1) - max(s.window[0], 0) + 1))
    words: dict[str, int] = {}
    for row, f in zip(ids, m):
        for tok in row[f]:
            w = _word(pipe, int(tok))
            words[w] = words.get(w, 0) + 1
    return {
        "prompts_with_trigger": float(m.any(-1).mean()),
        "flagged_token_fraction": float(m.sum() / max(int((lengths - 2).sum()), 1)),
        "mean_filtered_steps": float(steps.mean()),
        "flagged_words": dict(sorted(words.items(), key=lambda kv: -kv[1])),
    }


def edit(config, workdir: str) -> dict:
    pipe = pipeline.from_config(config.model)
    t0 = time.perf_counter()
    graphdef, state = nnx.split(pipe.model)
    C = jax.block_until_ready(toxic_embeddings(pipe, keywords(config), config.safree.pooling))
    apply, encode, encode_negative = safree_functions(config, pipe, graphdef, C)
    seconds = time.perf_counter() - t0
    out = {
        "erase_seconds": seconds,
        "export": pipeline.save(
            pipe,
            os.path.join(workdir, "export"),
            extra_files={"safree.json": json.dumps(settings(config), indent=1).encode()},
        ),
    }
    if config.eval.enabled and pipe.testbed:
        from jaxsafe.data import shapes, shapes_metrics

        e = config.eval
        target_prompts = [
            p
            for c in config.concepts.erase
            for p in shapes_metrics.concept_prompts(c, e.samples_per_concept, e.seed)[0]
        ]
        heldout = shapes.ShapesDataset(1).arrays(0, e.fid_samples or 64)["caption"]
        out["triggers_target"] = probe(config, pipe, graphdef, (state,), C, target_prompts)
        out["triggers_heldout"] = probe(config, pipe, graphdef, (state,), C, heldout)
        generate = pipeline.make_generator(
            pipe,
            apply,
            encode,
            encode_negative=encode_negative,
            negative_prompt=negative_prompt(config),
            **dict(config.sampling),
        )
        out.update(
            evaluation.evaluate(
                pipe,
                lambda c, s: generate((state,), c, s),
                list(config.concepts.erase),
                k=e.samples_per_concept,
                seed=e.seed,
                fid_samples=e.fid_samples,
                sampling=dict(config.sampling),
                loss_fn=lambda: evaluation.heldout_loss(
                    pipe,
                    apply,
                    encode,
                    (state,),
                    n=e.heldout_examples,
                    seed=e.seed,
                    exclude=list(config.concepts.erase),
                ),
            )
        )
    return out

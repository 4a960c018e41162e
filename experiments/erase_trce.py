r"""TRCE (Chen et al., 2025) through the generic trainer: ``build`` applies stage 1 (the closed-form
[EoT] mapping of every cross-attention key/value projection) to the loaded model, then splits it
for stage 2 (early-step contrastive fine-tuning of the self-attention layers and the
cross-attention queries, ``jaxsafe.erasure.trce``). Config: ``configs/erasure/trce.py``.

Prompts (``jaxsafe.erasure.prompts.prompt_pairs``): every erased concept (``concepts.erase``) and
its safe counterpart (``concepts.guide``: one for all, or one per concept) in each of
``concepts.templates`` (stage 1) and ``trce.stage2_templates`` (stage 2; empty = the stage-1
templates). Stage 1 maps the rows ``trce.mapping_rows`` picks with ``trce.token_weights``
(the keyword tokens found by :func:`keyword_positions`) and preserves the rows from the last
word token on (``jaxsafe.erasure.model.preserve_rows``) of the prompts of
``trce.preserve_file`` (one per line; COCO captions in the paper) and of the
``concepts.preserve`` words in the templates, each prompt's rows weighted
``trce.stage1_preserve_scale``² / the number of preserved prompts (the reference multiplies
its COCO cache, divided by 3·10⁴, by the scale twice; ``trce.stage1_preserve_squared``).

The frozen state holds the stage-1 model's trained subset (``original``, the regulariser's
target), everything that does not train (``rest``, with the stage-1 keys and values) and the
original keys and values (``kv_original``): ε* is the model with those put back.
"""

from __future__ import annotations

import re
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxsafe.diffusion import pipeline
from jaxsafe.erasure import evaluation, prompts, trce
from jaxsafe.erasure import model as em
from jaxsafe.erasure import params as ep
from jaxsafe.parallel import batch_shards, tile_to_shards
from jaxsafe.train import Task
from jaxsafe.treepath import named_leaves, replace_by_name

_KV = ep.nnx_filter(lambda n: re.search(r"/attn2/to_[kv]/kernel$", n) is not None)


def preserve_prompts(config) -> list[str]:
    """Stage 1's preserved prompts: the lines of ``trce.preserve_file`` and the
    ``concepts.preserve`` words in every template."""
    out = prompts.read_prompt_lines(config.trce.preserve_file) if config.trce.preserve_file else []
    return out + prompts.expand(config.concepts.templates, prompts.preserve_words(config.concepts))


def keyword_positions(pipe, prompts, words) -> np.ndarray:
    """(N, K) token positions of ``words[i]`` in ``prompts[i]`` (its first occurrence; −1 pads;
    K = the longest word's token count): the keyword rows of ``trce.mapping_rows``."""
    ids, lens = pipe.tokenize(prompts), pipe.lengths(prompts)
    wids, wlens = pipe.tokenize(words), pipe.lengths(words)
    spans = []
    for p, n, w, m in zip(ids, lens, wids, wlens, strict=True):
        p, w = list(p[1 : n - 1]), list(w[1 : m - 1])
        start = next((i for i in range(len(p) - len(w) + 1) if p[i : i + len(w)] == w), None)
        spans.append([] if start is None or not w else list(range(start + 1, start + 1 + len(w))))
    k = max((len(x) for x in spans), default=0)
    return np.array([x + [-1] * (k - len(x)) for x in spans], np.int32).reshape(len(spans), k)


def apply_stage1(config, pipe) -> dict:
    """Edits ``pipe.model``'s cross-attention keys and values in place (stage 1); returns the
    edited kernels."""
    pairs = prompts.prompt_pairs(config.concepts)
    mal, safe = [a for a, _ in pairs], [b for _, b in pairs]
    emb = np.asarray(pipe.embed(mal + safe))
    lens = pipe.lengths(mal + safe)
    n = len(mal)
    w = tuple(config.trce.token_weights)
    keyword = None
    if len(w) > 3 and w[3]:
        tpl = config.concepts.templates
        keyword = keyword_positions(
            pipe, mal, [c for c in config.concepts.erase for _ in prompts.expand(tpl, [c])]
        )
    c_m, c_s, s = (
        np.asarray(x) for x in trce.mapping_rows(emb[:n], lens[:n], emb[n:], lens[n:], w, keyword)
    )
    used = s > 0
    c_m, c_s, s = c_m[used], c_s[used], s[used] / n
    keep = preserve_prompts(config)
    c_p = em.preserve_rows(pipe, keep)
    d_in = emb.shape[-1]
    rank = int(np.linalg.matrix_rank(c_m.astype(np.float64)))
    if c_p is None and rank < d_in:
        raise ValueError(
            f"TRCE's stage 1 has λ = 0: {len(c_m)} mapped rows of rank {rank} cannot "
            f"determine a "
            f"{d_in}-wide projection; give prompts to preserve (trce.preserve_file, "
            "COCO captions in the paper, or concepts.preserve)"
        )
    # The reference applies its preserve scale twice (configs/erasure/trce.py).
    ps = config.trce.stage1_preserve_scale
    scale = (ps * ps if config.trce.stage1_preserve_squared else ps) / max(len(keep), 1)
    new = jax.jit(
        lambda k: trce.stage1_edit(
            k, c_m, c_s, c_p, erase_scale=s, preserve_scale=scale, lam=config.trce.stage1_lam
        )
    )(em.kernels(pipe.model))
    em.set_kernels(pipe.model, new)
    return new


def build(config, mesh) -> Task:
    pipe = pipeline.from_config(config.model)
    t = config.trce
    kv_original = jax.tree.map(jnp.copy, nnx.state(pipe.model, _KV))
    apply_stage1(config, pipe)
    sel = ep.nnx_filter(trce.stage2_selection("unet"))
    graphdef, params, frozen = em.split_trainable(pipe.model, sel)
    frozen["kv_original"] = kv_original
    # ε_θ: the trained model; ε_start: the stage-1 model; ε*: the stage-1 model with the
    # original keys and values put back.
    eps_theta, eps_start = em.score_functions(graphdef)

    def eps_star(f, x, t_, emb):
        rest = replace_by_name(f["rest"], named_leaves(f["kv_original"]), what="kv_original")
        return nnx.merge(graphdef, f["original"], rest)(x, t_, emb)

    loss_fn = trce.make_trce_loss(
        eps_theta,
        eps_star,
        eps_start,
        pipe.scheduler,
        latent_shape=pipe.latent_shape,
        guidance=t.guidance,
        margin=t.margin,
        beta=t.beta,
        preserve_scale=t.preserve_scale,
        max_early_step=t.max_early_step,
        num_inference_steps=t.ddim_steps,
        sample_guidance=t.sample_guidance,
        batch_size=config.train.batch_size,
        reg_batch_size=t.reg_batch_size,
        uncond_hinge=t.uncond_hinge,
    )
    concepts = types.SimpleNamespace(
        erase=config.concepts.erase,
        guide=config.concepts.guide,
        templates=t.stage2_templates or config.concepts.templates,
    )
    pairs = prompts.prompt_pairs(concepts)
    mal, safe = [a for a, _ in pairs], [b for _, b in pairs]
    emb = np.asarray(pipe.embed(mal + safe + [""]))
    n = len(mal)
    batch = {
        k: tile_to_shards(v, batch_shards(mesh))
        for k, v in {"c_mal": emb[:n], "c_safe": emb[n : 2 * n], "uncond": emb[2 * n :]}.items()
    }
    o = config.optimizer
    return Task(
        graphdef=graphdef,
        params=params,
        frozen=frozen,
        optimizer=optax.adamw(o.lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=o.weight_decay),
        loss_fn=loss_fn,
        train_data=batch,
    )


def summarize(config, state, task, workdir) -> dict:
    return evaluation.summarize(config, state, task, workdir)

r"""TRCE (Chen et al., 2025) through the generic trainer: ``build`` applies stage 1 (the closed-form
[EoT] mapping of every cross-attention key/value projection, seconds) to the loaded model, then
splits it for stage 2 (early-step contrastive fine-tuning of the self-attention layers and the
cross-attention queries, ``jaxsafe.erasure.trce``). Config: ``configs/erasure/trce.py``.

Prompts (``_erasure.prompt_pairs``): every erased concept (``concepts.erase``) and its safe
counterpart (``concepts.guide``: one for all, or one per concept) in each of
``concepts.templates`` (stage 1) and ``trce.stage2_templates`` (stage 2; empty = the stage-1
templates). Stage 1 maps the rows ``trce.mapping_rows`` picks with ``trce.token_weights``
(the keyword tokens found by :func:`keyword_positions`) and preserves the rows from the last
word token on (``experiments.erase_uce.preserve_rows``) of the prompts of
``trce.preserve_file`` (one per line; COCO captions in the paper) and of the
``concepts.preserve`` words in the templates, each prompt's rows weighted
``trce.stage1_preserve_scale`` / the number of preserved prompts (the reference divides its
COCO cache by 3·10⁴).

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

from experiments import _erasure
from experiments.erase_uce import preserve_rows
from jaxsafe.erasure import params as ep
from jaxsafe.erasure import trce
from jaxsafe.train import Task
from jaxsafe.treepath import named_leaves, path_name

_KV = ep.nnx_filter(lambda n: re.search(r"/attn2/to_[kv]/kernel$", n) is not None)


def preserve_prompts(config) -> list[str]:
    """Stage 1's preserved prompts: the lines of ``trce.preserve_file`` and the
    ``concepts.preserve`` words in every template."""
    out = []
    if config.trce.preserve_file:
        with open(config.trce.preserve_file, encoding="utf-8") as f:
            out += [line.strip() for line in f if line.strip()]
    return out + _erasure.expand(config.concepts.templates,
                                 _erasure.preserve_words(config.concepts))


def keyword_positions(pipe, prompts, words) -> np.ndarray:
    """(N, K) token positions of ``words[i]`` in ``prompts[i]`` (its first occurrence; −1 pads;
    K = the longest word's token count): the keyword rows of ``trce.mapping_rows``."""
    ids, lens = pipe.tokenize(prompts), pipe.lengths(prompts)
    wids, wlens = pipe.tokenize(words), pipe.lengths(words)
    spans = []
    for p, n, w, m in zip(ids, lens, wids, wlens, strict=True):
        p, w = list(p[1:n - 1]), list(w[1:m - 1])
        start = next((i for i in range(len(p) - len(w) + 1) if p[i:i + len(w)] == w), None)
        spans.append([] if start is None or not w else list(range(start + 1, start + 1 + len(w))))
    k = max((len(x) for x in spans), default=0)
    return np.array([x + [-1] * (k - len(x)) for x in spans], np.int32).reshape(len(spans), k)


def apply_stage1(config, pipe) -> dict:
    """Edits ``pipe.model``'s cross-attention keys and values in place (stage 1); returns the
    edited kernels."""
    pairs = _erasure.prompt_pairs(config.concepts)
    mal, safe = [a for a, _ in pairs], [b for _, b in pairs]
    emb = np.asarray(pipe.embed(mal + safe))
    lens = pipe.lengths(mal + safe)
    n = len(mal)
    w = tuple(config.trce.token_weights)
    keyword = None
    if len(w) > 3 and w[3]:
        tpl = config.concepts.templates
        keyword = keyword_positions(pipe, mal, [c for c in config.concepts.erase
                                                for _ in _erasure.expand(tpl, [c])])
    c_m, c_s, s = (np.asarray(x) for x in trce.mapping_rows(emb[:n], lens[:n], emb[n:],
                                                            lens[n:], w, keyword))
    used = s > 0
    c_m, c_s, s = c_m[used], c_s[used], s[used] / n
    keep = preserve_prompts(config)
    c_p = preserve_rows(pipe, keep)
    d_in = emb.shape[-1]
    rank = int(np.linalg.matrix_rank(c_m.astype(np.float64)))
    if c_p is None and rank < d_in:
        raise ValueError(f"TRCE's stage 1 has λ = 0: {len(c_m)} mapped rows of rank {rank} cannot "
                         f"determine a "
                         f"{d_in}-wide projection; give prompts to preserve (trce.preserve_file, "
                         "COCO captions in the paper, or concepts.preserve)")
    scale = config.trce.stage1_preserve_scale / max(len(keep), 1)
    new = jax.jit(lambda k: trce.stage1_edit(k, c_m, c_s, c_p, erase_scale=s,
                                             preserve_scale=scale, lam=config.trce.stage1_lam))(
        _erasure.kernels(pipe.model))
    _erasure.set_kernels(pipe.model, new)
    return new


def _tile(x, shards: int) -> np.ndarray:
    """``x`` repeated whole until its rows divide among the mesh's batch shards (a fixed batch is
    split along axis 0); whole copies keep uniform draws over the rows uniform."""
    reps = shards // np.gcd(x.shape[0], shards)
    return np.concatenate([x] * reps)


def _overlay(tree, sub):
    """``tree`` with the leaves that ``sub`` names replaced by ``sub``'s (pure; the same State
    naming, ``jaxsafe.treepath.path_name``)."""
    new = named_leaves(sub)
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    names = [path_name(p) for p, _ in flat]
    missing = sorted(set(new) - set(names))
    if missing:
        raise KeyError(f"no leaf {missing[:3]} to replace")
    return jax.tree_util.tree_unflatten(treedef, [new.get(n, x) for n, (_, x) in
                                                  zip(names, flat, strict=True)])


def build(config, mesh) -> Task:
    pipe = _erasure.load(config.model.folder or None)
    t = config.trce
    kv_original = jax.tree.map(jnp.copy, nnx.state(pipe.model, _KV))
    apply_stage1(config, pipe)
    sel = ep.nnx_filter(trce.stage2_selection("unet"))
    graphdef, params, frozen = _erasure.split_trainable(pipe, sel)
    frozen["kv_original"] = kv_original

    def eps_theta(p, f, x, t_, emb):
        return _erasure.trained_model(graphdef, p, f)(x, t_, emb)

    def eps_start(f, x, t_, emb):
        return _erasure.original_model(graphdef, f)(x, t_, emb)

    def eps_star(f, x, t_, emb):
        rest = _overlay(f["rest"], f["kv_original"])
        return nnx.merge(graphdef, f["original"], rest)(x, t_, emb)

    loss_fn = trce.make_trce_loss(
        eps_theta, eps_star, eps_start, pipe.scheduler, latent_shape=pipe.latent_shape,
        guidance=t.guidance, margin=t.margin, beta=t.beta, preserve_scale=t.preserve_scale,
        max_early_step=t.max_early_step, num_inference_steps=t.ddim_steps,
        sample_guidance=t.sample_guidance, batch_size=t.batch_size,
        reg_batch_size=t.reg_batch_size, uncond_hinge=t.uncond_hinge)
    concepts = types.SimpleNamespace(erase=config.concepts.erase, guide=config.concepts.guide,
                                     templates=t.stage2_templates or config.concepts.templates)
    pairs = _erasure.prompt_pairs(concepts)
    mal, safe = [a for a, _ in pairs], [b for _, b in pairs]
    emb = np.asarray(pipe.embed(mal + safe + [""]))
    n = len(mal)
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    batch = {"c_mal": emb[:n], "c_safe": emb[n:2 * n], "uncond": emb[2 * n:]}
    batch = {k: _tile(v, shards) for k, v in batch.items()}
    o = config.optimizer
    return Task(graphdef=graphdef, params=params, frozen=frozen,
                optimizer=optax.adamw(o.lr, b1=0.9, b2=0.999, eps=1e-8,
                                      weight_decay=o.weight_decay),
                loss_fn=loss_fn, train_data=batch)


def summarize(config, state, task, workdir=None) -> dict:
    return _erasure.summarize_trained(config, state, task, workdir)

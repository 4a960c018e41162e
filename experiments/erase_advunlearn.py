"""AdvUnlearn (Zhang et al., NeurIPS 2024) through the generic trainer: the soft-prompt attack and
the text-encoder unlearning step of ``jaxsafe.erasure.advunlearn`` in one custom ``step_fn``; the
text-encoder parameters ``advunlearn.layers``/``component`` select train, everything else (the
UNet, the token and position embeddings) stays frozen and bit-identical. The export holds the
edited text encoder. Config: ``configs/erasure/advunlearn.py``."""

from __future__ import annotations

import jax
import numpy as np
import optax

from experiments import _erasure
from jaxsafe.erasure import advunlearn as au
from jaxsafe.erasure import params as ep
from jaxsafe.train import Task


def _tile(x, shards: int) -> np.ndarray:
    """``x`` repeated whole until its rows divide among the mesh's batch shards (every fixed-batch
    leaf is split along axis 0); whole copies keep uniform draws over the rows uniform."""
    x = np.asarray(x)
    return x if x.shape[0] % shards == 0 else np.concatenate([x] * shards)


def testbed_retain(erase) -> list[str]:
    """The test bed's retain set for targets ``erase``: every short caption "a [colour] <shape>
    [on a <background> background]" (synonyms included) that names no target (nor a synonym of
    one); near concepts (orange after red) stay in, as the retain set is there to keep them."""
    from jaxsafe.data import shapes

    erased = {shapes.CONCEPTS[w] for w in erase if w in shapes.CONCEPTS}
    out = []
    for colour in (None,) + shapes.COLOURS:
        for shape in shapes.SHAPES + tuple(shapes.SYNONYMS):
            for bg in (None,) + shapes.BACKGROUNDS:
                words = [w for w in (colour, shape) if w]
                if any(shapes.CONCEPTS[w] in erased for w in words + [bg] if w):
                    continue
                text = ("an " if words[0][0] in "aeiou" else "a ") + " ".join(words)
                out.append(text + (f" on a {bg} background" if bg else ""))
    return out


def read_retain_csv(path: str) -> list[str]:
    """The ``prompt`` column of a retain-set CSV (the authors' ``data/prompts/train/*.csv``)."""
    import csv

    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if not rows or "prompt" not in rows[0]:
        raise ValueError(f"advunlearn.retain_csv={path!r}: expected a CSV with a 'prompt' column")
    return [r["prompt"] for r in rows]


def build(config, mesh) -> Task:
    pipe = _erasure.load(config.model.folder or None)
    a = config.advunlearn
    sel = au.text_encoder_selection(tuple(a.layers) or None, a.component,
                                    a.final_layer_norm)
    graphdef, params, frozen = _erasure.split_trainable(pipe, ep.nnx_filter(sel))

    def model(p, f):
        return _erasure.trained_model(graphdef, p, f)

    def eps_theta(p, f, x, t, emb):
        return model(p, f)(x, t, emb)

    def eps_star(f, x, t, emb):
        return _erasure.original_model(graphdef, f)(x, t, emb)

    def encode(p, f, inputs_embeds):
        return au.encode_embeddings(model(p, f).text_encoder, inputs_embeds)

    def words(p, f, ids):
        return au.token_embeddings(model(p, f).text_encoder, ids)

    erase = list(config.concepts.erase)
    retain = read_retain_csv(a.retain_csv) if a.retain_csv else list(config.concepts.preserve)
    if not retain and pipe.testbed:
        retain = testbed_retain(erase)
    if a.retain_weight and a.retain_batch and not retain:
        raise ValueError("config.concepts.preserve: AdvUnlearn's retain term (retain_weight > 0, "
                         "retain_batch > 0) needs retain prompts")
    te_cfg = pipe.model.text_encoder.config
    au.check_prefix_fits(pipe.lengths(erase), a.k, te_cfg.max_position_embeddings, erase)
    optimizer = optax.adam(config.optimizer.lr)
    method = au.make_advunlearn(
        eps_theta, eps_star, encode, words, pipe.scheduler, optimizer,
        latent_shape=pipe.latent_shape, vocab_size=te_cfg.vocab_size, k=a.k,
        attack_steps=a.attack_steps, attack_lr=a.attack_lr, attack_method=a.attack_method,
        attack_init=a.attack_init, warmup=a.warmup, retain_weight=a.retain_weight,
        retain_batch=a.retain_batch, eta=a.negative_guidance, start_guidance=a.start_guidance,
        num_inference_steps=a.ddim_steps)
    batch = {"ids_e": np.asarray(pipe.tokenize(erase), np.int32),
             "c_e": np.asarray(pipe.embed(erase)), "uncond": np.asarray(pipe.embed([""]))}
    if retain:
        batch.update(ids_r=np.asarray(pipe.tokenize(retain), np.int32),
                     c_r=np.asarray(pipe.embed(retain)))
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    batch = {name: _tile(x, shards) for name, x in batch.items()}
    adv = method.init_adv(params, frozen, jax.random.key(config.train.seed))
    return Task(graphdef=graphdef, params=params, frozen=frozen, optimizer=optimizer,
                train_data=batch, extra={"adv": adv}, step_fn=method.step)


def summarize(config, state, task, workdir=None) -> dict:
    return _erasure.summarize_trained(config, state, task, workdir)

"""AdvUnlearn (Zhang et al., NeurIPS 2024) through the generic trainer: the soft-prompt attack and
the text-encoder unlearning step of ``jaxsafe.erasure.advunlearn`` in one custom ``step_fn``; the
text-encoder parameters ``advunlearn.layers``/``component`` select train, everything else (the
UNet, the token and position embeddings) stays frozen and bit-identical. The export holds the
edited text encoder. Config: ``configs/erasure/advunlearn.py``."""

from __future__ import annotations

import jax
import numpy as np
import optax

from jaxsafe.diffusion import pipeline
from jaxsafe.erasure import advunlearn as au
from jaxsafe.erasure import evaluation, prompts
from jaxsafe.erasure import model as em
from jaxsafe.erasure import params as ep
from jaxsafe.parallel import batch_shards, tile_to_shards
from jaxsafe.train import Task


def build(config, mesh) -> Task:
    pipe = pipeline.from_config(config.model)
    a = config.advunlearn
    sel = au.text_encoder_selection(tuple(a.layers) or None, a.component, a.final_layer_norm)
    graphdef, params, frozen = em.split_trainable(pipe.model, ep.nnx_filter(sel))
    eps_theta, eps_star = em.score_functions(graphdef)

    def model(p, f):
        return em.trained_model(graphdef, p, f)

    def encode(p, f, inputs_embeds):
        return au.encode_embeddings(model(p, f).text_encoder, inputs_embeds)

    def words(p, f, ids):
        return au.token_embeddings(model(p, f).text_encoder, ids)

    # The concept prompts: each erased word in every concepts.templates form (none in the paper
    # setting: the bare word, as the reference; the test bed's caption forms otherwise).
    erase = prompts.expand(config.concepts.templates, list(config.concepts.erase))
    retain = (
        prompts.read_prompt_csv(a.retain_csv) if a.retain_csv else list(config.concepts.preserve)
    )
    if not retain and pipe.testbed:
        retain = prompts.testbed_retain(list(config.concepts.erase))
    if a.retain_weight and a.retain_batch and not retain:
        raise ValueError(
            "config.concepts.preserve: AdvUnlearn's retain term (retain_weight > 0, "
            "retain_batch > 0) needs retain prompts"
        )
    te_cfg = pipe.model.text_encoder.config
    au.check_prefix_fits(pipe.lengths(erase), a.k, te_cfg.max_position_embeddings, erase)
    optimizer = optax.adam(config.optimizer.lr)
    method = au.make_advunlearn(
        eps_theta,
        eps_star,
        encode,
        words,
        pipe.scheduler,
        optimizer,
        latent_shape=pipe.latent_shape,
        vocab_size=te_cfg.vocab_size,
        k=a.k,
        attack_steps=a.attack_steps,
        attack_lr=a.attack_lr,
        attack_method=a.attack_method,
        attack_init=a.attack_init,
        warmup=a.warmup,
        retain_weight=a.retain_weight,
        retain_batch=a.retain_batch,
        eta=a.negative_guidance,
        start_guidance=a.start_guidance,
        num_inference_steps=a.ddim_steps,
    )
    batch = {
        "ids_e": np.asarray(pipe.tokenize(erase), np.int32),
        "c_e": np.asarray(pipe.embed(erase)),
        "uncond": np.asarray(pipe.embed([""])),
    }
    if retain:
        batch.update(
            ids_r=np.asarray(pipe.tokenize(retain), np.int32), c_r=np.asarray(pipe.embed(retain))
        )
    # Erase and retain rows differ in number: each is tiled to the mesh on its own.
    batch = {name: tile_to_shards(x, batch_shards(mesh)) for name, x in batch.items()}
    adv = method.init_adv(params, frozen, jax.random.key(config.train.seed))
    return Task(
        graphdef=graphdef,
        params=params,
        frozen=frozen,
        optimizer=optimizer,
        train_data=batch,
        extra={"adv": adv},
        step_fn=method.step,
    )


def summarize(config, state, task, workdir) -> dict:
    return evaluation.summarize(config, state, task, workdir)

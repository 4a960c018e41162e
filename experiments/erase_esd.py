"""ESD (Gandikota et al., ICCV 2023): ``jaxsafe.erasure.esd``'s loss on the parameters
``esd.train_method`` selects (``jaxsafe.erasure.params``), trained by the generic trainer.
Config: ``configs/erasure/esd.py``."""

from __future__ import annotations

import numpy as np
import optax

from jaxsafe.diffusion import pipeline
from jaxsafe.erasure import esd, evaluation, prompts
from jaxsafe.erasure import model as em
from jaxsafe.erasure import params as ep
from jaxsafe.parallel import batch_shards, tile_to_shards
from jaxsafe.train import Task


def build(config, mesh) -> Task:
    pipe = pipeline.from_config(config.model)
    e = config.esd
    graphdef, params, frozen = em.split_trainable(
        pipe.model, ep.nnx_filter(ep.selection(e.train_method, "unet"))
    )
    eps_theta, eps_star = em.score_functions(graphdef)
    loss_fn = esd.make_esd_loss(
        eps_theta,
        eps_star,
        pipe.scheduler,
        eta=e.negative_guidance,
        source=e.source,
        start_guidance=e.start_guidance,
        num_inference_steps=e.ddim_steps,
        latent_shape=pipe.latent_shape,
    )
    # c_from is the guide prompt: ESD's is the empty prompt (negative guidance towards
    # "nothing"); a guide concept anchors the erased concept onto it instead.
    pairs = prompts.prompt_pairs(config.concepts)
    n = len(pairs)
    emb = np.asarray(pipe.embed([a for a, _ in pairs] + [b for _, b in pairs] + [""]))
    batch = {"c_e": emb[:n], "c_from": emb[n : 2 * n], "uncond": np.repeat(emb[2 * n :], n, 0)}
    if all(b == "" for _, b in pairs):
        del batch["c_from"]  # ESD's own setting: the frozen model runs on two conditions
    return Task(
        graphdef=graphdef,
        params=params,
        frozen=frozen,
        optimizer=optax.adam(config.optimizer.lr),
        loss_fn=em.random_rows(loss_fn, config.train.batch_size),
        train_data=tile_to_shards(batch, batch_shards(mesh)),
    )


def summarize(config, state, task, workdir) -> dict:
    return evaluation.summarize(config, state, task, workdir)

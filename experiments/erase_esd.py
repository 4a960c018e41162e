"""ESD (Gandikota et al., ICCV 2023) through the generic trainer: ``jaxsafe.erasure.esd``'s loss on
the parameters ``esd.train_method`` selects (``jaxsafe.erasure.params``), the frozen original
sharing the untrained ones. Config: ``configs/erasure/esd.py``."""

from __future__ import annotations

import numpy as np
import optax

from experiments import _erasure
from jaxsafe.erasure import esd
from jaxsafe.erasure import params as ep
from jaxsafe.train import Task


def build(config, mesh) -> Task:
    del mesh
    pipe = _erasure.load(config.model.folder or None)
    e = config.esd
    sel = ep.nnx_filter(ep.selection(e.train_method, "unet"))
    graphdef, params, frozen = _erasure.split_trainable(pipe, sel)

    def eps_theta(p, f, x, t, emb):
        return _erasure.trained_model(graphdef, p, f)(x, t, emb)

    def eps_star(f, x, t, emb):
        return _erasure.original_model(graphdef, f)(x, t, emb)

    loss_fn = esd.make_esd_loss(eps_theta, eps_star, pipe.scheduler, eta=e.negative_guidance,
                                source=e.source, start_guidance=e.start_guidance,
                                num_inference_steps=e.ddim_steps, latent_shape=pipe.latent_shape)
    # c_from is the guide prompt: ESD's is the empty prompt (negative guidance towards
    # "nothing"); a guide concept anchors the erased concept onto it instead.
    pairs = _erasure.prompt_pairs(config.concepts)
    n = len(pairs)
    emb = np.asarray(pipe.embed([a for a, _ in pairs] + [b for _, b in pairs] + [""]))
    batch = {"c_e": emb[:n], "c_from": emb[n:2 * n], "uncond": np.repeat(emb[2 * n:], n, 0)}
    loss_fn = _erasure.random_rows(loss_fn, e.batch_size)
    return Task(graphdef=graphdef, params=params, frozen=frozen,
                optimizer=optax.adam(config.optimizer.lr), loss_fn=loss_fn, train_data=batch)


def summarize(config, state, task, workdir=None) -> dict:
    return _erasure.summarize_trained(config, state, task, workdir)

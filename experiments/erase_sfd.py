"""SFD, text version (Chen, Zhang, Zhou, ICLR 2025; ``SD/training/training_loop.py``): a one-step
generator distilled from the text-to-image model (``jaxsafe.diffusion.sid`` with
``sid.vp_kernel``) that forgets the erased concepts. Config: ``configs/erasure/sfd.py``.

Prompts (``jaxsafe.erasure.prompts``): the forgetting prompts are every erased word in every
``concepts.templates`` form, each paired with its **override**, the same prompt with the word
replaced by its guide (``concepts.guide``; ``prompts.prompt_pairs``), as the reference builds
"a middle aged man" from "brad pitt" by replacing the concept; the remaining prompts are the test
bed's retain set (``prompts.testbed_retain``) or ``sfd.retain_prompts``. G and f_ψ see the
forgetting prompt, the teacher f_φ the override. The teacher's and f_ψ's predictions are
classifier-free guided against the empty prompt (``sfd.guidance``, the reference's 4.5); G is
the plain conditional model at t_init. Only the UNet trains (G and f_ψ start from the teacher's
UNet; the text encoder is frozen). G is exported with ``sfd.json`` naming it one-step; on the
test bed the summary is the erasure metrics of one-step generation.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxsafe.diffusion import pipeline, schedulers, sid, t2i
from jaxsafe.diffusion.sid import SiDTerm
from jaxsafe.erasure import evaluation, prompts
from jaxsafe.erasure import model as em
from jaxsafe.parallel import batch_shards, fetch
from jaxsafe.train import Task


def _unet(path, _):
    return path[0] == "unet"


def denoisers(graphdef, rest, abar, uncond, guidance: float):
    """``(plain, guided)``: x₀ predictions ``denoise(unet_params, x_t, t, emb, key)`` of the
    model's ε, unguided (G) and guided against ``uncond`` with scale ``guidance`` (f_φ, f_ψ)."""

    def eps(p, x, t, emb):
        return nnx.merge(graphdef, p, rest)(x, t, emb)

    def x0(x, t, e):
        a = abar[t].reshape((-1,) + (1,) * (x.ndim - 1))
        return (x - jnp.sqrt(1 - a) * e) / jnp.sqrt(a)

    def plain(p, x, t, emb, key):
        return x0(x, t, eps(p, x, t, emb))

    def guided(p, x, t, emb, key):
        u = jnp.broadcast_to(uncond, emb.shape)
        e_u, e_c = jnp.split(
            eps(p, jnp.concatenate([x, x]), jnp.concatenate([t, t]), jnp.concatenate([u, emb])), 2
        )
        return x0(x, t, e_u + guidance * (e_c - e_u))

    return plain, guided


def build(config, mesh) -> Task:
    pipe = pipeline.from_config(config.model)
    s = config.sfd
    retain = list(s.retain_prompts)
    if not retain:
        if not pipe.testbed:
            raise ValueError(
                "sfd.retain_prompts: SFD's remaining term needs prompts to keep "
                "(the test bed derives them; a Stable Diffusion folder does not)"
            )
        retain = prompts.testbed_retain(list(config.concepts.erase))
    graphdef, params, frozen = em.split_trainable(pipe.model, _unet)
    abar = schedulers.alphas_cumprod(pipe.scheduler)
    uncond = jnp.asarray(pipe.embed([""]))
    plain, guided = denoisers(graphdef, frozen["rest"], abar, uncond, s.guidance)
    pairs = prompts.prompt_pairs(config.concepts)
    forget_emb = jnp.asarray(pipe.embed([a for a, _ in pairs]))
    override_emb = jnp.asarray(pipe.embed([b for _, b in pairs]))
    retain_emb = jnp.asarray(pipe.embed(retain))
    b = config.train.batch_size

    def terms(key):
        k_r, k_f = jax.random.split(key)
        r = jax.random.randint(k_r, (b,), 0, len(retain))
        f = jax.random.randint(k_f, (b,), 0, len(pairs))
        return [
            SiDTerm(retain_emb[r], retain_emb[r], s.remain_weight),
            SiDTerm(forget_emb[f], override_emb[f], s.forget_weight),
        ]

    o = config.optimizer
    g_tx = optax.adam(o.lr_g, b1=o.b1, b2=o.b2, eps=o.eps)
    psi_tx = optax.adam(o.lr_psi, b1=o.b1, b2=o.b2, eps=o.eps)
    step = sid.make_sid_step(
        guided,
        terms,
        g_optimizer=g_tx,
        psi_optimizer=psi_tx,
        latent_shape=pipe.latent_shape,
        batch_size=b,
        alpha=s.alpha,
        g_loss_scale=s.g_loss_scale,
        generator_denoise=plain,
        kernel=sid.vp_kernel(abar, t_init=s.t_init, t_min=s.t_min, t_max=s.t_max),
    )

    def copy(t):
        return jax.tree.map(jnp.copy, t)

    return Task(
        graphdef=graphdef,
        params={"G": copy(params), "psi": copy(params)},
        frozen={"teacher": frozen["original"], "rest": frozen["rest"]},
        optimizer=sid.pair_optimizer(g_tx, psi_tx),
        # No data: the trainer's fixed batch is a placeholder, one row per batch shard.
        train_data={"unused": np.zeros((batch_shards(mesh),), np.float32)},
        extra={},
        step_fn=step,
    )


def one_step_generator(pipe, graphdef, rest, t_init: int, batch_size: int = 64):
    """``generate(unet_params, captions, seeds, terms=None) -> images``: G's x₀ at the
    pure-noise latent of step ``t_init``, decoded; image k's noise from ``seeds[k]`` alone.

    ``terms=(texts, weights)`` composes J more prompts at the one step (concept arithmetic,
    Petsiuk & Saenko, ECCV 2024, eq. 2, with G's own unguided s = 1):
    x̂₀ = x₀(p) + Σ_j w_j (x₀(c_j) − x₀(∅)); x₀ is affine in ε at a fixed x_t, so this is
    the composition of the ε predictions."""
    abar = schedulers.alphas_cumprod(pipe.scheduler)
    plain, _ = denoisers(graphdef, rest, abar, None, 1.0)

    @jax.jit
    def run(p, ids, seeds, weights):
        # ids: (1 + J, B, L), the prompts then the terms; weights: (J,), unused when J = 0.
        z = jax.vmap(lambda k: jax.random.normal(jax.random.key(k), pipe.latent_shape))(seeds)
        rows = ids.shape[0] + (ids.shape[0] > 1)  # ∅ joins when terms are composed
        b = ids.shape[1]
        flat = ids.reshape((-1, ids.shape[-1]))
        if rows > ids.shape[0]:
            flat = jnp.concatenate(
                [jnp.broadcast_to(jnp.asarray(pipe.tokenize([""])), (b, ids.shape[-1])), flat]
            )
        emb = nnx.merge(graphdef, p, rest).encode(flat)
        x = jnp.tile(jnp.sqrt(1 - abar[t_init]) * z, (rows, 1, 1, 1))
        x0 = plain(p, x, jnp.full((rows * b,), t_init, jnp.int32), emb, None)
        if rows > 1:
            x0 = x0.reshape((rows, b) + x0.shape[1:])
            w = jnp.broadcast_to(jnp.concatenate([jnp.ones(1), weights]), (b, rows - 1))
            x0 = t2i.composed_guidance(x0[0], x0[1:], w)
        return pipe.decode(x0)

    def generate(p, captions, seeds, terms=None):
        captions, seeds = list(captions), np.asarray(seeds)
        extra, weights = ([], []) if terms is None else t2i.check_terms(terms, len(captions))
        out = []
        for i in range(0, len(captions), batch_size):
            cols = [c[i : i + batch_size] for c in [captions] + extra]
            n = len(cols[0])
            ids = np.stack([pipe.tokenize(c + [""] * (batch_size - n)) for c in cols])
            sd = np.zeros(batch_size, np.int32)  # one compiled shape
            sd[:n] = seeds[i : i + batch_size]
            out.append(
                np.asarray(fetch(run(p, jnp.asarray(ids), sd, jnp.asarray(weights, jnp.float32))))[
                    :n
                ]
            )
        return np.concatenate(out)

    return generate


def summarize(config, state, task, workdir) -> dict:
    pipe = pipeline.from_config(config.model)
    G = fetch(state.params["G"])
    rest = fetch(state.frozen["rest"])
    model = nnx.merge(task.graphdef, G, rest)
    extra = {
        "sfd.json": json.dumps(
            {"method": "SFD", "one_step": True, "t_init": config.sfd.t_init}
        ).encode()
    }
    out = {
        "export": pipeline.save(
            pipe, os.path.join(workdir, "export"), unet=model.unet, extra_files=extra
        )
    }
    if config.eval.enabled and pipe.testbed:
        gen = one_step_generator(
            pipe, task.graphdef, rest, config.sfd.t_init, config.sampling.batch_size
        )
        e = config.eval
        out.update(
            evaluation.evaluate(
                pipe,
                lambda c, sd: gen(G, c, sd),
                list(config.concepts.erase),
                k=e.samples_per_concept,
                seed=e.seed,
                fid_samples=e.fid_samples,
                sampling=dict(config.sampling),
            )
        )
    return out

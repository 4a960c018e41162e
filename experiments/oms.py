r"""One More Step (OMS) trained on a test-bed model's world, and the paper's measurements.

The OMS network ψ (a time-free ``UNet2DConditionModel``, :mod:`jaxsafe.diffusion.oms`) learns
the prediction at the virtual step ᾱ = 0 from (latent, caption) pairs (Hu et al., CVPR 2024; no
training code is released, docs/oms.md):

.. math::

    L = \mathbb{E}_{x_0, c, \epsilon \sim \mathcal{N}(0, I)}\,
        \lVert v_\psi(\epsilon, \tau(\tilde c)) - (-x_0) \rVert^2, \qquad x_0 = E(\text{image}),

c̃ the caption dropped to the empty prompt with probability ``data.caption_dropout`` (for OMS's
own guidance), E the base model's latent map (SD's VAE in the paper) and τ the base folder's
text encoder, frozen; the base UNet is not used. ``summarize`` writes ``<workdir>/export``
(``oms.save``) and measures with the base folder's sampler (``shapes_metrics.lightness_report``):
``base/*`` (brightness and shape/colour accuracy for "on a black/white background" prompts),
``oms/*`` (the same prompts, sampling started from OMS's x_{τ₀}), ``control/*`` (the base prompt
leaves the background out, the OMS prompt names it), ``unnamed/*`` (those base prompts without
OMS) and ``data/*`` (the real images' brightness per lightness word and the oracle's accuracy on
them: the judge's ceiling).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxsafe import parallel
from jaxsafe.data import shapes, shapes_metrics
from jaxsafe.diffusion import oms, pipeline
from jaxsafe.nn import oracle as oracle_lib
from jaxsafe.nn.unet2d_condition import UNet2DConditionConfig, UNet2DConditionModel
from jaxsafe.optim import clipped_adamw
from jaxsafe.train import Task, ema_after_update, split_model


def _base(config) -> pipeline.Pipeline:
    pipe = pipeline.load(config.base.folder or pipeline.LIGHTNESS_TESTBED)
    if pipe.encode_image is None:
        raise ValueError(
            f"base.folder={config.base.folder!r}: its latent map cannot encode "
            "images, and OMS trains on latents"
        )
    return pipe


def build_model(config, pipe: pipeline.Pipeline) -> pipeline.T2I:
    u = {k: tuple(v) if isinstance(v, list | tuple) else v for k, v in config.oms_unet.items()}
    size, _, channels = pipe.latent_shape
    cfg = UNet2DConditionConfig(
        sample_size=size,
        in_channels=channels,
        out_channels=channels,
        cross_attention_dim=pipe.model.text_encoder.config.hidden_size,
        prediction_type="v_prediction",
        time_conditioning=False,
        **u,
    )
    return pipeline.T2I(
        UNet2DConditionModel(cfg, rngs=nnx.Rngs(config.train.seed)), pipe.model.text_encoder
    )


def make_loss_fn(graphdef, encode_image, empty_ids: np.ndarray, caption_dropout: float):
    """The loss of the module docstring, batch = {'image', 'input_ids'}."""

    def loss_fn(params, frozen, extra, batch, rng):
        model = nnx.merge(graphdef, params, frozen)
        x0 = encode_image(batch["image"])
        k_eps, k_drop = jax.random.split(rng)
        drop = jax.random.bernoulli(k_drop, caption_dropout, (x0.shape[0], 1))
        ids = jnp.where(drop, jnp.asarray(empty_ids)[None], batch["input_ids"])
        emb = jax.lax.stop_gradient(model.encode(ids))
        eps = jax.random.normal(k_eps, x0.shape)
        return oms.loss(lambda _, x, e: model.unet(x, None, e), None, x0, emb, eps), ({}, extra)

    return loss_fn


def _dataset(config, seed):
    return shapes.ShapesDataset(seed, world=config.data.world)


def build(config, mesh) -> Task:
    pipe = _base(config)
    model = build_model(config, pipe)
    graphdef, params, frozen = split_model(model, nnx.All(nnx.Param, nnx.PathContains("unet")))
    train = shapes.shapes_batches(
        _dataset(config, config.data.train_seed),
        pipe.tokenize,
        config.train.batch_size,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    loss_fn = make_loss_fn(
        graphdef, pipe.encode_image, pipe.tokenize([""])[0], config.data.caption_dropout
    )
    held = _dataset(config, config.data.heldout_seed).arrays(0, config.eval.heldout_examples)
    held = {
        "image": held["image"].astype(np.float32) / 127.5 - 1.0,
        "input_ids": pipe.tokenize(held["caption"]),
    }
    # No caption dropout on held-out data: the conditional prediction's error.
    held_loss = jax.jit(make_loss_fn(graphdef, pipe.encode_image, pipe.tokenize([""])[0], 0.0))

    def heldout(state):
        loss, _ = held_loss(
            state.extra["ema"], state.frozen, {}, held, jax.random.key(config.eval.seed)
        )
        return {"loss": float(parallel.fetch(loss))}

    return Task(
        graphdef=graphdef,
        params=params,
        frozen=frozen,
        optimizer=clipped_adamw(config.optimizer),
        loss_fn=loss_fn,
        train_data=train,
        extra={"ema": jax.tree.map(jnp.copy, params)},
        after_update=ema_after_update(config.optimizer.ema_decay),
        evaluators={"heldout": heldout},
    )


def _strip_background(caption: str) -> str:
    return caption.split(" on a ")[0]


def measure(config, pipe: pipeline.Pipeline, oms_model: pipeline.T2I) -> dict:
    """The measurements of the module docstring."""
    s, e = config.sampling, config.eval
    graphdef, *state = nnx.split(pipe.model)
    gen = pipeline.generator(
        pipe,
        graphdef,
        num_inference_steps=s.num_inference_steps,
        guidance_scale=s.guidance_scale,
        batch_size=s.batch_size,
    )
    module = oms.OMS(model=oms_model, tokenize=pipe.tokenize)

    def start(captions, seeds):
        return module.latents(
            captions,
            seeds,
            scheduler=pipe.scheduler,
            kind="ddim",
            num_inference_steps=s.num_inference_steps,
            guidance_scale=s.oms_guidance_scale,
            noise=s.oms_noise,
        )

    runs = {
        "base": lambda c, sd: gen(state, c, sd),
        "unnamed": lambda c, sd: gen(state, [_strip_background(x) for x in c], sd),
        "oms": lambda c, sd: gen(state, c, sd, x_T=start(c, sd)),
        "control": lambda c, sd: gen(
            state, [_strip_background(x) for x in c], sd, x_T=start(c, sd)
        ),
    }
    oracle = oracle_lib.load()
    out = {}
    for name, generate in runs.items():
        report = shapes_metrics.lightness_report(generate, oracle, k=e.samples, seed=e.seed)
        out.update({f"{name}/{k}": v for k, v in report.items()})
    real = _dataset(config, config.data.heldout_seed).arrays(0, e.real_images)
    images = real["image"].astype(np.float32) / 127.5 - 1.0
    light = shapes_metrics.brightness(images)
    pred = shapes_metrics.oracle_predict(oracle, images)
    for i, w in enumerate(shapes.LIGHTNESS):
        rows = real["label"][:, 2] == len(shapes.BACKGROUNDS) + i
        out[f"data/brightness/{w}"] = float(light[rows].mean())
        # The judge's own accuracy on real images of the world: the ceiling for generations.
        for a, name in ((0, "shape"), (1, "colour")):
            out[f"data/{name}/{w}"] = float(np.mean(pred[rows, a] == real["label"][rows, a]))
    return out


def summarize(config, state, task, workdir: str) -> dict:
    """Held-out loss, the export and :func:`measure` of the EMA weights."""
    out = dict(task.evaluators["heldout"](state))
    pipe = _base(config)
    model = nnx.merge(
        task.graphdef, parallel.fetch(state.extra["ema"]), parallel.fetch(state.frozen)
    )
    if workdir and parallel.is_primary():
        oms.save(os.path.join(workdir, "export"), model.unet, model.text_encoder, pipe.tokenizer)
    out.update(measure(config, pipe, model))
    return out

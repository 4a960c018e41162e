r"""The miniature text-to-image test bed: a tiny Stable-Diffusion-shaped model of captioned shapes.

A CLIP text transformer τ_θ (``jaxsafe.nn.clip_text``) and a UNet ε_θ
(``jaxsafe.nn.unet2d_condition``) are trained jointly from scratch on ``jaxsafe.data.shapes``
with the ε-prediction DDPM objective (Ho et al., NeurIPS 2020, eq. 14; latent diffusion's form,
Rombach et al., CVPR 2022, eq. 2):

.. math::

    L = \mathbb{E}_{x_0, y, \epsilon, t}\, \bigl\lVert \epsilon - \epsilon_\theta\bigl(
        \sqrt{\bar\alpha_t}\, E(x_0) + \sqrt{1 - \bar\alpha_t}\, \epsilon,\ t,\
        \tau_\theta(\tilde y)\bigr) \bigr\rVert^2,

ỹ the caption replaced by the empty prompt with probability ``data.caption_dropout`` (0.1), for
classifier-free guidance. E is a fixed linear autoencoder, the PCA of 4×4 patches
(:class:`jaxsafe.nn.patch_pca.PatchPCA`, 32×32×3 → 8×8×12, unit-variance z), in place of SD's VAE
(why not pixels, why not the plain unshuffle: docs/testbed.md, "The model"); the linear β
schedule 1e-4..0.02, T = 1000, applies to z. The text transformer is CLIP's architecture over the
word tokenizer's ids (EOT the largest id). EMA of all trained parameters with diffusers' warm-up
min(decay, (1 + n)/(10 + n)) serves evaluation and export. No ``clip_sample`` (as SD): z is not
bounded by [−1, 1] and clamping x̂_0 there erased the shapes. Evaluators: ``heldout``,
``samples``, ``shapes`` (the oracle's accuracy per shape word); ``summarize`` adds the
per-concept accuracy and the oracle Fréchet distance and exports the model (:func:`export`).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxsafe.data import shapes, shapes_metrics
from jaxsafe.diffusion import pipeline, schedulers, t2i
from jaxsafe.nn import oracle as oracle_lib
from jaxsafe.nn.clip_text import CLIPTextConfig, CLIPTextModel
from jaxsafe.nn.patch_pca import PatchPCA, fit_patch_pca
from jaxsafe.nn.unet2d_condition import UNet2DConditionConfig, UNet2DConditionModel
from jaxsafe.optim import clipped_adamw
from jaxsafe.parallel import fetch
from jaxsafe.train import Task, ema_after_update, split_model

SAMPLE_PROMPTS = (
    "a red circle on a plain background",
    "an orange circle on a striped background",
    "a green square on a dotted background",
    "a blue box on a plain background",
    "a red ellipse on a striped background",
    "an orange triangle on a dotted background",
    "a green triangle on a plain background",
    "a blue ellipse on a dotted background",
    "a circle",
    "a red triangle",
    "a box on a striped background",
    "",
)


class TestbedModel(nnx.Module):
    """The two trained networks and the fixed latent map, so one `nnx.split` hands them to the
    trainer (the latent map's `Fixed` arrays land in `frozen`)."""

    def __init__(
        self,
        text_config: CLIPTextConfig,
        unet_config: UNet2DConditionConfig,
        latent: PatchPCA,
        *,
        rngs: nnx.Rngs,
    ):
        self.text_encoder = CLIPTextModel(text_config, rngs=rngs)
        self.unet = UNet2DConditionModel(unet_config, rngs=rngs)
        self.latent = latent

    def __call__(self, z_t, t, input_ids):
        return self.unet(z_t, t, self.text_encoder(input_ids)["last_hidden_state"])


def tokenizer(config):
    """The word tokenizer of the config's world (``data.world``, default grey)."""
    return shapes.tokenizer(config.data.max_length, config.data.get("world", "grey"))


def dataset(config, seed: int, **kw) -> shapes.ShapesDataset:
    return shapes.ShapesDataset(seed, world=config.data.get("world", "grey"), **kw)


def text_config(config, tokenizer) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=tokenizer.vocab_size,
        max_position_embeddings=tokenizer.max_length,
        eos_token_id=tokenizer.eos_token_id,
        **config.text_encoder,
    )


def unet_config(config) -> UNet2DConditionConfig:
    u = dict(config.unet)
    for k in ("block_out_channels", "down_block_types", "up_block_types"):
        u[k] = tuple(u[k])
    channels = config.latent.components
    return UNet2DConditionConfig(
        sample_size=shapes.RESOLUTION // config.latent.patch,
        in_channels=channels,
        out_channels=channels,
        cross_attention_dim=config.text_encoder.hidden_size,
        prediction_type="epsilon",
        **u,
    )


def scheduler_config(config) -> schedulers.SchedulerConfig:
    return schedulers.SchedulerConfig(**config.scheduler)


def build_model(config, tokenizer) -> TestbedModel:
    """The model with a freshly fitted latent map (a checkpoint's or export's replaces it)."""
    lat = config.latent
    images = dataset(config, config.data.train_seed).arrays(0, lat.fit_images)["image"]
    pca = PatchPCA(*fit_patch_pca(images / 127.5 - 1.0, lat.patch, lat.components), lat.patch)
    return TestbedModel(
        text_config(config, tokenizer), unet_config(config), pca, rngs=nnx.Rngs(config.train.seed)
    )


def make_loss_fn(
    graphdef, sched: schedulers.SchedulerConfig, empty_ids: np.ndarray, caption_dropout: float
):
    """The ε-prediction loss of the module docstring, batch = {'image', 'input_ids'}."""
    T = sched.num_train_timesteps

    def loss_fn(params, frozen, extra, batch, rng):
        model = nnx.merge(graphdef, params, frozen)
        z0 = model.latent.encode(batch["image"])
        b = z0.shape[0]
        k_t, k_eps, k_drop = jax.random.split(rng, 3)
        t = jax.random.randint(k_t, (b,), 0, T)
        eps = jax.random.normal(k_eps, z0.shape)
        drop = jax.random.bernoulli(k_drop, caption_dropout, (b, 1))
        ids = jnp.where(drop, jnp.asarray(empty_ids)[None], batch["input_ids"])
        eps_hat = model(schedulers.add_noise(sched, z0, eps, t), t, ids)
        return jnp.mean((eps_hat - eps) ** 2), ({}, extra)

    return loss_fn


def make_generator(graphdef, config, tokenizer, mesh=None):
    """``generate((params, frozen), captions, seeds) -> (n, 32, 32, 3)`` images in [−1, 1]:
    ``t2i.make_generator`` (DDIM, classifier-free guidance against the empty prompt) with the
    model's UNet, text encoder and latent decoder."""
    s = config.sampling
    model = lambda pf: nnx.merge(graphdef, *pf)
    return t2i.make_generator(
        lambda pf, z, t, emb: model(pf).unet(z, t, emb),
        lambda pf, ids: model(pf).text_encoder(ids)["last_hidden_state"],
        tokenizer,
        scheduler_config(config),
        latent_shape=(shapes.RESOLUTION // config.latent.patch,) * 2 + (config.latent.components,),
        decode=lambda pf, z: jnp.clip(model(pf).latent.decode(z), -1.0, 1.0),
        kind=s.kind,
        num_inference_steps=s.num_inference_steps,
        guidance_scale=s.guidance_scale,
        batch_size=s.batch_size,
        mesh=mesh,
    )


def make_heldout_evaluator(graphdef, config, tokenizer):
    """Denoising loss of the EMA weights on fixed held-out data, t and ε (no caption dropout)."""
    data = dataset(config, config.data.heldout_seed).arrays(0, config.eval.heldout_examples)
    images = data["image"].astype(np.float32) / 127.5 - 1.0
    ids = tokenizer(data["caption"])
    loss_fn = make_loss_fn(graphdef, scheduler_config(config), tokenizer(""), 0.0)
    loss = jax.jit(lambda p, f, b: loss_fn(p, f, {}, b, jax.random.key(config.eval.seed))[0])

    def evaluate(state):
        return {
            "loss": float(
                fetch(loss(state.extra["ema"], state.frozen, {"image": images, "input_ids": ids}))
            )
        }

    return evaluate


def make_samples_evaluator(generate, prompts=SAMPLE_PROMPTS):
    from jaxsafe.data.images import image_grid

    seeds = np.arange(len(prompts))

    def evaluate(state):
        return {
            "grid": image_grid(generate((state.extra["ema"], state.frozen), prompts, seeds), cols=4)
        }

    return evaluate


def _trainable(config):
    return nnx.Param if config.train_text_encoder else nnx.All(nnx.Param, nnx.PathContains("unet"))


def build(config, mesh) -> Task:
    tok = tokenizer(config)
    model = build_model(config, tok)
    graphdef, params, frozen = split_model(model, _trainable(config))
    data = dataset(
        config,
        config.data.train_seed,
        shape_weights=config.data.shape_weights,
        colour_weights=config.data.get("colour_weights"),
    )
    train = shapes.shapes_batches(
        data,
        tok,
        config.train.batch_size,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    generate = make_generator(graphdef, config, tok, mesh)
    return Task(
        graphdef=graphdef,
        params=params,
        frozen=frozen,
        optimizer=clipped_adamw(config.optimizer),
        loss_fn=make_loss_fn(
            graphdef, scheduler_config(config), tok(""), config.data.caption_dropout
        ),
        train_data=train,
        extra={"ema": jax.tree.map(jnp.copy, params)},
        after_update=ema_after_update(config.optimizer.ema_decay),
        evaluators={
            "heldout": make_heldout_evaluator(graphdef, config, tok),
            "samples": make_samples_evaluator(generate),
            "shapes": make_shapes_evaluator(generate, config),
        },
    )


def make_shapes_evaluator(generate, config):
    """Oracle accuracy of the EMA weights on each shape word's prompts: shapes are learned last
    (docs/testbed.md), so this is the curve that says when the model is done."""

    oracle = oracle_lib.load()
    e = config.eval

    def evaluate(state):
        def gen(captions, seeds):
            return generate((state.extra["ema"], state.frozen), captions, seeds)

        report = shapes_metrics.erasure_report(
            gen, oracle, concepts=shapes.SHAPES, k=e.samples_per_concept, seed=e.seed
        )
        return {w: report[f"acc/{w}"] for w in shapes.SHAPES}

    return evaluate


def evaluate_model(config, graphdef, params, frozen, oracle=None) -> dict:
    """Per-concept generation accuracy (``shapes_metrics.erasure_report`` with no target) and
    the oracle Fréchet distance between ``eval.fid_samples`` generations for held-out captions
    and the held-out images themselves."""
    tok = tokenizer(config)
    oracle = oracle or oracle_lib.load()
    generate = make_generator(graphdef, config, tok)

    def gen(captions, seeds):
        return generate((params, frozen), captions, seeds)

    e = config.eval
    out = shapes_metrics.erasure_report(gen, oracle, k=e.samples_per_concept, seed=e.seed)
    real = dataset(config, config.data.heldout_seed).arrays(0, e.fid_samples)
    seeds = np.arange(e.fid_samples) + 10**6  # not the seeds of the concept prompts
    fake = np.concatenate(
        [gen(real["caption"][i : i + 64], seeds[i : i + 64]) for i in range(0, e.fid_samples, 64)]
    )
    out["oracle_fd"] = shapes_metrics.oracle_frechet_distance(
        oracle, fake, real["image"].astype(np.float32) / 127.5 - 1.0
    )
    out["caption_accuracy"] = float(
        np.mean(np.all(shapes_metrics.oracle_predict(oracle, fake) == real["label"], -1))
    )
    return out


def export(config, graphdef, params, frozen, folder: str) -> str:
    """Writes the model as a diffusers-layout folder (``jaxsafe.diffusion.pipeline
    .export_testbed``); ``pipeline.load(folder)`` reads it back."""
    model = nnx.merge(graphdef, fetch(params), fetch(frozen))
    return pipeline.export_testbed(
        model.unet,
        model.text_encoder,
        scheduler_config(config),
        tokenizer(config),
        model.latent,
        folder,
    )


def restore(config, workdir: str, step: int | None = None, ema: bool = True):
    """``(graphdef, params, frozen, step)`` of a run's checkpoint (the EMA weights by default),
    on any topology; erasure runs can start from a checkpoint this way as well as from an export.
    """
    from jaxsafe import train
    from jaxsafe.treepath import named_leaves, replace_by_name

    graphdef, params, frozen = split_model(
        build_model(config, tokenizer(config)), _trainable(config)
    )
    step, raw = train.load_arrays(os.path.join(workdir, "checkpoints"), step)

    def fill(like, stored, what):
        try:
            return replace_by_name(
                like, named_leaves(stored), complete=True, what=f"checkpoint {what} in {workdir}"
            )
        except KeyError as e:
            raise ValueError(f"{e.args[0]}: it does not fit the config") from None

    params = fill(params, raw["extra"]["ema"] if ema else raw["params"], "params")
    return graphdef, params, fill(frozen, raw["frozen"], "frozen"), int(step)


def summarize(config, state, task, workdir: str) -> dict:
    """Held-out loss, per-concept accuracy and Fréchet distance of the EMA weights; exports them
    to ``<workdir>/export``."""
    out = dict(task.evaluators["heldout"](state))
    ema, frozen = fetch(state.extra["ema"]), fetch(state.frozen)
    out.update(evaluate_model(config, task.graphdef, ema, frozen))
    if workdir:
        export(config, task.graphdef, ema, frozen, os.path.join(workdir, "export"))
    return out

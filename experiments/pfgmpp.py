"""PFGM++ (Xu et al., ICML 2023) and EDM (Karras et al., NeurIPS 2022) training of a SongUNet.

The objective is :func:`jaxsafe.diffusion.pfgmpp.denoising_loss`, EDM's preconditioned,
λ(σ)-weighted denoising loss with PFGM++'s heavy-tailed perturbation for finite D (D = inf:
EDM's Gaussian), averaged over the batch (EDM's `loss.sum() / batch_size`). The loop follows
EDM's `training/training_loop.py`, with t = optimizer steps taken and B the global batch size:

* learning-rate warm-up lr_t = lr · min(t B / max(lr_rampup_kimg · 1000, 1e-8), 1) (lr 0 at
  t = 0, as EDM); Adam(β1 = 0.9, β2 = 0.999, ε = 1e-8); optional clipping by global norm
  (`optimizer.grad_clip` > 0; EDM and PFGM++ have none);
* gradients pass through nan_to_num(nan=0, posinf=1e5, neginf=-1e5), like EDM. Deviation: a
  non-finite *loss* still stops the run (the trainer's `NonFiniteError`), where EDM carries on;
* EMA with EDM's half-life in images, h_t = min(ema_halflife_kimg · 1000, t B ·
  ema_rampup_ratio), β_t = 0.5^(B / max(h_t, 1e-8)), kept in `TrainState.extra['ema']`, updated
  in `Task.after_update` and checkpointed, so a resumed run's EMA equals an uninterrupted one's;
* with `augment.p > 0`, EDM's non-leaky augmentation (`jaxsafe.diffusion.augment`): the target
  is the augmented image and the network gets its 9 labels; class-conditional models get one-hot
  labels (`data.cond`).

The `samples` evaluator draws Heun samples of the EMA weights from the prior of the same D and
reports the Fréchet distance on the digits classifier's features (`fd`, next to its floor
`fd_real`) or the FID against `eval.fid_ref` (docs/diffusion.md, "Evaluation: Fréchet distance
on digits-classifier features", "FID with Inception-v3").
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxsafe.data import images
from jaxsafe.diffusion import augment, edm, fid, pfgmpp
from jaxsafe.diffusion import image_model as im
from jaxsafe.nn import inception, songunet
from jaxsafe.parallel import fetch
from jaxsafe.train import Task, split_model

DATA_SOURCES = ("digits", "tfds", "folder")
FEATURE_NETS = ("digits", "inception", "none")


# ---------------------------------------------------------------------------------------------
# EDM's schedules


def make_optimizer(cfg, batch_size: int) -> optax.GradientTransformation:
    parts = [edm.nan_to_num_grads()] if cfg.nan_to_num else []
    if cfg.grad_clip:
        parts.append(optax.clip_by_global_norm(cfg.grad_clip))
    parts.append(
        optax.adam(
            edm.lr_schedule(cfg.lr, batch_size, cfg.lr_rampup_kimg),
            b1=cfg.b1,
            b2=cfg.b2,
            eps=cfg.eps,
        )
    )
    return optax.chain(*parts)


# ---------------------------------------------------------------------------------------------
# Data and model


def load_source(cfg):
    """The config's image source: offline digits, a TFDS data_source or an image folder."""
    if cfg.name == "digits":
        return images.ArraySource(images.digits(cfg.resolution, cfg.split))
    if cfg.name == "tfds":
        return images.tfds_source(cfg.tfds_name, cfg.split, cfg.data_dir)
    if cfg.name == "folder":
        if not cfg.path:
            raise ValueError("data.name='folder' needs data.path (a folder of PNG/JPEG images)")
        return images.ImageFolderSource(cfg.path, cfg.resolution, cfg.channels)
    raise ValueError(f"data.name={cfg.name!r}; expected one of {DATA_SOURCES}")


def make_loss_fn(graphdef, config):
    p = config.pfgmpp
    D = im.augmentation_dim(p.D)
    aug_p = im.augment_p(config)

    def loss_fn(params, frozen, extra, batch, rng):
        model = nnx.merge(graphdef, params, frozen)
        k_loss, k_dropout, k_aug = jax.random.split(rng, 3)
        images, labels = batch["image"], None
        if aug_p > 0:
            keys = jax.random.split(k_aug, images.shape[0])
            images, labels = jax.vmap(lambda k, x: augment.augment(k, x, aug_p))(keys, images)
        denoiser = im.make_denoiser(model, p.sigma_data, nnx.Rngs(dropout=k_dropout), labels)
        per_example = pfgmpp.denoising_loss(
            denoiser,
            images,
            k_loss,
            D=D,
            P_mean=p.P_mean,
            P_std=p.P_std,
            sigma_data=p.sigma_data,
            class_labels=im.one_hot(batch.get("label"), config),
        )
        return jnp.mean(per_example), ({}, extra)

    return loss_fn


def make_after_update(config):
    e, batch_size = config.ema, config.train.batch_size
    rampup = e.rampup_ratio if e.rampup_ratio else None

    def after_update(state):
        # state.step already counts this update; EDM's cur_nimg is the count before it.
        beta = edm.ema_beta(state.step - 1, batch_size, e.halflife_kimg, rampup)
        return {**state.extra, "ema": edm.ema_update(state.extra["ema"], state.params, beta)}

    return after_update


# ---------------------------------------------------------------------------------------------
# Sampling and evaluation


def make_evaluator(graphdef, config):
    ev = config.eval
    if ev.feature_net not in FEATURE_NETS:
        raise ValueError(f"eval.feature_net={ev.feature_net!r}; expected one of {FEATURE_NETS}")
    if ev.feature_net == "digits" and config.data.name != "digits":
        raise ValueError("eval.feature_net='digits' needs data.name='digits'")
    sample_fn = im.make_sample_fn(graphdef, config)
    fd = inception_fn = None
    if ev.feature_net == "inception":  # both files checked now, not at the first evaluation
        if not ev.get("fid_ref"):
            raise ValueError(
                "eval.feature_net='inception' needs eval.fid_ref (statistics of launch.fid_stats)"
            )
        fid.load_stats(ev.fid_ref)
        inception_fn = fid.feature_fn(inception.load(ev.get("fid_weights") or None))
    if ev.feature_net == "digits":
        features, real, stats = im.digits_features(config.data.resolution)
        subset = np.random.default_rng(ev.seed).choice(len(real), ev.num_samples, replace=False)
        fd = (features, stats, im.frechet_distance_to(stats, np.asarray(features(real[subset]))))

    last = {}  # step -> results: `summarize` reuses the final evaluation instead of resampling

    def evaluate(state):
        step = int(fetch(state.step))
        if step in last:
            return last[step]
        params = state.extra["ema"] if ev.use_ema else state.params
        x, _ = im.generate(
            sample_fn,
            params,
            state.frozen,
            jax.random.key(ev.seed),
            ev.num_samples,
            ev.batch_size,
            im.num_classes(config),
        )
        out = {"samples": images.image_grid(x[: ev.grid])}
        if fd is not None:
            features, stats, fd_real = fd
            feats = np.concatenate(
                [
                    np.asarray(features(jnp.asarray(x[i : i + ev.batch_size])))
                    for i in range(0, len(x), ev.batch_size)
                ]
            )
            out.update(fd=im.frechet_distance_to(stats, feats), fd_real=fd_real)
        if inception_fn is not None:
            out["fid"] = fid.fid(fid.features(inception_fn, x, ev.batch_size), ev.fid_ref)
        last.clear()
        last[step] = out
        return out

    return evaluate


# ---------------------------------------------------------------------------------------------
# Checkpoint -> model (for sampling outside the trainer)


# ---------------------------------------------------------------------------------------------


def build(config, mesh) -> Task:
    del mesh  # the data are split over processes; the trainer shards the batch over devices
    if config.data.cond and config.data.name == "folder":
        raise ValueError("data.cond=True needs labels; image folders are unconditional")
    im.augmentation_dim(config.pfgmpp.D)  # fail early on a bad D
    source = load_source(config.data)
    train_data = images.image_batches(
        source,
        config.train.batch_size,
        seed=config.data.seed,
        flip=config.data.flip,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    model = im.build_model(config)
    graphdef, params, frozen = split_model(model)
    evaluators = {"samples": make_evaluator(graphdef, config)} if config.eval.num_samples else {}
    return Task(
        graphdef=graphdef,
        params=params,
        frozen=frozen,
        optimizer=make_optimizer(config.optimizer, config.train.batch_size),
        loss_fn=make_loss_fn(graphdef, config),
        train_data=train_data,
        extra={"ema": jax.tree.map(jnp.copy, params)},
        evaluators=evaluators,
        grad_metrics=lambda params, grads: {"grad_norm": optax.tree.norm(grads)},
        after_update=make_after_update(config),
        sharding_rules=songunet.SONGUNET_SHARDING_RULES,
    )


def summarize(config, state, task, workdir) -> dict:
    del workdir
    if "samples" not in task.evaluators:
        return {}
    out = task.evaluators["samples"](state)
    return {k: float(v) for k, v in out.items() if np.ndim(v) == 0}

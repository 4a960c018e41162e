"""PFGM++ (Xu et al., ICML 2023) and EDM (Karras et al., NeurIPS 2022) training of a SongUNet.

The objective is `jaxsafe.diffusion.pfgmpp.denoising_loss`, EDM's preconditioned, λ(σ)-weighted
denoising loss with PFGM++'s heavy-tailed perturbation for finite D (D = inf: EDM's Gaussian),
averaged over the batch (EDM's `loss.sum() / batch_size`). The training loop follows EDM's
`training/training_loop.py`, with t = optimizer steps taken and B the global batch size:

* learning-rate warm-up: lr_t = lr · min(t B / max(lr_rampup_kimg · 1000, 1e-8), 1) (as in EDM
  the very first step, t = 0, has lr 0); Adam(β1 = 0.9, β2 = 0.999, ε = 1e-8);
* gradients pass through nan_to_num(nan=0, posinf=1e5, neginf=-1e5) before the update, like
  EDM's `torch.nan_to_num(param.grad, ...)`: a few overflowing gradient entries cannot poison the
  weights. A non-finite *loss* still stops the run (the trainer's `NonFiniteError`), where EDM
  would carry on;
* optional gradient clipping by global norm (`optimizer.grad_clip` > 0; EDM and PFGM++ have none);
* EMA of the weights with EDM's half-life in images: h = ema_halflife_kimg · 1000, ramped up as
  h_t = min(h, t B · ema_rampup_ratio); β_t = 0.5^(B / max(h_t, 1e-8));
  θ_ema ← β_t θ_ema + (1 − β_t) θ (at t = 0, β = 0: the EMA starts at the first updated weights).
  The EMA lives in `TrainState.extra['ema']`, is updated in `Task.after_update` and checkpointed
  with the run, so a resumed run's EMA equals an uninterrupted one's.

Not implemented: EDM's non-leaky augmentation pipeline (`--augment=0.12/0.15`, with the network's
`augment_dim = 9` conditioning); the configs set augment_dim = 0 and say so. Class-conditional
models get one-hot labels (`data.cond`).

Evaluators: `samples` draws `eval.num_samples` images with the EMA weights (`eval.use_ema`) and
the Heun sampler from the PFGM++ prior of the same D, and returns a grid image; with
`eval.feature_net = 'digits'` it also reports the Fréchet distance between the shipped digits
classifier's features of the samples and of all 1,797 real digits (`fd`), next to the FD of the
same number of real digits (`fd_real`, the floor set by the sample size).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxsafe.data import images
from jaxsafe.diffusion import edm, metrics, pfgmpp, samplers
from jaxsafe.nn import songunet
from jaxsafe.parallel import fetch
from jaxsafe.train import Task, split_model
from jaxsafe.treepath import named_leaves, path_name

DATA_SOURCES = ("digits", "tfds", "folder")
FEATURE_NETS = ("digits", "none")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


# ---------------------------------------------------------------------------------------------
# EDM's schedules


def ema_beta(step, batch_size: int, halflife_kimg: float, rampup_ratio: float | None):
    """β_t = 0.5^(B / max(h_t, 1e-8)), h_t = min(halflife_kimg·1000, t·B·rampup_ratio)."""
    h = jnp.asarray(halflife_kimg * 1000.0, jnp.float32)
    if rampup_ratio is not None:
        h = jnp.minimum(h, jnp.asarray(step, jnp.float32) * batch_size * rampup_ratio)
    return 0.5 ** (batch_size / jnp.maximum(h, 1e-8))


def ema_update(ema, params, beta):
    """θ_ema ← β θ_ema + (1 − β) θ (EDM's `p_net.lerp(p_ema, β)`)."""
    return jax.tree.map(lambda e, p: (p + beta * (e - p)).astype(e.dtype), ema, params)


def lr_schedule(lr: float, batch_size: int, rampup_kimg: float):
    """optax schedule of the update count t: lr · min(t B / max(rampup_kimg·1000, 1e-8), 1)."""
    def schedule(count):
        nimg = jnp.asarray(count, jnp.float32) * batch_size
        return lr * jnp.minimum(nimg / max(rampup_kimg * 1000.0, 1e-8), 1.0)

    return schedule


def nan_to_num_grads() -> optax.GradientTransformation:
    """EDM's nan_to_num(nan=0, posinf=1e5, neginf=-1e5) on every gradient entry."""
    return optax.stateless(lambda g, _: jax.tree.map(
        lambda x: jnp.nan_to_num(x, nan=0.0, posinf=1e5, neginf=-1e5), g))


def make_optimizer(cfg, batch_size: int) -> optax.GradientTransformation:
    parts = [nan_to_num_grads()] if cfg.nan_to_num else []
    if cfg.grad_clip:
        parts.append(optax.clip_by_global_norm(cfg.grad_clip))
    parts.append(optax.adam(lr_schedule(cfg.lr, batch_size, cfg.lr_rampup_kimg),
                            b1=cfg.b1, b2=cfg.b2, eps=cfg.eps))
    return optax.chain(*parts)


# ---------------------------------------------------------------------------------------------
# Data and model


def image_shape(data_cfg) -> tuple[int, int, int]:
    channels = 1 if data_cfg.name == "digits" else data_cfg.channels
    return data_cfg.resolution, data_cfg.resolution, channels


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


def num_classes(config) -> int:
    return config.data.num_classes if config.data.cond else 0


def build_model(config, rngs: nnx.Rngs | None = None) -> songunet.SongUNet:
    m = config.model
    if m.dtype not in DTYPES:
        raise ValueError(f"model.dtype={m.dtype!r}; expected one of {tuple(DTYPES)}")
    h, _, c = image_shape(config.data)
    return songunet.SongUNet(
        h, c, c, label_dim=num_classes(config), augment_dim=0,
        model_channels=m.model_channels, channel_mult=tuple(m.channel_mult),
        channel_mult_emb=m.channel_mult_emb, num_blocks=m.num_blocks,
        attn_resolutions=tuple(m.attn_resolutions), dropout=m.dropout,
        label_dropout=m.label_dropout, embedding_type=m.embedding_type,
        channel_mult_noise=m.channel_mult_noise, encoder_type=m.encoder_type,
        decoder_type=m.decoder_type, resample_filter=tuple(m.resample_filter),
        dtype=None if m.dtype == "float32" else DTYPES[m.dtype],
        rngs=rngs or nnx.Rngs(config.train.seed))


def augmentation_dim(D):
    """The config's D as `pfgmpp` takes it: a positive float, or None for inf (EDM)."""
    return pfgmpp.check_D(D)


def one_hot(labels, config):
    if not config.data.cond:
        return None
    return jax.nn.one_hot(labels, num_classes(config), dtype=jnp.float32)


def make_denoiser(model, sigma_data: float, rngs: nnx.Rngs | None = None):
    """D(x; σ, labels) = EDM's preconditioned `model` (dropout keys from `rngs`, if training).

    As in EDM's `EDMPrecond`, `labels=None` on a class-conditional model means all-zero labels
    (the unconditional branch that label dropout trains), which classifier-free guidance uses.
    """
    def F(x_in, c_noise, labels):
        if labels is None and model.label_dim:
            labels = jnp.zeros((x_in.shape[0], model.label_dim), x_in.dtype)
        return model(x_in, c_noise, labels, rngs=rngs).astype(x_in.dtype)

    return lambda x, sigma, labels: edm.denoise(F, x, sigma, labels, sigma_data=sigma_data)


def make_loss_fn(graphdef, config):
    p = config.pfgmpp
    D = augmentation_dim(p.D)

    def loss_fn(params, frozen, extra, batch, rng):
        model = nnx.merge(graphdef, params, frozen)
        k_loss, k_dropout = jax.random.split(rng)
        denoiser = make_denoiser(model, p.sigma_data, nnx.Rngs(dropout=k_dropout))
        per_example = pfgmpp.denoising_loss(
            denoiser, batch["image"], k_loss, D=D, P_mean=p.P_mean, P_std=p.P_std,
            sigma_data=p.sigma_data, class_labels=one_hot(batch.get("label"), config))
        return jnp.mean(per_example), ({}, extra)

    return loss_fn


def make_after_update(config):
    e, batch_size = config.ema, config.train.batch_size
    rampup = e.rampup_ratio if e.rampup_ratio else None

    def after_update(state):
        # state.step already counts this update; EDM's cur_nimg is the count before it.
        beta = ema_beta(state.step - 1, batch_size, e.halflife_kimg, rampup)
        return {**state.extra, "ema": ema_update(state.extra["ema"], state.params, beta)}

    return after_update


# ---------------------------------------------------------------------------------------------
# Sampling and evaluation


def make_sample_fn(graphdef, config, *, D=None, num_steps=None, noise_injection_alpha=0.0):
    """Jitted `sample(params, frozen, key, labels) -> (n, H, W, C)` images in [-1, 1]-ish.

    `labels` (n,) int selects the batch size (any values when unconditional). D and num_steps
    default to the config's (`pfgmpp.D`, `sampler.num_steps`).
    """
    s, p = config.sampler, config.pfgmpp
    D = augmentation_dim(p.D if D is None else D)
    steps = num_steps or s.num_steps
    shape = image_shape(config.data)

    @jax.jit
    def sample(params, frozen, key, labels):
        model = nnx.merge(graphdef, params, frozen)
        model.eval()
        k_prior, k_inject = jax.random.split(key)
        latents = pfgmpp.prior_sample(k_prior, (labels.shape[0],) + shape, s.sigma_max, D)
        return samplers.heun_sampler(
            make_denoiser(model, p.sigma_data), latents, num_steps=steps, sigma_min=s.sigma_min,
            sigma_max=s.sigma_max, rho=s.rho, class_labels=one_hot(labels, config),
            noise_injection_alpha=noise_injection_alpha,
            rng=k_inject if noise_injection_alpha else None)

    return sample


def generate(sample_fn, params, frozen, key, num: int, batch_size: int, num_classes_: int = 0):
    """`num` samples in batches of `batch_size` (keys folded by batch index), as numpy."""
    out, labels = [], []
    for i in range(-(-num // batch_size)):
        k = jax.random.fold_in(key, i)
        y = (jax.random.randint(jax.random.fold_in(k, 1), (batch_size,), 0, num_classes_)
             if num_classes_ else jnp.zeros((batch_size,), jnp.int32))
        out.append(np.asarray(fetch(sample_fn(params, frozen, k, y))))
        labels.append(np.asarray(y))
    return np.concatenate(out)[:num], np.concatenate(labels)[:num]


def digits_features(resolution: int):
    """Jitted features of the shipped digits classifier and the reference statistics of all
    1,797 real digits at `resolution`."""
    from jaxsafe.nn import digits_classifier

    net = digits_classifier.load()
    features = jax.jit(lambda x: net.features(x))
    real = images.to_float(images.digits(resolution)["image"])
    return features, real, metrics.gaussian_stats(np.asarray(features(real)))


def frechet_distance_to(stats, feats) -> float:
    return metrics.frechet_distance(*metrics.gaussian_stats(feats), *stats)


def make_evaluator(graphdef, config):
    ev = config.eval
    if ev.feature_net not in FEATURE_NETS:
        raise ValueError(f"eval.feature_net={ev.feature_net!r}; expected one of {FEATURE_NETS}")
    if ev.feature_net == "digits" and config.data.name != "digits":
        raise ValueError("eval.feature_net='digits' needs data.name='digits'")
    sample_fn = make_sample_fn(graphdef, config)
    fd = None
    if ev.feature_net == "digits":
        features, real, stats = digits_features(config.data.resolution)
        subset = np.random.default_rng(ev.seed).choice(len(real), ev.num_samples, replace=False)
        fd = (features, stats, frechet_distance_to(stats, np.asarray(features(real[subset]))))

    last = {}  # step -> results: `summarize` reuses the final evaluation instead of resampling

    def evaluate(state):
        step = int(fetch(state.step))
        if step in last:
            return last[step]
        params = state.extra["ema"] if ev.use_ema else state.params
        x, _ = generate(sample_fn, params, state.frozen, jax.random.key(ev.seed), ev.num_samples,
                        ev.batch_size, num_classes(config))
        out = {"samples": images.image_grid(x[:ev.grid])}
        if fd is not None:
            features, stats, fd_real = fd
            feats = np.concatenate([np.asarray(features(jnp.asarray(x[i:i + ev.batch_size])))
                                    for i in range(0, len(x), ev.batch_size)])
            out.update(fd=frechet_distance_to(stats, feats), fd_real=fd_real)
        last.clear()
        last[step] = out
        return out

    return evaluate


# ---------------------------------------------------------------------------------------------
# Checkpoint -> model (for sampling outside the trainer)


def restore_like(template, raw):
    """`template`'s pytree (arrays or `jax.ShapeDtypeStruct`s) filled with the arrays of a
    `jaxsafe.train.load_arrays` subtree, matched by leaf name; a missing name or a different
    shape raises ValueError."""
    stored = named_leaves(raw, is_leaf=lambda x: hasattr(x, "shape"))

    def one(path, x):
        name = path_name(path)
        if name not in stored:
            raise ValueError(f"checkpoint lacks tensor {name!r} (has e.g. {sorted(stored)[:3]})")
        if tuple(stored[name].shape) != tuple(x.shape):
            raise ValueError(f"checkpoint tensor {name!r} has shape {tuple(stored[name].shape)}, "
                             f"model needs {tuple(x.shape)}")
        return jnp.asarray(stored[name], x.dtype)

    return jax.tree_util.tree_map_with_path(one, template)


# ---------------------------------------------------------------------------------------------


def build(config, mesh) -> Task:
    del mesh  # the data are split over processes; the trainer shards the batch over devices
    if config.data.cond and config.data.name == "folder":
        raise ValueError("data.cond=True needs labels; image folders are unconditional")
    augmentation_dim(config.pfgmpp.D)  # fail early on a bad D
    source = load_source(config.data)
    train_data = images.image_batches(
        source, config.train.batch_size, seed=config.data.seed, flip=config.data.flip,
        process_index=jax.process_index(), process_count=jax.process_count())
    model = build_model(config)
    graphdef, params, frozen = split_model(model)
    evaluators = {"samples": make_evaluator(graphdef, config)} if config.eval.num_samples else {}
    return Task(graphdef=graphdef, params=params, frozen=frozen,
                optimizer=make_optimizer(config.optimizer, config.train.batch_size),
                loss_fn=make_loss_fn(graphdef, config), train_data=train_data,
                extra={"ema": jax.tree.map(jnp.copy, params)},
                evaluators=evaluators,
                grad_metrics=lambda params, grads: {"grad_norm": optax.tree.norm(grads)},
                after_update=make_after_update(config),
                sharding_rules=songunet.SONGUNET_SHARDING_RULES)


def summarize(config, state, task, workdir) -> dict:
    del workdir
    if "samples" not in task.evaluators:
        return {}
    out = task.evaluators["samples"](state)
    return {k: float(v) for k, v in out.items() if np.ndim(v) == 0}


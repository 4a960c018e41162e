"""The EDM / PFGM++ SongUNet image model of a ``configs/pfgmpp`` config, outside the trainer:
building it, its preconditioned denoiser, Heun sampling from the prior of any D, restoring a run's
checkpoint, and the Fréchet distance on the shipped digits classifier's features. Used by the
PFGM++/EDM experiment, the sampling launcher, SiD/SFD distillation (whose teacher is such a run)
and the benchmarks.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxsafe.data import images
from jaxsafe.diffusion import augment, edm, metrics, pfgmpp, samplers
from jaxsafe.nn import songunet
from jaxsafe.parallel import fetch
from jaxsafe.treepath import named_leaves, path_name

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def image_shape(data_cfg) -> tuple[int, int, int]:
    channels = 1 if data_cfg.name == "digits" else data_cfg.channels
    return data_cfg.resolution, data_cfg.resolution, channels


def num_classes(config) -> int:
    return config.data.num_classes if config.data.cond else 0


def augment_p(config) -> float:
    """EDM's augmentation probability ``config.augment.p`` (0, off, when the config has none)."""
    aug = config.get("augment")
    return float(aug.p) if aug is not None else 0.0


def songunet_kwargs(config) -> dict:
    """SongUNet's arguments from ``config.model`` and ``config.data`` (dtype and rngs apart);
    ``augment_dim`` is EDM's 9 augmentation labels when ``config.augment.p > 0``."""
    m = config.model
    h, _, c = image_shape(config.data)
    return dict(
        img_resolution=h,
        in_channels=c,
        out_channels=c,
        label_dim=num_classes(config),
        augment_dim=augment.NUM_LABELS if augment_p(config) > 0 else 0,
        model_channels=m.model_channels,
        channel_mult=tuple(m.channel_mult),
        channel_mult_emb=m.channel_mult_emb,
        num_blocks=m.num_blocks,
        attn_resolutions=tuple(m.attn_resolutions),
        dropout=m.dropout,
        label_dropout=m.label_dropout,
        embedding_type=m.embedding_type,
        channel_mult_noise=m.channel_mult_noise,
        encoder_type=m.encoder_type,
        decoder_type=m.decoder_type,
        resample_filter=tuple(m.resample_filter),
    )


def build_model(config, rngs: nnx.Rngs | None = None) -> songunet.SongUNet:
    m = config.model
    if m.dtype not in DTYPES:
        raise ValueError(f"model.dtype={m.dtype!r}; expected one of {tuple(DTYPES)}")
    return songunet.SongUNet(
        **songunet_kwargs(config),
        dtype=None if m.dtype == "float32" else DTYPES[m.dtype],
        rngs=rngs or nnx.Rngs(config.train.seed),
    )


def augmentation_dim(D):
    """The config's D as `pfgmpp` takes it: a positive float, or None for inf (EDM)."""
    return pfgmpp.check_D(D)


def one_hot(labels, config):
    if not config.data.cond:
        return None
    return jax.nn.one_hot(labels, num_classes(config), dtype=jnp.float32)


def make_denoiser(model, sigma_data: float, rngs: nnx.Rngs | None = None, augment_labels=None):
    """D(x; σ, labels) = EDM's preconditioned `model` (dropout keys from `rngs`, if training;
    `augment_labels` (B, 9) of EDM's augmentation, if training with it; None at sampling).

    As in EDM's `EDMPrecond`, `labels=None` on a class-conditional model means all-zero labels
    (the unconditional branch that label dropout trains), which classifier-free guidance uses.
    """

    def F(x_in, c_noise, labels):
        if labels is None and model.label_dim:
            labels = jnp.zeros((x_in.shape[0], model.label_dim), x_in.dtype)
        return model(x_in, c_noise, labels, augment_labels, rngs=rngs).astype(x_in.dtype)

    return lambda x, sigma, labels: edm.denoise(F, x, sigma, labels, sigma_data=sigma_data)


def make_sample_fn(graphdef, config, *, D=None, num_steps=None, noise_injection_alpha=0.0):
    """Jitted `sample(params, frozen, key, labels, alpha=None) -> (n, H, W, C)` images in
    [-1, 1]-ish.

    `labels` (n,) int selects the batch size (any values when unconditional). D and num_steps
    default to the config's (`pfgmpp.D`, `sampler.num_steps`). The noise-injection strength is
    `noise_injection_alpha`, or the `alpha` argument when given: a traced scalar, so one compiled
    sampler serves every α of a robustness sweep.
    """
    s, p = config.sampler, config.pfgmpp
    D = augmentation_dim(p.D if D is None else D)
    steps = num_steps or s.num_steps
    shape = image_shape(config.data)

    @jax.jit
    def sample(params, frozen, key, labels, alpha=None):
        model = nnx.merge(graphdef, params, frozen)
        model.eval()
        k_prior, k_inject = jax.random.split(key)
        strength = noise_injection_alpha if alpha is None else alpha
        latents = pfgmpp.prior_sample(k_prior, (labels.shape[0],) + shape, s.sigma_max, D)
        return samplers.heun_sampler(
            make_denoiser(model, p.sigma_data),
            latents,
            num_steps=steps,
            sigma_min=s.sigma_min,
            sigma_max=s.sigma_max,
            rho=s.rho,
            class_labels=one_hot(labels, config),
            noise_injection_alpha=strength,
            rng=k_inject if alpha is not None or noise_injection_alpha else None,
        )

    return sample


def generate(sample_fn, params, frozen, key, num: int, batch_size: int, num_classes_: int = 0):
    """`num` samples in batches of `batch_size` (keys folded by batch index), as numpy."""
    out, labels = [], []
    for i in range(-(-num // batch_size)):
        k = jax.random.fold_in(key, i)
        y = (
            jax.random.randint(jax.random.fold_in(k, 1), (batch_size,), 0, num_classes_)
            if num_classes_
            else jnp.zeros((batch_size,), jnp.int32)
        )
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
            raise ValueError(
                f"checkpoint tensor {name!r} has shape {tuple(stored[name].shape)}, "
                f"model needs {tuple(x.shape)}"
            )
        return jnp.asarray(stored[name], x.dtype)

    return jax.tree_util.tree_map_with_path(one, template)


def load_config(workdir: str, config=None):
    """``config``, or the ``config.json`` that ``launch.train`` wrote into ``workdir``; either
    must be a PFGM++/EDM run's (``experiment='pfgmpp'``)."""
    import ml_collections

    from jaxsafe.files import read_json

    where = "--config"
    if config is None:
        where = os.path.join(workdir, "config.json")
        if not os.path.exists(where):
            raise FileNotFoundError(f"{where} not found; pass --config=<the training config file>")
        config = read_json(where, "the run's config")
        if not isinstance(config, dict):
            raise ValueError(f"{where}: expected a JSON object (the run's config)")
        config = ml_collections.ConfigDict(config)
    if config.get("experiment") != "pfgmpp":
        raise ValueError(
            f"{where}: experiment={config.get('experiment')!r}; expected a "
            "PFGM++/EDM run (experiment='pfgmpp', configs/pfgmpp/)"
        )
    return config


def load_model(config, workdir: str, *, use_ema: bool = True, step: int | None = None):
    """``(graphdef, params, frozen, step)`` of a checkpoint in ``workdir/checkpoints`` (the EMA
    weights by default)."""
    from jaxsafe import train

    ckpt = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(ckpt):
        raise FileNotFoundError(f"no checkpoints directory {ckpt}")
    step, tree = train.load_arrays(ckpt, step)
    abstract = nnx.eval_shape(lambda: build_model(config, nnx.Rngs(0)))
    graphdef, params, frozen = train.split_model(abstract)
    params = restore_like(params, tree["extra"]["ema"] if use_ema else tree["params"])
    frozen = restore_like(frozen, tree["frozen"])
    return graphdef, params, frozen, step

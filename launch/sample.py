r"""Samples a trained PFGM++ / EDM model: PNG grid, `.npz`, and the robustness probes.

    python -m launch.sample --workdir=/tmp/pfgmpp_digits [--num=64] [--D=128] [--steps=18] \
        [--alpha=0,0.05,0.1] [--bits=0,8,6] [--no_ema] [--checkpoint_step=N] [--out=DIR]

The model is rebuilt from `<workdir>/config.json` (or `--config`), its weights read with
`jaxsafe.train.load_arrays` (any topology wrote them); the EMA weights by default. For every
combination of `--alpha` (PFGM++'s noise injection x ← x + α σ_i ε before each Heun step; 0 =
off) and `--bits` (post-training b-bit quantisation of the conv / linear kernels outside norms,
embeddings, the mapping network and full-resolution layers, as PFGM++'s `generate_quant.py`; 0 =
full precision) it writes `samples_a{α}_b{bits}.png` and `.npz` (`images` uint8 NHWC, `labels`)
to `--out` (default `<workdir>/samples`) and, for digits models, prints the Fréchet distance on
the digits classifier's features (`summary.json` holds the table). `--fid_ref=stats.npz` adds
the FID against reference statistics (`launch.fid_stats`) with the FID Inception of
`--fid_weights` / `$JAXSAFE_FID_INCEPTION`; a missing file is one line on stderr and exit status
2. D defaults to the trained one; another D is allowed (an ablation).
"""

import functools
import itertools
import json
import os

from absl import app, flags
from ml_collections import config_flags

from jaxsafe import compilation_cache as cache
from launch import user_errors

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir (checkpoints, config.json).")
_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file (default: <workdir>/config.json).", lock_config=True
)
_NUM = flags.DEFINE_integer("num", 64, "Samples per setting.")
_BATCH = flags.DEFINE_integer("batch", 256, "Sampling batch size.")
_D = flags.DEFINE_float(
    "D", None, "Augmentation dimension for sampling (inf = EDM); default: trained D."
)
_STEPS = flags.DEFINE_integer("steps", None, "Heun steps (default: config.sampler.num_steps).")
_ALPHA = flags.DEFINE_list("alpha", ["0"], "Noise-injection strengths α.")
_BITS = flags.DEFINE_list("bits", ["0"], "Weight quantisation bits (0 = none).")
_NO_EMA = flags.DEFINE_bool("no_ema", False, "Use the raw weights instead of the EMA.")
_CKPT_STEP = flags.DEFINE_integer("checkpoint_step", None, "Checkpoint step (default: latest).")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_OUT = flags.DEFINE_string("out", None, "Output directory (default: <workdir>/samples).")
_FID_REF = flags.DEFINE_string(
    "fid_ref",
    None,
    "FID reference statistics (.npz of launch.fid_stats or pytorch-fid): adds each setting's FID.",
)
_FID_WEIGHTS = flags.DEFINE_string(
    "fid_weights", None, "FID Inception safetensors (default: $JAXSAFE_FID_INCEPTION)."
)
cache.define_flag()
flags.mark_flags_as_required(["workdir"])


def quantizable(resolution: int):
    """PFGM++ generate_quant.py's choice of tensors, on this library's leaf names."""
    full = f"{resolution}x{resolution}"

    def include(name: str) -> bool:
        return (
            name.endswith("kernel")
            and "norm" not in name
            and "affine" not in name
            and not name.startswith("map_")
            and full not in name
        )

    return include


def sample_workdir(
    workdir: str,
    config=None,
    *,
    num: int = 64,
    batch: int = 256,
    D=None,
    steps: int | None = None,
    alphas=(0.0,),
    bits=(0,),
    use_ema: bool = True,
    step: int | None = None,
    seed: int = 0,
    out: str | None = None,
    fid_ref: str | None = None,
    fid_weights: str | None = None,
) -> list[dict]:
    """Samples every (α, bits) combination; returns one row per combination (see module doc).

    With ``fid_ref`` each row also has ``fid``: the FID Inception's distance of the samples to
    those statistics (weights from ``fid_weights`` or ``$JAXSAFE_FID_INCEPTION``).
    """
    import jax
    import numpy as np

    from jaxsafe.data import images
    from jaxsafe.diffusion import image_model, quantize_params

    inception_fn = None
    if fid_ref:  # both files are checked before any sampling
        from jaxsafe.diffusion import fid
        from jaxsafe.nn import inception

        fid.load_stats(fid_ref)
        inception_fn = fid.feature_fn(inception.load(fid_weights))
    config = image_model.load_config(workdir, config)
    graphdef, params, frozen, ckpt_step = image_model.load_model(
        config, workdir, use_ema=use_ema, step=step
    )
    D = config.pfgmpp.D if D is None else D
    out = out or os.path.join(workdir, "samples")
    os.makedirs(out, exist_ok=True)
    fd = None
    if config.data.name == "digits":
        features, _, stats = image_model.digits_features(config.data.resolution)
        fd = lambda x: image_model.frechet_distance_to(stats, np.asarray(features(x)))
    rows = []
    # One compiled sampler for every setting: α is an argument (bits only change the values).
    sample = image_model.make_sample_fn(graphdef, config, D=D, num_steps=steps)
    for alpha, b in itertools.product(alphas, bits):
        alpha, b = float(alpha), int(b)
        if alpha < 0 or b < 0:
            raise ValueError(f"alpha and bits must be >= 0, got alpha={alpha}, bits={b}")
        p = quantize_params(params, b, include=quantizable(config.data.resolution)) if b else params
        sample_fn = functools.partial(sample, alpha=jax.numpy.float32(alpha)) if alpha else sample
        x, labels = image_model.generate(
            sample_fn,
            p,
            frozen,
            jax.random.key(seed),
            num,
            min(batch, num),
            image_model.num_classes(config),
        )
        name = os.path.join(out, f"samples_a{alpha:g}_b{b}")
        images.save_png(
            name + ".png", images.image_grid(x[:100]), scale=4 if x.shape[1] <= 32 else 1
        )
        np.savez(name + ".npz", images=images.to_uint8(x), labels=labels)
        row = dict(
            checkpoint_step=int(ckpt_step),
            D=float(D),
            steps=steps or config.sampler.num_steps,
            alpha=alpha,
            bits=b,
            ema=use_ema,
            num=num,
            png=name + ".png",
            npz=name + ".npz",
        )
        if fd is not None:
            row["fd"] = fd(x)
        if inception_fn is not None:
            row["fid"] = fid.fid(fid.features(inception_fn, x, min(batch, 64)), fid_ref)
        rows.append(row)
        print(
            " ".join(
                f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                for k, v in row.items()
                if k not in ("png", "npz")
            ),
            flush=True,
        )
    with open(os.path.join(out, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(rows, f, indent=2)
    return rows


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from jaxsafe.train.metrics import quiet_orbax

    quiet_orbax()
    from jaxsafe import host_memory

    cache.enable_from_flag()  # a rerun loads the Heun sampler instead of compiling it
    host_memory.retain()  # XLA's temporaries stay mapped between calls
    sample_workdir(
        _WORKDIR.value,
        _CONFIG.value,
        num=_NUM.value,
        batch=_BATCH.value,
        D=_D.value,
        steps=_STEPS.value,
        alphas=_ALPHA.value,
        bits=_BITS.value,
        use_ema=not _NO_EMA.value,
        step=_CKPT_STEP.value,
        seed=_SEED.value,
        out=_OUT.value,
        fid_ref=_FID_REF.value,
        fid_weights=_FID_WEIGHTS.value,
    )


if __name__ == "__main__":
    user_errors.run(main)

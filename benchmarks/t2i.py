r"""Text-to-image sampling throughput: one UNet denoising step and whole compiled t2i samples.

    python -m benchmarks.t2i --model=sd15 --batch=1 --steps=2          # SD 1.5 UNet, 64×64 latents
    python -m benchmarks.t2i --model=testbed                           # experiments/t2i_testbed.py
    python -m benchmarks.t2i --model=sd15 --decode                     # + SD VAE decode to 512×512

Random weights (throughput does not depend on them). Per model it prints:
* the UNet step: one jitted UNet call on the classifier-free-guidance batch 2B ([uncond; cond]),
  i.e. one denoising step; compile time, steps/s, XLA cost-analysis FLOPs, planned peak memory;
* the t2i sampler (`jaxsafe.diffusion.t2i.make_t2i_sampler`: seeds → noise → `lax.scan` over
  the N steps → optional decode, one program): compile time, samples/s, s/sample and planned
  peak memory. Cost analysis does not multiply a scan body by its trip count, so the sampler's
  achieved FLOP/s is N × (UNet step FLOPs) (+ decode FLOPs) per sample batch over its time;
* achieved FLOP/s against the measured f32 matmul peak of the host.
Text encoding is not timed (the sampler takes prompt embeddings). ``--reference`` times
diffusers' UNet2DConditionModel of the same config (``benchmarks/reference/unet.py``; the
``torch`` extra) in turn with jaxsafe's UNet step (A B A B) and prints the ratio (> 1: jaxsafe
faster).
"""

import importlib.util

from absl import app, flags

from benchmarks.common import random_model

_MODEL = flags.DEFINE_enum(
    "model", "both", ["sd15", "testbed", "both"], "Which UNet(s) to measure."
)
_BATCH = flags.DEFINE_integer(
    "batch", None, "Prompts per call (default: 1 for sd15, the config's for testbed)."
)
_STEPS = flags.DEFINE_integer(
    "steps", None, "Inference steps (default: 2 for sd15, the config's for testbed)."
)
_KIND = flags.DEFINE_enum("kind", None, ["ddim", "ddpm", "euler"], "Scheduler (default: ddim).")
_GUIDANCE = flags.DEFINE_float(
    "guidance", None, "CFG scale (default: 7.5 sd15, config's for testbed)."
)
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "UNet computation dtype.")
_DECODE = flags.DEFINE_bool(
    "decode",
    False,
    "sd15: decode the latents with the SD VAE (random weights); "
    "the test bed always decodes (a reshape).",
)
_REPS = flags.DEFINE_integer("reps", 3, "Timed calls of each program (after one warm-up call).")
_REFERENCE = flags.DEFINE_bool(
    "reference",
    False,
    "Also time diffusers' UNet step (PyTorch), in turn with jaxsafe's, and print the ratio.",
)
_TESTBED_CONFIG = flags.DEFINE_string(
    "testbed_config", "configs/t2i/testbed.py", "Test-bed config file."
)


def sd15(dtype):
    from flax import nnx

    from jaxsafe.diffusion.schedulers import SchedulerConfig
    from jaxsafe.nn.unet2d_condition import UNet2DConditionModel, sd15_unet_config

    cfg = sd15_unet_config()
    graphdef, params, n = random_model(
        lambda: UNet2DConditionModel(cfg, dtype=dtype, rngs=nnx.Rngs(0))
    )
    return {
        "name": "SD 1.5 UNet (64×64×4 latents, 512² images)",
        "config": cfg,
        "graphdef": graphdef,
        "params": params,
        "n_params": n,
        "scheduler": SchedulerConfig(),
        "latent_shape": (64, 64, 4),
        "context": (77, 768),
        "kind": "ddim",
        "steps": 2,
        "guidance": 7.5,
        "batch": 1,
    }


def testbed(dtype, path):
    """The test bed's UNet, scheduler, sampling settings and 4×4-unshuffle "VAE"
    (experiments/t2i_testbed.py), from its config file."""
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from experiments import t2i_testbed as tb
    from jaxsafe.nn.patch_pca import from_latent
    from jaxsafe.nn.unet2d_condition import UNet2DConditionModel

    spec = importlib.util.spec_from_file_location("testbed_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config("cpu")
    cfg = tb.unet_config(c)
    graphdef, params, n = random_model(
        lambda: UNet2DConditionModel(cfg, dtype=dtype, rngs=nnx.Rngs(0))
    )
    s = c.sampling
    p = c.latent.patch
    # The fixed patch-PCA decoder (a random basis here: the cost is the same).
    basis = jnp.asarray(
        np.random.default_rng(0).standard_normal((cfg.in_channels, 3 * p * p)), jnp.float32
    )
    return {
        "name": f"test-bed UNet ({path}:cpu, 8×8×{cfg.in_channels} patch-PCA latents of 32² "
        "images)",
        "config": cfg,
        "graphdef": graphdef,
        "params": params,
        "n_params": n,
        "scheduler": tb.scheduler_config(c),
        "latent_shape": (cfg.sample_size, cfg.sample_size, cfg.in_channels),
        "context": (c.data.max_length, c.text_encoder.hidden_size),
        "kind": s.kind,
        "steps": s.num_inference_steps,
        "guidance": s.guidance_scale,
        "batch": s.batch_size,
        "decode": lambda _, z: jnp.clip(from_latent(z @ basis, p), -1.0, 1.0),
    }


def sd_vae_decode(dtype):
    from flax import nnx

    from jaxsafe.diffusion.t2i import make_decode
    from jaxsafe.nn.autoencoder_kl import AutoencoderKL, AutoencoderKLConfig

    cfg = AutoencoderKLConfig()
    graphdef, params, _ = random_model(lambda: AutoencoderKL(cfg, dtype=dtype, rngs=nnx.Rngs(1)))
    decode = make_decode(lambda p, z: nnx.merge(graphdef, p["vae"]).decode(z), cfg.scaling_factor)
    return params, decode


def run(m, peak):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from benchmarks.common import compile_timed, fmt_bytes, memory_bytes, model_flops, time_calls
    from jaxsafe.diffusion.t2i import make_t2i_sampler

    b = _BATCH.value or m["batch"]
    n = _STEPS.value or m["steps"]
    kind = _KIND.value or m["kind"]
    guidance = m["guidance"] if _GUIDANCE.value is None else _GUIDANCE.value
    graphdef = m["graphdef"]
    params = {"unet": m["params"]}
    decode = m.get("decode")
    if _DECODE.value and m["latent_shape"] == (64, 64, 4):
        params["vae"], decode = sd_vae_decode(jnp.bfloat16 if _DTYPE.value == "bfloat16" else None)

    def unet_apply(p, x, t, emb):
        return nnx.merge(graphdef, p["unet"])(x, t, emb).astype(jnp.float32)

    rows = 2 * b if guidance != 1 else b
    x = jax.random.normal(jax.random.key(1), (rows, *m["latent_shape"]))
    t = jnp.full((rows,), 500, jnp.int32)
    cond = jax.random.normal(jax.random.key(2), (b, *m["context"]))
    emb = jnp.concatenate([cond, cond]) if rows == 2 * b else cond
    print(
        f"\n{m['name']}: {m['n_params'] / 1e6:.1f} M parameters, batch {b} prompts, {kind} "
        f"{n} steps, guidance {guidance}, {_DTYPE.value}" + (", + decode" if decode else "")
    )

    step, step_compile = compile_timed(jax.jit(unet_apply), params, x, t, emb)
    step_flops = model_flops(jax.jit(unet_apply).lower, params, x, t, emb)
    sec = time_calls(lambda: step(params, x, t, emb), _REPS.value)
    print(
        f"  UNet step (batch {rows}): compile {step_compile:6.2f} s  {1 / sec:8.3f} steps/s  "
        f"{sec * 1e3:9.1f} ms/step  {step_flops / 1e9:8.1f} GFLOP/step  "
        f"{step_flops / sec / 1e9:7.1f} GFLOP/s "
        f"({100 * step_flops / sec / peak:5.1f} % of matmul peak)  "
        f"peak memory {fmt_bytes(memory_bytes(step))}"
    )

    if _REFERENCE.value:
        import numpy as np

        from benchmarks.common import alternate
        from benchmarks.reference import torch_threads
        from benchmarks.reference.unet import make_forward

        ref, _ = make_forward(m["config"], rows, m["latent_shape"], m["context"])
        print(f"  PyTorch reference: diffusers UNet2DConditionModel, {torch_threads()} threads")
        sec = alternate(
            {
                "jaxsafe": (lambda: step(params, x, t, emb), _REPS.value),
                "diffusers": (ref, _REPS.value),
            },
            rounds=3,
        )
        a, r = float(np.median(sec["jaxsafe"])), float(np.median(sec["diffusers"]))
        print(
            f"  UNet step, timed in turn: jaxsafe {a * 1e3:9.1f} ms  diffusers {r * 1e3:9.1f} ms  "
            f"{r / a:5.2f}x the reference"
        )

    decode_flops = 0.0
    if _DECODE.value and decode is not None:
        lat = jax.random.normal(jax.random.key(3), (b, *m["latent_shape"]))
        dec, dec_compile = compile_timed(jax.jit(decode), params, lat)
        decode_flops = model_flops(jax.jit(decode).lower, params, lat)
        dsec = time_calls(lambda: dec(params, lat), _REPS.value)
        print(
            f"  decode (batch {b}): compile {dec_compile:6.2f} s  {dsec:8.2f} s/call  "
            f"{decode_flops / 1e9:8.1f} GFLOP  {decode_flops / dsec / 1e9:7.1f} GFLOP/s  "
            f"peak memory {fmt_bytes(memory_bytes(dec))}"
        )

    sampler = make_t2i_sampler(
        unet_apply,
        m["scheduler"],
        kind=kind,
        num_inference_steps=n,
        guidance_scale=guidance,
        latent_shape=m["latent_shape"],
        decode=decode,
    )
    uncond = jnp.zeros((1, *m["context"]))
    seeds = jnp.arange(b, dtype=jnp.int32)
    compiled, t2i_compile = compile_timed(sampler, params, cond, uncond, seeds)
    sec = time_calls(lambda: compiled(params, cond, uncond, seeds), _REPS.value)
    flops = n * step_flops + decode_flops
    print(
        f"  t2i sampler ({n} steps, one program): compile {t2i_compile:6.2f} s  "
        f"{b / sec:8.4f} samples/s  "
        f"{sec / b:8.2f} s/sample  {n / sec:7.3f} steps/s  {flops / sec / 1e9:7.1f} GFLOP/s "
        f"({100 * flops / sec / peak:5.1f} % of matmul peak)  "
        f"peak memory {fmt_bytes(memory_bytes(compiled))}"
    )


def main(argv):
    del argv
    import jax.numpy as jnp

    from benchmarks.common import machine, matmul_peak_flops

    dtype = jnp.bfloat16 if _DTYPE.value == "bfloat16" else None
    peak = matmul_peak_flops()
    print(f"machine: {machine()}")
    print(f"measured f32 matmul peak: {peak / 1e9:.1f} GFLOP/s")
    if _MODEL.value in ("testbed", "both"):
        run(testbed(dtype, _TESTBED_CONFIG.value), peak)
    if _MODEL.value in ("sd15", "both"):
        run(sd15(dtype), peak)


if __name__ == "__main__":
    app.run(main)

r"""Training and sampling throughput of the PFGM++ / EDM SongUNet (DDPM++ CIFAR-10 by default).

    python -m benchmarks.diffusion [--config=configs/pfgmpp/cifar10_d128.py] [--variant=paper] \
        [--batch_sizes=4,8] [--sample_batch=4] [--steps=3] [--k=1,8] [--lowering=auto] \
        [--augment=0.12] [--reference]

Training: one full optimizer step of the experiment (PFGM++ loss, Adam with warm-up,
nan_to_num, EMA update), jitted by the trainer's `compile_train_step`, on a synthetic batch of
the config's image shape, with EDM's augmentation at probability ``--augment`` (default 0, as
the PyTorch reference arm, which has no augmentation pipeline); per batch size and steps per
call K (lowered as the trainer lowers them, ``--lowering``; the K's timed in turn) it prints
compile time, images/s, XLA's planned peak memory and the achieved FLOP/s (cost analysis of the
step × steps/s) against the measured f32 matmul peak. Sampling: the 18-step Heun sampler from
the PFGM++ prior, jitted whole; its FLOPs are one denoiser call's × (2N − 1), as XLA's cost
analysis counts a `fori_loop` body once. ``--reference`` times the authors' step and sampler
written in PyTorch (``benchmarks/reference/diffusion.py``: EDM's DDPM++ SongUNet and
EDMPrecond, the PFGM++ perturbation, Adam, ``nan_to_num``, EMA; EDM's Heun sampler) in turn
with jaxsafe's (A B A B) and prints the ratio (> 1: jaxsafe faster).
"""

import importlib.util

from absl import app, flags

_CONFIG = flags.DEFINE_string("config", "configs/pfgmpp/cifar10_d128.py", "PFGM++ config file.")
_VARIANT = flags.DEFINE_string("variant", "paper", "Config argument (paper / cpu / smoke).")
_BATCHES = flags.DEFINE_list("batch_sizes", ["4", "8"], "Training batch sizes.")
_SAMPLE_BATCH = flags.DEFINE_integer("sample_batch", 4, "Sampling batch size (0 = skip).")
_STEPS = flags.DEFINE_integer("steps", 3, "Timed steps per measurement (after one warm-up).")
_K = flags.DEFINE_list("k", ["1"], "Training steps per compiled call, one row each.")
_LOWERING = flags.DEFINE_enum(
    "lowering",
    "auto",
    ["auto", "scan", "loop"],
    "How K > 1 steps run (jaxsafe.train.loop.lowering).",
)
_AUGMENT = flags.DEFINE_float(
    "augment",
    0.0,
    "EDM's augmentation probability in the step (0: off, as in the PyTorch reference arm).",
)
_REFERENCE = flags.DEFINE_bool(
    "reference",
    False,
    "Also time the authors' training step and Heun "
    "sampler in PyTorch (benchmarks/reference/diffusion.py) in turn "
    "with jaxsafe's, and print the ratio.",
)


def load_config(path, arg):
    spec = importlib.util.spec_from_file_location("bench_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def main(argv):
    del argv
    import time

    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from benchmarks.common import (
        alternate,
        fmt_bytes,
        k_step_arms,
        machine,
        matmul_peak_flops,
        memory_bytes,
        model_flops,
        time_calls,
    )
    from experiments import pfgmpp
    from jaxsafe import parallel, train
    from jaxsafe.diffusion import image_model

    config = load_config(_CONFIG.value, _VARIANT.value)
    if _REFERENCE.value and _AUGMENT.value:
        raise app.UsageError("--reference times the step without augmentation: --augment=0")
    with config.unlocked():
        config.augment.p = _AUGMENT.value
    mesh = parallel.make_mesh()
    peak = matmul_peak_flops()
    model = image_model.build_model(config)
    graphdef, params, frozen = train.split_model(model)
    shape = image_model.image_shape(config.data)
    n_params = sum(x.size for x in jax.tree.leaves(params))
    print(f"machine: {machine()}")
    print(
        f"config: {_CONFIG.value}:{_VARIANT.value}  image {shape}  D={config.pfgmpp.D}  "
        f"augment p={config.augment.p}  params {n_params:,}"
    )
    print(f"measured f32 matmul peak: {peak / 1e9:.1f} GFLOP/s")

    kwargs = image_model.songunet_kwargs(config)
    d = float("inf") if image_model.augmentation_dim(config.pfgmpp.D) is None else config.pfgmpp.D
    if _REFERENCE.value:
        from benchmarks.reference import diffusion as reference
        from benchmarks.reference import torch_threads

        threads = torch_threads()
    for b in map(int, _BATCHES.value):
        with config.unlocked():
            config.train.batch_size = b
        batch = {"image": jax.random.uniform(jax.random.key(1), (b,) + shape, minval=-1, maxval=1)}
        if config.data.cond:
            batch["label"] = jnp.zeros((b,), jnp.int32)
        # The step donates its state: give it copies, keep `params` / `frozen` for the sampler.
        p, f = jax.tree.map(jnp.copy, params), jax.tree.map(jnp.copy, frozen)
        task = train.Task(
            graphdef=graphdef,
            params=p,
            frozen=f,
            optimizer=pfgmpp.make_optimizer(config.optimizer, b),
            loss_fn=pfgmpp.make_loss_fn(graphdef, config),
            train_data=batch,
            extra={"ema": jax.tree.map(jnp.copy, p)},
            after_update=pfgmpp.make_after_update(config),
        )
        initial = train.place_state(train.init_state(p, f, task.optimizer, task.extra), mesh)
        placed = parallel.global_batch(batch, mesh)
        arms, rows, flops = k_step_arms(
            task,
            initial,
            lambda k: placed,
            mesh,
            list(map(int, _K.value)),
            _LOWERING.value,
            _STEPS.value,
        )
        if _REFERENCE.value:
            arms["torch"] = (
                reference.make_train_step(
                    kwargs,
                    b,
                    shape,
                    D=d,
                    P_mean=config.pfgmpp.P_mean,
                    P_std=config.pfgmpp.P_std,
                    sigma_data=config.pfgmpp.sigma_data,
                    lr=config.optimizer.lr,
                    lr_rampup_kimg=config.optimizer.lr_rampup_kimg,
                    ema_halflife_kimg=config.ema.halflife_kimg,
                    ema_rampup_ratio=config.ema.rampup_ratio,
                )[0],
                _STEPS.value,
            )
        seconds = alternate(arms, rounds=1 if len(arms) == 1 else 3)
        ref = float(np.median(seconds.pop("torch"))) if _REFERENCE.value else None
        for k, (compile_s, memory) in rows.items():
            sec = float(np.median(seconds[k])) / k  # per step
            print(
                f"train  batch {b:4d}  K={k:<2d} compile {compile_s:6.1f} s  "
                f"{b / sec:8.2f} images/s  {sec:7.3f} s/step  {flops / sec / 1e9:7.2f} GFLOP/s "
                f"({100 * flops / sec / peak:5.1f} % of matmul peak)  peak memory {memory}"
                + (f"  {ref / sec:5.2f}x the reference" if ref else "")
            )
        if ref:
            print(
                f"train  batch {b:4d}  PyTorch reference ({threads} threads): "
                f"{b / ref:8.2f} images/s  {ref:7.3f} s/step"
            )

    n = _SAMPLE_BATCH.value
    if n:
        labels = jnp.zeros((n,), jnp.int32)
        sample = image_model.make_sample_fn(graphdef, config)
        t0 = time.perf_counter()
        compiled = sample.lower(params, frozen, jax.random.key(0), labels).compile()
        compile_s = time.perf_counter() - t0
        sec = time_calls(lambda: compiled(params, frozen, jax.random.key(0), labels), _STEPS.value)

        def denoise(params, x, sigma):
            net = nnx.merge(graphdef, params, frozen)
            net.eval()
            y = image_model.one_hot(labels, config)
            return image_model.make_denoiser(net, config.pfgmpp.sigma_data)(x, sigma, y)

        x0, s0 = jnp.zeros((n,) + shape), jnp.ones((n,))
        one = jax.jit(denoise).lower(params, x0, s0).compile()
        nfe = 2 * config.sampler.num_steps - 1
        flops = model_flops(jax.jit(denoise).lower, params, x0, s0) * nfe
        print(
            f"sample batch {n:4d}  {config.sampler.num_steps} Heun steps (NFE {nfe})  compile "
            f"{compile_s:6.1f} s  {n / sec:8.3f} images/s  {sec:7.2f} s/batch  "
            f"{flops / sec / 1e9:7.2f} GFLOP/s ({100 * flops / sec / peak:5.1f} % of matmul peak)  "
            f"peak memory {fmt_bytes(memory_bytes(compiled))}"
        )
        # The sampler runs its steps in a fori_loop; compare with NFE standalone denoiser calls.
        one_s = time_calls(lambda: one(params, x0, s0), _STEPS.value)
        print(
            f"  one denoiser call outside the loop: {one_s:.3f} s; x NFE = {one_s * nfe:.2f} s "
            f"vs {sec:.2f} s for the sampler"
        )
        if _REFERENCE.value:
            net = reference.song_unet(**kwargs)
            theirs = reference.make_sampler(
                net,
                n,
                shape,
                D=d,
                sigma_data=config.pfgmpp.sigma_data,
                num_steps=config.sampler.num_steps,
                sigma_min=config.sampler.sigma_min,
                sigma_max=config.sampler.sigma_max,
                rho=config.sampler.rho,
            )
            seconds = alternate(
                {
                    "jaxsafe": (lambda: compiled(params, frozen, jax.random.key(0), labels), 1),
                    "torch": (theirs, 1),
                },
                rounds=3,
            )
            a, r = (float(np.median(seconds[arm])) for arm in ("jaxsafe", "torch"))
            print(
                f"  sampler timed in turn: jaxsafe {n / a:.3f} images/s  PyTorch ({threads} "
                f"threads) {n / r:.3f} images/s  {r / a:5.2f}x the reference"
            )


if __name__ == "__main__":
    app.run(main)

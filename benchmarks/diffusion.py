r"""Training and sampling throughput of the PFGM++ / EDM SongUNet (DDPM++ CIFAR-10 by default).

    python -m benchmarks.diffusion [--config=configs/pfgmpp/cifar10_d128.py] [--variant=paper] \
        [--batch_sizes=4,8] [--sample_batch=4] [--steps=3] [--k=1,8] [--lowering=auto]

Training: one full optimizer step of the experiment (PFGM++ loss, Adam with warm-up, nan_to_num,
EMA update), jitted by the trainer's `compile_train_step`, on a synthetic batch of the config's
image shape; per batch size and steps per call K (lowered as the trainer lowers them,
``--lowering``; the K's timed in turn) it prints compile time, images/s, XLA's planned peak
memory and the achieved FLOP/s (cost analysis of the step × steps/s) against the measured f32
matmul peak.
Sampling: the 18-step Heun sampler (35 network evaluations) from the PFGM++ prior, jitted whole;
its FLOPs are those of one denoiser call × (2N − 1), because XLA's cost analysis counts a
`fori_loop` body once.
"""

import importlib.util

from absl import app, flags

_CONFIG = flags.DEFINE_string("config", "configs/pfgmpp/cifar10_d128.py", "PFGM++ config file.")
_VARIANT = flags.DEFINE_string("variant", "paper", "Config argument (paper / cpu / smoke).")
_BATCHES = flags.DEFINE_list("batch_sizes", ["4", "8"], "Training batch sizes.")
_SAMPLE_BATCH = flags.DEFINE_integer("sample_batch", 4, "Sampling batch size (0 = skip).")
_STEPS = flags.DEFINE_integer("steps", 3, "Timed steps per measurement (after one warm-up).")
_K = flags.DEFINE_list("k", ["1"], "Training steps per compiled call, one row each.")
_LOWERING = flags.DEFINE_enum("lowering", "auto", ["auto", "scan", "loop"],
                              "How K > 1 steps run (jaxsafe.train.loop.lowering).")


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
    from flax import nnx

    import numpy as np

    from benchmarks.common import (
        alternate,
        cost_flops,
        fmt_bytes,
        machine,
        matmul_peak_flops,
        memory_bytes,
        time_calls,
    )
    from experiments import pfgmpp
    from jaxsafe import parallel, train
    from jaxsafe.diffusion import image_model

    config = load_config(_CONFIG.value, _VARIANT.value)
    mesh = parallel.make_mesh()
    peak = matmul_peak_flops()
    model = image_model.build_model(config)
    graphdef, params, frozen = train.split_model(model)
    shape = image_model.image_shape(config.data)
    n_params = sum(x.size for x in jax.tree.leaves(params))
    print(f"machine: {machine()}")
    print(f"config: {_CONFIG.value}:{_VARIANT.value}  image {shape}  D={config.pfgmpp.D}  "
          f"params {n_params:,}")
    print(f"measured f32 matmul peak: {peak / 1e9:.1f} GFLOP/s")

    for b in map(int, _BATCHES.value):
        with config.unlocked():
            config.train.batch_size = b
        batch = {"image": jax.random.uniform(jax.random.key(1), (b,) + shape, minval=-1, maxval=1)}
        if config.data.cond:
            batch["label"] = jnp.zeros((b,), jnp.int32)
        # The step donates its state: give it copies, keep `params` / `frozen` for the sampler.
        p, f = jax.tree.map(jnp.copy, params), jax.tree.map(jnp.copy, frozen)
        task = train.Task(graphdef=graphdef, params=p, frozen=f,
                          optimizer=pfgmpp.make_optimizer(config.optimizer, b),
                          loss_fn=pfgmpp.make_loss_fn(graphdef, config), train_data=batch,
                          extra={"ema": jax.tree.map(jnp.copy, p)},
                          after_update=pfgmpp.make_after_update(config))
        initial = train.place_state(train.init_state(p, f, task.optimizer, task.extra), mesh)
        placed = parallel.global_batch(batch, mesh)
        arms, rows, flops = {}, {}, None
        for k in map(int, _K.value):
            state = jax.tree.map(lambda x: x.copy(), initial)  # each K's calls donate theirs
            compiled, _, compile_s = train.compile_train_step(task, state, placed, mesh, k, True,
                                                              _LOWERING.value)
            if flops is None:  # cost analysis: the partitioned (per-device) one-step program
                one = compiled if k == 1 else train.compile_train_step(
                    task, jax.tree.map(lambda x: x.copy(), initial), placed, mesh, 1, True)[0]
                flops = cost_flops(one) * mesh.size
            box = [state]

            def call(box=box, compiled=compiled, placed=placed):
                box[0], metrics = compiled(box[0], placed)
                return metrics

            arms[k] = (call, max(1, _STEPS.value // k))
            rows[k] = (compile_s, fmt_bytes(memory_bytes(compiled)))
        seconds = alternate(arms, rounds=1 if len(arms) == 1 else 3)
        for k, (compile_s, memory) in rows.items():
            sec = float(np.median(seconds[k])) / k  # per step
            print(f"train  batch {b:4d}  K={k:<2d} compile {compile_s:6.1f} s  "
                  f"{b / sec:8.2f} images/s  {sec:7.3f} s/step  {flops / sec / 1e9:7.2f} GFLOP/s "
                  f"({100 * flops / sec / peak:5.1f} % of matmul peak)  peak memory {memory}")

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
        flops = cost_flops(one) * nfe
        print(f"sample batch {n:4d}  {config.sampler.num_steps} Heun steps (NFE {nfe})  compile "
              f"{compile_s:6.1f} s  {n / sec:8.3f} images/s  {sec:7.2f} s/batch  "
              f"{flops / sec / 1e9:7.2f} GFLOP/s ({100 * flops / sec / peak:5.1f} % of matmul peak)  "
              f"peak memory {fmt_bytes(memory_bytes(compiled))}")
        # The sampler runs its steps in a fori_loop; compare with NFE standalone denoiser calls.
        one_s = time_calls(lambda: one(params, x0, s0), _STEPS.value)
        print(f"  one denoiser call outside the loop: {one_s:.3f} s; x NFE = {one_s * nfe:.2f} s "
              f"vs {sec:.2f} s for the sampler")


if __name__ == "__main__":
    app.run(main)

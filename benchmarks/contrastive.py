r"""Training throughput of SimCLR pre-training with and without DBPM (experiments/dbpm.py).

    python -m benchmarks.contrastive [--config=configs/dbpm/har.py:cpu] \
        [--data=synthetic:7352,128,9,6] [--k=1,8] [--lowering=auto|scan|loop] [--reference]
    XLA_FLAGS=--xla_force_host_platform_device_count=8 \
        python -m benchmarks.contrastive --mesh_data=8

For each arm (`simclr`: dbpm.enabled=False; `simclr+dbpm`: DBPM acting from the first epoch, so
its statistics, flags and weights are computed every step) and each steps-per-call K (lowered
as the trainer lowers it, ``--lowering``) prints: compile time, steps/s and samples/s, achieved
FLOP/s (XLA cost analysis of a one-step program × steps/s, summed over devices) against the
measured f32 matmul peak, and XLA's planned peak memory per device. `--data=synthetic:N,T,C,K`
replaces the config's data by N random series of T steps and C channels in K classes (the
default has UCI-HAR's shapes: no download, a paper-sized memory); `--data=config` uses the
config's own. ``--reference`` adds the authors' SimCLR step in PyTorch
(``benchmarks/reference/contrastive.py``; the ``torch`` extra), timed in turn with the jaxsafe
arms, and prints each arm's ratio to it (> 1: jaxsafe faster).
"""

from absl import app, flags

_CONFIG = flags.DEFINE_string("config", "configs/dbpm/har.py:cpu", "DBPM config file[:variant].")
_DATA = flags.DEFINE_string("data", "synthetic:7352,128,9,6", "synthetic:N,T,C,K or 'config'.")
_K = flags.DEFINE_list("k", ["1", "8"], "Steps per compiled call, one row each.")
_LOWERING = flags.DEFINE_enum(
    "lowering",
    "auto",
    ["auto", "scan", "loop"],
    "How K > 1 steps run (jaxsafe.train.loop.lowering).",
)
_CALLS = flags.DEFINE_integer("calls", 5, "Timed calls per round at K = 4 (scaled by 4 / K).")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Rounds of the arms timed in turn (A B A B).")
_REFERENCE = flags.DEFINE_bool("reference", False, "Also time DBPM's SimCLR step in PyTorch.")
_BATCH = flags.DEFINE_integer("batch_size", 0, "Override the config's batch size (0: keep).")
_MESH_DATA = flags.DEFINE_integer("mesh_data", 1, "Size of the mesh's data axis.")
_MESH_FSDP = flags.DEFINE_integer("mesh_fsdp", 1, "Size of the mesh's fsdp axis.")


def synthetic(spec):
    import numpy as np

    from jaxsafe.data import timeseries as ts

    n, t, c, k = (int(v) for v in spec.split(":", 1)[1].split(","))
    rng = np.random.default_rng(0)

    def split(m):
        return {
            "x": rng.normal(size=(m, t, c)).astype(np.float32),
            "y": rng.integers(0, k, m).astype(np.int32),
        }

    return ts.TimeSeriesData(split(n), split(max(k, n // 4)), tuple(map(str, range(k))))


def main(argv):
    del argv
    import jax
    import numpy as np

    from benchmarks.common import (
        alternate,
        fmt_bytes,
        load_config,
        machine,
        matmul_peak_flops,
        memory_bytes,
        model_flops,
        stacked_batch,
    )
    from experiments import dbpm
    from jaxsafe import parallel, train

    if _DATA.value.startswith("synthetic:"):
        data = synthetic(_DATA.value)
        dbpm.load_data = lambda cfg: data  # the benchmark's stand-in for the configured set
    elif _DATA.value != "config":
        raise app.UsageError(f"--data={_DATA.value!r}; expected synthetic:N,T,C,K or config")
    mesh = parallel.make_mesh(_MESH_DATA.value, _MESH_FSDP.value)
    peak = matmul_peak_flops()
    print(f"machine: {machine()}")
    print(
        f"config: {_CONFIG.value}  data: {_DATA.value}  mesh: {dict(mesh.shape)}  "
        f"lowering: {_LOWERING.value}"
    )
    print(f"measured f32 matmul peak: {peak / 1e9:.1f} GFLOP/s")
    rows, arms = {}, {}
    for arm, enabled in (("simclr", False), ("simclr+dbpm", True)):
        config = load_config(_CONFIG.value)
        with config.unlocked():
            config.dbpm.enabled, config.dbpm.warmup = enabled, 0
            if _BATCH.value:
                config.train.batch_size = _BATCH.value
        config = dbpm.resolve(config)
        task = dbpm.build(config, mesh)
        n = task.extra["memory"]["recorded"].shape[1]
        tc = config.train
        flops = None
        initial = train.place_state(
            train.init_state(task.params, task.frozen, task.optimizer, task.extra, tc.seed),
            mesh,
            task.sharding_rules,
            tc.fsdp_min_size,
        )
        for k in map(int, _K.value):
            state = jax.tree.map(lambda x: x.copy(), initial)  # each K's calls donate theirs
            batch = stacked_batch(task.train_data, k, mesh)
            compiled, _, compile_s = train.compile_train_step(
                task, state, batch, mesh, k, False, _LOWERING.value
            )
            if flops is None:
                one = stacked_batch(task.train_data, 1, mesh)
                flops = model_flops(train.lower_train_step, task, initial, one, mesh)
            box = [state]

            def call(compiled=compiled, batch=batch, box=box):
                box[0], metrics = compiled(box[0], batch)
                return metrics

            arms[arm, k] = (call, max(1, _CALLS.value * 4 // k))
            rows[arm, k] = (
                f"N={n} B={config.train.batch_size}",
                config.train.batch_size,
                flops,
                compile_s,
                fmt_bytes(memory_bytes(compiled)),
            )
    if _REFERENCE.value:
        from benchmarks.reference import contrastive as reference
        from benchmarks.reference import torch_threads

        x = task.train_data[0]["x"]
        print(f"PyTorch reference: {reference.__name__}, {torch_threads()} threads")
        arms["torch", 1] = (
            reference.make_step(
                config, x.shape[0] * jax.process_count(), x.shape[1], x.shape[2], dbpm.MODELS
            )[0],
            _CALLS.value,
        )
        rows["torch", 1] = (
            f"N=-    B={config.train.batch_size}",
            config.train.batch_size,
            flops,
            0.0,
            "n/a",
        )
    seconds = alternate(arms, _ROUNDS.value)
    steps_s = {key: key[1] / np.median(v) for key, v in seconds.items()}
    for (arm, k), (label, b, flops, compile_s, memory) in rows.items():
        spread = [key[1] / s for key in [(arm, k)] for s in seconds[arm, k]]
        achieved = flops * steps_s[arm, k]
        print(
            f"{arm:12s} K={k:<2d} {label}  compile {compile_s:6.2f} s  "
            f"{steps_s[arm, k]:7.3f} steps/s (rounds {min(spread):.3f}-{max(spread):.3f})  "
            f"{steps_s[arm, k] * b:8.1f} samples/s  {achieved / 1e9:7.2f} GFLOP/s "
            f"({100 * achieved / peak:5.1f} % of matmul peak)  peak memory {memory}"
            + (
                f"  {steps_s[arm, k] / steps_s['torch', 1]:5.2f}x the reference"
                if ("torch", 1) in steps_s and arm != "torch"
                else ""
            )
        )
    steps_s.pop(("torch", 1), None)
    for k in map(int, _K.value):
        overhead = steps_s["simclr", k] / steps_s["simclr+dbpm", k] - 1
        print(f"DBPM overhead at K={k}: {100 * overhead:+.1f} % time per step")
    base = min(map(int, _K.value))
    for (arm, k), v in steps_s.items():
        if k != base:
            print(f"{arm} K={k} against K={base}: {v / steps_s[arm, base]:.3f}x steps/s")


if __name__ == "__main__":
    app.run(main)

r"""Training throughput of SimCLR pre-training with and without DBPM (experiments/dbpm.py).

    python -m benchmarks.contrastive [--config=configs/dbpm/har.py:cpu] \
        [--data=synthetic:7352,128,9,6] [--k=1,8] [--lowering=auto|scan|loop]
    XLA_FLAGS=--xla_force_host_platform_device_count=8 \
        python -m benchmarks.contrastive --mesh_data=8

For each arm (`simclr`: dbpm.enabled=False; `simclr+dbpm`: DBPM acting from the first epoch,
warm-up 0, so its statistics, flags and Gaussian weights are computed every step) and each
steps-per-call K (lowered as the trainer lowers it, ``--lowering``) prints: compile time,
steps/s and samples/s, achieved FLOP/s (XLA cost analysis of one step x steps/s, summed over
devices) against the measured f32 matmul peak, and XLA's planned peak memory per device. DBPM's
own work is a few reductions over the (epochs x N) memory per step, so the two arms should run
at the same speed.

`--data=synthetic:N,T,C,K` replaces the config's data set by N random series of T steps and C
channels in K classes (the default has UCI-HAR's shapes), so the benchmark needs no download and
DBPM's memory has a paper-sized N. `--data=config` uses the config's own data set.
Cost analysis does not multiply a `lax.scan` body by its trip count, so FLOPs per step come from
a one-step program.
"""


from absl import app, flags

_CONFIG = flags.DEFINE_string("config", "configs/dbpm/har.py:cpu", "DBPM config file[:variant].")
_DATA = flags.DEFINE_string("data", "synthetic:7352,128,9,6", "synthetic:N,T,C,K or 'config'.")
_K = flags.DEFINE_list("k", ["1", "8"], "Steps per compiled call, one row each.")
_LOWERING = flags.DEFINE_enum("lowering", "auto", ["auto", "scan", "loop"],
                              "How K > 1 steps run (jaxsafe.train.loop.lowering).")
_CALLS = flags.DEFINE_integer("calls", 5, "Timed calls per arm at K = 4 (scaled by 4 / K).")
_BATCH = flags.DEFINE_integer("batch_size", 0, "Override the config's batch size (0: keep).")
_MESH_DATA = flags.DEFINE_integer("mesh_data", 1, "Size of the mesh's data axis.")
_MESH_FSDP = flags.DEFINE_integer("mesh_fsdp", 1, "Size of the mesh's fsdp axis.")


def synthetic(spec):
    import numpy as np

    from jaxsafe.data import timeseries as ts

    n, t, c, k = (int(v) for v in spec.split(":", 1)[1].split(","))
    rng = np.random.default_rng(0)

    def split(m):
        return {"x": rng.normal(size=(m, t, c)).astype(np.float32),
                "y": rng.integers(0, k, m).astype(np.int32)}

    return ts.TimeSeriesData(split(n), split(max(k, n // 4)), tuple(map(str, range(k))))


def stacked_batch(data, k: int, mesh):
    """The first ``k`` batches of ``data`` on the mesh as the trainer feeds a ``k``-step call:
    one batch as it is for K = 1, else stacked on a leading axis of ``k``."""
    import jax
    import numpy as np

    from jaxsafe import parallel

    if k == 1:
        return parallel.global_batch(data[0], mesh)
    host = jax.tree.map(lambda *xs: np.stack(xs), *[data[s] for s in range(k)])
    return parallel.global_batch(host, mesh, leading=1)


def main(argv):
    del argv
    from benchmarks.common import (cost_flops, fmt_bytes, load_config, machine, matmul_peak_flops,
                                   memory_bytes, time_calls)
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
    print(f"config: {_CONFIG.value}  data: {_DATA.value}  mesh: {dict(mesh.shape)}  "
          f"lowering: {_LOWERING.value}")
    print(f"measured f32 matmul peak: {peak / 1e9:.1f} GFLOP/s")
    results = {}
    for arm, enabled in (("simclr", False), ("simclr+dbpm", True)):
        config = load_config(_CONFIG.value)
        with config.unlocked():
            config.dbpm.enabled, config.dbpm.warmup = enabled, 0
            if _BATCH.value:
                config.batch_size = _BATCH.value
        task = dbpm.build(config, mesh)
        n = task.extra["memory"]["recorded"].shape[1]
        tc = config.train
        flops = None
        for k in map(int, _K.value):
            state = train.place_state(train.init_state(task.params, task.frozen, task.optimizer,
                                                       task.extra, tc.seed), mesh,
                                      task.sharding_rules, tc.fsdp_min_size)
            batch = stacked_batch(task.train_data, k, mesh)
            if flops is None:  # cost analysis is of the partitioned (per-device) program
                one = stacked_batch(task.train_data, 1, mesh)
                flops = cost_flops(train.compile_train_step(task, state, one, mesh, 1,
                                                            False)[0]) * mesh.size
            compiled, _, compile_s = train.compile_train_step(task, state, batch, mesh, k, False,
                                                              _LOWERING.value)
            box = [state]

            def call():
                box[0], metrics = compiled(box[0], batch)
                return metrics

            sec = time_calls(call, max(2, _CALLS.value * 4 // k))
            steps_s = k / sec
            results[arm, k] = steps_s
            achieved = flops * steps_s
            print(f"{arm:12s} K={k:<2d} N={n} B={config.batch_size}  "
                  f"compile {compile_s:6.2f} s  {steps_s:7.3f} steps/s  "
                  f"{steps_s * config.batch_size:8.1f} samples/s  {achieved / 1e9:7.2f} GFLOP/s "
                  f"({100 * achieved / peak:5.1f} % of matmul peak)  "
                  f"peak memory {fmt_bytes(memory_bytes(compiled))}", flush=True)
    for k in map(int, _K.value):
        overhead = results["simclr", k] / results["simclr+dbpm", k] - 1
        print(f"DBPM overhead at K={k}: {100 * overhead:+.1f} % time per step")


if __name__ == "__main__":
    app.run(main)

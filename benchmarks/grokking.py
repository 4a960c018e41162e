r"""Full-batch training throughput of the grokking MLP (addition mod 113, 40 % train data).

    python -m benchmarks.grokking [--config=configs/grokking/perp_adamw.py] [--k=1,10,100] \
        [--reference]
    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m benchmarks.grokking --mesh_data=8

Prints, per steps-per-call K: compile time, steps/s, achieved FLOP/s (XLA cost analysis of one
step × steps/s, summed over devices) against the measured f32 matmul peak of the host, and
XLA's planned peak memory per device.
Cost analysis does not multiply a `lax.scan` body by its trip count, so FLOPs per step come
from the K = 1 program. ``--reference`` adds the authors' step in PyTorch
(``benchmarks/reference/grokking.py``; the ``torch`` extra), timed in turn with every K (A B A B,
``--rounds`` rounds), and prints each K's ratio to it (> 1: jaxsafe faster).
"""

from absl import app, flags

_CONFIG = flags.DEFINE_string("config", "configs/grokking/perp_adamw.py", "Grokking config file.")
_K = flags.DEFINE_list("k", ["1", "10", "100"], "Steps per compiled call.")
_STEPS = flags.DEFINE_integer("steps", 400, "Steps timed per K.")
_REFERENCE = flags.DEFINE_bool("reference", False, "Also time the PyTorch reference step.")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Rounds of the arms timed in turn.")
_MESH_DATA = flags.DEFINE_integer("mesh_data", 1, "Size of the mesh's data axis.")
_MESH_FSDP = flags.DEFINE_integer("mesh_fsdp", 1, "Size of the mesh's fsdp axis.")


def main(argv):
    del argv
    import numpy as np

    from benchmarks.common import (
        alternate,
        fmt_bytes,
        load_config,
        machine,
        matmul_peak_flops,
        memory_bytes,
        model_flops,
    )
    from experiments import grokking
    from jaxsafe import parallel, train

    config = load_config(_CONFIG.value)
    mesh = parallel.make_mesh(_MESH_DATA.value, _MESH_FSDP.value)
    peak = matmul_peak_flops()
    print(f"machine: {machine()}")
    print(
        f"config: {_CONFIG.value}  mesh: {dict(mesh.shape)}  train examples: "
        f"{len(grokking.load_data(config.data)['train']['y'])}"
    )
    print(f"measured f32 matmul peak: {peak / 1e9:.1f} GFLOP/s")
    flops_per_step, arms, rows = None, {}, {}
    for k in map(int, _K.value):
        task = grokking.build(config, mesh)
        tc = config.train
        state = train.place_state(
            train.init_state(task.params, task.frozen, task.optimizer, task.extra, tc.seed),
            mesh,
            task.sharding_rules,
            tc.fsdp_min_size,
        )
        batch = parallel.global_batch(task.train_data, mesh)
        compiled, _, compile_s = train.compile_train_step(task, state, batch, mesh, k, True)
        if k == 1:
            flops_per_step = model_flops(train.lower_train_step, task, state, batch, mesh, 1, True)
        box = [state]

        def call(compiled=compiled, batch=batch, box=box):
            box[0], metrics = compiled(box[0], batch)
            return metrics

        arms[f"K={k}"] = (call, max(2, _STEPS.value // k))
        rows[f"K={k}"] = (k, compile_s, fmt_bytes(memory_bytes(compiled)))
    if _REFERENCE.value:
        from benchmarks.reference import grokking as reference
        from benchmarks.reference import torch_threads

        print(f"PyTorch reference: {reference.__name__}, {torch_threads()} threads")
        arms["torch"] = (
            reference.make_step(config, grokking.load_data(config.data))[0],
            _STEPS.value,
        )
        rows["torch"] = (1, 0.0, "n/a")
    seconds = alternate(arms, _ROUNDS.value)
    steps_s = {name: rows[name][0] / float(np.median(v)) for name, v in seconds.items()}
    for name, (k, compile_s, memory) in rows.items():
        achieved = flops_per_step * steps_s[name] if flops_per_step else float("nan")
        ratio = (
            f"  {steps_s[name] / steps_s['torch']:5.2f}x the reference"
            if "torch" in steps_s and name != "torch"
            else ""
        )
        print(
            f"{name:6s}  compile {compile_s:6.2f} s  {steps_s[name]:9.1f} steps/s  "
            f"{achieved / 1e9:7.2f} GFLOP/s ({100 * achieved / peak:5.1f} % of matmul peak)  "
            f"peak memory {memory}{ratio}"
        )


if __name__ == "__main__":
    app.run(main)

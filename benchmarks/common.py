"""Shared measurement helpers for the benchmark scripts."""

import importlib.util
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxsafe import host_memory
from jaxsafe.nn import conv_dispatch

# Before any JAX computation starts XLA's threads: a thread that has allocated before keeps a
# malloc arena of its own, which returns a freed block of more than 64 MiB to the system.
_RETAINED = host_memory.retain()


def machine() -> str:
    """The machine line every benchmark prints first, with whether freed host memory is
    retained (as the launchers do, jaxsafe.host_memory: this module turns it on when imported),
    so that every arm, the PyTorch reference included, runs under a launcher's allocator
    settings."""
    retained = _RETAINED
    dev = jax.devices()[0]
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import os

    return (
        f"{jax.device_count()} x {dev.device_kind} ({dev.platform}), host: {os.cpu_count()} cores "
        f"{cpu}, jax {jax.__version__}, freed host memory "
        f"{'retained' if retained else 'returned (glibc defaults)'}"
    )


def matmul_peak_flops(n: int = 2048, dtype=jnp.float32, repeats: int = 10) -> float:
    """Measured FLOP/s of a jitted n×n matmul: the denominator for achieved-FLOP/s ratios."""
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda a: a @ a)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def compile_timed(fn, *args):
    """``(fn.lower(*args).compile(), seconds it took)`` for a jitted ``fn``."""
    t0 = time.perf_counter()
    compiled = fn.lower(*args).compile()
    return compiled, time.perf_counter() - t0


def model_flops(lower, *args) -> float:
    """FLOPs of one call of the program ``lower(*args)`` lowers (``jitted.lower``,
    ``jaxsafe.train.lower_train_step``), by XLA's cost analysis of the whole, unpartitioned
    program, traced with every convolution XLA's direct one
    (``jaxsafe.nn.conv_dispatch.xla_convolutions``): the model's FLOPs, not the fewer products
    Winograd runs on the CPU, so that a PyTorch arm's FLOP/s uses the same count."""
    with conv_dispatch.xla_convolutions():
        cost = lower(*args).cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0]
    return float(cost.get("flops", float("nan"))) if cost else float("nan")


def memory_bytes(compiled) -> int | None:
    """Peak device memory of one call as XLA plans it (arguments + outputs + temporaries)."""
    m = compiled.memory_analysis()
    if m is None:
        return None
    return int(
        m.argument_size_in_bytes
        + m.output_size_in_bytes
        + m.temp_size_in_bytes
        - m.alias_size_in_bytes
    )


def time_calls(call, n: int) -> float:
    """Seconds per call over `n` calls after one warm-up call; `call()` returns a pytree.

    Each call is waited for, as the trainer does when it reads the step's metrics. (Queuing many
    calls with collectives on simulated CPU devices can also deadlock XLA's CPU runtime.)
    """
    jax.block_until_ready(call())
    t0 = time.perf_counter()
    for _ in range(n):
        jax.block_until_ready(call())
    return (time.perf_counter() - t0) / n


def alternate(arms: dict, rounds: int = 3) -> dict:
    """Seconds per call of each arm, the arms timed in turn (A B A B ...) so that drift of the
    machine (other load, clocks) falls on all of them alike: ``arms`` name -> (call, n), each
    round times ``n`` calls of every arm (:func:`time_calls`, whose warm-up call runs in the
    first round only). Returns name -> the ``rounds`` figures."""
    out = {name: [] for name in arms}
    for name, (call, _) in arms.items():
        jax.block_until_ready(call())
    for _ in range(rounds):
        for name, (call, n) in arms.items():
            t0 = time.perf_counter()
            for _ in range(n):
                jax.block_until_ready(call())
            out[name].append((time.perf_counter() - t0) / n)
    return out


def k_step_arms(
    task,
    initial,
    batch_for,
    mesh,
    ks,
    lowering: str = "auto",
    calls: int = 4,
    fixed_batch: bool = True,
):
    """One timing arm per steps-per-call K of the trainer's compiled step
    (``jaxsafe.train.compile_train_step`` with ``lowering``), for :func:`alternate`.

    ``initial`` is the placed train state (copied per K: each K's calls donate theirs);
    ``batch_for(k)`` the placed batch of a K-step call. Returns ``(arms, rows, flops)``:
    ``arms[k] = (call, n)`` with ``n`` calls of about ``calls`` steps in all, ``rows[k] =
    (compile seconds, planned peak memory)`` and the one-step program's FLOPs over the mesh.
    Divide an arm's seconds per call by K for seconds per step."""
    from jaxsafe import train

    arms, rows, flops = {}, {}, None
    for k in ks:
        state = jax.tree.map(lambda x: x.copy(), initial)
        batch = batch_for(k)
        compiled, _, compile_s = train.compile_train_step(
            task, state, batch, mesh, k, fixed_batch, lowering
        )
        if flops is None:
            flops = model_flops(
                train.lower_train_step, task, initial, batch_for(1), mesh, 1, fixed_batch
            )
        box = [state]

        def call(box=box, compiled=compiled, batch=batch):
            box[0], metrics = compiled(box[0], batch)
            return metrics

        arms[k] = (call, max(1, calls // k))
        rows[k] = (compile_s, fmt_bytes(memory_bytes(compiled)))
    return arms, rows, flops


def stacked_batch(data, k: int, mesh):
    """The first ``k`` batches of ``data`` on the mesh as the trainer feeds a ``k``-step call:
    one batch as it is for K = 1, else stacked on a leading axis of ``k``."""
    from jaxsafe import parallel

    if k == 1:
        return parallel.global_batch(data[0], mesh)
    host = jax.tree.map(lambda *xs: np.stack(xs), *[data[s] for s in range(k)])
    return parallel.global_batch(host, mesh, leading=1)


def fmt_bytes(n) -> str:
    return "n/a" if n is None else f"{n / 2**20:.1f} MiB"


def stats(xs) -> str:
    xs = np.asarray(xs)
    return f"{xs.mean():.4g} ± {xs.std():.2g}"


def load_config(spec: str):
    """The ConfigDict of `path/to/config.py[:arg]` (the launcher's `--config` syntax)."""
    path, _, arg = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("bench_config", path)
    if module_spec is None:
        raise FileNotFoundError(f"config file {path!r} not found")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg or None)


def random_model(make):
    """(graphdef, params, count) of an NNX model with N(0, 0.02²) weights drawn on the host (a
    jitted per-leaf init of the SD UNet is slow to compile on CPU)."""
    import jax
    import numpy as np
    from flax import nnx

    graphdef, abstract = nnx.split(nnx.eval_shape(make))
    leaves, treedef = jax.tree.flatten(abstract)
    rng = np.random.default_rng(0)
    params = treedef.unflatten(
        [
            jax.numpy.asarray(0.02 * rng.standard_normal(leaf.shape, np.float32), leaf.dtype)
            for leaf in leaves
        ]
    )
    return graphdef, params, sum(leaf.size for leaf in leaves)

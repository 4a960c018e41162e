"""The one training loop every experiment uses.

`run(task, config, workdir, mesh)`:
  * builds the `TrainState`, shards it with the task's rules, and resumes from the latest
    checkpoint in `workdir/checkpoints` when there is one;
  * compiles the `config.steps_per_call` = K steps of one call, jitted with explicit in/out
    shardings and the state donated, lowered as `config.lowering` says (:func:`lowering`): one
    program of K steps in a `lax.scan`, or a host loop over the one-step program;
  * logs metrics (JSONL + TensorBoard), runs evaluators, saves checkpoints periodically, at the
    end and on SIGTERM; stops on a non-finite metric before that state can be saved; resumes from
    the newest checkpoint that passes its checksums, moving damaged ones aside.

Config fields (`config.train` in the experiment configs): num_steps, steps_per_call, log_every,
eval_every, checkpoint_every, keep_checkpoints, seed, async_checkpointing, fsdp_min_size, and
optionally lowering (default "auto") and verify_checkpoints (default True: checksums written with
every checkpoint and checked on resume, `jaxsafe.train.checkpoint`).
"""

import concurrent.futures
import os
import signal
import threading
import time

import grain
import jax
import numpy as np
from absl import logging
from jax import lax
from jax.extend import core as jex_core

from jaxsafe.parallel import sharding as sh
from jaxsafe.parallel.distributed import is_primary
from jaxsafe.train.checkpoint import Checkpointer
from jaxsafe.train.metrics import MetricWriter, Progress
from jaxsafe.train.state import TrainState, init_state
from jaxsafe.train.task import Task, default_step


class NonFiniteError(FloatingPointError):
    """A training metric became NaN or infinite."""


def _check_multiples(cfg) -> None:
    k = cfg.steps_per_call
    for name in ("num_steps", "log_every", "eval_every", "checkpoint_every"):
        value = cfg[name]
        if value and value % k:
            raise ValueError(f"train.{name}={value} must be a multiple of train.steps_per_call={k}")


def is_fixed_batch(train_data) -> bool:
    """Full-batch training: a pytree of arrays rather than a dataset indexed by step."""
    return not isinstance(train_data, grain.MapDataset)


LOWERINGS = ("auto", "scan", "loop")


def _has_convolution(jaxpr) -> bool:
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "conv_general_dilated":
            return True
        if any(
            _has_convolution(getattr(sub, "jaxpr", sub))
            for sub in jex_core.jaxprs_in_params(eqn.params)
        ):
            return True
    return False


def lowering(choice: str, step, state, batch) -> str:
    """How K steps per call run: "scan" (one program, the K steps in a `lax.scan`) or "loop"
    (the one-step program called K times from the host). "auto" picks "loop" for a step with
    a convolution on XLA:CPU, else "scan": XLA:CPU runs a convolution inside a while loop off
    its fast path, many times slower per step, while a loop of calls keeps the one-step
    program's speed and compile time; everywhere else the scan saves the per-call dispatch
    (docs/benchmarks.md, "K steps per call on XLA:CPU: the scan against a host loop")."""
    if choice not in LOWERINGS:
        raise ValueError(f"train.lowering={choice!r}; expected one of {LOWERINGS}")
    if choice != "auto":
        return choice
    if jax.default_backend() != "cpu":
        return "scan"
    return "loop" if _has_convolution(jax.make_jaxpr(step)(state, batch).jaxpr) else "scan"


class _Loop:
    """K calls of the compiled one-step program behind the K-step program's interface:
    `(state, batches) -> (state, metrics stacked (K, ...))`; cost and memory analyses are the
    one step's."""

    def __init__(self, compiled, take, k: int, fixed_batch: bool):
        self.compiled, self.take, self.k, self.fixed = compiled, take, k, fixed_batch

    def __call__(self, state, batches):
        metrics = []
        for i in range(self.k):
            state, m = self.compiled(state, batches if self.fixed else self.take(batches, i))
            metrics.append(m)
        return state, jax.tree.map(lambda *xs: jax.numpy.concatenate(xs), *metrics)

    def __getattr__(self, name):  # cost_analysis, memory_analysis, as_text, ...
        return getattr(self.compiled, name)


def _calls(task, steps_per_call: int, fixed_batch: bool, how: str):
    """`(one, call)`: one step `(state, batch) -> (state, metrics)`, and the K-step program
    `(state, batches) -> (state, metrics stacked (K, ...))` for lowering `how`."""
    step = task.step_fn or default_step(task)

    def one(s, b):
        return step(s, b, s.key())

    def call(s, batches):
        if steps_per_call == 1 or how == "loop":
            s, m = one(s, batches)
            return s, jax.tree.map(lambda x: x[None], m)
        if fixed_batch:
            return lax.scan(lambda c, _: one(c, batches), s, length=steps_per_call)
        return lax.scan(one, s, batches)

    return one, call


def lower_train_step(
    task: Task, state: TrainState, batch, mesh, steps_per_call: int = 1, fixed_batch: bool = False
):
    """The `steps_per_call` steps as one program (a `lax.scan` for K > 1), jitted with the
    state's and batch's shardings and lowered, not compiled: what :func:`compile_train_step`
    compiles for K = 1 or lowering "scan". `.cost_analysis()` counts its FLOPs without a
    compile."""
    _, call = _calls(task, steps_per_call, fixed_batch, "scan")
    state_sh = jax.tree.map(lambda x: x.sharding, state)
    batch_sh = jax.tree.map(lambda x: x.sharding, batch)
    jitted = jax.jit(
        call,
        in_shardings=(state_sh, batch_sh),
        out_shardings=(state_sh, sh.replicated(mesh)),
        donate_argnums=0,
    )
    return jitted.lower(state, batch)


def compile_train_step(
    task: Task,
    state: TrainState,
    batch,
    mesh,
    steps_per_call: int,
    fixed_batch: bool,
    lowering_choice: str = "auto",
):
    """AOT-compiles `steps_per_call` steps (lowered per :func:`lowering`); returns
    `(compiled, state_shardings, seconds)`, `compiled(state, batch) -> (state, metrics)` with
    metrics stacked over the steps. `batch` has a leading axis of K unless `fixed_batch` or K
    is 1."""
    state_sh = jax.tree.map(lambda x: x.sharding, state)
    batch_sh = jax.tree.map(lambda x: x.sharding, batch)
    stacked = steps_per_call > 1 and not fixed_batch
    one_batch = (
        jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), batch)
        if stacked
        else batch
    )
    one = _calls(task, 1, fixed_batch, "scan")[0]
    how = "scan" if steps_per_call == 1 else lowering(lowering_choice, one, state, one_batch)

    t0 = time.perf_counter()
    if how == "scan":
        lowered = lower_train_step(task, state, batch, mesh, steps_per_call, fixed_batch)
        return lowered.compile(), state_sh, time.perf_counter() - t0
    one_sh = batch_sh if fixed_batch else sh.batch_sharding(mesh)
    take = jax.jit(
        lambda b, i: jax.tree.map(lambda x: lax.dynamic_index_in_dim(x, i, 0, False), b),
        out_shardings=one_sh,
    )
    if stacked:
        one_batch = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype, sharding=one_sh), batch
        )
    jitted = jax.jit(
        _calls(task, steps_per_call, fixed_batch, "loop")[1],
        in_shardings=(state_sh, one_sh),
        out_shardings=(state_sh, sh.replicated(mesh)),
        donate_argnums=0,
    )
    compiled = jitted.lower(state, one_batch).compile()
    return _Loop(compiled, take, steps_per_call, fixed_batch), state_sh, time.perf_counter() - t0


def place_state(state: TrainState, mesh, rules=(), min_size: int = 2**10) -> TrainState:
    shardings = sh.shardings_for(state, mesh, rules, min_size)
    return jax.device_put(state, shardings)


def _first_non_finite(metrics: dict, first_step: int):
    for name, values in metrics.items():
        values = np.asarray(values)
        bad = ~np.isfinite(values)
        if bad.any():
            i = int(np.argmax(bad))
            return name, float(values[i]), first_step + i + 1
    return None


class _Preemption:
    """Turns SIGTERM into a flag the loop checks between calls."""

    def __init__(self):
        self.requested = False
        self._old = None
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        logging.warning("SIGTERM received: saving a checkpoint and stopping")
        self.requested = True

    def restore(self):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)


def run(task: Task, cfg, workdir: str, mesh) -> TrainState:
    """Trains `task` for `cfg.num_steps` steps (resuming from `workdir` if possible)."""
    _check_multiples(cfg)
    k = cfg.steps_per_call
    fixed = is_fixed_batch(task.train_data)
    writer = MetricWriter(workdir, enabled=is_primary())
    ckpt = Checkpointer(
        os.path.join(workdir, "checkpoints"),
        keep=cfg.keep_checkpoints,
        save_every=cfg.checkpoint_every,
        async_save=cfg.async_checkpointing,
        verify=cfg.get("verify_checkpoints", True),
    )

    state = init_state(task.params, task.frozen, task.optimizer, task.extra, cfg.seed)
    state = place_state(state, mesh, task.sharding_rules, cfg.fsdp_min_size)
    leaves = jax.tree.leaves(state.params)
    logging.info(
        "params: %d tensors, %d sharded over fsdp, %d values; mesh %s",
        len(leaves),
        sum(not x.sharding.is_fully_replicated for x in leaves),
        sum(x.size for x in leaves),
        dict(mesh.shape),
    )
    if ckpt.latest_step() is not None:
        state = ckpt.restore(state)
        logging.info("resumed from %s at step %d", ckpt.directory, int(sh.fetch(state.step)))
    start = int(sh.fetch(state.step))
    if start % k:
        raise ValueError(f"checkpoint step {start} is not a multiple of steps_per_call={k}")

    def host_batch(step):
        if fixed:
            return task.train_data
        items = [task.train_data[s] for s in range(step, step + k)]
        return items[0] if k == 1 else jax.tree.map(lambda *xs: np.stack(xs), *items)

    leading = 0 if (fixed or k == 1) else 1
    fixed_global = sh.global_batch(task.train_data, mesh) if fixed else None
    to_device = (lambda b: fixed_global) if fixed else (lambda b: sh.global_batch(b, mesh, leading))
    compiled, _, compile_s = compile_train_step(
        task, state, to_device(host_batch(start)), mesh, k, fixed, cfg.get("lowering", "auto")
    )
    logging.info(
        "compiled %d step(s) per call%s in %.1fs",
        k,
        "" if k == 1 else " (loop)" if isinstance(compiled, _Loop) else " (scan)",
        compile_s,
    )

    def evaluate(step):
        for name, fn in task.evaluators.items():
            values = dict(fn(state))
            scalars = {f"{name}/{key}": v for key, v in values.items() if np.ndim(v) == 0}
            writer.scalars(step, scalars)
            for key, v in values.items():
                if np.ndim(v) >= 3:
                    writer.image(step, f"{name}/{key}", v)
            if scalars:
                logging.info(
                    "eval step %d: %s",
                    step,
                    ", ".join(f"{a}={float(b):.4g}" for a, b in scalars.items()),
                )

    if start == 0 and cfg.eval_every:
        evaluate(0)
    progress = Progress(start, cfg.num_steps)
    preempt = _Preemption()
    pool = concurrent.futures.ThreadPoolExecutor(1)
    try:
        step = start
        next_batch = pool.submit(host_batch, step)
        while step < cfg.num_steps:
            batch = to_device(next_batch.result())
            if step + k < cfg.num_steps:
                next_batch = pool.submit(host_batch, step + k)
            state, metrics = compiled(state, batch)
            metrics = sh.fetch(metrics)
            bad = _first_non_finite(metrics, step)
            if bad is not None:
                name, value, at = bad
                last = ckpt.latest_step()
                raise NonFiniteError(
                    f"non-finite {name} = {value} at step {at}; stopped without saving this state "
                    + (
                        f"(last good checkpoint: step {last} in {ckpt.directory})"
                        if last is not None
                        else "(no checkpoint saved yet)"
                    )
                )
            for i in range(k):
                s = step + i + 1
                if cfg.log_every and s % cfg.log_every == 0:
                    writer.scalars(s, {f"train/{n}": v[i] for n, v in metrics.items()})
            step += k
            if cfg.log_every and step % cfg.log_every == 0:
                progress.log(step, {n: v[-1] for n, v in metrics.items()})
            if cfg.eval_every and step % cfg.eval_every == 0:
                evaluate(step)
            ckpt.save(step, state, force=step == cfg.num_steps)
            if preempt.requested:
                ckpt.save(step, state, force=True)
                logging.warning("pre-empted at step %d; checkpoint saved, rerun to resume", step)
                break
        if step == cfg.num_steps and cfg.eval_every and step % cfg.eval_every:
            evaluate(step)
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        preempt.restore()
        ckpt.close()
        writer.close()
    return state

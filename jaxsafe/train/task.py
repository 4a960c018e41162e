"""The seam between an experiment and the generic loop.

An experiment builds a `Task`; `jaxsafe.train.loop.run` trains it. The loss has the shape

    loss_fn(params, frozen, extra, batch, rng) -> (loss, (metrics, new_extra))

and is pure, so the default step can `jax.value_and_grad` it, jit it with shardings and scan it.
Methods with alternating updates (SFD, AdvUnlearn) pass their own `step_fn(state, batch, rng)
-> (state, metrics)` instead; it still receives and returns the whole `TrainState`.
"""

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import optax

from jaxsafe.train.state import TrainState

LossFn = Callable[..., tuple[jax.Array, tuple[dict, Any]]]
StepFn = Callable[[TrainState, Any, jax.Array], tuple[TrainState, dict]]
Evaluator = Callable[[TrainState], Mapping[str, Any]]


@dataclasses.dataclass
class Task:
    """What an experiment hands the trainer.

    Attributes:
      graphdef: the NNX graph definition (static), for evaluators and exporting.
      params / frozen / extra: initial values of the corresponding `TrainState` fields.
      optimizer: optax transform over `params` (use `optax.masked` / the split filter to choose
        which parameters train).
      loss_fn: see module docstring. Unused when `step_fn` is given.
      train_data: either a `grain.MapDataset` whose item `step` is this process's batch for that
        step (random access by step makes resumption exact), or a fixed pytree of arrays used
        at every step (full-batch training; it is put on the devices once).
      evaluators: name -> function of the state returning scalars (logged as `name/key`) and
        optionally images (HxWxC arrays in [0, 1], written as PNG).
      grad_metrics: optional `(params, grads) -> dict` computed inside the default step.
      after_update: optional `(state) -> extra`, run inside the step after the optimizer
        update (EMA of parameters, schedules).
      step_fn: optional custom step replacing the default one.
      sharding_rules: `(regex, spec)` rules for parameter / optimizer-state sharding.
    """

    graphdef: Any
    params: Any
    frozen: Any
    optimizer: optax.GradientTransformation
    train_data: Any
    loss_fn: LossFn | None = None
    extra: Any = None
    evaluators: Mapping[str, Evaluator] = dataclasses.field(default_factory=dict)
    grad_metrics: Callable[[Any, Any], dict] | None = None
    after_update: Callable[[TrainState], Any] | None = None
    step_fn: StepFn | None = None
    sharding_rules: Sequence[tuple[str, Any]] = ()


def default_step(task: Task) -> StepFn:
    """One optimizer step on `task.loss_fn`."""
    if task.loss_fn is None:
        raise ValueError("Task needs a loss_fn or a step_fn")

    def step(state: TrainState, batch, rng):
        grad_fn = jax.value_and_grad(task.loss_fn, has_aux=True)
        (loss, (metrics, extra)), grads = grad_fn(
            state.params, state.frozen, state.extra, batch, rng
        )
        updates, opt_state = task.optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, **metrics}
        if task.grad_metrics is not None:
            metrics.update(task.grad_metrics(state.params, grads))
        new = state.replace(step=state.step + 1, params=params, opt_state=opt_state, extra=extra)
        if task.after_update is not None:
            new = new.replace(extra=task.after_update(new))
        return new, metrics

    return step

"""The train state every experiment shares."""

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx, struct


class TrainState(struct.PyTreeNode):
    """Everything a run needs to continue, and nothing static.

    Attributes:
      step: number of optimizer steps taken (int32 scalar).
      params: the trainable variables (an `nnx.State`), updated by the optimizer.
      frozen: the model's other variables (frozen weights, a teacher network, constants);
        passed to the loss, never updated by the default step.
      opt_state: the optax state of `params`.
      extra: method state carried between steps and checkpointed: EMA weights, DBPM memory,
        batch statistics, schedules. The loss returns its new value.
      rng: raw key data of the run's base key. Step `t` uses `fold_in(key, t)`, so a resumed run
        draws the same numbers as an uninterrupted one.
    """

    step: jax.Array
    params: Any
    frozen: Any
    opt_state: Any
    extra: Any
    rng: jax.Array

    def key(self, salt: int | None = None) -> jax.Array:
        """The PRNG key of the current step (optionally folded with `salt`)."""
        key = jax.random.fold_in(jax.random.wrap_key_data(self.rng), self.step)
        return key if salt is None else jax.random.fold_in(key, salt)


def split_model(model: nnx.Module, trainable: Any = nnx.Param):
    """`(graphdef, params, frozen)`: the variables matching `trainable`, and all the others."""
    graphdef, params, frozen = nnx.split(model, trainable, ...)
    return graphdef, params, frozen


def init_state(params, frozen, optimizer, extra=None, seed: int = 0) -> TrainState:
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        frozen=frozen,
        opt_state=optimizer.init(params),
        extra={} if extra is None else extra,
        rng=jax.random.key_data(jax.random.key(seed)),
    )


def ema_after_update(decay: float):
    """A ``Task.after_update`` keeping ``extra['ema'] ← d·ema + (1 − d)·params`` with diffusers'
    ``EMAModel`` warm-up ``d = min(decay, (1 + n)/(10 + n))``, n the step count."""

    def after_update(state):
        n = state.step.astype(jnp.float32)
        d = jnp.minimum(decay, (1 + n) / (10 + n))
        ema = jax.tree.map(lambda e, p: d * e + (1 - d) * p, state.extra["ema"], state.params)
        return {**state.extra, "ema": ema}

    return after_update

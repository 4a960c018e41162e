"""benchmarks.common.k_step_arms: one timing arm per steps-per-call K, each from its own copy of
the initial state, running K trainer steps per call."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from benchmarks.common import k_step_arms
from jaxsafe import parallel, train


def _task():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 4)).astype(np.float32)
    y = (x @ rng.normal(size=(4, 2))).astype(np.float32)

    def loss_fn(params, frozen, extra, batch, key):
        err = batch["x"] @ params["w"] - batch["y"] + 1e-3 * jax.random.normal(key, (16, 2))
        return jnp.mean(err**2), ({}, extra)

    return train.Task(
        graphdef=None,
        params={"w": jnp.zeros((4, 2))},
        frozen={},
        optimizer=optax.sgd(0.1),
        loss_fn=loss_fn,
        train_data={"x": x, "y": y},
    )


@pytest.mark.parametrize("lowering", ["scan", "loop"])
def test_each_k_runs_k_steps_per_call_from_the_same_start(lowering):
    mesh = parallel.make_mesh()
    task = _task()
    state = train.place_state(train.init_state(task.params, task.frozen, task.optimizer, {}), mesh)
    batch = parallel.global_batch(task.train_data, mesh)
    arms, rows, flops = k_step_arms(task, state, lambda k: batch, mesh, [1, 3], lowering, calls=6)
    assert {k: n for k, (_, n) in arms.items()} == {1: 6, 3: 2}
    assert set(rows) == {1, 3} and all(seconds > 0 for seconds, _ in rows.values())
    assert flops > 0
    one = [float(np.asarray(arms[1][0]()["loss"])[0]) for _ in range(3)]
    three = np.asarray(arms[3][0]()["loss"])
    assert three.shape == (3,)
    np.testing.assert_allclose(three, one, rtol=1e-6, atol=1e-7)
    assert one[2] < one[0]  # the steps train: a fresh state would repeat the first loss

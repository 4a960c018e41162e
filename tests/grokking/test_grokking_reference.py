"""The PyTorch reference arm of benchmarks/grokking.py does the experiment's step: from the same
weights, one step gives the same loss and the same updated weights as jaxsafe's compiled step
(StableMax in float64 with ⊥AdamW, softmax in float32 with AdamW). Needs the torch extra."""

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from benchmarks.common import load_config  # noqa: E402
from benchmarks.reference import grokking as reference  # noqa: E402
from experiments import grokking  # noqa: E402
from jaxsafe import parallel, train  # noqa: E402
from jaxsafe.treepath import named_leaves  # noqa: E402


@pytest.fixture
def restore_x64():
    """The float64 setting switches jax_enable_x64 on (grokking.build): switch it back so it
    does not leak into the tests that run after this one in the same process."""
    before = jax.config.jax_enable_x64
    yield
    jax.config.update("jax_enable_x64", before)


@pytest.mark.parametrize("setting,perp", [("stablemax", "per_tensor"), ("softmax_float32", None)])
def test_one_reference_step_equals_the_jaxsafe_step(setting, perp, restore_x64):
    config = load_config(f"configs/grokking/{setting}.py:smoke")
    with config.unlocked():
        config.optimizer.perp = perp
    mesh = parallel.make_mesh()
    task = grokking.build(config, mesh)
    kernels = [np.asarray(v) for _, v in sorted(named_leaves(task.params).items())]
    state = train.place_state(
        train.init_state(task.params, task.frozen, task.optimizer, task.extra, config.train.seed),
        mesh,
    )
    batch = parallel.global_batch(task.train_data, mesh)
    compiled = train.compile_train_step(task, state, batch, mesh, 1, True)[0]
    call, model = reference.make_step(config, grokking.load_data(config.data), kernels)
    for _ in range(3):
        state, metrics = compiled(state, batch)
        loss = call()
        np.testing.assert_allclose(
            loss, float(np.asarray(metrics["loss"])[0]), rtol=1e-5, atol=1e-6
        )
    after = [np.asarray(v) for _, v in sorted(named_leaves(jax.device_get(state.params)).items())]
    for layer, w in zip(model[::2], after):
        np.testing.assert_allclose(layer.weight.detach().numpy().T, w, rtol=1e-4, atol=1e-5)

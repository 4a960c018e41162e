"""The generic loop on a small regression task defined here (independent of any method)."""

import os

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from jaxsafe import parallel, train


class Linear(nnx.Module):
    def __init__(self, d_in, d_out, rngs):
        self.w = nnx.Param(jax.random.normal(rngs.params(), (d_in, d_out)) * 0.1)
        self.scale = nnx.Variable(jnp.ones(()))  # not a Param: lands in `frozen`

    def __call__(self, x):
        return self.scale[...] * (x @ self.w[...])


def make_task(nan_at=None, dataset=False, d_out=3, lr=0.05):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 4)).astype(np.float32)
    y = (x @ rng.normal(size=(4, d_out))).astype(np.float32)
    graphdef, params, frozen = train.split_model(Linear(4, d_out, nnx.Rngs(0)))

    def loss_fn(params, frozen, extra, batch, rng):
        model = nnx.merge(graphdef, params, frozen)
        # Noise from the step's key makes resumption depend on the key schedule.
        noise = 1e-3 * jax.random.normal(rng, batch["y"].shape)
        err = model(batch["x"]) - batch["y"] + noise
        loss = jnp.mean(err**2)
        if nan_at is not None:
            loss = jnp.where(extra["count"] + 1 >= nan_at, jnp.nan, loss)
        return loss, ({"abs_err": jnp.mean(jnp.abs(err))}, {"count": extra["count"] + 1})

    data = {"x": x, "y": y}
    if dataset:
        data = (
            grain.MapDataset.source([{"x": x[i], "y": y[i]} for i in range(64)]).repeat().batch(8)
        )
    return train.Task(
        graphdef=graphdef,
        params=params,
        frozen=frozen,
        optimizer=optax.adam(lr),
        loss_fn=loss_fn,
        train_data=data,
        extra={"count": jnp.zeros((), jnp.int32)},
    )


def cfg(**kw):
    c = ml_collections.ConfigDict(
        dict(
            num_steps=8,
            steps_per_call=1,
            log_every=1,
            eval_every=0,
            checkpoint_every=4,
            keep_checkpoints=5,
            seed=0,
            async_checkpointing=False,
            fsdp_min_size=1,
        )
    )
    c.update(kw)
    return c


@pytest.fixture(scope="module")
def mesh():
    return parallel.make_mesh()


def params_of(state):
    return jax.tree.map(np.asarray, state.params)


def assert_trees_equal(a, b):
    jax.tree.map(np.testing.assert_array_equal, a, b)


@pytest.mark.parametrize(
    "dataset,lowering", [(False, "scan"), (True, "scan"), (False, "loop"), (True, "loop")]
)
def test_k_steps_per_call_equal_single_steps_and_loss_decreases(tmp_path, mesh, dataset, lowering):
    s1 = train.run(make_task(dataset=dataset), cfg(), str(tmp_path / "a"), mesh)
    s4 = train.run(
        make_task(dataset=dataset),
        cfg(steps_per_call=4, log_every=4, lowering=lowering),
        str(tmp_path / "b"),
        mesh,
    )
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
        params_of(s1),
        params_of(s4),
    )
    assert int(s4.step) == 8 and int(s4.extra["count"]) == 8
    rows = train.read_jsonl(str(tmp_path / "a" / "metrics.jsonl"))
    rows4 = train.read_jsonl(str(tmp_path / "b" / "metrics.jsonl"))
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert [r["step"] for r in rows4] == [4, 8]
    # the K-th step's own metrics come back from a K-step call
    np.testing.assert_allclose(
        [r["train/loss"] for r in rows4],
        [rows[3]["train/loss"], rows[7]["train/loss"]],
        rtol=1e-5,
        atol=1e-6,
    )
    if not dataset:  # minibatch losses are too noisy over 8 steps to compare
        assert rows[-1]["train/loss"] < rows[0]["train/loss"]


def test_resume_matches_uninterrupted_run(tmp_path, mesh):
    full = train.run(make_task(), cfg(), str(tmp_path / "full"), mesh)
    half = train.run(make_task(), cfg(num_steps=4), str(tmp_path / "resumed"), mesh)
    assert int(half.step) == 4
    resumed = train.run(make_task(), cfg(), str(tmp_path / "resumed"), mesh)
    assert int(resumed.step) == 8
    assert_trees_equal(params_of(full), params_of(resumed))
    assert_trees_equal(
        jax.tree.map(np.asarray, full.opt_state), jax.tree.map(np.asarray, resumed.opt_state)
    )


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, mesh):
    with pytest.raises(
        train.NonFiniteError,
        match=r"non-finite loss = nan at step 6; .*last good checkpoint: step 4",
    ):
        train.run(make_task(nan_at=6), cfg(), str(tmp_path), mesh)
    ckpt = train.Checkpointer(str(tmp_path / "checkpoints"))
    assert ckpt.all_steps() == [4]
    restored = ckpt.restore(
        train.place_state(
            train.init_state(
                make_task().params,
                make_task().frozen,
                optax.adam(0.05),
                {"count": jnp.zeros((), jnp.int32)},
            ),
            mesh,
        )
    )
    assert np.all(np.isfinite(jax.tree.leaves(params_of(restored))[0]))


def test_mismatched_checkpoint_names_the_tensor(tmp_path, mesh):
    train.run(make_task(d_out=3), cfg(num_steps=4), str(tmp_path), mesh)
    with pytest.raises(
        train.CheckpointMismatchError,
        match=r"tensor 'params/w.*' has shape \(4, 3\) on disk but \(4, 2\)",
    ):
        train.run(make_task(d_out=2), cfg(), str(tmp_path), mesh)


def test_step_multiples_are_checked(tmp_path, mesh):
    with pytest.raises(
        ValueError, match=r"train.checkpoint_every=3 must be a multiple of train.steps_per_call=2"
    ):
        train.run(
            make_task(), cfg(steps_per_call=2, log_every=2, checkpoint_every=3), str(tmp_path), mesh
        )


def test_evaluators_write_scalars_and_images(tmp_path, mesh):
    task = make_task()
    task.evaluators = {
        "probe": lambda s: {
            "w_norm": jnp.linalg.norm(s.params["w"][...]),
            "picture": np.full((4, 4, 1), 0.5),
        }
    }
    train.run(task, cfg(eval_every=4), str(tmp_path), mesh)
    rows = [r for r in train.read_jsonl(str(tmp_path / "metrics.jsonl")) if "probe/w_norm" in r]
    assert [r["step"] for r in rows] == [0, 4, 8]
    assert sorted(os.listdir(tmp_path / "images")) == [
        f"probe_picture_{s:08d}.png" for s in (0, 4, 8)
    ]
    assert os.listdir(tmp_path / "tensorboard")


@pytest.mark.parametrize("dataset", [False, True])
def test_train_step_compiles_once(tmp_path, mesh, compile_log, dataset):
    # 12 steps in 6 calls of 2 (and a resumed run of 4 more): the step program is compiled once
    # per run, not per call, whether the batch is fixed or drawn from a dataset per call.
    with compile_log() as names:
        s = train.run(
            make_task(dataset=dataset),
            cfg(num_steps=12, steps_per_call=2, log_every=2),
            str(tmp_path),
            mesh,
        )
        assert int(s.step) == 12 and names.count("jit(call)") == 1, names
        train.run(
            make_task(dataset=dataset),
            cfg(num_steps=16, steps_per_call=2, log_every=2),
            str(tmp_path),
            mesh,
        )
        assert names.count("jit(call)") == 2, names


def test_auto_lowering_loops_over_a_convolution_on_cpu_and_scans_an_mlp():
    from jaxsafe.train import loop

    x = jnp.ones((2, 3, 16))
    conv = lambda w, b: jax.grad(lambda v: jax.lax.conv_general_dilated(b, v, (1,), "SAME").sum())(
        w
    )
    mlp = lambda w, b: jax.grad(lambda v: jnp.tanh(b.reshape(2, -1) @ v).sum())(w)
    assert jax.default_backend() == "cpu"
    assert loop.lowering("auto", conv, jnp.ones((4, 3, 3)), x) == "loop"
    assert loop.lowering("auto", mlp, jnp.ones((48, 5)), x) == "scan"
    assert loop.lowering("scan", conv, jnp.ones((4, 3, 3)), x) == "scan"
    with pytest.raises(
        ValueError,
        match=r"train.lowering='unroll'; expected one of "
        r"\('auto', 'scan', 'loop'\)",
    ):
        loop.lowering("unroll", mlp, jnp.ones((48, 5)), x)

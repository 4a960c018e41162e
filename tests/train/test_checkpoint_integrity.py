"""Checkpoint checksums: the fingerprint against an independent NumPy computation, and every kind
of damage (an array byte, the metadata, a truncated file, a missing commit marker) falling back
to the newest intact step, in the Checkpointer and through the training loop."""

import glob
import os
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from absl import logging
from flax import nnx
from subprocs import run_python

from jaxsafe import parallel, train


def np_fingerprint(x) -> int:
    """The fingerprint's definition written out in NumPy with Python integers."""
    x = np.asarray(x)
    if x.dtype == np.bool_:
        x = x.astype(np.uint8)
    raw = np.ascontiguousarray(x).view(np.uint8).reshape(-1)
    size = x.dtype.itemsize
    word = {1: np.uint8, 2: np.uint16}.get(size, np.uint32)
    words = raw.view(word).astype(np.uint64)
    m = 2**32
    h = (words ^ ((np.arange(words.size, dtype=np.uint64) * 0x9E3779B9) % m)) % m
    h ^= h >> 16
    h = (h * 0x85EBCA6B) % m
    h ^= h >> 13
    h = (h * 0xC2B2AE35) % m
    h ^= h >> 16
    return int(h.sum() % m)


def test_fingerprint_matches_numpy_definition_for_every_dtype():
    rng = np.random.default_rng(0)
    tree = {
        "f32": rng.normal(size=(3, 5)).astype(np.float32),
        "bf16": jnp.asarray(rng.normal(size=(7,)), jnp.bfloat16),
        "i8": rng.integers(-128, 127, size=(2, 3, 4), dtype=np.int8),
        "u32": rng.integers(0, 2**32, size=(9,), dtype=np.uint32),
        "bool": rng.random(5) > 0.5,
        "scalar": np.float32(3.5),
    }
    got = np.asarray(train.fingerprint(jax.tree.map(jnp.asarray, tree)))
    want = [np_fingerprint(np.asarray(x)) for x in jax.tree.leaves(tree)]
    np.testing.assert_array_equal(got, np.asarray(want, np.uint32))


def test_fingerprint_of_float64_covers_both_words():
    with jax.enable_x64(True):
        x = np.array([1.0, -2.5, 1e300])
        got = int(train.fingerprint([jnp.asarray(x)])[0])
        assert got == np_fingerprint(x)
        y = x.copy()
        y.view(np.uint8)[0] ^= 1  # the low word of the first value
        assert int(train.fingerprint([jnp.asarray(y)])[0]) != got


def test_any_single_byte_change_or_swap_changes_the_fingerprint():
    x = np.random.default_rng(1).normal(size=(16, 8)).astype(np.float32)
    base = int(train.fingerprint([jnp.asarray(x)])[0])
    raw = x.view(np.uint8).reshape(-1)
    for i in range(0, raw.size, 7):
        for flip in (0x01, 0x80, 0xFF):
            y = raw.copy()
            y[i] ^= flip
            assert (
                int(train.fingerprint([jnp.asarray(y.view(np.float32).reshape(x.shape))])[0])
                != base
            )
    swapped = x.copy()
    swapped[[0, 1]] = swapped[[1, 0]]
    assert int(train.fingerprint([jnp.asarray(swapped)])[0]) != base


def test_sharded_fingerprint_equals_unsharded():
    mesh = parallel.make_mesh()
    x = np.arange(8 * 6, dtype=np.float32).reshape(8, 6)
    sharded = jax.device_put(
        x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(mesh.axis_names[0]))
    )
    assert int(train.fingerprint([sharded])[0]) == np_fingerprint(x)


REPLICATED_SAVE = """
import sys
import jax, jax.numpy as jnp, numpy as np
slices = []
slice_in_dim = jax.lax.slice_in_dim
jax.lax.slice_in_dim = lambda *a, **k: slices.append(a[0].shape) or slice_in_dim(*a, **k)
from jaxsafe import parallel, train
mesh = parallel.make_mesh(4, 1)
replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
state = {"x": jax.device_put(jnp.arange(4096.0).reshape(64, 64), replicated)}
ckpt = train.Checkpointer(sys.argv[1], async_save=False)
ckpt.save(1, state, force=True)
ckpt.close()
back = train.Checkpointer(sys.argv[1]).restore(state)
np.testing.assert_array_equal(np.asarray(back["x"]), np.asarray(state["x"]))
print("SLICES", len(slices))
"""


@pytest.mark.slow  # a subprocess with 4 simulated devices: about 5 s
def test_one_process_writes_replicated_arrays_whole(tmp_path):
    """Orbax's replica-parallel save slices a replicated array into one share per replica so
    that each host writes its share; with one process there is one host, and the checkpointer
    writes each array whole (4 simulated devices), and restores it."""
    p = run_python(REPLICATED_SAVE, tmp_path / "ckpt", n_devices=4, timeout=300)
    assert "SLICES 0" in p.stdout.splitlines(), p.stdout


STATE = {"a": jnp.arange(1000.0), "b": {"c": jnp.ones((3, 4), jnp.int32)}}


def save_three(directory, **kw):
    ckpt = train.Checkpointer(str(directory), keep=5, save_every=1, **kw)
    for s in (1, 2, 3):
        ckpt.save(s, jax.tree.map(lambda x: x + s, STATE))  # noqa: B023
    ckpt.close()


def restore(directory, **kw):
    ckpt = train.Checkpointer(str(directory), keep=5, save_every=1, **kw)
    try:
        return ckpt.restore(STATE)
    finally:
        ckpt.close()


def data_file(step_dir):
    return max(glob.glob(f"{step_dir}/state/ocdbt.process_0/d/*"), key=os.path.getsize)


@pytest.fixture
def warnings(monkeypatch):
    seen = []
    monkeypatch.setattr(logging, "warning", lambda msg, *a: seen.append(msg % a if a else msg))
    return seen


def flip_byte(path, at):
    data = bytearray(open(path, "rb").read())
    data[at % len(data)] ^= 0xFF
    open(path, "wb").write(bytes(data))


def truncate(path):
    os.truncate(path, os.path.getsize(path) // 2)


DAMAGE = {
    "array byte 16": (lambda d: flip_byte(data_file(d), 16), r"at array 'a'"),
    "array byte 200": (lambda d: flip_byte(data_file(d), 200), r"at array 'a'"),
    "array byte 1000": (lambda d: flip_byte(data_file(d), 1000), r"at array 'a'"),
    "array file truncated": (lambda d: truncate(data_file(d)), r"at array 'a'"),
    "manifest byte": (lambda d: flip_byte(f"{d}/manifest/metadata", 30), r"manifest"),
    "manifest truncated": (lambda d: truncate(f"{d}/manifest/metadata"), r"unreadable manifest"),
    "orbax metadata truncated": (lambda d: truncate(f"{d}/state/_METADATA"), r"unreadable"),
    "commit marker deleted": (
        lambda d: os.remove(f"{d}/commit_success.txt"),
        r"lacks its commit marker commit_success.txt",
    ),
    "manifest deleted": (lambda d: shutil.rmtree(f"{d}/manifest"), r"unreadable manifest"),
}


@pytest.mark.parametrize("case", DAMAGE)
def test_damaged_latest_step_is_moved_aside_and_the_previous_restored(tmp_path, warnings, case):
    damage, why = DAMAGE[case]
    save_three(tmp_path)
    damage(tmp_path / "3")
    restored = restore(tmp_path)
    np.testing.assert_array_equal(np.asarray(restored["a"]), np.arange(1000.0) + 2)
    assert sorted(os.listdir(tmp_path)) == ["1", "2", "3.corrupt"]
    said = " | ".join(warnings)
    assert f"checkpoint {tmp_path}/3 " in said and f"moved to {tmp_path}/3.corrupt" in said
    assert __import__("re").search(why, said), said
    assert train.Checkpointer(str(tmp_path)).all_steps() == [1, 2]


def test_every_step_damaged_stops_with_one_clear_error(tmp_path, warnings):
    save_three(tmp_path)
    for s in (1, 2, 3):
        flip_byte(data_file(tmp_path / str(s)), 16)
    with pytest.raises(train.CheckpointCorruptError) as e:
        restore(tmp_path)
    msg = str(e.value)
    assert msg.startswith(f"no intact checkpoint in {tmp_path}: step 3 ")
    assert "step 2 " in msg and "step 1 " in msg and msg.endswith("a rerun starts from step 0")
    assert "\n" not in msg
    assert sorted(os.listdir(tmp_path)) == ["1.corrupt", "2.corrupt", "3.corrupt"]


def test_a_second_damage_at_the_same_step_keeps_the_first_copy(tmp_path, warnings):
    save_three(tmp_path)
    os.remove(tmp_path / "3" / "commit_success.txt")
    restore(tmp_path)
    ckpt = train.Checkpointer(str(tmp_path), keep=5, save_every=1)
    ckpt.save(3, jax.tree.map(lambda x: x + 30, STATE))
    ckpt.close()
    os.remove(tmp_path / "3" / "commit_success.txt")
    restore(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["1", "2", "3.corrupt", "3.corrupt.1"]


def test_a_different_model_is_a_mismatch_and_moves_nothing(tmp_path):
    save_three(tmp_path)
    other = {"a": jnp.zeros(999), "b": {"c": jnp.ones((3, 4), jnp.int32)}}
    ckpt = train.Checkpointer(str(tmp_path))
    with pytest.raises(
        train.CheckpointMismatchError,
        match=r"tensor 'a' has shape \(1000,\) on disk but \(999,\) in the model",
    ):
        ckpt.restore(other)
    wrong_dtype = {"a": jnp.zeros(1000, jnp.bfloat16), "b": STATE["b"]}
    with pytest.raises(
        train.CheckpointMismatchError,
        match=r"tensor 'a' is float32 on disk but bfloat16 in the model",
    ):
        ckpt.restore(wrong_dtype)
    ckpt.close()
    assert sorted(os.listdir(tmp_path)) == ["1", "2", "3"]


def test_load_arrays_falls_back_without_moving_anything(tmp_path, warnings):
    save_three(tmp_path)
    flip_byte(data_file(tmp_path / "3"), 200)
    step, tree = train.load_arrays(str(tmp_path))
    assert step == 2
    np.testing.assert_array_equal(np.asarray(tree["a"]), np.arange(1000.0) + 2)
    assert sorted(os.listdir(tmp_path)) == ["1", "2", "3"]
    with pytest.raises(train.CheckpointCorruptError, match=rf"checkpoint {tmp_path}/3 .*'a'"):
        train.load_arrays(str(tmp_path), 3)


def test_unverified_checkpoints_still_restore(tmp_path, warnings):
    save_three(tmp_path, verify=False)
    np.testing.assert_array_equal(np.asarray(restore(tmp_path)["a"]), np.arange(1000.0) + 3)
    assert any("saved without checksums: restored unverified" in w for w in warnings)
    np.testing.assert_array_equal(
        np.asarray(restore(tmp_path, verify=False)["a"]), np.arange(1000.0) + 3
    )


class Linear(nnx.Module):
    def __init__(self, rngs):
        self.w = nnx.Param(jax.random.normal(rngs.params(), (256, 16)) * 0.1)  # 16 KiB of data

    def __call__(self, x):
        return x @ self.w[...]


def make_task():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 256)).astype(np.float32)
    y = (x @ rng.normal(size=(256, 16))).astype(np.float32)
    graphdef, params, frozen = train.split_model(Linear(nnx.Rngs(0)))

    def loss_fn(params, frozen, extra, batch, rng):
        err = nnx.merge(graphdef, params, frozen)(batch["x"]) - batch["y"]
        err = err + 1e-3 * jax.random.normal(rng, err.shape)
        return jnp.mean(err**2), ({}, extra)

    return train.Task(
        graphdef=graphdef,
        params=params,
        frozen=frozen,
        optimizer=optax.adam(0.05),
        loss_fn=loss_fn,
        train_data={"x": x, "y": y},
    )


def cfg(num_steps):
    return ml_collections.ConfigDict(
        dict(
            num_steps=num_steps,
            steps_per_call=1,
            log_every=0,
            eval_every=0,
            checkpoint_every=4,
            keep_checkpoints=5,
            seed=0,
            async_checkpointing=True,
            fsdp_min_size=1,
        )
    )


def test_training_resumes_past_a_damaged_checkpoint_bit_identically(tmp_path, warnings):
    mesh = parallel.make_mesh()
    reference = train.run(make_task(), cfg(12), str(tmp_path / "reference"), mesh)
    workdir = tmp_path / "damaged"
    train.run(make_task(), cfg(8), str(workdir), mesh)
    path = data_file(workdir / "checkpoints" / "8")
    flip_byte(path, os.path.getsize(path) // 2)
    resumed = train.run(make_task(), cfg(12), str(workdir), mesh)
    assert any("checkpoints/8 " in w and "moved to" in w for w in warnings), warnings
    assert sorted(os.listdir(workdir / "checkpoints")) == ["12", "4", "8", "8.corrupt"]
    for a, b in zip(
        jax.tree.leaves(resumed.params), jax.tree.leaves(reference.params), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

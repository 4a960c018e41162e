"""`jaxsafe.parallel`: meshes, fsdp sharding rules, global batches, `fetch`, multi-host start-up.

This pytest process has already initialised JAX with one CPU device, so every check that needs
several devices runs in a fresh Python subprocess with 8 simulated CPU devices
(`--xla_force_host_platform_device_count=8`); its assertions live inside the snippet and a
failure shows the snippet's stderr. One test starts two such processes (4 devices each) joined
by `jaxsafe.parallel.initialize` to cover the multi-process paths of `global_batch`/`fetch`.
"""

import inspect
import re
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import subprocs
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxsafe import parallel
from jaxsafe.parallel import fsdp_spec, make_mesh, shardings_for
from jaxsafe.treepath import path_name as path_str

# Imported by every snippet; checks that the device count really is the simulated one.
PRELUDE = """\
import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
from jaxsafe import parallel
from jaxsafe.parallel import batch_sharding, fetch, global_batch, make_mesh, shardings_for
from jaxsafe.treepath import path_name


def norm(spec):
    t = tuple(spec)
    while t and t[-1] is None:
        t = t[:-1]
    return t

assert jax.device_count() == {n}, jax.devices()
"""


def norm(spec) -> tuple:
    """A PartitionSpec as a tuple without trailing `None`s (P() == P(None, None) in effect)."""
    t = tuple(spec)
    while t and t[-1] is None:
        t = t[:-1]
    return t


def run_snippet(code: str, setup: str = "", n_devices: int = 8, timeout: float = 120) -> str:
    """Runs `setup` then (dedented) `code` after PRELUDE in a fresh interpreter with `n_devices`
    CPU devices; returns its stdout."""
    return subprocs.run_snippet(
        code, n_devices, timeout, prefix=PRELUDE.format(n=n_devices) + setup + "\n"
    )


# ------------------------------------------------------------------------------------- make_mesh


def test_make_mesh_single_device_defaults():
    mesh = make_mesh()
    assert mesh.axis_names == ("data", "fsdp") == parallel.BATCH_AXES
    assert dict(mesh.shape) == {"data": jax.device_count(), "fsdp": 1}


def test_make_mesh_axis_sizes_on_8_devices():
    run_snippet("""
        devs = jax.devices()
        # data=-1: all remaining devices go to `data`.
        for k in (1, 2, 4, 8):
            m = make_mesh(data=-1, fsdp=k)
            assert m.axis_names == ("data", "fsdp"), m.axis_names
            assert dict(m.shape) == {"data": 8 // k, "fsdp": k}, (k, m.shape)
            assert m.devices.shape == (8 // k, k)
            assert sorted(d.id for d in m.devices.flat) == sorted(d.id for d in devs)
        # fsdp=-1: all remaining devices go to `fsdp`.
        for k in (1, 2, 4, 8):
            m = make_mesh(data=k, fsdp=-1)
            assert dict(m.shape) == {"data": k, "fsdp": 8 // k}, (k, m.shape)
        # Defaults: pure data parallelism.
        assert dict(make_mesh().shape) == {"data": 8, "fsdp": 1}
        # Both explicit.
        m = make_mesh(data=2, fsdp=4)
        assert dict(m.shape) == {"data": 2, "fsdp": 4}
        assert tuple(m.axis_types) == (AxisType.Auto, AxisType.Auto), m.axis_types
        # An explicit device subset.
        m = make_mesh(data=-1, fsdp=2, devices=devs[:4])
        assert dict(m.shape) == {"data": 2, "fsdp": 2}
        assert {d.id for d in m.devices.flat} == {d.id for d in devs[:4]}
        m = make_mesh(data=2, fsdp=-1, devices=devs[4:])
        assert dict(m.shape) == {"data": 2, "fsdp": 2}
        assert {d.id for d in m.devices.flat} == {d.id for d in devs[4:]}
        # Errors count the default (all) devices.
        for kw, msg in [(dict(fsdp=3), "mesh: fsdp=3 does not divide the 8 devices"),
                        (dict(data=3, fsdp=-1), "mesh: data=3 does not divide the 8 devices"),
                        (dict(data=4, fsdp=4),
                         "mesh: data*fsdp = 4*4 = 16, but there are 8 devices")]:
            try:
                make_mesh(**kw)
            except ValueError as e:
                assert str(e) == msg, (kw, str(e))
            else:
                raise AssertionError(f"no error for {kw}")
    """)


# The size checks run before any device is touched, so a list of n (repeated) devices is enough
# to exercise them in this 1-device process.
@pytest.mark.parametrize(
    "n, data, fsdp, msg",
    [
        (8, -1, -1, "mesh: only one of data, fsdp may be -1"),
        (8, -1, 3, "mesh: fsdp=3 does not divide the 8 devices"),
        (6, -1, 4, "mesh: fsdp=4 does not divide the 6 devices"),
        (8, 3, -1, "mesh: data=3 does not divide the 8 devices"),
        (6, 4, -1, "mesh: data=4 does not divide the 6 devices"),
        (8, 2, 2, "mesh: data*fsdp = 2*2 = 4, but there are 8 devices"),
        (8, 4, 4, "mesh: data*fsdp = 4*4 = 16, but there are 8 devices"),
        (8, 8, 2, "mesh: data*fsdp = 8*2 = 16, but there are 8 devices"),
        (1, 1, 2, "mesh: data*fsdp = 1*2 = 2, but there are 1 devices"),
    ],
)
def test_make_mesh_bad_sizes(n, data, fsdp, msg):
    devices = [jax.devices()[0]] * n
    with pytest.raises(ValueError, match=f"^{re.escape(msg)}$"):
        make_mesh(data=data, fsdp=fsdp, devices=devices)


@pytest.mark.parametrize("data, fsdp", [(-1, 0), (0, -1), (-4, -2)])
def test_make_mesh_rejects_non_positive_sizes(data, fsdp):
    with pytest.raises(ValueError, match=r"^mesh: "):
        make_mesh(data=data, fsdp=fsdp, devices=[jax.devices()[0]] * 8)


# ------------------------------------------------------------------------------------- fsdp_spec


@pytest.mark.parametrize(
    "shape, fsdp, min_size, expected",
    [
        # Largest divisible dimension, wherever it is.
        ((64, 256), 4, 0, P(None, "fsdp")),
        ((256, 64), 4, 0, P("fsdp", None)),
        ((8, 16, 24), 8, 0, P(None, None, "fsdp")),
        ((4096,), 8, 0, P("fsdp")),
        # The largest dimension is not divisible: the next largest that is.
        ((258, 64), 4, 0, P(None, "fsdp")),
        ((8, 16, 24), 16, 0, P(None, "fsdp", None)),
        ((30, 20, 10), 4, 0, P(None, "fsdp", None)),
        ((30, 21, 10), 5, 0, P("fsdp", None, None)),
        ((31, 21, 10), 5, 0, P(None, None, "fsdp")),
        # Ties between equal divisible dimensions: the first one.
        ((12, 7, 12), 4, 0, P("fsdp", None, None)),
        ((7, 12, 12), 4, 0, P(None, "fsdp", None)),
        ((16, 16), 4, 0, P("fsdp", None)),
        # Nothing divides: replicated.
        ((33, 35), 4, 0, P()),
        ((16, 16), 32, 0, P()),
        ((3,), 2, 0, P()),
        ((), 4, 0, P()),
        # fsdp size 1: replicated, however large.
        ((1024, 1024), 1, 0, P()),
        ((4096,), 1, 0, P()),
        # min_size: fewer elements than min_size are replicated; exactly min_size are sharded.
        ((32, 32), 4, 2**10, P("fsdp", None)),
        ((31, 32), 4, 2**10, P()),
        ((8, 8), 4, 64, P("fsdp", None)),
        ((8, 8), 4, 65, P()),
        ((2**20, 2**12), 8, 2**10, P("fsdp", None)),  # 2**32 elements: no int32 overflow
    ],
)
def test_fsdp_spec(shape, fsdp, min_size, expected):
    spec = fsdp_spec(shape, fsdp, min_size)
    assert isinstance(spec, P)
    assert norm(spec) == norm(expected), spec
    assert len(spec) <= len(shape)


def test_fsdp_spec_default_min_size_is_1024():
    assert fsdp_spec((1024,), 2) == P("fsdp")
    assert fsdp_spec((1022,), 2) == P()
    assert norm(fsdp_spec((32, 32), 2)) == ("fsdp",)
    assert fsdp_spec((32, 31), 2) == P()  # 992 < 1024 elements
    assert fsdp_spec((33, 31), 3) == P()  # 1023 < 1024 elements


# --------------------------------------------------------------------------------- shardings_for


class Net(nnx.Module):
    """A tiny nnx model; its source is also sent to the subprocess tests."""

    def __init__(self, rngs):
        self.embed = nnx.Embed(1000, 64, rngs=rngs)  # embedding (1000, 64)
        self.layers = nnx.List(
            [
                nnx.Linear(64, 256, rngs=rngs),  # kernel (64, 256)
                nnx.Linear(256, 64, rngs=rngs),
            ]
        )  # kernel (256, 64)


NET_SRC = "from flax import nnx\n" + inspect.getsource(Net)


def _nnx_params():
    return nnx.state(Net(nnx.Rngs(0)), nnx.Param)


def _by_path(tree):
    return {path_str(p): x for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def test_path_str_on_nnx_state_contains_layer_paths():
    paths = list(_by_path(_nnx_params()))
    for name in ("layers/0/kernel", "layers/0/bias", "layers/1/kernel", "embed/embedding"):
        assert name in paths, (name, paths)


def test_shardings_for_one_device_mesh():
    mesh = make_mesh()
    params = _nnx_params()
    sh = shardings_for(params, mesh, [("layers/0/kernel", P(None, "fsdp"))], min_size=0)
    # Same tree structure as the input; a NamedSharding on `mesh` per leaf.
    assert jax.tree.structure(sh) == jax.tree.structure(params)
    by = _by_path(sh)
    assert all(isinstance(s, NamedSharding) and s.mesh == mesh for s in by.values())
    # An explicit PartitionSpec is used as is (even on a size-1 axis) ...
    assert next(s for p, s in by.items() if p.startswith("layers/0/kernel")).spec == P(None, "fsdp")
    # ... while "fsdp" on a size-1 fsdp axis replicates.
    assert norm(next(s for p, s in by.items() if p.startswith("layers/1/kernel")).spec) == ()


@pytest.mark.parametrize("bad", ["shard", "FSDP", None, ("fsdp", None), 0])
def test_shardings_for_invalid_rule_spec(bad):
    tree = {"a": {"b": np.zeros((4, 4)), "c": np.zeros((2,))}}
    msg = f"sharding rule for 'a/b': expected PartitionSpec, 'fsdp' or 'replicate', got {bad!r}"
    with pytest.raises(ValueError, match=f"^{re.escape(msg)}$"):
        shardings_for(tree, make_mesh(), [("a/c", "replicate"), ("b", bad)])


def test_shardings_for_invalid_rule_after_a_match_is_never_used():
    tree = {"a": {"b": np.zeros((4, 4))}}
    sh = shardings_for(tree, make_mesh(), [("b", "replicate"), ("b", "bogus")])
    assert norm(sh["a"]["b"].spec) == ()


@pytest.mark.slow
def test_shardings_for_rules_on_fsdp_mesh():
    run_snippet(
        setup=NET_SRC,
        code="""
        mesh = make_mesh(data=2, fsdp=4)
        params = nnx.state(Net(nnx.Rngs(0)), nnx.Param)

        def specs(rules=(), min_size=2**10):
            sh = shardings_for(params, mesh, rules, min_size)
            assert jax.tree.structure(sh) == jax.tree.structure(params)
            out = {}
            for path, s in jax.tree_util.tree_leaves_with_path(sh):
                assert isinstance(s, NamedSharding) and s.mesh == mesh
                name = path_name(path)
                # 'layers/0/kernel/value' -> 'layers/0/kernel' (nnx Variables add a leaf attribute)
                key = next(k for k in ("embed/embedding", "layers/0/kernel", "layers/0/bias",
                                       "layers/1/kernel", "layers/1/bias") if name.startswith(k))
                out[key] = norm(s.spec)
            assert len(out) == 5, out
            return out

        def want(specs_by_name):
            return {k: norm(v) for k, v in specs_by_name.items()}

        # No rules: every leaf is "fsdp"; biases (< 1024 elements) are replicated.
        assert specs() == want({
            "embed/embedding": P("fsdp", None),   # (1000, 64): 1000 % 4 == 0
            "layers/0/kernel": P(None, "fsdp"),   # (64, 256)
            "layers/0/bias": P(),                 # (256,): fewer than 1024 elements
            "layers/1/kernel": P("fsdp", None),   # (256, 64)
            "layers/1/bias": P(),                 # (64,)
        }), specs()
        assert specs(min_size=0)["layers/0/bias"] == ("fsdp",)
        assert specs(min_size=0)["layers/1/bias"] == ("fsdp",)
        assert specs(min_size=256)["layers/0/bias"] == ("fsdp",)
        assert specs(min_size=257)["layers/0/bias"] == ()

        rules = [
            (r"layers/0/kernel", "replicate"),
            (r"layers/\\d+/kernel", P(None, "fsdp")),
            (r"bias", "fsdp"),
        ]
        got = specs(rules, min_size=0)
        assert got == want({
            "embed/embedding": P("fsdp", None),   # no rule: default fsdp
            "layers/0/kernel": P(),               # first match wins over the second rule
            "layers/0/bias": P("fsdp"),
            "layers/1/kernel": P(None, "fsdp"),   # explicit spec, not fsdp's choice
            "layers/1/bias": P("fsdp"),
        }), got
        # "fsdp" from a rule still honours min_size.
        assert specs(rules)["layers/0/bias"] == ()
        # Order matters: with the general rule first it wins for layers/0 too.
        got = specs([rules[1], rules[0]])
        assert got["layers/0/kernel"] == (None, "fsdp"), got
        # Rules are regular expressions searched anywhere in the path.
        got = specs([(r"^embed/", "replicate"), (r"ayers/1/ker", "replicate")])
        assert got["embed/embedding"] == () and got["layers/1/kernel"] == (), got
        assert got["layers/0/kernel"] == (None, "fsdp"), got
        # "replicate" everywhere.
        assert set(specs([(".", "replicate")]).values()) == {()}

        # The shardings are usable: place the state and check the shards.
        sh = shardings_for(params, mesh, rules, min_size=0)
        placed = jax.device_put(params, sh)
        k1 = placed["layers"][1]["kernel"][...]
        assert k1.sharding.spec == P(None, "fsdp")
        assert {s.data.shape for s in k1.addressable_shards} == {(256, 16)}
        k0 = placed["layers"][0]["kernel"][...]
        assert k0.sharding.is_fully_replicated
        k1_host = params["layers"][1]["kernel"][...]
        np.testing.assert_array_equal(np.asarray(k1), np.asarray(k1_host))

        # ShapeDtypeStruct leaves and plain containers work the same way.
        sds = {"w": [jax.ShapeDtypeStruct((8, 1024), np.float32),
                     jax.ShapeDtypeStruct((12, 10), np.float32)],
               "b": jax.ShapeDtypeStruct((1024,), np.float32)}
        sh = shardings_for(sds, mesh, [("w/1", "replicate")])
        assert sh["w"][0].spec == P(None, "fsdp"), sh
        assert norm(sh["w"][1].spec) == (), sh
        assert sh["b"].spec == P("fsdp"), sh
    """,
    )


def test_shardings_for_end_anchored_rule_on_nnx_state():
    # A 1-device mesh suffices: the rule's explicit spec is distinguishable from fsdp's P().
    sh = shardings_for(_nnx_params(), make_mesh(), [(r"layers/0/kernel$", P(None, "fsdp"))])
    spec = next(s.spec for p, s in _by_path(sh).items() if p.startswith("layers/0/kernel"))
    assert spec == P(None, "fsdp")


# --------------------------------------------------------------------------- global_batch, fetch


def test_global_batch_and_fetch_on_8_devices():
    run_snippet("""
        def position(mesh, device):
            (i, j), = np.argwhere(mesh.devices == device)
            return i * mesh.shape["fsdp"] + j   # batch split over (data, fsdp), data-major

        for data, fsdp in [(2, 4), (8, 1), (1, 8), (4, 2)]:
            mesh = make_mesh(data=data, fsdp=fsdp)
            for rows in (8, 32):
                host = {"x": np.arange(rows * 3, dtype=np.int32).reshape(rows, 3),
                        "y": [np.arange(rows, dtype=np.float32) * 0.5]}
                g = global_batch(host, mesh)
                assert jax.tree.structure(g) == jax.tree.structure(host)
                per = rows // 8
                for h, a in [(host["x"], g["x"]), (host["y"][0], g["y"][0])]:
                    assert isinstance(a, jax.Array) and a.shape == h.shape and a.dtype == h.dtype
                    assert a.sharding == batch_sharding(mesh)
                    assert a.sharding.spec == P(("data", "fsdp")), a.sharding
                    np.testing.assert_array_equal(np.asarray(a), h)
                    shards = a.addressable_shards
                    assert len(shards) == 8 and len({s.device for s in shards}) == 8
                    for s in shards:
                        k = position(mesh, s.device)
                        assert s.index[0] == slice(k * per, (k + 1) * per), (s.device, s.index)
                        assert all(ix == slice(None) for ix in s.index[1:]), s.index
                        np.testing.assert_array_equal(np.asarray(s.data), h[k * per:(k + 1) * per])
                # fetch: host numpy copies of the (fully addressable) global arrays.
                f = fetch(g)
                assert isinstance(f["x"], np.ndarray) and isinstance(f["y"][0], np.ndarray)
                np.testing.assert_array_equal(f["x"], host["x"])
                np.testing.assert_array_equal(f["y"][0], host["y"][0])

        # fetch on replicated results, python scalars and numpy arrays.
        mesh = make_mesh(data=2, fsdp=4)
        g = global_batch({"x": np.arange(16.0)}, mesh)
        total = jax.jit(lambda b: b["x"].sum(), out_shardings=parallel.replicated(mesh))(g)
        assert total.sharding.is_fully_replicated
        f = fetch({"total": total, "n": 3, "a": np.ones(2)})
        assert isinstance(f["total"], np.ndarray) and f["total"] == 120.0
        assert isinstance(f["n"], np.ndarray) and f["n"] == 3
        np.testing.assert_array_equal(f["a"], np.ones(2))

        # leading axes: (K, B, ...) scan chunks keep K whole and split B.
        for mesh in (make_mesh(data=2, fsdp=4), make_mesh(data=8, fsdp=1)):
            host = np.arange(3 * 16 * 5).reshape(3, 16, 5)
            a = global_batch({"x": host}, mesh, leading=1)["x"]
            assert a.shape == host.shape
            assert a.sharding == batch_sharding(mesh, leading=1)
            assert a.sharding.spec == P(None, ("data", "fsdp")), a.sharding
            np.testing.assert_array_equal(np.asarray(a), host)
            for s in a.addressable_shards:
                k = position(mesh, s.device)
                assert s.index == (slice(None), slice(2 * k, 2 * k + 2), slice(None)), s.index
                np.testing.assert_array_equal(np.asarray(s.data), host[:, 2 * k:2 * k + 2])
            np.testing.assert_array_equal(fetch(a), host)
        host = np.arange(2 * 3 * 8).reshape(2, 3, 8)
        a = global_batch(host, mesh, leading=2)
        assert a.sharding.spec == P(None, None, ("data", "fsdp"))
        np.testing.assert_array_equal(np.asarray(a), host)
        for s in a.addressable_shards:
            k = position(mesh, s.device)
            np.testing.assert_array_equal(np.asarray(s.data), host[:, :, k:k + 1])

        # The batch axis must exist and divide by the 8 batch shards.
        mesh = make_mesh(data=2, fsdp=4)
        cases = [
            ({"x": np.zeros((12, 3))}, 0,
             "batch leaf 'x' has shape (12, 3): axis 0 must exist and divide by the 8 batch "
             "shards on this process"),
            ({"a": [np.zeros((16,)), np.zeros((4,))]}, 0,
             "batch leaf 'a/1' has shape (4,): axis 0 must exist and divide by the 8 batch "
             "shards on this process"),
            ({"x": np.zeros((16, 12))}, 1,
             "batch leaf 'x' has shape (16, 12): axis 1 must exist and divide by the 8 batch "
             "shards on this process"),
            ({"x": np.zeros((16,))}, 1,
             "batch leaf 'x' has shape (16,): axis 1 must exist and divide by the 8 batch "
             "shards on this process"),
            ({"x": np.float32(1.0)}, 0,
             "batch leaf 'x' has shape (): axis 0 must exist and divide by the 8 batch "
             "shards on this process"),
        ]
        for batch, leading, msg in cases:
            try:
                global_batch(batch, mesh, leading)
            except ValueError as e:
                assert str(e) == msg, (str(e), msg)
            else:
                raise AssertionError(f"no error for {msg}")
    """)


def test_fetch_in_process():
    f = parallel.fetch({"a": jnp.arange(3), "b": 2.0, "c": [np.int32(7)]})
    assert jax.tree.structure(f) == jax.tree.structure({"a": 0, "b": 0, "c": [0]})
    assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(f))
    np.testing.assert_array_equal(f["a"], [0, 1, 2])
    assert f["b"] == 2.0 and f["c"][0] == 7


def test_is_primary_single_process():
    assert parallel.is_primary()


# ------------------------------------------------------------------------------- two processes

_TWO_PROCESS_BODY = """\
import os
import sys
import traceback
import numpy as np
from jaxsafe import parallel
pid, port = int(sys.argv[1]), sys.argv[2]
parallel.initialize(f"localhost:{port}", 2, pid)   # before any other JAX call
import jax


def main():
    assert jax.process_count() == 2 and jax.process_index() == pid
    assert jax.device_count() == 8 and jax.local_device_count() == 4
    assert parallel.is_primary() == (pid == 0)

    def local_rows(p, rows):
        return np.arange(rows * 3, dtype=np.int32).reshape(rows, 3) + 1000 * p

    for data, fsdp in [(2, 4), (1, 8), (4, 2)]:
        mesh = parallel.make_mesh(data=data, fsdp=fsdp)
        assert dict(mesh.shape) == {"data": data, "fsdp": fsdp}
        local = local_rows(pid, 8)
        g = parallel.global_batch({"x": local}, mesh)["x"]
        # The global batch is the concatenation of the processes' batches, in process order.
        full = np.concatenate([local_rows(0, 8), local_rows(1, 8)])
        assert g.shape == (16, 3) and not g.is_fully_addressable
        shards = g.addressable_shards
        assert len(shards) == 4
        for s in shards:
            assert s.device.process_index == pid
            np.testing.assert_array_equal(np.asarray(s.data), full[s.index])
        assert sorted(s.index[0].start for s in shards) == [8 * pid + 2 * i for i in range(4)]
        # fetch of a replicated (not fully addressable) array: the same values on every process.
        total = jax.jit(lambda x: x.sum(0), out_shardings=parallel.replicated(mesh))(g)
        assert not total.is_fully_addressable and total.sharding.is_fully_replicated
        f = parallel.fetch({"total": total, "n": 5})
        assert isinstance(f["total"], np.ndarray)
        np.testing.assert_array_equal(f["total"], full.sum(0))
        assert f["n"] == 5
        # fetch refuses a sharded, not fully addressable array.
        try:
            parallel.fetch(g)
        except ValueError as e:
            assert str(e).startswith("fetch needs a replicated array, got sharding "), str(e)
        else:
            raise AssertionError("fetch of a sharded global array did not raise")

    mesh = parallel.make_mesh(data=2, fsdp=4)
    # leading axis, per process (K, B_local, ...)
    local = np.arange(3 * 8).reshape(3, 8) + 100 * pid
    g = parallel.global_batch(local, mesh, leading=1)
    assert g.shape == (3, 16)
    full = np.concatenate([np.arange(24).reshape(3, 8), np.arange(24).reshape(3, 8) + 100], axis=1)
    for s in g.addressable_shards:
        np.testing.assert_array_equal(np.asarray(s.data), full[s.index])
    # Divisibility is checked against this process's 4 batch shards.
    try:
        parallel.global_batch({"x": np.zeros((6, 2))}, mesh)
    except ValueError as e:
        assert str(e) == ("batch leaf 'x' has shape (6, 2): axis 0 must exist and divide by the 4 "
                          "batch shards on this process"), str(e)
    else:
        raise AssertionError("no error for 6 rows on 4 local shards")
    print("PROCESS-OK", pid)


try:
    main()
except BaseException:
    # Exit at once: a normal exit would wait for the other process at shutdown.
    traceback.print_exc()
    sys.stderr.flush()
    os._exit(1)
"""


@pytest.mark.slow
def test_two_processes_global_batch_and_fetch(tmp_path):
    port = str(subprocs.free_port())
    env = subprocs.device_env(4)
    logs = [(tmp_path / f"out{pid}.txt", tmp_path / f"err{pid}.txt") for pid in (0, 1)]
    procs = []
    try:
        for pid, (out, err) in enumerate(logs):
            with open(out, "w") as fo, open(err, "w") as fe:  # files: no pipe can fill up
                procs.append(
                    subprocess.Popen(
                        [sys.executable, "-c", _TWO_PROCESS_BODY, str(pid), port],
                        cwd=subprocs.REPO_ROOT,
                        env=env,
                        stdout=fo,
                        stderr=fe,
                        text=True,
                    )
                )
        # If one process fails, the other would wait for it in a collective: stop it at once.
        deadline = time.monotonic() + 120
        while (
            any(p.poll() is None for p in procs)
            and time.monotonic() < deadline
            and not any(p.poll() not in (None, 0) for p in procs)
        ):
            time.sleep(0.05)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    for pid, (p, (out, err)) in enumerate(zip(procs, logs)):
        out, err = out.read_text(), err.read_text()
        assert p.returncode == 0 and f"PROCESS-OK {pid}" in out, (
            f"process {pid} exited with {p.returncode}\n--- stdout ---\n{out}\n"
            f"--- stderr ---\n{err}"
        )

"""Per-pair NT-Xent vs a float64 NumPy double loop, a closed form, and the sharded version on 8
simulated devices (in a subprocess, since this process has already initialised one device)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from subprocs import run_snippet

from jaxsafe.contrastive import l2_normalize, ntxent_per_pair, ntxent_per_pair_sharded
from jaxsafe.parallel import make_mesh


def np_ntxent_per_pair(z1, z2, t):
    """SimCLR's l(i -> j) summed over the 2B - 1 views other than the anchor, both directions."""
    z1 = np.asarray(z1, np.float64)
    z2 = np.asarray(z2, np.float64)
    z1 = z1 / np.linalg.norm(z1, axis=1, keepdims=True)
    z2 = z2 / np.linalg.norm(z2, axis=1, keepdims=True)
    views = np.concatenate([z1, z2])
    b = len(z1)
    out = np.zeros(b)
    for i in range(b):
        for anchor, positive in ((i, b + i), (b + i, i)):
            denom = 0.0
            for k in range(2 * b):
                if k != anchor:
                    denom += np.exp(views[anchor] @ views[k] / t)
            num = np.exp(views[anchor] @ views[positive] / t)
            out[i] += -np.log(num / denom) / 2
    return out


def _z(b=6, d=5, seed=0):
    rng = np.random.default_rng(seed)
    return (
        rng.standard_normal((b, d)).astype(np.float32),
        rng.standard_normal((b, d)).astype(np.float32),
    )


class NTXentTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_matches_numpy_double_loop(self):
        for b, d, t in ((6, 5, 0.2), (3, 8, 0.5), (1, 4, 0.2)):
            z1, z2 = _z(b, d, seed=b)
            got = self.variant(lambda a, c, t=t: ntxent_per_pair(a, c, t))(z1, z2)
            chex.assert_shape(got, (b,))
            np.testing.assert_allclose(got, np_ntxent_per_pair(z1, z2, t), rtol=2e-5, atol=2e-5)

    @chex.variants(with_jit=True, without_jit=True)
    def test_default_temperature_is_0_2(self):
        z1, z2 = _z()
        np.testing.assert_allclose(
            self.variant(ntxent_per_pair)(z1, z2),
            np_ntxent_per_pair(z1, z2, 0.2),
            rtol=2e-5,
            atol=2e-5,
        )

    @chex.variants(with_jit=True, without_jit=True)
    def test_closed_form_orthonormal_identical_views(self):
        # z1 = z2 = e_i: positive similarity 1, the 2B - 2 negatives 0, so
        # L_i = -1/t + log(exp(1/t) + 2B - 2) for every i.
        b, t = 4, 0.2
        e = np.eye(b, 7, dtype=np.float32) * 3.0  # the norm must not matter
        got = self.variant(lambda a: ntxent_per_pair(a, a, t))(e)
        # ~0.04 left after cancelling logits of size 1/t = 5: atol ~ 2 ulp(5) in float32.
        np.testing.assert_allclose(
            got, np.full(b, -1 / t + np.log(np.exp(1 / t) + 2 * b - 2)), rtol=1e-6, atol=1e-6
        )

    def test_scale_invariant_and_symmetric(self):
        z1, z2 = _z()
        base = ntxent_per_pair(z1, z2)
        np.testing.assert_allclose(ntxent_per_pair(5 * z1, 0.1 * z2), base, rtol=1e-5, atol=1e-5)
        # Swapping the views swaps the two directions of each pair's loss: same average.
        np.testing.assert_allclose(ntxent_per_pair(z2, z1), base, rtol=1e-5, atol=1e-5)

    def test_bfloat16_inputs_computed_in_float32(self):
        z1, z2 = _z()
        got = ntxent_per_pair(jnp.asarray(z1, jnp.bfloat16), jnp.asarray(z2, jnp.bfloat16))
        assert got.dtype == jnp.float32
        ref = np_ntxent_per_pair(
            np.asarray(jnp.asarray(z1, jnp.bfloat16), np.float32),
            np.asarray(jnp.asarray(z2, jnp.bfloat16), np.float32),
            0.2,
        )
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=2e-5)

    def test_gradient_finite_at_zero_vector(self):
        z1, z2 = _z()
        z1[0] = 0.0
        g = jax.jit(jax.grad(lambda a: ntxent_per_pair(a, z2).sum()))(z1)
        assert np.isfinite(np.asarray(g)).all()

    def test_l2_normalize(self):
        z = np.array([[3.0, 4.0], [0.0, 0.0]], np.float32)
        np.testing.assert_allclose(l2_normalize(z), [[0.6, 0.8], [0.0, 0.0]], atol=1e-6)

    def test_bad_input(self):
        z1, z2 = _z()
        with pytest.raises(ValueError, match=r"z1 must have shape \(B, D\), got \(6,\)"):
            ntxent_per_pair(z1[:, 0], z2[:, 0])
        with pytest.raises(ValueError, match=r"z2 shape \(5, 5\) must equal z1 shape \(6, 5\)"):
            ntxent_per_pair(z1, z2[:5])
        with pytest.raises(ValueError, match="temperature must be > 0, got 0.0"):
            ntxent_per_pair(z1, z2, 0.0)

    @pytest.mark.slow
    def test_sharded_bad_input_single_device(self):
        mesh = make_mesh()
        z1, z2 = _z()
        with pytest.raises(ValueError, match=r"axis_names=\('batch',\) must be a non-empty subset"):
            ntxent_per_pair_sharded(z1, z2, 0.2, mesh, axis_names=("batch",))
        # One device: the sharded version is the plain one.
        np.testing.assert_allclose(
            ntxent_per_pair_sharded(z1, z2, 0.2, mesh),
            ntxent_per_pair(z1, z2),
            rtol=1e-6,
            atol=1e-5,
        )


SHARDED_SNIPPET = """
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from jaxsafe.contrastive import ntxent_per_pair, ntxent_per_pair_sharded
from jaxsafe.parallel import make_mesh

assert jax.device_count() == 8
rng = np.random.default_rng(0)
z1 = rng.standard_normal((16, 12)).astype(np.float32)
z2 = rng.standard_normal((16, 12)).astype(np.float32)
w = rng.uniform(size=16).astype(np.float32)   # a non-uniform reduction, to test the gradient
ref = np.asarray(ntxent_per_pair(z1, z2, 0.2))
ref_g = jax.grad(lambda a, b: (w * ntxent_per_pair(a, b, 0.2)).sum(), argnums=(0, 1))(z1, z2)

for data, fsdp, axes in ((8, 1, ("data", "fsdp")), (2, 4, ("data", "fsdp")), (4, 2, ("data",)),
                         (2, 4, ("fsdp",))):
    mesh = make_mesh(data=data, fsdp=fsdp)
    sh = NamedSharding(mesh, P(axes))
    a, b = jax.device_put(z1, sh), jax.device_put(z2, sh)
    f = jax.jit(lambda a, b: ntxent_per_pair_sharded(a, b, 0.2, mesh, axes))
    got = f(a, b)
    assert got.sharding.is_equivalent_to(sh, 1), (axes, got.sharding)
    np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-5, atol=1e-6, err_msg=str(axes))
    g = jax.jit(jax.grad(lambda a, b: (w * ntxent_per_pair_sharded(a, b, 0.2, mesh, axes)).sum(),
                         argnums=(0, 1)))(a, b)
    for x, y in zip(g, ref_g):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-6,
                                   err_msg=str(axes))

mesh = make_mesh(data=8)
try:
    ntxent_per_pair_sharded(z1[:12], z2[:12], 0.2, mesh)
except ValueError as e:
    assert "batch size 12 must be a multiple of the 8 shards" in str(e), e
else:
    raise AssertionError("no error for an indivisible batch")
"""


@pytest.mark.slow
def test_sharded_equals_single_device_on_8_devices():
    run_snippet(SHARDED_SNIPPET, n_devices=8, timeout=300)

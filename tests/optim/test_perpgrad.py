"""⊥Grad: orthogonality, norm preservation, pass-through and optimizer chains vs. NumPy."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl.testing import parameterized

from jaxsafe.optim import perp_adamw, perp_sgd, perpgrad


def _tree(seed=0):
    rng = np.random.default_rng(seed)
    f = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)  # noqa: E731
    params = {"w1": f(5, 4), "b1": f(4), "w2": f(4, 3)}
    grads = {"w1": f(5, 4), "b1": f(4), "w2": f(4, 3)}
    return params, grads


def np_project(p, g):
    p, g = np.asarray(p, np.float64), np.asarray(g, np.float64)
    return g - (np.vdot(p, g) / np.vdot(p, p)) * p


def _flat(tree):
    return np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(tree)])


def _update(tx, grads, params):
    return tx.update(grads, tx.init(params), params)[0]


def _rel_dot(a, b):
    a, b = np.ravel(np.asarray(a, np.float64)), np.ravel(np.asarray(b, np.float64))
    return abs(np.vdot(a, b)) / (np.linalg.norm(a) * np.linalg.norm(b))


class PerpGradTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_per_tensor_orthogonal_and_norm_preserving(self):
        params, grads = _tree()
        out = self.variant(lambda g, p: _update(perpgrad(), g, p))(grads, params)
        for k in params:
            self.assertLess(_rel_dot(out[k], params[k]), 1e-6, k)
            np.testing.assert_allclose(
                np.linalg.norm(out[k]), np.linalg.norm(grads[k]), rtol=1e-5, atol=1e-5, err_msg=k
            )
            # Same direction as the unscaled projection.
            proj = np_project(params[k], grads[k])
            np.testing.assert_allclose(
                out[k], proj * np.linalg.norm(grads[k]) / np.linalg.norm(proj), rtol=1e-4, atol=1e-6
            )
            self.assertEqual(out[k].dtype, grads[k].dtype)

    @chex.variants(with_jit=True, without_jit=True)
    def test_per_tensor_without_rescale_matches_numpy(self):
        params, grads = _tree(1)
        out = self.variant(lambda g, p: _update(perpgrad(rescale=False), g, p))(grads, params)
        for k in params:
            np.testing.assert_allclose(
                out[k], np_project(params[k], grads[k]), rtol=1e-4, atol=1e-6, err_msg=k
            )

    @chex.variants(with_jit=True, without_jit=True)
    def test_global_mode_matches_eq12(self):
        params, grads = _tree(2)
        out = self.variant(lambda g, p: _update(perpgrad(mode="global"), g, p))(grads, params)
        np.testing.assert_allclose(
            _flat(out), np_project(_flat(params), _flat(grads)), rtol=1e-4, atol=1e-6
        )
        self.assertLess(_rel_dot(_flat(out), _flat(params)), 1e-6)
        # Only the total inner product vanishes, not each tensor's.
        self.assertGreater(max(_rel_dot(out[k], params[k]) for k in params), 1e-2)

    @chex.variants(with_jit=True, without_jit=True)
    def test_global_mode_rescale(self):
        params, grads = _tree(3)
        out = self.variant(lambda g, p: _update(perpgrad(mode="global", rescale=True), g, p))(
            grads, params
        )
        np.testing.assert_allclose(
            np.linalg.norm(_flat(out)), np.linalg.norm(_flat(grads)), rtol=1e-5, atol=2e-5
        )
        self.assertLess(_rel_dot(_flat(out), _flat(params)), 1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters("per_tensor", "global")
    def test_zero_params_pass_gradient_through(self, mode):
        params = {"w": jnp.zeros((3, 2)), "b": jnp.zeros(2)}
        grads = {"w": jnp.arange(6.0).reshape(3, 2) - 2.5, "b": jnp.array([0.5, -1.0])}
        for rescale in (True, False):
            out = self.variant(lambda g, p, r=rescale: _update(perpgrad(mode, rescale=r), g, p))(
                grads, params
            )
            chex.assert_trees_all_equal(out, grads)

    @chex.variants(with_jit=True, without_jit=True)
    def test_mixed_zero_and_nonzero_tensors(self):
        params, grads = _tree(4)
        params["b1"] = jnp.zeros_like(params["b1"])
        out = self.variant(lambda g, p: _update(perpgrad(), g, p))(grads, params)
        np.testing.assert_array_equal(out["b1"], grads["b1"])
        self.assertLess(_rel_dot(out["w1"], params["w1"]), 1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_parallel_and_zero_gradients_stay_finite(self):
        theta = jnp.array([1.0, -2.0, 4.0])
        params = {"a": theta, "b": theta}
        grads = {"a": jnp.zeros(3), "b": jnp.array([2.0, -4.0, 8.0])}
        out = self.variant(lambda g, p: _update(perpgrad(), g, p))(grads, params)
        np.testing.assert_array_equal(out["a"], np.zeros(3))
        self.assertTrue(np.all(np.isfinite(out["b"])))

    def test_bfloat16_params_keep_dtype(self):
        params, grads = _tree(5)
        params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
        grads = jax.tree.map(lambda x: x.astype(jnp.bfloat16), grads)
        out = _update(perpgrad(rescale=False), grads, params)
        for k in params:
            self.assertEqual(out[k].dtype, jnp.bfloat16)
            self.assertLess(_rel_dot(out[k], params[k]), 2e-2, k)

    def test_errors(self):
        params, grads = _tree()
        tx = perpgrad()
        with pytest.raises(
            ValueError, match=r"perpgrad needs params: call update\(grads, state, params\)"
        ):
            tx.update(grads, tx.init(params))
        with pytest.raises(
            ValueError,
            match=r"Unknown perpgrad mode 'layerwise'; valid modes are 'per_tensor', 'global'",
        ):
            perpgrad(mode="layerwise")


class PerpOptimizersTest(chex.TestCase):
    def test_perp_sgd_first_step_is_minus_lr_times_projection(self):
        params, grads = _tree(6)
        updates = _update(perp_sgd(0.1, rescale=False), grads, params)
        for k in params:
            np.testing.assert_allclose(
                updates[k], -0.1 * np_project(params[k], grads[k]), rtol=1e-4, atol=1e-7
            )

    def test_perp_adamw_equals_adamw_on_projected_gradient(self):
        params, grads = _tree(7)
        tx = perp_adamw(1e-2, weight_decay=0.1, mode="global")
        ref = optax.adamw(1e-2, weight_decay=0.1)
        state, ref_state = tx.init(params), ref.init(params)
        for _ in range(2):
            u, state = tx.update(grads, state, params)
            r, ref_state = ref.update(_proj_global(grads, params), ref_state, params)
            chex.assert_trees_all_close(u, r, rtol=1e-4, atol=1e-7)
            params = optax.apply_updates(params, u)

    def test_perp_adamw_trains_under_jit(self):
        rng = np.random.default_rng(8)
        x = jnp.asarray(rng.standard_normal((32, 5)), jnp.float32)
        y = jnp.asarray(rng.integers(0, 3, 32))
        params = {"w": jnp.asarray(rng.standard_normal((5, 3)), jnp.float32), "b": jnp.zeros(3)}
        tx = perp_adamw(1e-2)

        def loss_fn(p):
            return optax.softmax_cross_entropy_with_integer_labels(x @ p["w"] + p["b"], y).mean()

        @jax.jit
        def step(p, s):
            g = jax.grad(loss_fn)(p)
            u, s = tx.update(g, s, p)
            return optax.apply_updates(p, u), s

        state = tx.init(params)
        losses = [float(loss_fn(params))]
        w_norm = float(jnp.linalg.norm(params["w"]))
        for _ in range(3):
            params, state = step(params, state)
            losses.append(float(loss_fn(params)))
        chex.assert_tree_all_finite(params)
        self.assertLess(losses[-1], losses[0])
        # Updates are (almost) tangent to the sphere: ||w|| grows only at second order.
        self.assertLess(abs(float(jnp.linalg.norm(params["w"])) - w_norm), 1e-2 * w_norm)


def _proj_global(grads, params):
    proj = np_project(_flat(params), _flat(grads))
    leaves, treedef = jax.tree.flatten(grads)
    out, i = [], 0
    for leaf in leaves:
        out.append(jnp.asarray(proj[i : i + leaf.size].reshape(leaf.shape), jnp.float32))
        i += leaf.size
    return jax.tree.unflatten(treedef, out)

"""Softmax-Collapse / zero-loss / NLM metrics vs. constructed inputs and NumPy."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsafe.grokking import (
    accuracy,
    global_nlm_cosine,
    nlm_cosine,
    path_name,
    softmax_collapse_fraction,
    zero_loss_fraction,
)


def np_cos_theta_neg_g(p, g):
    p, g = np.ravel(p).astype(np.float64), np.ravel(g).astype(np.float64)
    return -np.dot(p, g) / (np.linalg.norm(p) * np.linalg.norm(g))


def _tree(seed=0):
    rng = np.random.default_rng(seed)
    f = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)  # noqa: E731
    params = {
        "layers": [{"kernel": f(3, 4), "bias": f(4)}, {"kernel": f(4, 2), "bias": f(2)}],
        "scale": f(),
    }
    grads = jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), jnp.float32), params)
    return params, grads


class SoftmaxCollapseTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_float32_large_gap_collapses(self):
        # exp(-30) = 9e-14 is far below float32's half-ulp of 1 (6e-8), even summed over 112
        # classes.
        row = np.full(113, -30.0, np.float32)
        row[5] = 0.0
        logits = np.stack([row, row + 100.0, np.roll(row, 7)])
        frac = self.variant(softmax_collapse_fraction)(logits)
        self.assertEqual(float(frac), 1.0)

    @chex.variants(with_jit=True, without_jit=True)
    def test_small_logits_do_not_collapse(self):
        logits = np.random.default_rng(0).standard_normal((16, 10)).astype(np.float32)
        self.assertEqual(float(self.variant(softmax_collapse_fraction)(logits)), 0.0)

    @chex.variants(with_jit=True, without_jit=True)
    def test_partial_fraction_and_leading_dims(self):
        logits = np.array([[[30.0, 0.0], [1.0, 0.0]], [[0.0, 50.0], [0.0, 0.0]]], np.float32)
        np.testing.assert_array_equal(
            self.variant(softmax_collapse_fraction)(logits), 0.5
        )  # exact: 2 / 4

    @chex.variants(with_jit=True, without_jit=True)
    def test_mask_weights_rows(self):
        logits = np.array([[30.0, 0.0], [1.0, 0.0], [40.0, 0.0], [0.0, 0.0]], np.float32)
        frac = self.variant(lambda z, m: softmax_collapse_fraction(z, mask=m))
        np.testing.assert_array_equal(
            frac(logits, np.array([1.0, 1.0, 0.0, 0.0])), 0.5
        )  # exact: 1 / 2
        np.testing.assert_allclose(frac(logits, np.array([1.0, 0.0, 1.0, 1.0])), 2 / 3, atol=1e-6)
        with pytest.raises(
            ValueError, match=r"mask shape \(3,\) must equal the per-row shape \(4,\)"
        ):
            softmax_collapse_fraction(logits, mask=np.ones(3))

    def test_float64_does_not_collapse_where_float32_does(self):
        logits = np.array([[30.0, 0.0, 0.0], [0.0, -25.0, -40.0]])
        self.assertEqual(float(softmax_collapse_fraction(logits.astype(np.float32))), 1.0)
        with jax.enable_x64(True):
            for fn in (softmax_collapse_fraction, jax.jit(softmax_collapse_fraction)):
                self.assertEqual(float(fn(jnp.asarray(logits, jnp.float64))), 0.0)
            # The dtype argument overrides the input dtype in both directions.
            self.assertEqual(
                float(softmax_collapse_fraction(jnp.asarray(logits, jnp.float64), jnp.float32)), 1.0
            )
            self.assertEqual(
                float(softmax_collapse_fraction(logits.astype(np.float32), jnp.float64)), 0.0
            )
            # A gap beyond float64's resolution (exp(-200) ~ 1e-87) collapses even in float64.
            self.assertEqual(
                float(softmax_collapse_fraction(jnp.array([[0.0, -200.0]], jnp.float64))), 1.0
            )

    def test_float64_dtype_requires_x64(self):
        if jax.config.jax_enable_x64:
            pytest.skip("x64 is globally enabled")
        with pytest.raises(ValueError, match="float64 needs x64 enabled"):
            softmax_collapse_fraction(jnp.zeros((2, 3)), dtype=jnp.float64)


class AccuracyTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_is_argmax_equals_label_with_ties_to_the_first_maximum(self):
        # Logits from {0, 1, 2} over 5 classes: most rows have tied maxima, and NumPy's argmax
        # (the first maximum) decides which label counts as correct.
        rng = np.random.default_rng(0)
        z = rng.integers(0, 3, size=(400, 5)).astype(np.float32)
        y = rng.integers(0, 5, size=400)
        mask = (rng.random(400) > 0.3).astype(np.float32)
        hits = np.argmax(z, -1) == y
        got = self.variant(lambda z, y: accuracy(z, y))(z, y)
        np.testing.assert_allclose(got, hits.mean(), rtol=0, atol=1e-6)
        got = self.variant(lambda z, y, m: accuracy(z, y, mask=m))(z, y, mask)
        np.testing.assert_allclose(got, (hits * mask).sum() / mask.sum(), rtol=0, atol=1e-6)


class ZeroLossTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_counts_exact_zeros_only(self):
        # -0.0 counts as zero; the smallest normal float32 does not. (Subnormals are
        # not used: XLA on CPU flushes them to zero before comparing.)
        loss = jnp.array([0.0, 1e-30, 0.0, 2.0, -0.0, np.finfo(np.float32).tiny, 0.5, 0.0])
        np.testing.assert_array_equal(self.variant(zero_loss_fraction)(loss), 4 / 8)  # exact: 4 / 8

    @chex.variants(with_jit=True, without_jit=True)
    def test_mask(self):
        loss = jnp.array([0.0, 0.0, 1.0, 0.0])
        mask = jnp.array([1.0, 1.0, 1.0, 0.0])
        np.testing.assert_allclose(
            self.variant(lambda x, m: zero_loss_fraction(x, mask=m))(loss, mask), 2 / 3, atol=1e-6
        )

    @chex.variants(with_jit=True, without_jit=True)
    def test_all_and_none(self):
        self.assertEqual(float(self.variant(zero_loss_fraction)(jnp.zeros((3, 5)))), 1.0)
        self.assertEqual(float(self.variant(zero_loss_fraction)(jnp.ones((3, 5)))), 0.0)


class NLMCosineTest(chex.TestCase):
    def test_path_name(self):
        params, _ = _tree()
        flat, _ = jax.tree_util.tree_flatten_with_path(params)
        self.assertEqual(
            [path_name(p) for p, _ in flat],
            ["layers/0/bias", "layers/0/kernel", "layers/1/bias", "layers/1/kernel", "scale"],
        )
        self.assertEqual(path_name(()), "")

    def test_nnx_state_names(self):
        from flax import nnx

        class Model(nnx.Module):
            def __init__(self, rngs):
                self.layers = nnx.List([nnx.Linear(3, 4, rngs=rngs), nnx.Linear(4, 2, rngs=rngs)])

        _, params = nnx.split(Model(nnx.Rngs(0)), nnx.Param)
        grads = jax.tree.map(lambda p: -2.0 * p, params)
        cos = nlm_cosine(params, grads)
        self.assertEqual(
            set(cos), {"layers/0/kernel", "layers/0/bias", "layers/1/kernel", "layers/1/bias"}
        )
        np.testing.assert_allclose(cos["layers/1/kernel"], 1.0, rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(cos["layers/1/bias"], 0.0)  # zero-initialised bias: exactly 0

    @chex.variants(with_jit=True, without_jit=True)
    def test_per_tensor_matches_numpy(self):
        params, grads = _tree()
        cos = self.variant(nlm_cosine)(params, grads)
        self.assertEqual(
            set(cos),
            {"layers/0/kernel", "layers/0/bias", "layers/1/kernel", "layers/1/bias", "scale"},
        )
        expected = {
            "layers/0/kernel": np_cos_theta_neg_g(
                params["layers"][0]["kernel"], grads["layers"][0]["kernel"]
            ),
            "layers/1/bias": np_cos_theta_neg_g(
                params["layers"][1]["bias"], grads["layers"][1]["bias"]
            ),
            "scale": np_cos_theta_neg_g(params["scale"], grads["scale"]),
        }
        for name, value in expected.items():
            np.testing.assert_allclose(cos[name], value, rtol=1e-5, atol=1e-6, err_msg=name)
            chex.assert_shape(cos[name], ())

    @chex.variants(with_jit=True, without_jit=True)
    def test_closed_forms_and_zero_tensors(self):
        theta = jnp.array([1.0, 2.0, -2.0])
        params = {"a": theta, "b": theta, "c": jnp.zeros(3), "d": theta}
        grads = {"a": -3.0 * theta, "b": 0.5 * theta, "c": jnp.ones(3), "d": jnp.zeros(3)}
        cos = self.variant(nlm_cosine)(params, grads)
        # -g parallel to θ -> +1 (pure scaling up); g parallel to θ -> -1; zero tensors -> 0.
        np.testing.assert_allclose([cos[k] for k in "abcd"], [1.0, -1.0, 0.0, 0.0], atol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_global_matches_numpy(self):
        params, grads = _tree(1)
        flat = lambda t: np.concatenate([np.ravel(x) for x in jax.tree.leaves(t)])  # noqa: E731
        np.testing.assert_allclose(
            self.variant(global_nlm_cosine)(params, grads),
            np_cos_theta_neg_g(flat(params), flat(grads)),
            rtol=1e-5,
            atol=1e-6,
        )

    def test_structure_mismatch(self):
        with pytest.raises(ValueError, match="same tree structure"):
            nlm_cosine({"a": jnp.ones(2)}, {"b": jnp.ones(2)})

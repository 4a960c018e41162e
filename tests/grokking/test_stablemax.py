"""StableMax / cross-entropy vs. independent float64 NumPy formulas and closed forms."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from jaxsafe.grokking import (
    log_s,
    log_stablemax,
    s,
    softmax_cross_entropy,
    stablemax,
    stablemax_cross_entropy,
)

X64_MSG = r"float64 needs x64 enabled.*jax_enable_x64.*JAX_ENABLE_X64=1"


def np_s(x):
    x = np.asarray(x, np.float64)
    return np.where(x >= 0, x + 1.0, 1.0 / (1.0 - np.minimum(x, 0.0)))


def np_stablemax(x, axis=-1):
    sx = np_s(x)
    return sx / sx.sum(axis=axis, keepdims=True)


def np_nll(probs, labels):
    return -np.log(np.take_along_axis(probs, labels[..., None], axis=-1)[..., 0])


def np_softmax(x):
    x = np.asarray(x, np.float64)
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _logits(shape=(4, 7, 11), scale=5.0, seed=0):
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


# XLA on CPU flushes float32 subnormals (e.g. s(-3e38) = 3.3e-39) to zero.
TINY = float(np.finfo(np.float32).tiny)
EDGE = np.array([0.0, 1.0, -1.0, 1e30, -1e30, 3e38, -3e38, 0.5, -0.5], np.float32)


class StableMaxTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_s_matches_numpy(self):
        x = np.concatenate([EDGE, _logits((50,), 10.0)])
        np.testing.assert_allclose(self.variant(s)(x), np_s(x), rtol=1e-6, atol=TINY)

    @chex.variants(with_jit=True, without_jit=True)
    def test_s_closed_form_derivatives(self):
        ds = self.variant(jax.vmap(jax.grad(s)))(jnp.array([1.0, -1.0, 0.0, 3.0, -3.0]))
        # s'(x) = 1 for x >= 0 and 1 / (1 - x)^2 for x < 0.
        np.testing.assert_allclose(
            ds, [1.0, 0.25, 1.0, 1.0, 1.0 / 16.0], rtol=1e-6, atol=0
        )  # exact: powers of 2

    @chex.variants(with_jit=True, without_jit=True)
    def test_log_s_is_log_of_s_with_correct_derivative(self):
        x = np.concatenate([EDGE[:3], _logits((50,), 10.0)])
        np.testing.assert_allclose(self.variant(log_s)(x), np.log(np_s(x)), rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(
            self.variant(jax.vmap(jax.grad(log_s)))(jnp.array([0.0, 1.0, -1.0])),
            [1.0, 0.5, 0.5],
            rtol=1e-6,
            atol=0,  # exact: powers of 2
        )

    @chex.variants(with_jit=True, without_jit=True)
    @pytest.mark.slow
    def test_gradients_finite_at_edge_values(self):
        x = jnp.asarray(EDGE)
        for fn in (s, log_s):
            g = self.variant(jax.vmap(jax.grad(fn)))(x)
            self.assertTrue(np.all(np.isfinite(g)), (fn.__name__, g))
        cotangent = jnp.linspace(-1.0, 1.0, x.size)
        for fn in (stablemax, log_stablemax):
            g = self.variant(jax.grad(lambda z, f=fn: jnp.vdot(cotangent, f(z))))(x)
            self.assertTrue(np.all(np.isfinite(g)), (fn.__name__, g))
        g = self.variant(jax.grad(lambda z: stablemax_cross_entropy(z, jnp.array(3)).sum()))(x)
        self.assertTrue(np.all(np.isfinite(g)))

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(0, 1, -1)
    def test_stablemax_matches_numpy(self, axis):
        x = _logits()
        p = self.variant(lambda z: stablemax(z, axis=axis))(x)
        np.testing.assert_allclose(p, np_stablemax(x, axis), rtol=2e-6, atol=1e-6)
        np.testing.assert_allclose(np.sum(p, axis=axis), 1.0, rtol=1e-6, atol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_stablemax_extreme_values(self):
        p = self.variant(stablemax)(jnp.asarray(EDGE))
        self.assertTrue(np.all(np.isfinite(p)))
        np.testing.assert_allclose(p, np_stablemax(EDGE), rtol=1e-5, atol=TINY)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(0, -1)
    def test_log_stablemax_is_log_of_stablemax(self, axis):
        x = _logits()
        logp = self.variant(lambda z: log_stablemax(z, axis=axis))(x)
        np.testing.assert_allclose(logp, np.log(np_stablemax(x, axis)), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(
            logp, np.log(np.asarray(stablemax(x, axis=axis))), rtol=1e-5, atol=1e-6
        )

    @chex.variants(with_jit=True, without_jit=True)
    def test_equals_softmax_of_signed_log1p(self):
        x = _logits(scale=50.0)
        expected = np_softmax(
            np.sign(x.astype(np.float64)) * np.log1p(np.abs(x.astype(np.float64)))
        )
        np.testing.assert_allclose(self.variant(stablemax)(x), expected, rtol=2e-6, atol=1e-6)

    def test_integer_input_is_promoted(self):
        np.testing.assert_array_equal(
            s(jnp.array([-1, 0, 2])), [0.5, 1.0, 3.0]
        )  # exact: 1 / 2, 0 + 1, 2 + 1


class CrossEntropyTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_stablemax_ce_matches_numpy(self):
        x = _logits((6, 5, 9), scale=20.0)
        y = np.random.default_rng(1).integers(0, 9, size=(6, 5))
        loss = self.variant(stablemax_cross_entropy)(x, y)
        chex.assert_shape(loss, (6, 5))
        np.testing.assert_allclose(loss, np_nll(np_stablemax(x), y), rtol=1e-5, atol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_softmax_ce_matches_numpy(self):
        x = _logits((6, 9), scale=20.0)
        y = np.random.default_rng(2).integers(0, 9, size=(6,))
        loss = self.variant(softmax_cross_entropy)(x, y)
        chex.assert_shape(loss, (6,))
        np.testing.assert_allclose(loss, np_nll(np_softmax(x), y), rtol=1e-5, atol=1e-6)

    def test_stablemax_ce_closed_form(self):
        # logits [1, 0, -1]: s = [2, 1, 1/2], sum 7/2.
        loss = stablemax_cross_entropy(jnp.array([[1.0, 0.0, -1.0]] * 3), jnp.array([0, 1, 2]))
        np.testing.assert_allclose(
            loss, [np.log(7 / 4), np.log(7 / 2), np.log(7)], rtol=1e-6, atol=1e-6
        )

    def test_stablemax_ce_gradient_is_the_closed_form(self):
        # dL/dz_j = s'(z_j) / sum_k s(z_k) - [j = y] s'(z_y) / s(z_y), with s'(z) = 1 for z >= 0
        # and 1 / (1 - z)^2 below, so that s'(z) / s(z) = 1 / (1 + |z|). Labels on and off the
        # largest logit.
        x = _logits((6, 9), scale=20.0)
        y = np.array([int(np.argmax(x[0])), 0, 3, 8, int(np.argmin(x[4])), 5])
        with jax.enable_x64(True):
            g = jax.grad(lambda z: stablemax_cross_entropy(z, y, dtype=jnp.float64).sum())(
                jnp.asarray(x, jnp.float64)
            )
        z = x.astype(np.float64)
        ds = np.where(z >= 0, 1.0, 1.0 / (1.0 - z) ** 2)
        want = ds / np_s(z).sum(-1, keepdims=True)
        want[np.arange(6), y] -= 1.0 / (1.0 + np.abs(z[np.arange(6), y]))
        np.testing.assert_allclose(np.asarray(g), want, rtol=1e-12, atol=1e-15)

    @chex.variants(with_jit=True, without_jit=True)
    def test_stablemax_ce_at_extreme_logits_is_finite_and_exact(self):
        # Every label of EDGE's row: s spans 3.3e-39 (below float32's normal range) to 3e38, so
        # the reference's ratio s(z_y) / sum s underflows or overflows; float64 NumPy does not.
        x = np.tile(EDGE, (EDGE.size, 1))
        y = np.arange(EDGE.size)
        loss = self.variant(stablemax_cross_entropy)(x, y)
        z = x.astype(np.float64)
        want = np.log(np_s(z).sum(-1)) - np.log(np_s(z[y, y]))
        np.testing.assert_allclose(loss, want, rtol=1e-6, atol=1e-6)

    def test_softmax_ce_is_exactly_zero_under_collapse_but_stablemax_is_not(self):
        x = jnp.array([[40.0, 0.0, 0.0]])
        self.assertEqual(float(softmax_cross_entropy(x, jnp.array([0]))[0]), 0.0)
        self.assertGreater(float(stablemax_cross_entropy(x, jnp.array([0]))[0]), 0.0)

    @parameterized.parameters(stablemax_cross_entropy, softmax_cross_entropy)
    def test_label_validation(self, loss_fn):
        with pytest.raises(
            ValueError, match=r"labels shape \(4, 1\) must equal logits.shape\[:-1\] \(4,\)"
        ):
            loss_fn(jnp.zeros((4, 3)), jnp.zeros((4, 1), jnp.int32))
        with pytest.raises(ValueError, match="labels must be integer"):
            loss_fn(jnp.zeros((4, 3)), jnp.zeros((4,)))

    @parameterized.parameters(stablemax_cross_entropy, softmax_cross_entropy)
    def test_float64_requires_x64(self, loss_fn):
        if jax.config.jax_enable_x64:
            pytest.skip("x64 is globally enabled")
        with pytest.raises(ValueError, match=X64_MSG):
            loss_fn(jnp.zeros((2, 3)), jnp.zeros((2,), jnp.int32), dtype=jnp.float64)
        with pytest.raises(ValueError, match=X64_MSG):
            loss_fn(jnp.zeros((2, 3)), jnp.zeros((2,), jnp.int32), dtype="float64")

    @parameterized.parameters(stablemax_cross_entropy, softmax_cross_entropy)
    def test_dtype_casts(self, loss_fn):
        loss = loss_fn(
            jnp.zeros((2, 3), jnp.bfloat16), jnp.zeros((2,), jnp.int32), dtype=jnp.float32
        )
        self.assertEqual(loss.dtype, jnp.float32)

    def test_float64_with_x64_enabled(self):
        x = _logits((5, 8), scale=30.0)
        y = np.arange(5)
        with jax.enable_x64(True):
            for fn in (
                stablemax_cross_entropy,
                jax.jit(stablemax_cross_entropy, static_argnames="dtype"),
            ):
                loss = fn(jnp.asarray(x), jnp.asarray(y), dtype=jnp.float64)
                self.assertEqual(loss.dtype, jnp.float64)
                # Tight on purpose: a float32 path anywhere would be off by ~1e-7.
                np.testing.assert_allclose(loss, np_nll(np_stablemax(x), y), rtol=1e-12, atol=1e-12)
            # Softmax collapse disappears in float64: a gap of 30 gives a tiny but nonzero loss.
            sm = softmax_cross_entropy(jnp.array([[30.0, 0.0]]), jnp.array([0]), dtype=jnp.float64)
            self.assertEqual(sm.dtype, jnp.float64)
            # log_softmax = z - logsumexp(z) loses ~ulp(30) = 3.6e-15 absolute here.
            np.testing.assert_allclose(sm, np.log1p(np.exp(-30.0)), rtol=0, atol=1e-15)
            self.assertGreater(float(sm[0]), 0.0)

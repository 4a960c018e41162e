"""PFGM++ kernel: moments, exact radial law, Beta vs Student-t construction, D → ∞, the loss."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from jaxsafe.diffusion import (
    denoise,
    denoising_loss,
    perturbation,
    perturbation_student_t,
    prior_sample,
    r_from_sigma,
)

SHAPE = (4000, 2, 2, 3)  # N = 12
N = 12
P_MIN = 1e-3  # KS p-values below this reject "same distribution"


def sq_norm(n):
    return np.sum(np.asarray(n, np.float64) ** 2, axis=tuple(range(1, n.ndim)))


class AlignmentTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_r_is_sigma_sqrt_D(self):
        sigma = jnp.array([0.002, 1.0, 80.0])
        np.testing.assert_allclose(
            self.variant(lambda s: r_from_sigma(s, 128))(sigma),
            [0.002 * np.sqrt(128), np.sqrt(128), 80 * np.sqrt(128)],
            rtol=1e-6,
            atol=1e-8,
        )


@pytest.mark.parametrize("D", [None, 0, -3.0, float("nan"), "big", float("-inf")])
def test_bad_D_raises(D):
    if D is None:
        with pytest.raises(ValueError, match=r"r = sigma \* sqrt\(D\) is infinite for D=None/inf"):
            r_from_sigma(1.0, D)
        return
    with pytest.raises(
        ValueError, match=r"D must be a static positive number, None or float\('inf'\)"
    ):
        perturbation(jax.random.key(0), (2, 3), 1.0, D)


def test_bad_shape_and_sigma_raise():
    with pytest.raises(
        ValueError, match=r"shape must be \(B, \.\.\.\) with at least one data axis, got \(5,\)"
    ):
        perturbation(jax.random.key(0), (5,), 1.0, 8)
    with pytest.raises(ValueError, match=r"sigma must be a scalar or have shape \(5,\)"):
        perturbation(jax.random.key(0), (5, 3), jnp.ones((3,)), 8)


class GaussianLimitTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_D_none_and_inf_are_exactly_sigma_eps(self):
        key = jax.random.key(7)
        sigma = jnp.array([0.1, 1.0, 5.0])
        # The same formula written out, compiled the same way (XLA may fuse the product under jit).
        want = self.variant(
            lambda k, s: s[:, None, None, None] * jax.random.normal(k, (3, 4, 4, 3))
        )(key, sigma)
        for D in (None, float("inf")):
            got = self.variant(lambda k, s, D=D: perturbation(k, (3, 4, 4, 3), s, D))(key, sigma)
            np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(
            self.variant(lambda k: prior_sample(k, (3, 4, 4, 3), 80.0))(key),
            self.variant(lambda k: 80.0 * jax.random.normal(k, (3, 4, 4, 3)))(key),
        )

    def test_large_D_approaches_gaussian(self):
        sigma = 2.0
        n = perturbation(jax.random.key(1), SHAPE, sigma, 1e6)
        g = sigma * np.asarray(jax.random.normal(jax.random.key(2), SHAPE))
        self.assertGreater(stats.ks_2samp(np.sqrt(sq_norm(n)), np.sqrt(sq_norm(g))).pvalue, P_MIN)
        self.assertGreater(stats.kstest(np.asarray(n)[:, 0, 0, 0] / sigma, "norm").pvalue, P_MIN)
        # ... while small D is detectably not Gaussian with the same sample size
        # (the test has power).
        n_small = perturbation(jax.random.key(1), SHAPE, sigma, 6)
        self.assertLess(stats.ks_2samp(np.sqrt(sq_norm(n_small)), np.sqrt(sq_norm(g))).pvalue, 1e-6)


class KernelTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_second_moment_is_D_over_D_minus_2(self):
        # ‖n‖² / r² ~ BetaPrime(a, b), a = N/2, b = D/2: E = a / (b − 1), so
        # E‖n‖² / (N σ²) = D / (D − 2); Var = a (a + b − 1) / ((b − 2)(b − 1)²) sets the
        # Monte-Carlo tolerance (5 standard errors).
        m, D = 20_000, 16
        sigma = jnp.asarray(np.random.default_rng(0).uniform(0.1, 10.0, m), jnp.float32)
        n = self.variant(lambda k, s: perturbation(k, (m, 2, 2, 3), s, D))(jax.random.key(3), sigma)
        ratio = sq_norm(n) / (N * np.asarray(sigma, np.float64) ** 2)
        a, b = N / 2, D / 2
        se = np.sqrt(a * (a + b - 1) / ((b - 2) * (b - 1) ** 2) * (D / N) ** 2 / m)
        self.assertAlmostEqual(ratio.mean(), D / (D - 2), delta=5 * se)
        self.assertGreater(abs(D / (D - 2) - 1), 10 * se)  # distinguishable from the Gaussian's 1

    def test_radius_follows_beta_prime(self):
        for D in (1.0, 4.0, 128.0):
            sigma = 0.7
            n = perturbation(jax.random.key(4), SHAPE, sigma, D)
            x = sq_norm(n) / (sigma**2 * D)
            self.assertGreater(stats.kstest(x, stats.betaprime(N / 2, D / 2).cdf).pvalue, P_MIN, D)

    def test_direction_is_isotropic(self):
        n = np.asarray(perturbation(jax.random.key(5), SHAPE, 1.0, 8)).reshape(SHAPE[0], N)
        u = n / np.linalg.norm(n, axis=1, keepdims=True)
        # E u = 0 and E u uᵀ = I / N for the uniform distribution on the sphere.
        np.testing.assert_allclose(u.mean(0), 0.0, atol=5 / np.sqrt(N * SHAPE[0]))
        np.testing.assert_allclose(
            u.T @ u / SHAPE[0], np.eye(N) / N, atol=5 * np.sqrt(2 / N**2 / SHAPE[0])
        )

    def test_beta_and_student_t_constructions_agree(self):
        sigma = jnp.asarray(np.random.default_rng(1).uniform(0.5, 2.0, SHAPE[0]), jnp.float32)
        for D in (3.0, 32.0):
            nb = perturbation(jax.random.key(10), SHAPE, sigma, D)
            nt = perturbation_student_t(jax.random.key(11), SHAPE, sigma, D)
            s = np.asarray(sigma, np.float64)
            for f in (
                lambda n, s=s: np.sqrt(sq_norm(n)) / s,
                lambda n, s=s: np.asarray(n, np.float64)[:, 1, 0, 2] / s,
            ):
                self.assertGreater(stats.ks_2samp(f(nb), f(nt)).pvalue, P_MIN, D)
            # A coordinate of a multivariate t with D degrees of freedom and scale σ is t_D(0, σ).
            self.assertGreater(
                stats.kstest(np.asarray(nb)[:, 0, 1, 1] / s, stats.t(D).cdf).pvalue, P_MIN, D
            )

    def test_prior_is_kernel_at_sigma_max(self):
        x = prior_sample(jax.random.key(6), SHAPE, 80.0, D=8)
        self.assertGreater(
            stats.kstest(sq_norm(x) / (80.0**2 * 8), stats.betaprime(N / 2, 4).cdf).pvalue, P_MIN
        )

    def test_float32_radius_is_finite_for_small_D_large_N(self):
        # 1 − B ≈ D / N would cancel in float32 for CIFAR-sized N; the log-odds form does not.
        n = perturbation(jax.random.key(8), (64, 32, 32, 3), 80.0, 1.0)
        self.assertTrue(np.all(np.isfinite(np.asarray(n))))


def linear_F(a, b):
    return lambda x_in, c_noise, labels: (
        a * x_in + b * c_noise.reshape(-1, *([1] * (x_in.ndim - 1)))
    )


class LossTest(chex.TestCase):
    def _numpy_loss(self, a, b, y, sigma, n):
        """λ(σ) Σ (c_skip x + c_out (a c_in x + b c_noise) − y)² with x = y + n, in float64."""
        y, sigma, n = (np.asarray(v, np.float64) for v in (y, sigma, n))
        s = sigma[:, None, None, None]
        c_skip, c_out, c_in, c_noise = (
            0.25 / (s**2 + 0.25),
            0.5 * s / np.sqrt(s**2 + 0.25),
            1 / np.sqrt(s**2 + 0.25),
            np.log(s) / 4,
        )
        x = y + n
        D_x = c_skip * x + c_out * (a * c_in * x + b * c_noise)
        lam = (sigma**2 + 0.25) / (0.5 * sigma) ** 2
        return lam * ((D_x - y) ** 2).sum((1, 2, 3)), (
            lam[:, None, None, None] * 2 * (D_x - y) * c_out * c_in * x
        ).sum() / len(y)

    @chex.variants(with_jit=True, without_jit=True)
    def test_edm_loss_matches_hand_computation(self):
        y = jnp.asarray(np.random.default_rng(2).standard_normal((6, 4, 4, 3)) * 0.5, jnp.float32)
        key = jax.random.key(9)
        # The documented key use: (σ key, noise key) = split(rng); D = None noise is σ ε.
        k_sigma, k_n = jax.random.split(key)
        sigma = np.exp(-1.2 + 1.2 * np.asarray(jax.random.normal(k_sigma, (6,)), np.float64))
        n = sigma[:, None, None, None] * np.asarray(jax.random.normal(k_n, y.shape), np.float64)

        def loss(a):
            return denoising_loss(lambda x, s, c: denoise(linear_F(a, 0.3), x, s, c), y, key)

        got = self.variant(loss)(0.8)
        want, want_grad = self._numpy_loss(0.8, 0.3, y, sigma, n)
        np.testing.assert_allclose(got, want, rtol=2e-4, atol=1e-4)
        # The batch mean is the training objective; its gradient in a matches d/da by hand.
        np.testing.assert_allclose(
            self.variant(jax.grad(lambda a: loss(a).mean()))(0.8), want_grad, rtol=2e-3, atol=1e-3
        )

    @pytest.mark.slow
    def test_finite_D_loss_uses_the_pfgmpp_kernel(self):
        y = jnp.asarray(np.random.default_rng(3).standard_normal((5, 2, 2, 3)), jnp.float32)
        key = jax.random.key(12)
        k_sigma, k_n = jax.random.split(key)
        sigma = jnp.exp(-1.2 + 1.2 * jax.random.normal(k_sigma, (5,)))
        n = perturbation(k_n, y.shape, sigma, 64)
        got = denoising_loss(lambda x, s, c: denoise(linear_F(0.5, -1.0), x, s, c), y, key, D=64)
        want, _ = self._numpy_loss(0.5, -1.0, y, sigma, n)
        np.testing.assert_allclose(got, want, rtol=2e-4, atol=1e-4)

    def test_perfect_denoiser_has_zero_loss_and_labels_reach_it(self):
        y = jnp.ones((3, 2, 2, 1))
        labels = jnp.arange(3)

        def oracle(x, sigma, c):
            np.testing.assert_array_equal(c, labels)
            self.assertEqual(sigma.shape, (3,))
            return y

        np.testing.assert_array_equal(
            denoising_loss(oracle, y, jax.random.key(0), D=8, class_labels=labels), 0.0
        )

    def test_bad_denoiser_output_raises(self):
        with pytest.raises(
            ValueError, match=r"denoiser must return an array of y's shape \(3, 4\), got \(3,\)"
        ):
            denoising_loss(lambda x, s, c: x.sum(1), jnp.ones((3, 4)), jax.random.key(0))

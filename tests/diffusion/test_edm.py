"""EDM preconditioning, loss weight, training σ and schedule vs the paper's formulas in NumPy."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsafe.diffusion import (
    SIGMA_DATA,
    denoise,
    edm_sigma_steps,
    loss_weight,
    precondition,
    sample_training_sigma,
)

SIGMAS = np.array([0.002, 0.01, 0.1, 0.5, 1.0, 3.0, 20.0, 80.0])


def np_precondition(sigma, sd=0.5):
    sigma = np.asarray(sigma, np.float64)
    return (
        sd**2 / (sigma**2 + sd**2),
        sigma * sd / np.sqrt(sigma**2 + sd**2),
        1 / np.sqrt(sigma**2 + sd**2),
        np.log(sigma) / 4,
    )


def linear_F(a, b):
    """F(x_in, c_noise) = a x_in + b c_noise, a toy network with a closed-form denoiser."""
    return lambda x_in, c_noise, labels: (
        a * x_in + b * c_noise.reshape(-1, *([1] * (x_in.ndim - 1)))
    )


class PreconditionTest(chex.TestCase):
    def test_sigma_data_default_is_papers(self):
        self.assertEqual(SIGMA_DATA, 0.5)

    @chex.variants(with_jit=True, without_jit=True)
    def test_matches_table_1(self):
        got = self.variant(precondition)(jnp.asarray(SIGMAS, jnp.float32))
        for g, want in zip(got, np_precondition(SIGMAS)):
            np.testing.assert_allclose(g, want, rtol=2e-6, atol=1e-8)

    @chex.variants(with_jit=True, without_jit=True)
    def test_unit_variance_conditions(self):
        # App. B.6: Var[c_in (y + n)] = c_in² (σ_d² + σ²) = 1 and
        # Var[F_target] = ((1 − c_skip)² σ_d² + c_skip² σ²) / c_out² = 1
        # for Var[y] = σ_d², Var[n] = σ².
        sd = 0.7
        c_skip, c_out, c_in, _ = self.variant(lambda s: precondition(s, sd))(
            jnp.asarray(SIGMAS, jnp.float32)
        )
        s2 = SIGMAS**2
        np.testing.assert_allclose(np.asarray(c_in) ** 2 * (sd**2 + s2), 1.0, rtol=1e-5, atol=1e-6)
        target_var = (
            (1 - np.asarray(c_skip)) ** 2 * sd**2 + np.asarray(c_skip) ** 2 * s2
        ) / np.asarray(c_out) ** 2
        np.testing.assert_allclose(target_var, 1.0, rtol=1e-5, atol=1e-6)

    def test_c_skip_minimises_c_out(self):
        # c_out² = min over c of (1 − c)² σ_d² + c² σ²; the minimiser is c_skip.
        c_skip, c_out, _, _ = precondition(jnp.asarray(SIGMAS))
        grid = np.linspace(0, 1, 200001)
        for s, cs, co in zip(SIGMAS, np.asarray(c_skip), np.asarray(c_out)):
            f = (1 - grid) ** 2 * 0.25 + grid**2 * s**2
            self.assertAlmostEqual(grid[np.argmin(f)], cs, delta=1e-5)
            np.testing.assert_allclose(f.min(), co**2, rtol=1e-5, atol=1e-9)

    def test_unit_variance_monte_carlo(self):
        rng = np.random.default_rng(0)
        m = 200_000
        for s in (0.05, 1.0, 30.0):
            y = rng.standard_normal(m) * SIGMA_DATA
            x = y + s * rng.standard_normal(m)
            c_skip, c_out, c_in, _ = (float(c) for c in precondition(jnp.float32(s)))
            # Var of the sample variance of unit-variance normals is 2/m; 6 standard errors.
            tol = 6 * np.sqrt(2 / m)
            self.assertAlmostEqual(np.var(c_in * x), 1.0, delta=tol)
            self.assertAlmostEqual(np.var((y - c_skip * x) / c_out), 1.0, delta=tol)

    @chex.variants(with_jit=True, without_jit=True)
    def test_loss_weight_is_inverse_c_out_squared(self):
        lam = self.variant(loss_weight)(jnp.asarray(SIGMAS, jnp.float32))
        np.testing.assert_allclose(
            lam, (SIGMAS**2 + 0.25) / (SIGMAS * 0.5) ** 2, rtol=1e-6, atol=4e-6
        )
        np.testing.assert_allclose(
            np.asarray(lam) * np_precondition(SIGMAS)[1] ** 2, 1.0, rtol=1e-5, atol=1e-6
        )


class DenoiseTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_matches_numpy_for_linear_network(self):
        x = np.random.default_rng(1).standard_normal((4, 3, 5, 2)).astype(np.float32)
        sigma = np.array([0.01, 0.3, 2.0, 50.0], np.float32)
        got = self.variant(lambda x, s: denoise(linear_F(0.7, -0.2), x, s))(x, sigma)
        c_skip, c_out, c_in, c_noise = (c[:, None, None, None] for c in np_precondition(sigma))
        want = c_skip * x + c_out * (0.7 * c_in * x - 0.2 * c_noise)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)

    def test_network_sees_c_noise_per_example_and_labels(self):
        seen = {}

        def F(x_in, c_noise, labels):
            seen["c_noise"], seen["labels"] = c_noise, labels
            return jnp.zeros_like(x_in)

        labels = jnp.eye(3)
        out = denoise(F, jnp.ones((3, 2, 2, 1)), jnp.array([0.5, 1.0, 2.0]), labels)
        np.testing.assert_allclose(
            seen["c_noise"], np.log([0.5, 1.0, 2.0]) / 4, rtol=1e-6, atol=2e-7
        )
        self.assertIs(seen["labels"], labels)
        # F = 0 leaves the skip path: D = c_skip x.
        np.testing.assert_allclose(
            out[:, 0, 0, 0], 0.25 / (np.array([0.5, 1.0, 2.0]) ** 2 + 0.25), rtol=1e-6, atol=1e-7
        )

    def test_scalar_sigma_broadcasts(self):
        x = jnp.arange(12.0).reshape(3, 4)
        np.testing.assert_array_equal(
            denoise(linear_F(1.0, 1.0), x, 0.3), denoise(linear_F(1.0, 1.0), x, jnp.full((3,), 0.3))
        )

    def test_denoiser_tends_to_identity_as_sigma_goes_to_zero(self):
        # c_skip → 1 and c_out → 0, so |D − x| ≤ c_out · sup|F| for a bounded network.
        x = jnp.asarray(np.random.default_rng(2).standard_normal((2, 8)), jnp.float32)
        F = lambda x_in, c_noise, labels: jnp.tanh(3 * x_in + c_noise[:, None])
        for s in (1e-2, 1e-4, 1e-6):
            err = float(jnp.max(jnp.abs(denoise(F, x, s) - x)))
            self.assertLessEqual(
                err, s * 0.5 / np.sqrt(s**2 + 0.25) + 1e-6 + s**2 * 4 * float(jnp.max(jnp.abs(x)))
            )

    def test_bad_sigma_shape_raises(self):
        with pytest.raises(
            ValueError, match=r"sigma must be a scalar or have shape \(2,\).*got \(2, 1, 1, 1\)"
        ):
            denoise(linear_F(1.0, 0.0), jnp.ones((2, 4, 4, 3)), jnp.ones((2, 1, 1, 1)))

    def test_bad_network_output_raises(self):
        with pytest.raises(
            ValueError, match=r"F must return an array of x's shape \(2, 4\), got \(2, 1\)"
        ):
            denoise(lambda x, c, lab: x[:, :1], jnp.ones((2, 4)), 1.0)


class TrainingSigmaTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_is_lognormal_with_paper_defaults(self):
        key = jax.random.key(3)
        sigma = self.variant(lambda k: sample_training_sigma(k, 100_000))(key)
        self.assertEqual(sigma.shape, (100_000,))
        np.testing.assert_allclose(
            sigma,
            np.exp(-1.2 + 1.2 * np.asarray(jax.random.normal(key, (100_000,)))),
            rtol=1e-5,
            atol=1e-8,
        )
        log_s = np.log(np.asarray(sigma, np.float64))
        self.assertAlmostEqual(log_s.mean(), -1.2, delta=5 * 1.2 / np.sqrt(1e5))
        self.assertAlmostEqual(log_s.std(), 1.2, delta=5 * 1.2 / np.sqrt(2e5))


class SigmaStepsTest(chex.TestCase):
    def test_matches_eq_5(self):
        t = np.asarray(edm_sigma_steps())
        i = np.arange(18)
        want = (80 ** (1 / 7) + i / 17 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
        np.testing.assert_allclose(t[:-1], want, rtol=1e-6, atol=1e-8)
        self.assertEqual(t.shape, (19,))
        self.assertEqual(t[-1], 0.0)
        np.testing.assert_allclose([t[0], t[-2]], [80.0, 0.002], rtol=1e-6, atol=1e-8)
        self.assertTrue(np.all(np.diff(t) < 0))

    def test_float64_schedule(self):
        with jax.enable_x64(True):
            t = edm_sigma_steps(5, 0.01, 10.0, 3.0, dtype=jnp.float64)
            self.assertEqual(t.dtype, jnp.float64)
            i = np.arange(5)
            want = (10 ** (1 / 3) + i / 4 * (0.01 ** (1 / 3) - 10 ** (1 / 3))) ** 3
            # Tight on purpose: a schedule computed in float32 would be off by ~1e-7.
            np.testing.assert_allclose(np.asarray(t)[:-1], want, rtol=1e-14, atol=1e-15)

    def test_one_step_is_sigma_max_then_zero(self):
        np.testing.assert_array_equal(edm_sigma_steps(1), [80.0, 0.0])


@pytest.mark.parametrize(
    "kwargs, msg",
    [
        ({"num_steps": 0}, r"num_steps must be an integer >= 1, got 0"),
        ({"num_steps": 2.5}, r"num_steps must be an integer >= 1, got 2.5"),
        ({"sigma_min": 0.0}, r"need 0 < sigma_min < sigma_max, got sigma_min=0.0, sigma_max=80.0"),
        ({"sigma_min": 90.0}, r"need 0 < sigma_min < sigma_max, got sigma_min=90.0"),
        ({"rho": 0.0}, r"rho must be > 0, got 0.0"),
    ],
)
def test_sigma_steps_bad_arguments_raise(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        edm_sigma_steps(**kwargs)

"""Heun/Euler samplers: schedule and NFE, a NumPy reference run, exact denoisers for EDM and
finite-D PFGM++ reproducing the data distribution, churn / noise-injection variances, guidance,
dtypes."""

import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import io_callback

from jaxsafe.diffusion import euler_sampler, heun_sampler, prior_sample

MU, S = 0.7, 0.5  # 1-D Gaussian data N(MU, S²) per coordinate


def np_schedule(n=18, smin=0.002, smax=80.0, rho=7.0):
    i = np.arange(n)
    t = (smax ** (1 / rho) + i / max(n - 1, 1) * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho
    return np.append(t, 0.0)


def gaussian_denoiser(x, sigma, labels=None):
    """E[y | y + σε = x] for y ~ N(MU, S² I): MU + S² / (S² + σ²) (x − MU)."""
    s = sigma.reshape(-1, *([1] * (x.ndim - 1)))
    return MU + S**2 / (S**2 + s**2) * (x - MU)


def np_gaussian_denoiser(x, sigma):
    return MU + S**2 / (S**2 + sigma**2) * (x - MU)


def np_heun(x, t, denoiser, heun=True):
    """EDM Algorithm 2 without churn, written out in float64."""
    for i in range(len(t) - 1):
        d = (x - denoiser(x, t[i])) / t[i]
        x_next = x + (t[i + 1] - t[i]) * d
        if heun and i < len(t) - 2:
            d2 = (x_next - denoiser(x_next, t[i + 1])) / t[i + 1]
            x_next = x + (t[i + 1] - t[i]) * (d + d2) / 2
        x = x_next
    return x


def recording(denoiser, log):
    """Wraps a denoiser so every evaluation appends its σ to `log` (an ordered host callback)."""

    def wrapped(x, sigma, labels):
        io_callback(lambda s: log.append(float(np.asarray(s)[0])), None, sigma, ordered=True)
        return denoiser(x, sigma, labels)

    return wrapped


class ScheduleAndNfeTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_heun_evaluates_35_times_on_the_edm_schedule(self):
        log = []
        out = self.variant(lambda z: heun_sampler(recording(gaussian_denoiser, log), z))(
            jnp.ones((2, 3))
        )
        jax.block_until_ready(out)
        t = np_schedule()
        # Step i evaluates D at σ_i and (Heun, i < 17) at σ_{i+1}: σ0 σ1 σ1 σ2 ... σ16 σ17 σ17.
        want = [s for i in range(17) for s in (t[i], t[i + 1])] + [t[17]]
        self.assertLen(log, 35)
        np.testing.assert_allclose(log, want, rtol=1e-6, atol=1e-8)

    def test_euler_evaluates_once_per_step(self):
        log = []
        jax.block_until_ready(
            euler_sampler(
                recording(gaussian_denoiser, log), jnp.ones((2, 3)), num_steps=7, sigma_max=10.0
            )
        )
        np.testing.assert_allclose(log, np_schedule(7, smax=10.0)[:-1], rtol=1e-6, atol=1e-8)

    def test_guidance_calls_the_denoiser_twice_per_evaluation(self):
        log = []
        labels = jnp.zeros((2,))
        jax.block_until_ready(
            heun_sampler(
                recording(gaussian_denoiser, log),
                jnp.ones((2, 3)),
                num_steps=5,
                class_labels=labels,
                guidance=2.0,
            )
        )
        self.assertLen(log, 2 * (2 * 5 - 1))


class ReferenceRunTest(chex.TestCase):
    def test_float64_matches_numpy_algorithm_2(self):
        x0 = np.random.default_rng(0).standard_normal((64, 3)) * 80.0
        with jax.enable_x64(True):
            for sampler, heun in ((heun_sampler, True), (euler_sampler, False)):
                got = jax.jit(
                    lambda z, sampler=sampler: sampler(gaussian_denoiser, z, dtype=jnp.float64)
                )(x0)
                self.assertEqual(got.dtype, jnp.float64)
                np.testing.assert_allclose(
                    got,
                    np_heun(x0, np_schedule(), np_gaussian_denoiser, heun),
                    rtol=1e-12,
                    atol=1e-13,
                )  # tight: float64 must match Algorithm 2 to round-off

    @chex.variants(with_jit=True, without_jit=True)
    def test_float32_matches_numpy_and_jit_matches_eager(self):
        x0 = (np.random.default_rng(1).standard_normal((64, 3)) * 80.0).astype(np.float32)
        got = self.variant(
            lambda z: heun_sampler(gaussian_denoiser, z, num_steps=10, sigma_max=40.0, rho=5.0)
        )(x0)
        self.assertEqual(got.dtype, jnp.float32)
        want = np_heun(
            x0.astype(np.float64), np_schedule(10, smax=40.0, rho=5.0), np_gaussian_denoiser
        )
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)

    def test_float64_without_x64_raises(self):
        with pytest.raises(ValueError, match=r"dtype=float64 needs x64 enabled.*jax_enable_x64"):
            heun_sampler(gaussian_denoiser, jnp.ones((2, 3)), dtype=jnp.float64)


class GaussianDataTest(chex.TestCase):
    X0 = 80.0 * jax.random.normal(jax.random.key(0), (20_000, 2))
    # For Gaussian data the ODE is linear: x(σ) − μ = √((S² + σ²) / (S² + σ_max²)) (x(σ_max) − μ).
    EXACT = MU + S / np.sqrt(S**2 + 80.0**2) * (np.asarray(X0, np.float64) - MU)

    def _max_error(self, sampler, num_steps):
        return np.abs(
            np.asarray(sampler(gaussian_denoiser, self.X0, num_steps=num_steps), np.float64)
            - self.EXACT
        ).max()

    def test_heun_is_second_order_and_euler_first_order_on_the_exact_flow(self):
        heun = [self._max_error(heun_sampler, n) for n in (18, 36, 72)]
        euler = [self._max_error(euler_sampler, n) for n in (18, 36, 72)]
        # Halving the steps' log-spacing divides the error by ≈ 4 (Heun) or ≈ 2 (Euler).
        for coarse, fine in itertools.pairwise(heun):
            self.assertBetween(coarse / fine, 3.0, 5.0)
        for coarse, fine in itertools.pairwise(euler):
            self.assertBetween(coarse / fine, 1.6, 2.5)
        self.assertLess(heun[-1], 0.01)
        for e, h in zip(euler, heun):
            self.assertGreater(e, 2 * h)

    def test_default_heun_reproduces_the_data_distribution(self):
        out = np.asarray(heun_sampler(gaussian_denoiser, self.X0), np.float64)
        n = out.size
        # The σ_max prior ignores the data mean: an offset of μ S / √(S² + σ_max²) ≈ 0.6 % of μ.
        self.assertAlmostEqual(out.mean(), MU, delta=5 * S / np.sqrt(n) + MU * S / 80)
        # 18 Heun steps overshoot the spread of such a narrow Gaussian by ≈ 5 %
        # (see the test above).
        self.assertAlmostEqual(out.std(), S, delta=5 * S / np.sqrt(2 * n) + 0.07 * S)


# A mixture of Gaussians: Σ_k π_k N(μ_k, s_k² I).
PIS = np.array([0.3, 0.7])
MUS2 = np.array([[-1.0, 0.5], [1.5, -0.5]])
SS2 = np.array([0.3, 0.5])


def mixture_moments(pis, mus, ss):
    mean = pis @ mus
    d = mus.shape[1]
    cov = sum(p * (s**2 * np.eye(d) + np.outer(m, m)) for p, m, s in zip(pis, mus, ss)) - np.outer(
        mean, mean
    )
    return mean, cov


def edm_mixture_denoiser(pis, mus, ss):
    """E[y | y + σε = x] = Σ_k w_k(x) (μ_k + s_k² / (s_k² + σ²)(x − μ_k)),
    w_k ∝ π_k N(x; μ_k, (s_k² + σ²) I)."""
    pis, mus, ss = (jnp.asarray(a, jnp.float32) for a in (pis, mus, ss))

    def D(x, sigma, labels=None):
        v = ss[None] ** 2 + sigma[:, None] ** 2  # (B, K)
        r2 = jnp.sum((x[:, None] - mus[None]) ** 2, -1)
        w = jax.nn.softmax(jnp.log(pis) - x.shape[1] / 2 * jnp.log(v) - r2 / (2 * v), axis=-1)
        a = ss[None] ** 2 / v
        return (w * (1 - a)) @ mus + jnp.sum(w * a, -1, keepdims=True) * x

    return D


def pfgmpp_mixture_denoiser(pis, mus, ss, D_aug, num_u=800):
    """E[y | x] under the PFGM++ kernel p_σ(x | y) ∝ (‖x − y‖² + σ² D)^{−(N+D)/2}, N = data dim.

    The kernel is a Gaussian scale mixture: n = σ z / √u, z ~ N(0, I), u = g / D with g ~ χ²_D,
    i.e. u ~ Gamma(D/2, rate D/2); given u the noise is N(0, τ² I), τ² = σ² / u, and the
    Gaussian-data posterior applies per (k, u):
        D(x; σ) = Σ_k ∫ w(k, u | x) (μ_k + s_k² / (s_k² + τ²)(x − μ_k)) du,
        w(k, u | x) ∝ π_k Gamma(u; D/2, D/2) N(x; μ_k, (s_k² + τ²) I).
    The u-integral is a trapezoid rule on a log-spaced grid (u dlog u = du), far more accurate than
    the Monte-Carlo tolerances; as D → ∞, u concentrates at 1 and this becomes the EDM denoiser.
    """
    pis, mus, ss = (jnp.asarray(a, jnp.float32) for a in (pis, mus, ss))
    log_u = jnp.linspace(np.log(1e-12), np.log(1e3), num_u)
    log_prior = (
        D_aug / 2 * (log_u - jnp.exp(log_u))
    )  # Gamma(D/2, D/2) density × Jacobian u, up to a constant

    def D(x, sigma, labels=None):
        v = ss[None, :, None] ** 2 + sigma[:, None, None] ** 2 * jnp.exp(-log_u)  # (B, K, U)
        r2 = jnp.sum((x[:, None] - mus[None]) ** 2, -1)[..., None]
        logw = jnp.log(pis)[None, :, None] + log_prior - x.shape[1] / 2 * jnp.log(v) - r2 / (2 * v)
        w = jax.nn.softmax(logw.reshape(x.shape[0], -1), -1).reshape(logw.shape)
        a = jnp.sum(w * ss[None, :, None] ** 2 / v, -1)  # (B, K)
        return (jnp.sum(w, -1) - a) @ mus + jnp.sum(a, -1, keepdims=True) * x

    return D


class MixtureDataTest(chex.TestCase):
    def test_edm_reproduces_a_gaussian_mixture(self):
        n = 4000
        x0 = 80.0 * jax.random.normal(jax.random.key(1), (n, 2))
        out = np.asarray(
            jax.jit(lambda z: heun_sampler(edm_mixture_denoiser(PIS, MUS2, SS2), z))(x0), np.float64
        )
        comp = np.argmin(((out[:, None] - MUS2[None]) ** 2).sum(-1), axis=1)
        for k in range(2):
            frac = (comp == k).mean()
            self.assertAlmostEqual(frac, PIS[k], delta=5 * np.sqrt(PIS[k] * (1 - PIS[k]) / n))
            pts = out[comp == k]
            np.testing.assert_allclose(
                pts.mean(0), MUS2[k], atol=5 * SS2[k] / np.sqrt(len(pts)) + 0.01
            )
            # 18-step Heun inflates the spread by a few % on such narrow modes
            # (see the finite-D test).
            np.testing.assert_allclose(pts.std(0), SS2[k], rtol=0.1, atol=1e-6)

    @pytest.mark.slow
    def test_pfgmpp_denoiser_tends_to_edm_as_D_grows(self):
        x = jnp.asarray(np.random.default_rng(2).standard_normal((16, 2)) * 2, jnp.float32)
        sigma = jnp.asarray(np.geomspace(0.01, 50, 16), jnp.float32)
        edm = edm_mixture_denoiser(PIS, MUS2, SS2)(x, sigma)
        np.testing.assert_allclose(
            pfgmpp_mixture_denoiser(PIS, MUS2, SS2, 1e4, 4000)(x, sigma), edm, atol=2e-3
        )
        # ... but at D comparable to N the posterior mean under the heavy-tailed kernel differs.
        self.assertGreater(
            float(jnp.abs(pfgmpp_mixture_denoiser(PIS, MUS2, SS2, 2.0)(x, sigma) - edm).max()), 0.1
        )

    @pytest.mark.slow
    def test_finite_D_sampler_reproduces_the_data(self):
        # N = 8 data dimensions, D = 4 < N (the paper's regime D ≪ N, e.g. 128 vs 3072):
        # heavy-tailed prior (E‖x‖² is infinite) at σ_max, the same x–σ ODE, the finite-D exact
        # denoiser.
        d, D, n = 8, 4.0, 2000
        pis, mus, ss = (
            np.array([0.4, 0.6]),
            np.stack([np.full(d, 0.4), np.full(d, -0.4)]),
            np.array([0.3, 0.5]),
        )
        mean, cov = mixture_moments(pis, mus, ss)
        x0 = prior_sample(jax.random.key(3), (n, d), 80.0, D)
        # Heun's error is O(h²): 32 steps keep its bias on the covariance ≈ 0.01 (0.03 at 18 steps).
        run = jax.jit(lambda z, den: heun_sampler(den, z, num_steps=32), static_argnums=1)
        out = np.asarray(run(x0, pfgmpp_mixture_denoiser(pis, mus, ss, D)), np.float64)
        # Standard errors: mean √(C_ii / n); covariance √((C_ii C_jj + C_ij²) / n);
        # 5 of them + bias.
        np.testing.assert_allclose(out.mean(0), mean, atol=5 * np.sqrt(cov[0, 0] / n))
        cov_tol = 5 * np.sqrt((cov[0, 0] ** 2 + cov[0, 1] ** 2) / n) + 0.015
        np.testing.assert_allclose(np.cov(out.T), cov, atol=cov_tol)
        self.assertAlmostEqual(
            (out.mean(1) > 0).mean(), pis[0], delta=5 * np.sqrt(pis[0] * pis[1] / n)
        )
        # Control: the same prior with the Gaussian-kernel (EDM) posterior mean is detectably wrong.
        wrong = np.asarray(run(x0, edm_mixture_denoiser(pis, mus, ss)), np.float64)
        self.assertGreater(np.abs(np.cov(wrong.T) - cov).max(), 3 * cov_tol)


def linear_map_variance(t, gamma, S_noise, alpha):
    """Mean factor and variance of x − MU after the Heun sampler with the Gaussian denoiser.

    With D = MU + a(σ)(x − MU), a = S² / (S² + σ²), every step is linear in e = x − MU:
    injection adds α² σ_i², churn adds (σ̂² − σ_i²) S_noise², then e ← M e with the Euler/Heun
    factor M.
    """
    a = lambda s: S**2 / (S**2 + s**2)
    var, mean_factor = 80.0**2, 1.0
    for i in range(len(t) - 1):
        var += alpha**2 * t[i] ** 2
        t_hat = t[i] * (1 + gamma[i])
        var += (t_hat**2 - t[i] ** 2) * S_noise**2
        h = t[i + 1] - t_hat
        m = 1 + h * (1 - a(t_hat)) / t_hat
        if i < len(t) - 2:
            m = 1 + h / 2 * ((1 - a(t_hat)) / t_hat + (1 - a(t[i + 1])) * m / t[i + 1])
        var, mean_factor = m**2 * var, m * mean_factor
    return mean_factor, var


class StochasticOptionsTest(chex.TestCase):
    X0 = 80.0 * jax.random.normal(jax.random.key(4), (50_000, 4))

    def _check(self, out, mean_factor, var):
        out = np.asarray(out, np.float64).ravel()
        n = out.size
        self.assertAlmostEqual(out.mean(), MU - mean_factor * MU, delta=5 * np.sqrt(var / n) + 1e-3)
        self.assertAlmostEqual(out.var(), var, delta=5 * var * np.sqrt(2 / n))
        return 5 * var * np.sqrt(2 / n)

    def test_churn_adds_the_algorithm_2_noise(self):
        t = np_schedule()
        S_churn, S_min, S_max, S_noise = 7.0, 0.1, 1.0, 1.003
        gamma = np.where((t[:-1] >= S_min) & (t[:-1] <= S_max), S_churn / 18, 0.0)
        out = heun_sampler(
            gaussian_denoiser,
            self.X0,
            S_churn=S_churn,
            S_min=S_min,
            S_max=S_max,
            S_noise=S_noise,
            rng=jax.random.key(5),
        )
        tol = self._check(out, *linear_map_variance(t, gamma, S_noise, 0.0))
        # Distinguishable from no churn, and from churn ignoring the S_min/S_max window.
        for other in (np.zeros(18), np.full(18, S_churn / 18)):
            self.assertGreater(
                abs(linear_map_variance(t, other, S_noise, 0.0)[1] - np.asarray(out).var()), 3 * tol
            )

    def test_churn_is_capped_at_sqrt2_minus_1(self):
        t = np_schedule()
        out = heun_sampler(gaussian_denoiser, self.X0, S_churn=80.0, rng=jax.random.key(6))
        self._check(out, *linear_map_variance(t, np.full(18, np.sqrt(2) - 1), 1.0, 0.0))

    def test_noise_injection_adds_alpha_sigma_eps_each_step(self):
        t = np_schedule()
        out = heun_sampler(
            gaussian_denoiser, self.X0, noise_injection_alpha=0.2, rng=jax.random.key(7)
        )
        tol = self._check(out, *linear_map_variance(t, np.zeros(18), 1.0, 0.2))
        self.assertGreater(
            abs(linear_map_variance(t, np.zeros(18), 1.0, 0.0)[1] - np.asarray(out).var()), 3 * tol
        )

    def test_random_options_need_rng(self):
        for kwargs in ({"S_churn": 1.0}, {"noise_injection_alpha": 0.1}):
            with pytest.raises(
                ValueError, match=r"rng is required when S_churn > 0 or noise_injection_alpha > 0"
            ):
                heun_sampler(gaussian_denoiser, jnp.ones((2, 3)), **kwargs)
        with pytest.raises(ValueError, match=r"rng is required"):
            euler_sampler(gaussian_denoiser, jnp.ones((2, 3)), noise_injection_alpha=0.1)


def labelled_denoiser(x, sigma, labels):
    """Gaussian data whose mean is the label (0 when unconditional)."""
    mu = 0.0 if labels is None else labels[:, None]
    return mu + S**2 / (S**2 + sigma[:, None] ** 2) * (x - mu)


class GuidanceTest(chex.TestCase):
    X0 = 80.0 * jax.random.normal(jax.random.key(8), (8, 3))
    LABELS = jnp.linspace(-2.0, 2.0, 8)

    @chex.variants(with_jit=True, without_jit=True)
    def test_w0_is_unconditional_and_w1_conditional(self):
        run = self.variant(
            lambda z, c, w: heun_sampler(labelled_denoiser, z, class_labels=c, guidance=w)
        )
        plain = self.variant(lambda z, c: heun_sampler(labelled_denoiser, z, class_labels=c))
        np.testing.assert_allclose(
            run(self.X0, self.LABELS, 0.0), plain(self.X0, None), rtol=1e-6, atol=1e-6
        )
        np.testing.assert_allclose(
            run(self.X0, self.LABELS, 1.0), plain(self.X0, self.LABELS), rtol=1e-6, atol=1e-6
        )

    def test_w_extrapolates_the_conditional_direction(self):
        def by_hand(x, sigma, labels):
            return labelled_denoiser(x, sigma, None) + 3.0 * (
                labelled_denoiser(x, sigma, labels) - labelled_denoiser(x, sigma, None)
            )

        np.testing.assert_allclose(
            heun_sampler(labelled_denoiser, self.X0, class_labels=self.LABELS, guidance=3.0),
            heun_sampler(by_hand, self.X0, class_labels=self.LABELS),
            rtol=1e-5,
            atol=1e-5,
        )

    def test_bad_arguments_raise(self):
        with pytest.raises(ValueError, match=r"guidance \(classifier-free\) needs class_labels"):
            heun_sampler(labelled_denoiser, self.X0, guidance=2.0)
        with pytest.raises(
            ValueError, match=r"class_labels must have leading dimension 8, got shape \(3,\)"
        ):
            heun_sampler(labelled_denoiser, self.X0, class_labels=jnp.zeros(3))
        with pytest.raises(
            ValueError,
            match=r"denoiser must return an array of the latents' shape \(8, 3\), got \(8,\)",
        ):
            heun_sampler(lambda x, s, c: x[:, 0], self.X0)
        with pytest.raises(ValueError, match=r"latents must have a batch axis"):
            heun_sampler(gaussian_denoiser, jnp.float32(1.0))

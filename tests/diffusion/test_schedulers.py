"""DDPM / DDIM / Euler schedulers: hand computations, closed forms, and diffusers' scheduler
loops."""

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsafe.diffusion import schedulers as S

SD = S.SchedulerConfig()
T = 1000


def np_alphas_cumprod(beta_schedule="scaled_linear", b0=0.00085, b1=0.012):
    if beta_schedule == "linear":
        b = np.linspace(b0, b1, T)
    else:
        b = np.linspace(np.sqrt(b0), np.sqrt(b1), T) ** 2
    return b, np.cumprod(1.0 - b)


AB = np_alphas_cumprod()[1]


def _rand(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


# --------------------------------------------------------------------------- schedule


@pytest.mark.parametrize(
    "schedule,b0,b1", [("scaled_linear", 0.00085, 0.012), ("linear", 1e-4, 0.02)]
)
def test_betas_and_alphas_cumprod_match_numpy(schedule, b0, b1):
    cfg = S.SchedulerConfig(beta_schedule=schedule, beta_start=b0, beta_end=b1)
    b, ab = np_alphas_cumprod(schedule, b0, b1)
    np.testing.assert_allclose(S.betas(cfg), b, rtol=1e-6, atol=1e-10)
    np.testing.assert_allclose(S.alphas_cumprod(cfg), ab, rtol=1e-6, atol=1e-11)
    assert S.betas(cfg)[0] == np.float32(b0) and np.isclose(
        S.betas(cfg)[-1], b1, rtol=1e-6, atol=1e-9
    )
    # ᾱ_0 = 1 − β_0 and ᾱ_1 = (1 − β_0)(1 − β_1), by hand.
    np.testing.assert_allclose(
        S.alphas_cumprod(cfg)[:2], [1 - b[0], (1 - b[0]) * (1 - b[1])], rtol=1e-7, atol=1e-8
    )


def test_sd_timesteps_by_hand():
    np.testing.assert_array_equal(
        S.timesteps(SD, 50), np.arange(981, 0, -20)
    )  # ⌊1000/50⌋ = 20, +1 offset
    assert S.timesteps(SD, 50).dtype == jnp.int32
    np.testing.assert_array_equal(S.timesteps(SD, 3), [667, 334, 1])  # ⌊1000/3⌋ = 333
    trailing = S.SchedulerConfig(timestep_spacing="trailing")
    np.testing.assert_array_equal(S.timesteps(trailing, 50), np.arange(999, 0, -20))
    np.testing.assert_array_equal(
        S.timesteps(trailing, 3), [999, 666, 332]
    )  # round(1000, 666.7, 333.3) − 1
    linspace = S.SchedulerConfig(timestep_spacing="linspace")
    np.testing.assert_array_equal(S.timesteps(linspace, 4), [999, 666, 333, 0])
    np.testing.assert_array_equal(S.euler_timesteps(linspace, 4), [999, 666, 333, 0])
    np.testing.assert_array_equal(
        S.euler_timesteps(linspace, 3), [999, 499.5, 0]
    )  # not rounded for Euler
    np.testing.assert_array_equal(
        S.timesteps(S.SchedulerConfig(steps_offset=0), 4), [750, 500, 250, 0]
    )


def test_trailing_always_has_n_steps():
    # diffusers' arange gives 62 entries (the last −1) for N = 61.
    t = np.asarray(S.timesteps(S.SchedulerConfig(timestep_spacing="trailing"), 61))
    assert t.shape == (61,) and t.min() >= 0 and t[0] == 999


def test_previous_timesteps():
    np.testing.assert_array_equal(S.previous_timesteps(SD, "ddim", 50), np.arange(961, -20, -20))
    np.testing.assert_array_equal(S.previous_timesteps(SD, "ddpm", 3), [334, 1, -1])
    # DDIM's t − ⌊T/N⌋ is not the next timestep for trailing spacing with T mod N ≠ 0 (diffusers).
    tr = S.SchedulerConfig(timestep_spacing="trailing")
    np.testing.assert_array_equal(S.previous_timesteps(tr, "ddim", 3), [666, 333, -1])


def test_euler_sigmas_by_hand():
    sig = np.asarray(S.euler_sigmas(SD, 50))
    t = np.arange(981, 0, -20)
    np.testing.assert_allclose(sig[:-1], np.sqrt((1 - AB[t]) / AB[t]), rtol=1e-6, atol=1e-8)
    assert sig.shape == (51,) and sig[-1] == 0
    lin = np.asarray(S.euler_sigmas(S.SchedulerConfig(timestep_spacing="linspace"), 3))
    s = np.sqrt((1 - AB) / AB)
    np.testing.assert_allclose(
        lin, [s[999], 0.5 * (s[499] + s[500]), s[0], 0], rtol=1e-6, atol=1e-8
    )
    # init noise: √(σ_max² + 1) for leading, σ_max for trailing / linspace (diffusers)
    assert np.isclose(
        S.init_noise_sigma(SD, "euler", 50), np.sqrt(sig[0] ** 2 + 1), rtol=1e-6, atol=1e-6
    )
    tr = S.SchedulerConfig(timestep_spacing="trailing")
    assert np.isclose(S.init_noise_sigma(tr, "euler", 10), s[999], rtol=1e-6, atol=1e-6)
    assert S.init_noise_sigma(SD, "ddim", 50) == 1.0


# --------------------------------------------------------------------------- config errors


def test_config_errors():
    with pytest.raises(ValueError, match=r"beta_schedule must be one of .*'cosine'"):
        S.SchedulerConfig(beta_schedule="cosine")
    with pytest.raises(ValueError, match=r"prediction_type must be one of .*'eps'"):
        S.SchedulerConfig(prediction_type="eps")
    with pytest.raises(ValueError, match=r"timestep_spacing must be one of"):
        S.SchedulerConfig(timestep_spacing="uniform")
    with pytest.raises(ValueError, match=r"num_inference_steps must be in \[1, 1000\].*got 1001"):
        S.timesteps(SD, 1001)
    with pytest.raises(ValueError, match=r"num_inference_steps must be in \[1, 1000\].*got 0"):
        S.euler_sigmas(SD, 0)
    with pytest.raises(
        ValueError, match=r"steps_offset=1 pushes .* to 1000, past num_train_timesteps - 1 = 999"
    ):
        S.timesteps(SD, 1000)
    with pytest.raises(
        ValueError, match=r"kind must be one of \('ddim', 'ddpm', 'euler'\), got 'pndm'"
    ):
        S.sample_loop(SD, "pndm", lambda x, t: x, jnp.zeros((1, 2)), 2)
    with pytest.raises(ValueError, match=r"kind must be 'ddim' or 'ddpm'"):
        S.previous_timesteps(SD, "euler", 10)


def test_from_dict():
    sd15 = {  # Stable Diffusion 1.5's scheduler/scheduler_config.json
        "_class_name": "PNDMScheduler",
        "_diffusers_version": "0.6.0",
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "num_train_timesteps": 1000,
        "set_alpha_to_one": False,
        "skip_prk_steps": True,
        "steps_offset": 1,
        "trained_betas": None,
        "clip_sample": False,
    }
    assert S.SchedulerConfig.from_dict(sd15) == SD
    v = S.SchedulerConfig.from_dict(
        {"prediction_type": "v_prediction", "timestep_spacing": "trailing"}
    )
    assert (v.prediction_type, v.timestep_spacing, v.beta_schedule) == (
        "v_prediction",
        "trailing",
        "scaled_linear",
    )
    with pytest.raises(ValueError, match=r"trained_betas=\[0.1\] is not supported"):
        S.SchedulerConfig.from_dict({"trained_betas": [0.1]})
    with pytest.raises(ValueError, match=r"use_karras_sigmas=True is not supported"):
        S.SchedulerConfig.from_dict({"use_karras_sigmas": True})


# --------------------------------------------------------------------------- step maths


class StepMathsTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_add_noise_velocity_predict_x0(self):
        x0, eps = _rand(3, 4, 4, 2), _rand(3, 4, 4, 2, seed=1)
        t = np.array([0, 500, 999])
        ab = AB[t][:, None, None, None]
        x_t = self.variant(functools.partial(S.add_noise, SD))(x0, eps, t)
        np.testing.assert_allclose(
            x_t, np.sqrt(ab) * x0 + np.sqrt(1 - ab) * eps, rtol=1e-5, atol=1e-6
        )
        v = self.variant(functools.partial(S.velocity, SD))(x0, eps, t)
        np.testing.assert_allclose(
            v, np.sqrt(ab) * eps - np.sqrt(1 - ab) * x0, rtol=1e-5, atol=1e-6
        )
        # x0 = √ᾱ x_t − √(1−ᾱ) v (v-prediction) and x0 = (x_t − √(1−ᾱ) ε)/√ᾱ (epsilon) recover x0.
        vcfg = S.SchedulerConfig(prediction_type="v_prediction")
        got_v = self.variant(functools.partial(S.predict_x0, vcfg))(x_t, v, t)
        np.testing.assert_allclose(
            got_v,
            np.sqrt(ab) * np.asarray(x_t) - np.sqrt(1 - ab) * np.asarray(v),
            rtol=1e-5,
            atol=1e-6,
        )
        np.testing.assert_allclose(got_v, x0, atol=2e-5)
        got_e = self.variant(functools.partial(S.predict_x0, SD))(x_t, eps, t)
        np.testing.assert_allclose(
            got_e, (np.asarray(x_t) - np.sqrt(1 - ab) * eps) / np.sqrt(ab), rtol=1e-5, atol=1e-5
        )
        np.testing.assert_allclose(got_e, x0, atol=1e-4)  # 1/√ᾱ_999 ≈ 15 amplifies float32 rounding
        scfg = S.SchedulerConfig(prediction_type="sample", clip_sample=True, clip_sample_range=0.5)
        np.testing.assert_array_equal(
            self.variant(functools.partial(S.predict_x0, scfg))(x_t, x0, t), np.clip(x0, -0.5, 0.5)
        )

    @chex.variants(with_jit=True, without_jit=True)
    def test_ddim_step_matches_formula(self):
        x_t, out, z = _rand(2, 3, 3, 4), _rand(2, 3, 3, 4, seed=1), _rand(2, 3, 3, 4, seed=2)
        for cfg, t, t_prev, eta in [
            (SD, 981, 961, 0.0),
            (SD, 501, 481, 1.0),
            (SD, 1, -19, 0.3),
            (S.SchedulerConfig(set_alpha_to_one=True), 1, -19, 0.0),
        ]:
            a, a_prev = (
                AB[t],
                (AB[t_prev] if t_prev >= 0 else (1.0 if cfg.set_alpha_to_one else AB[0])),
            )
            x0 = (x_t - np.sqrt(1 - a) * out) / np.sqrt(a)
            sigma = eta * np.sqrt((1 - a_prev) / (1 - a)) * np.sqrt(1 - a / a_prev)
            want = np.sqrt(a_prev) * x0 + np.sqrt(1 - a_prev - sigma**2) * out + sigma * z
            step = self.variant(functools.partial(S.ddim_step, cfg, eta=eta, noise=z))
            np.testing.assert_allclose(step(out, t, t_prev, x_t), want, rtol=1e-5, atol=2e-5)

    @chex.variants(with_jit=True, without_jit=True)
    def test_ddim_eta0_with_true_noise_stays_on_the_forward_trajectory(self):
        # With ε̂ = ε and η = 0, one DDIM step maps x_t(x0, ε) to x_{t'}(x0, ε) exactly.
        x0, eps = _rand(2, 8), _rand(2, 8, seed=1)
        x_t = np.sqrt(AB[700]) * x0 + np.sqrt(1 - AB[700]) * eps
        got = self.variant(functools.partial(S.ddim_step, SD))(eps, 700, 300, x_t)
        np.testing.assert_allclose(
            got, np.sqrt(AB[300]) * x0 + np.sqrt(1 - AB[300]) * eps, atol=1e-5
        )

    @chex.variants(with_jit=True, without_jit=True)
    def test_ddpm_step_matches_posterior(self):
        x_t, out, z = _rand(2, 4, 4, 1), _rand(2, 4, 4, 1, seed=1), _rand(2, 4, 4, 1, seed=2)
        for cfg, t, t_prev in [
            (SD, 981, 961),
            (S.SchedulerConfig(prediction_type="v_prediction"), 400, 200),
            (SD, 1, -1),
        ]:
            a, a_prev = AB[t], (AB[t_prev] if t_prev >= 0 else 1.0)
            beta = 1 - a / a_prev
            if cfg.prediction_type == "epsilon":
                x0 = (x_t - np.sqrt(1 - a) * out) / np.sqrt(a)
            else:
                x0 = np.sqrt(a) * x_t - np.sqrt(1 - a) * out
            mean = (
                np.sqrt(a_prev) * beta / (1 - a) * x0
                + np.sqrt(1 - beta) * (1 - a_prev) / (1 - a) * x_t
            )
            var = max((1 - a_prev) / (1 - a) * beta, 1e-20)
            got = self.variant(functools.partial(S.ddpm_step, cfg))(out, t, t_prev, x_t, z)
            np.testing.assert_allclose(got, mean + np.sqrt(var) * z, rtol=1e-5, atol=2e-5)
        # No noise is added at t = 0.
        got0 = self.variant(functools.partial(S.ddpm_step, SD))(out, 0, -1, x_t, z)
        np.testing.assert_allclose(
            got0, (x_t - np.sqrt(1 - AB[0]) * out) / np.sqrt(AB[0]), rtol=1e-5, atol=2e-5
        )

    @chex.variants(with_jit=True, without_jit=True)
    def test_euler_step_with_exact_denoiser(self):
        # x = x0 + σ ε with ε̂ = ε: one Euler step lands on x0 + σ_next ε (the ODE is linear in σ).
        x0, eps = _rand(2, 8), _rand(2, 8, seed=1)
        got = self.variant(functools.partial(S.euler_step, SD))(eps, 7.0, 2.5, x0 + 7.0 * eps)
        np.testing.assert_allclose(got, x0 + 2.5 * eps, rtol=1e-5, atol=1e-5)
        # v-prediction: the model sees x/√(σ²+1) = √ᾱ x0 + √(1−ᾱ) ε with ᾱ = 1/(σ²+1).
        s = 7.0
        ab = 1 / (s**2 + 1)
        v = np.sqrt(ab) * eps - np.sqrt(1 - ab) * x0
        vcfg = S.SchedulerConfig(prediction_type="v_prediction")
        got = self.variant(functools.partial(S.euler_step, vcfg))(v, s, 0.0, x0 + s * eps)
        np.testing.assert_allclose(got, x0, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(
            self.variant(S.euler_scale_input)(s, x0 + s * eps),
            (x0 + s * eps) / np.sqrt(s**2 + 1),
            rtol=1e-6,
            atol=1e-7,
        )


# --------------------------------------------------------------------------- sample_loop


def _oracle(cfg, c):
    """ε̂ of the exact denoiser for data concentrated at the point c (in the VP variable x_t)."""
    ab = np_alphas_cumprod()[1]  # the configs used here all have SD betas

    def eps_hat(x_t, t):
        a = jnp.interp(t, jnp.arange(T), ab).astype(
            jnp.float32
        )  # Euler timesteps can be fractional
        return (x_t - jnp.sqrt(a) * c) / jnp.sqrt(1 - a)

    return eps_hat


class SampleLoopTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_exact_denoiser_recovers_the_data_point(self):
        c = jnp.asarray(_rand(1, 6) * 0.5)
        x_T = _rand(3, 6, seed=3)
        key = jax.random.key(0)
        for cfg, kind, kw in [
            (S.SchedulerConfig(set_alpha_to_one=True), "ddim", {}),
            (S.SchedulerConfig(timestep_spacing="trailing"), "euler", {}),
            (SD, "euler", {}),
            (SD, "ddpm", {"rng": key}),
            (S.SchedulerConfig(set_alpha_to_one=True), "ddim", {"eta": 1.0, "rng": key}),
        ]:
            loop = self.variant(
                functools.partial(
                    S.sample_loop, cfg, kind, _oracle(cfg, c), num_inference_steps=10, **kw
                )
            )
            np.testing.assert_allclose(
                loop(x_T), np.broadcast_to(c, x_T.shape), atol=2e-4, err_msg=kind
            )

    def test_loop_is_one_scan_and_traces_the_model_once(self):
        calls = []

        def denoise(x, t):
            calls.append(t.shape)
            return 0.1 * x

        jaxpr = jax.make_jaxpr(lambda x: S.sample_loop(SD, "ddim", denoise, x, 25))(
            jnp.ones((2, 4))
        )
        assert calls == [()]
        assert [e.primitive.name for e in jaxpr.jaxpr.eqns].count("scan") == 1

    def test_per_sample_keys_make_samples_independent_of_their_batch(self):
        x_T = _rand(3, 5)
        keys = jax.random.split(jax.random.key(7), 3)
        f = jax.jit(lambda x, k: S.sample_loop(SD, "ddpm", lambda x, t: 0.3 * x, x, 8, rng=k))
        full = f(x_T, keys)
        np.testing.assert_array_equal(f(x_T[1:2], keys[1:2]), full[1:2])
        np.testing.assert_array_equal(f(x_T, keys), full)  # deterministic
        other = f(x_T, jax.random.split(jax.random.key(8), 3))
        assert np.abs(np.asarray(other - full)).min() > 0
        # raw uint32 keys work too and mean the same keys
        np.testing.assert_array_equal(f(x_T, jax.random.key_data(keys)), full)

    def test_trajectory_and_noise_argument(self):
        x_T, noise = _rand(2, 3), _rand(4, 2, 3, seed=1)
        x0, traj = S.sample_loop(
            SD, "ddpm", lambda x, t: 0.5 * x, x_T, 4, noise=noise, return_trajectory=True
        )
        assert traj.shape == (4, 2, 3)
        np.testing.assert_array_equal(traj[-1], x0)
        # the first step by hand with the given noise
        first = S.ddpm_step(SD, 0.5 * x_T, 751, 501, x_T, noise[0])
        np.testing.assert_allclose(traj[0], first, rtol=1e-6, atol=1e-7)

    def test_sample_loop_errors(self):
        x = jnp.zeros((2, 3))
        with pytest.raises(ValueError, match=r"needs rng \(or noise\); got rng=None"):
            S.sample_loop(SD, "ddpm", lambda x, t: x, x, 4)
        with pytest.raises(ValueError, match=r"eta=0.5\) needs rng"):
            S.sample_loop(SD, "ddim", lambda x, t: x, x, 4, eta=0.5)
        with pytest.raises(ValueError, match=r"noise must have shape .* \(4, 2, 3\), got \(4, 3\)"):
            S.sample_loop(SD, "ddpm", lambda x, t: x, x, 4, noise=jnp.zeros((4, 3)))
        with pytest.raises(ValueError, match=r"either rng or noise"):
            S.sample_loop(
                SD, "ddpm", lambda x, t: x, x, 4, noise=jnp.zeros((4, 2, 3)), rng=jax.random.key(0)
            )
        with pytest.raises(
            ValueError, match=r"one PRNG key or a batch of 2 keys .*got key shape \(3,\)"
        ):
            S.sample_loop(
                SD, "ddpm", lambda x, t: x, x, 4, rng=jax.random.split(jax.random.key(0), 3)
            )
        with pytest.raises(
            ValueError, match=r"denoise_fn must return the sample's shape \(2, 3\), got \(2,\)"
        ):
            S.sample_loop(SD, "ddim", lambda x, t: x[:, 0], x, 4)
        with pytest.raises(ValueError, match=r"ddim_step needs noise when eta != 0"):
            S.ddim_step(SD, x, 981, 961, x, eta=0.5)


# --------------------------------------------------------------------------- diffusers


def _fake_model_np(x, t):
    return (0.8 * x + 0.3 * np.sin(x) + 1e-3 * t).astype(np.float32)


def _fake_model_jnp(x, t):
    return 0.8 * x + 0.3 * jnp.sin(x) + 1e-3 * t


def _diffusers_loop(kind, cfg, n, x_T, noise, eta):
    """diffusers' own set_timesteps / scale_model_input / step loop.

    Returns:
        ``(timesteps, sigmas, traj)``.
    """
    torch = pytest.importorskip("torch", reason="torch is needed for the diffusers reference")
    diffusers = pytest.importorskip(
        "diffusers", reason="diffusers is not installed (pip install diffusers)"
    )
    from diffusers.schedulers import scheduling_ddpm

    kw = {
        k: getattr(cfg, k)
        for k in (
            "num_train_timesteps",
            "beta_start",
            "beta_end",
            "beta_schedule",
            "prediction_type",
            "timestep_spacing",
            "steps_offset",
        )
    }
    if kind == "ddim":
        sched = diffusers.DDIMScheduler(
            **kw, set_alpha_to_one=cfg.set_alpha_to_one, clip_sample=cfg.clip_sample
        )
    elif kind == "ddpm":
        sched = diffusers.DDPMScheduler(**kw, clip_sample=cfg.clip_sample)
    else:
        sched = diffusers.EulerDiscreteScheduler(**kw)
    sched.set_timesteps(n)
    x = torch.from_numpy(x_T) * sched.init_noise_sigma
    traj = []
    for i, t in enumerate(sched.timesteps):
        out = torch.from_numpy(_fake_model_np(sched.scale_model_input(x, t).numpy(), float(t)))
        z = torch.from_numpy(noise[i])
        if kind == "ddim":
            x = sched.step(out, t, x, eta=eta, variance_noise=z if eta > 0 else None).prev_sample
        elif kind == "ddpm":  # DDPMScheduler draws its own noise: hand it ours
            orig = scheduling_ddpm.randn_tensor
            scheduling_ddpm.randn_tensor = lambda *a, _z=z, **k: _z
            try:
                x = sched.step(out, t, x).prev_sample
            finally:
                scheduling_ddpm.randn_tensor = orig
        else:
            x = sched.step(out, t, x).prev_sample
        traj.append(x.numpy())
    sigmas = sched.sigmas.numpy() if kind == "euler" else None
    return sched.timesteps.numpy(), sigmas, np.stack(traj)


# One case per kind and prediction type runs by default; the rest of the grid is marked slow.
FAST = {
    ("ddim", "leading", "epsilon", 10, 0.0),
    ("ddim", "trailing", "v_prediction", 30, 0.0),
    ("ddpm", "leading", "v_prediction", 10, 0.0),
    ("ddpm", "trailing", "epsilon", 30, 0.0),
    ("euler", "linspace", "epsilon", 10, 0.0),
    ("euler", "trailing", "v_prediction", 10, 0.0),
    ("ddim", "trailing", "v_prediction", 20, 0.5),
}
GRID = [
    (kind, spacing, pred, n, 0.0)
    for kind in ("ddim", "ddpm", "euler")
    for spacing in ("leading", "trailing", "linspace")
    for pred in ("epsilon", "v_prediction")
    for n in ((10, 30) if spacing == "trailing" else (10,))
]
GRID += [
    ("ddim", "leading", "epsilon", 20, 1.0),
    ("ddim", "trailing", "v_prediction", 20, 0.5),
    ("ddim", "linspace", "epsilon", 30, 0.7),
]
CASES = [c if c in FAST else pytest.param(*c, marks=pytest.mark.slow) for c in GRID]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("kind,spacing,pred,n,eta", CASES)
def test_full_loop_matches_diffusers(kind, spacing, pred, n, eta):
    cfg = S.SchedulerConfig(timestep_spacing=spacing, prediction_type=pred)
    x_T, noise = _rand(2, 6, 6, 4, seed=10), _rand(n, 2, 6, 6, 4, seed=11)
    ref_t, ref_sigmas, ref = _diffusers_loop(kind, cfg, n, x_T, noise, eta)

    stochastic = kind == "ddpm" or eta > 0
    loop = jax.jit(
        lambda x, z: S.sample_loop(
            cfg,
            kind,
            _fake_model_jnp,
            x,
            n,
            eta=eta,
            noise=z if stochastic else None,
            return_trajectory=True,
        )
    )
    _, traj = loop(x_T, noise)
    traj = np.asarray(traj)
    if kind == "euler":
        np.testing.assert_array_equal(S.euler_timesteps(cfg, n), ref_t)
        # ours are float64-exact (checked by hand above); diffusers' are computed in float32
        np.testing.assert_allclose(S.euler_sigmas(cfg, n), ref_sigmas, rtol=5e-5, atol=1e-6)
        # compare in the variable the model sees, x/√(σ²+1), as Euler's x grows to ~40 at
        # σ_max ≈ 14.6 (1e-5 there is below float32 resolution); the last sample (σ = 0) is
        # compared as is.
        scale = np.sqrt(ref_sigmas[1:] ** 2 + 1)[:, None, None, None, None]
        traj, ref = traj / scale, ref / scale
    else:
        np.testing.assert_array_equal(S.timesteps(cfg, n), ref_t)
    assert np.abs(traj - ref).max() < 1e-5, np.abs(traj - ref).max(axis=(1, 2, 3, 4))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("kind", ["ddim", "ddpm"])
def test_linear_betas_with_clip_sample_match_diffusers(kind):
    # the test bed's schedule (configs/t2i/testbed.py): Ho et al.'s linear betas, x̂_0 clipped
    # to [−1, 1]
    cfg = S.SchedulerConfig(
        beta_schedule="linear", beta_start=1e-4, beta_end=0.02, clip_sample=True
    )
    n = 25
    x_T, noise = _rand(2, 6, 6, 3, seed=12), 0.5 * _rand(n, 2, 6, 6, 3, seed=13)
    _, _, ref = _diffusers_loop(kind, cfg, n, x_T, noise, 0.0)
    _, traj = jax.jit(
        lambda x, z: S.sample_loop(
            cfg,
            kind,
            _fake_model_jnp,
            x,
            n,
            noise=z if kind == "ddpm" else None,
            return_trajectory=True,
        )
    )(x_T, noise)
    assert np.abs(np.asarray(traj) - ref).max() < 1e-5
    # clipping was active: the unclipped x̂_0 of the first step leaves [−1, 1]
    x0 = S.predict_x0(
        dataclasses.replace(cfg, clip_sample=False), x_T, _fake_model_jnp(x_T, 961.0), 961
    )
    assert np.abs(np.asarray(x0)).max() > 1.5


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_timesteps_match_diffusers_for_many_n():
    diffusers = pytest.importorskip(
        "diffusers", reason="diffusers is not installed (pip install diffusers)"
    )
    for spacing in ("leading", "trailing", "linspace"):
        cfg = S.SchedulerConfig(timestep_spacing=spacing)
        kw = {
            "beta_schedule": "scaled_linear",
            "beta_start": 0.00085,
            "beta_end": 0.012,
            "steps_offset": 1,
            "timestep_spacing": spacing,
        }
        ddim, euler = diffusers.DDIMScheduler(**kw), diffusers.EulerDiscreteScheduler(**kw)
        # 48: .5 ties decided by arange's float steps; 61, 103: diffusers' trailing has n + 1
        # entries
        for n in (1, 2, 3, 7, 10, 25, 30, 48, 50, 61, 100, 103, 333, 500, 999):
            ddim.set_timesteps(n)
            euler.set_timesteps(n)
            ref = ddim.timesteps.numpy()[:n]  # diffusers' trailing has a spurious −1 for some n
            np.testing.assert_array_equal(S.timesteps(cfg, n), ref, err_msg=f"{spacing} {n}")
            np.testing.assert_array_equal(S.euler_timesteps(cfg, n), euler.timesteps.numpy()[:n])


def test_from_dict_of_diffusers_config():
    diffusers = pytest.importorskip(
        "diffusers", reason="diffusers is not installed (pip install diffusers)"
    )
    sched = diffusers.DDIMScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        steps_offset=1,
        set_alpha_to_one=False,
        clip_sample=False,
        prediction_type="v_prediction",
        timestep_spacing="trailing",
    )
    cfg = S.SchedulerConfig.from_dict(dict(sched.config))
    assert cfg == S.SchedulerConfig(prediction_type="v_prediction", timestep_spacing="trailing")
    np.testing.assert_allclose(
        S.alphas_cumprod(cfg), sched.alphas_cumprod.numpy(), rtol=2e-6, atol=1e-6
    )

"""Text-to-image sampler: CFG, negative prompts, per-sample seeds, against a NumPy DDIM loop."""

import chex
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsafe.diffusion import schedulers as S
from jaxsafe.diffusion import t2i

SD = S.SchedulerConfig()
LATENT = (4, 4, 3)
L, D = 5, 8


def _ab():
    return np.cumprod(1 - np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2)


def toy_unet_np(params, x, t, emb):
    """A stand-in UNet whose output depends on the latents, the timestep and the text embedding."""
    e = emb.mean(axis=(1, 2))[:, None, None, None]
    return params["w"] * x + params["a"] * e + 1e-4 * np.asarray(t, np.float64)[:, None, None, None]


def toy_unet(params, x, t, emb):
    e = emb.mean(axis=(1, 2))[:, None, None, None]
    return params["w"] * x + params["a"] * e + 1e-4 * t.astype(jnp.float32)[:, None, None, None]


PARAMS = {"w": np.float32(0.3), "a": np.float32(0.7)}


def np_ddim(x_T, eps_fn, n=5):
    """DDIM (η = 0) in float64 with ε = eps_fn(x, t), SD schedule, leading spacing + offset 1,
    as diffusers."""
    ab = _ab()
    x = x_T.astype(np.float64)
    ratio = 1000 // n
    for t in np.arange(n)[::-1] * ratio + 1:
        eps = eps_fn(x, np.full((x.shape[0],), t))
        a, a_prev = ab[t], (ab[t - ratio] if t - ratio >= 0 else ab[0])
        x0 = (x - np.sqrt(1 - a) * eps) / np.sqrt(a)
        x = np.sqrt(a_prev) * x0 + np.sqrt(1 - a_prev) * eps
    return x


def np_ddim_cfg(x_T, cond, uncond, scale, n=5):
    def eps(x, t):
        e_c = toy_unet_np(PARAMS, x, t, cond)
        if uncond is None:
            return e_c
        e_u = toy_unet_np(PARAMS, x, t, uncond)
        return e_u + scale * (e_c - e_u)

    return np_ddim(x_T, eps, n)


def _emb(b, seed):
    return np.random.default_rng(seed).standard_normal((b, L, D)).astype(np.float32)


COND, NEG, EMPTY = _emb(3, 0), _emb(3, 1), _emb(1, 2)
SEEDS = np.array([11, 22, 33], np.int32)


class GuidanceTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_cfg_formula(self):
        u, c = np.array([1.0, -2.0, 0.5]), np.array([3.0, 1.0, 0.5])
        cfg = self.variant(t2i.classifier_free_guidance)
        np.testing.assert_allclose(
            cfg(u, c, 7.5), u + 7.5 * (c - u), atol=0
        )  # exact: dyadic values
        np.testing.assert_allclose(cfg(u, c, 1.0), c, atol=0)  # exact: dyadic values
        np.testing.assert_allclose(cfg(u, c, 0.0), u, atol=0)  # exact: dyadic values


def test_initial_noise_is_per_seed_and_standard_normal():
    z = np.asarray(t2i.initial_noise(np.array([5, 6, 5]), (32, 32, 4)))
    np.testing.assert_array_equal(z[0], z[2])
    assert not np.allclose(z[0], z[1], atol=1e-6)
    np.testing.assert_array_equal(t2i.initial_noise(np.array([6]), (32, 32, 4))[0], z[1])
    assert abs(z.mean()) < 0.03 and abs(z.std() - 1) < 0.03  # 12,288 draws


@pytest.fixture(scope="module")
def ddim_sampler():
    return t2i.make_t2i_sampler(
        toy_unet, SD, kind="ddim", num_inference_steps=5, guidance_scale=7.5, latent_shape=LATENT
    )


def test_matches_numpy_ddim_with_cfg(ddim_sampler):
    x_T = np.asarray(t2i.initial_noise(SEEDS, LATENT))
    got = ddim_sampler(PARAMS, COND, NEG, SEEDS)
    np.testing.assert_allclose(got, np_ddim_cfg(x_T, COND, NEG, 7.5), rtol=1e-4, atol=1e-4)
    # the empty prompt's (1, L, D) embedding is shared by the batch
    got_empty = ddim_sampler(PARAMS, COND, EMPTY, SEEDS)
    np.testing.assert_allclose(
        got_empty, np_ddim_cfg(x_T, COND, np.repeat(EMPTY, 3, 0), 7.5), rtol=1e-4, atol=1e-4
    )
    # a negative prompt replaces the unconditional embedding, so it changes the image
    assert np.abs(np.asarray(got) - np.asarray(got_empty)).max() > 1e-2


def test_guidance_one_is_the_conditional_path():
    s1 = t2i.make_t2i_sampler(
        toy_unet, SD, num_inference_steps=5, guidance_scale=1.0, latent_shape=LATENT
    )
    x_T = np.asarray(t2i.initial_noise(SEEDS, LATENT))
    got = s1(PARAMS, COND, NEG, SEEDS)
    np.testing.assert_allclose(got, np_ddim_cfg(x_T, COND, None, 1.0), rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(s1(PARAMS, COND, EMPTY, SEEDS), got)


def test_seeds_reproducible_and_independent_of_batch(ddim_sampler):
    a = np.asarray(ddim_sampler(PARAMS, COND, NEG, SEEDS))
    np.testing.assert_array_equal(ddim_sampler(PARAMS, COND, NEG, SEEDS), a)
    b = np.asarray(ddim_sampler(PARAMS, COND, NEG, SEEDS + 1))
    assert np.abs(a - b).reshape(3, -1).max(axis=1).min() > 1e-2
    # sample 1 alone (same seed, prompt, negative prompt) is the same image
    single = t2i.make_t2i_sampler(
        toy_unet, SD, kind="ddim", num_inference_steps=5, latent_shape=LATENT
    )
    np.testing.assert_allclose(
        single(PARAMS, COND[1:2], NEG[1:2], SEEDS[1:2])[0], a[1], rtol=1e-6, atol=1e-6
    )


@pytest.mark.parametrize("kind,eta", [("ddpm", 0.0), ("ddim", 0.5), ("euler", 0.0)])
def test_stochastic_and_euler_kinds_per_seed(kind, eta):
    f = t2i.make_t2i_sampler(
        toy_unet, SD, kind=kind, eta=eta, num_inference_steps=4, latent_shape=LATENT
    )
    a = np.asarray(f(PARAMS, COND, NEG, SEEDS))
    np.testing.assert_array_equal(f(PARAMS, COND, NEG, SEEDS), a)
    np.testing.assert_allclose(
        f(PARAMS, COND[2:], NEG[2:], SEEDS[2:])[0], a[2], rtol=1e-6, atol=1e-6
    )
    if kind == "euler":  # deterministic given x_T: equals sample_loop with the same CFG denoiser

        def denoise(x, t):
            tt = jnp.full((6,), t)
            out = toy_unet(PARAMS, jnp.concatenate([x, x]), tt, jnp.concatenate([NEG, COND]))
            return out[:3] + 7.5 * (out[3:] - out[:3])

        want = S.sample_loop(SD, "euler", denoise, t2i.initial_noise(SEEDS, LATENT), 4)
        np.testing.assert_allclose(a, want, rtol=1e-5, atol=1e-5)


def test_one_batched_unet_call_per_step_and_decode():
    shapes = []

    def unet(params, x, t, emb):
        shapes.append((x.shape, t.shape, emb.shape))
        return toy_unet(params, x, t, emb)

    f = t2i.make_t2i_sampler(
        unet,
        SD,
        num_inference_steps=3,
        latent_shape=LATENT,
        decode=t2i.make_decode(lambda p, z: 10.0 * z, scaling_factor=20.0),
    )
    img = f(PARAMS, COND, NEG, SEEDS)
    assert shapes == [((6, *LATENT), (6,), (6, L, D))]  # traced once: [uncond; cond] in one call
    lat = t2i.make_t2i_sampler(toy_unet, SD, num_inference_steps=3, latent_shape=LATENT)(
        PARAMS, COND, NEG, SEEDS
    )
    np.testing.assert_allclose(
        img, np.clip(np.asarray(lat) * 10.0 / 20.0 / 2 + 0.5, 0, 1), rtol=1e-6, atol=1e-6
    )


def test_input_errors(ddim_sampler):
    with pytest.raises(ValueError, match=r"cond_emb must be \(B, L, D\), got shape \(3, 8\)"):
        ddim_sampler(PARAMS, COND[:, 0], NEG, SEEDS)
    with pytest.raises(
        ValueError, match=r"uncond_emb must be .*\(L, D\) = \(5, 8\).*got shape \(2, 5, 8\)"
    ):
        ddim_sampler(PARAMS, COND, NEG[:2], SEEDS)
    with pytest.raises(
        ValueError, match=r"seeds must be an integer array of shape \(3,\).*float32 \(3,\)"
    ):
        ddim_sampler(PARAMS, COND, NEG, SEEDS.astype(np.float32))
    with pytest.raises(ValueError, match=r"kind must be one of .*got 'plms'"):
        t2i.make_t2i_sampler(toy_unet, SD, kind="plms")
    with pytest.raises(
        ValueError, match=r"latent_shape must be \(H, W, C\) of positive ints, got \(64, 64\)"
    ):
        t2i.make_t2i_sampler(toy_unet, SD, latent_shape=(64, 64))
    with pytest.raises(ValueError, match=r"num_inference_steps must be in \[1, 1000\]"):
        t2i.make_t2i_sampler(toy_unet, SD, num_inference_steps=0)
    with pytest.raises(ValueError, match=r"scaling_factor must be > 0"):
        t2i.make_decode(lambda p, z: z, 0.0)


def test_composed_terms_take_their_own_aux_values():
    """``make_generator`` with per-prompt values (SPM's transport strength) and ``terms``: each
    composed prompt's ε uses its own value, ∅ the prompt's, against a float64 DDIM loop of
    ε̃ = ε_∅ + s (ε_p − ε_∅) + w (ε_q − ε_∅)."""
    words = {"": 0, "red": 1, "blue": 2, "circle": 3, "square": 4}

    def tokenize(texts):
        return np.array([[words[w] for w in (t.split() + [""] * L)[:L]] for t in texts], np.int32)

    def encode(params, ids):
        return jnp.asarray(ids, jnp.float32)[..., None] * jnp.linspace(0.1, 1.0, D)

    def gamma(ids):
        return 1.0 + 0.25 * np.asarray(ids)[:, 0]

    gen = t2i.make_generator(
        lambda p, x, t, e, v: v[:, None, None, None] * toy_unet(p, x, t, e),
        encode,
        tokenize,
        SD,
        latent_shape=LATENT,
        num_inference_steps=5,
        guidance_scale=3.0,
        batch_size=2,
        aux=lambda p, ids, emb: 1.0 + 0.25 * ids[:, 0].astype(jnp.float32),
    )
    prompts, others, seeds = (
        ["red circle", "blue square", "circle"],
        ["blue", "square", "red"],
        np.array([5, 6, 7], np.int32),
    )
    got = gen(PARAMS, prompts, seeds, terms=([others], [0.7]))

    emb = {
        k: np.asarray(encode(None, tokenize(v)), np.float64)
        for k, v in (("p", prompts), ("q", others), ("u", [""] * 3))
    }
    g_p, g_q = (
        gamma(tokenize(prompts))[:, None, None, None],
        gamma(tokenize(others))[:, None, None, None],
    )

    def eps(x, t):
        e_u, e_p = (g_p * toy_unet_np(PARAMS, x, t, emb[k]) for k in "up")
        e_q = g_q * toy_unet_np(PARAMS, x, t, emb["q"])
        return e_u + 3.0 * (e_p - e_u) + 0.7 * (e_q - e_u)

    want = np_ddim(np.asarray(t2i.initial_noise(seeds, LATENT)), eps)
    assert np.abs(g_q - g_p).max() > 0.2  # the terms' values differ from the prompts'
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)

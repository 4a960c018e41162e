"""SafeGen: the mosaic target (paper form and reference-code form), the loss against numpy, the
mosaic operator, and that a run trains only the self-attention layers."""

import dataclasses
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsafe.diffusion import schedulers
from jaxsafe.erasure import safegen

SCHED = schedulers.SchedulerConfig(beta_schedule="linear", beta_start=1e-4, beta_end=0.02)
SHAPE = (3, 4, 4, 2)


def _np_alpha_bar(t):
    b = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
    return np.cumprod(1 - b)[t][:, None, None, None]


def _latents(seed=0):
    r = np.random.default_rng(seed)
    return [r.standard_normal(SHAPE).astype(np.float32) for _ in range(3)]


class MosaicTargetTest(chex.TestCase):
    @chex.all_variants(with_pmap=False)
    def test_paper_target_denoises_the_unsafe_latent_to_the_mosaic(self):
        z_u, z_m, eps = _latents()
        t = jnp.array([0, 258, 999])
        target = self.variant(lambda *a: safegen.mosaic_target(SCHED, *a, "paper"))(
            z_u, z_m, eps, t
        )
        ab = _np_alpha_bar(np.asarray(t))
        # (float32 ᾱ_0 = 0.9999 carries 1 − ᾱ_0 to ~1e-3 relative: the rtol.)
        np.testing.assert_allclose(
            target, eps + np.sqrt(ab / (1 - ab)) * (z_u - z_m), rtol=1e-3, atol=1e-4
        )
        # Its x̂_0 at x_t = √ᾱ z_u + √(1−ᾱ) ε is the mosaic, at every t. (x̂_0 divides by
        # √ᾱ_999 ≈ 0.0064: float32 rounding of x_t, |x_t| ~ 4, is amplified ~160×.)
        x_t = schedulers.add_noise(SCHED, z_u, eps, t)
        np.testing.assert_allclose(schedulers.predict_x0(SCHED, x_t, target, t), z_m, atol=3e-4)

    @chex.all_variants(with_pmap=False)
    def test_reference_target_drops_the_noise_level_factor(self):
        z_u, z_m, eps = _latents(1)
        t = jnp.array([10, 258, 900])
        target = self.variant(lambda *a: safegen.mosaic_target(SCHED, *a, "reference"))(
            z_u, z_m, eps, t
        )
        np.testing.assert_allclose(target, eps + z_u - z_m, rtol=1e-6, atol=1e-6)
        # ... so its x̂_0 is the mosaic only where ᾱ_t = 1/2 (t = 258 on this schedule).
        x0 = np.asarray(
            schedulers.predict_x0(SCHED, schedulers.add_noise(SCHED, z_u, eps, t), target, t)
        )
        ab = _np_alpha_bar(np.asarray(t))
        # |x0| up to ~200 at t = 900, float32 rounding amplified by 1/√ᾱ_900 ≈ 60.
        np.testing.assert_allclose(x0, z_u - np.sqrt((1 - ab) / ab) * (z_u - z_m), atol=3e-4)
        assert np.abs(x0[1] - z_m[1]).max() < 1e-2 < np.abs(x0[0] - z_m[0]).max()

    def test_v_prediction_targets(self):
        v_sched = dataclasses.replace(SCHED, prediction_type="v_prediction")
        z_u, z_m, eps = _latents(2)
        t = jnp.array([5, 400, 990])
        v = safegen.mosaic_target(v_sched, z_u, z_m, eps, t, "paper")
        x_t = schedulers.add_noise(v_sched, z_u, eps, t)
        np.testing.assert_allclose(schedulers.predict_x0(v_sched, x_t, v, t), z_m, atol=1e-4)
        ab = _np_alpha_bar(np.asarray(t))
        np.testing.assert_allclose(
            safegen.mosaic_target(v_sched, z_u, z_m, eps, t, "reference"),
            np.sqrt(ab) * eps - np.sqrt(1 - ab) * (z_u - z_m),
            rtol=1e-5,
            atol=1e-5,
        )

    def test_bad_arguments(self):
        z_u, z_m, eps = _latents()
        with pytest.raises(ValueError, match="target='exact'; expected one of"):
            safegen.mosaic_target(SCHED, z_u, z_m, eps, jnp.zeros(3, int), "exact")
        with pytest.raises(ValueError, match="must have the same shape"):
            safegen.mosaic_target(SCHED, z_u, z_m[:2], eps, jnp.zeros(3, int))
        with pytest.raises(ValueError, match="positive divisor"):
            safegen.pixelate(jnp.zeros((1, 32, 32, 3)), 5)


def test_pixelate_is_the_block_mean():
    x = np.random.default_rng(0).uniform(-1, 1, (2, 8, 8, 3)).astype(np.float32)
    out = np.asarray(safegen.pixelate(jnp.asarray(x), 4))
    for i in range(2):
        for j in range(2):
            block = x[:, 4 * i : 4 * i + 4, 4 * j : 4 * j + 4]
            np.testing.assert_allclose(
                out[:, 4 * i : 4 * i + 4, 4 * j : 4 * j + 4],
                np.broadcast_to(block.mean((1, 2), keepdims=True), block.shape),
                rtol=1e-6,
                atol=1e-6,
            )


def _toy_eps(w):
    """ε(x, t, c) = tanh(x · w0 + mean(c) w1 + t/1000)."""

    def eps(x, t, emb):
        c = emb.mean(axis=(1, 2))[:, None, None, None]
        return jnp.tanh(x * w[0] + c * w[1] + t[:, None, None, None] / 1000.0)

    return eps


@pytest.mark.parametrize("target", ["default", "paper", "reference"])
def test_loss_equals_an_independent_numpy_computation(target):
    """ "default": the loss and the config as shipped, whose target must be the authors' training
    script's ε_m = ε + (z_u − z_m); the unconditional prompt tiled to 8 rows (a mesh's shards)
    must act as the one row."""
    from configs.erasure import safegen as safegen_config

    w = jnp.array([0.8, -0.3])
    kw = {} if target == "default" else {"target": target}
    loss_fn = safegen.make_safegen_loss(
        lambda p, f, x, t, e: _toy_eps(p)(x, t, e),
        SCHED,
        weight_mosaic=0.1,
        weight_preserve=0.9,
        **kw,
    )
    if target == "default":
        assert safegen_config.get_config().safegen.target == "reference"
        assert safegen_config.get_config("cpu").safegen.target == "reference"
    z_u, z_m, z_n = _latents(4)
    uncond = np.random.default_rng(5).standard_normal((1, 3, 5)).astype(np.float32)
    if target == "default":
        uncond = np.repeat(uncond, 8, 0)
    batch = {"z_unsafe": z_u, "z_mosaic": z_m, "z_normal": z_n, "uncond": uncond}
    rng = jax.random.key(7)
    loss, (metrics, _) = jax.jit(loss_fn)(w, None, {}, batch, rng)
    # The same draws from the same key split, then everything in float64 numpy.
    _, _, k_t, k_e, k_n = jax.random.split(rng, 5)
    t = np.asarray(jax.random.randint(k_t, (3,), 0, 1000))
    eps = np.asarray(jax.random.normal(k_e, SHAPE), np.float64)
    eps_n = np.asarray(jax.random.normal(k_n, SHAPE), np.float64)
    ab = _np_alpha_bar(t)
    x_t = np.sqrt(ab) * z_u + np.sqrt(1 - ab) * eps
    x_n = np.sqrt(ab) * z_n + np.sqrt(1 - ab) * eps_n
    c = uncond.mean()

    def np_eps(x):
        return np.tanh(x * 0.8 + c * -0.3 + t[:, None, None, None] / 1000.0)

    if target == "paper":
        eps_m = (x_t - np.sqrt(ab) * z_m) / np.sqrt(1 - ab)
    else:
        eps_m = eps + z_u - z_m
    l_m = np.mean((np_eps(x_t) - eps_m) ** 2)
    l_p = np.mean((np_eps(x_n) - eps_n) ** 2)
    np.testing.assert_allclose(metrics["mosaic_loss"], l_m, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(metrics["preserve_loss"], l_p, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(loss, 0.1 * l_m + 0.9 * l_p, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_minibatches_are_drawn_from_the_pools_and_gradients_flow():
    w = jnp.array([0.8, -0.3])
    loss_fn = safegen.make_safegen_loss(
        lambda p, f, x, t, e: _toy_eps(p)(x, t, e), SCHED, batch_size=5
    )
    z_u, z_m, _ = _latents(6)
    batch = {
        "z_unsafe": z_u,
        "z_mosaic": z_m,
        "z_normal": np.zeros((7, 4, 4, 2), np.float32),
        "uncond": np.zeros((1, 3, 5), np.float32),
    }
    g = jax.grad(lambda p: loss_fn(p, None, {}, batch, jax.random.key(0))[0])(w)
    assert np.all(np.isfinite(g)) and float(jnp.abs(g).sum()) > 0
    with pytest.raises(ValueError, match="one row per triplet"):
        safegen.make_safegen_loss(lambda p, f, x, t, e: x, SCHED)(
            w, None, {}, batch, jax.random.key(0)
        )


def test_testbed_triplets_show_the_concept_its_mosaic_and_no_concept():
    from experiments.erase_safegen import testbed_images
    from jaxsafe.data import shapes
    from jaxsafe.data.shapes_metrics import oracle_predict
    from jaxsafe.nn import oracle as oracle_lib

    u, m, n = testbed_images(["square"], 12, "mosaic", 16)
    assert u.shape == m.shape == n.shape == (12, 32, 32, 3)
    oracle = oracle_lib.load()
    square = shapes.CONCEPTS["square"][1]
    assert np.all(oracle_predict(oracle, u)[:, 0] == square)
    assert np.all(oracle_predict(oracle, n)[:, 0] != square)
    np.testing.assert_allclose(
        m, np.asarray(safegen.pixelate(jnp.asarray(u), 16)), atol=0
    )  # exact: censor() makes m by this very pixelate call
    # For a colour concept the mosaic is grey as well: equal channels, the pixelation's luminance.
    u, m, _ = testbed_images(["red"], 4, "grey_mosaic", 4)
    assert np.all(oracle_predict(oracle, u)[:, 1] == shapes.CONCEPTS["red"][1])
    p = np.asarray(safegen.pixelate(jnp.asarray(u), 4))
    np.testing.assert_allclose(
        m[..., 0], 0.299 * p[..., 0] + 0.587 * p[..., 1] + 0.114 * p[..., 2], atol=1e-6
    )
    np.testing.assert_array_equal(m[..., 0], m[..., 2])


@pytest.mark.slow
def test_a_smoke_run_changes_only_self_attention(tiny_folder, erase_on_8_devices):
    """The smoke run on 8 devices (SafeGen's one unconditional prompt row is tiled over the 8
    batch shards): exactly the UNet's self-attention moved."""
    from jaxsafe.weights.convert import read_safetensors

    def weights(folder, rel):
        return {k: np.asarray(v) for k, v in read_safetensors([os.path.join(folder, rel)]).items()}

    summary = erase_on_8_devices("safegen", {"optimizer.lr": 1e-2})
    unet = os.path.join("unet", "diffusion_pytorch_model.safetensors")
    text = os.path.join("text_encoder", "model.safetensors")
    before, after = weights(tiny_folder, unet), weights(summary["export"], unet)
    changed = {k for k in before if not np.array_equal(before[k], after[k])}
    attn1 = {k for k in before if ".attn1." in k}
    assert changed == attn1 and attn1
    t0, t1 = weights(tiny_folder, text), weights(summary["export"], text)
    assert all(np.array_equal(t0[k], t1[k]) for k in t0)


def test_a_csv_manifest_of_triplets_is_read_resized_and_centre_cropped(tmp_path):
    from PIL import Image

    from experiments.erase_safegen import manifest_images

    r = np.random.default_rng(0)
    imgs = {}
    for name, size in (("u.png", (48, 32)), ("m.png", (32, 32)), ("n.png", (32, 64))):
        imgs[name] = r.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(imgs[name]).save(tmp_path / name)
    (tmp_path / "meta.csv").write_text(
        "nude_image_path,mos_image_path,norm_image_path\nu.png,m.png,n.png\n"
    )
    u, m, n = manifest_images(str(tmp_path / "meta.csv"), 32)
    assert u.shape == m.shape == n.shape == (1, 32, 32, 3)
    np.testing.assert_allclose(m[0], imgs["m.png"] / 127.5 - 1.0, atol=1e-6)  # already 32²
    np.testing.assert_allclose(u[0], imgs["u.png"][:, 8:40] / 127.5 - 1.0, atol=1e-6)  # crop
    np.testing.assert_allclose(n[0], imgs["n.png"][16:48] / 127.5 - 1.0, atol=1e-6)
    (tmp_path / "bad.csv").write_text("image,text\nu.png,x\n")
    with pytest.raises(ValueError, match="expected a CSV with columns nude_image_path"):
        manifest_images(str(tmp_path / "bad.csv"), 32)

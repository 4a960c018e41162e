"""One More Step: the ᾱ = 0 identities, its guidance, the step's statistics against the closed
form, the time-free UNet, the base sampler started from given latents, and loading an OMS folder
(text encoder named by reference, fp16 variant, mismatches)."""

import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxsafe.diffusion import oms, pipeline, schedulers, t2i
from jaxsafe.nn.unet2d_condition import UNet2DConditionConfig, UNet2DConditionModel
from jaxsafe.treepath import named_leaves
from jaxsafe.weights import diffusers

SD_SCHEDULER = schedulers.SchedulerConfig(
    beta_schedule="scaled_linear",
    beta_start=0.00085,
    beta_end=0.012,
    steps_offset=1,
    timestep_spacing="leading",
)


def test_v_at_zero_alpha_bar_is_minus_x0():
    rs = np.random.RandomState(0)
    x0, eps = rs.randn(3, 4), rs.randn(3, 4)
    a = 0.0
    v = np.sqrt(a) * eps - np.sqrt(1 - a) * x0  # Salimans & Ho's v, written out
    np.testing.assert_allclose(oms.x0_from_v(v), x0, atol=1e-12)


def test_guidance_scale_one_is_the_conditional_prediction():
    rs = np.random.RandomState(1)
    u, c = rs.randn(2, 5), rs.randn(2, 5)
    np.testing.assert_allclose(oms.guide(u, c, 1.0), c, atol=1e-12)
    np.testing.assert_allclose(oms.guide(u, c, 2.0), 2 * c - u, atol=1e-12)


def test_first_alpha_bar_is_the_product_at_the_first_timestep():
    # SD's DDIM at 20 "leading" steps with offset 1 starts at t = 951.
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2
    want = np.prod(1 - betas[:952])
    got = oms.first_alpha_bar(SD_SCHEDULER, "ddim", 20)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize(
    "noise,std", [("code", lambda a: 1 - a), ("paper", lambda a: np.sqrt(1 - a))]
)
def test_step_of_a_constant_predictor_matches_the_closed_form(noise, std):
    # v_ψ ≡ −c: x̂₀ = c, so x_τ₀ ~ N(√ᾱ c, σ²) with σ = 1 − ᾱ (code) or √(1 − ᾱ) (paper).
    a, c, n = 0.3, 1.5, 4096
    x = oms.initial_latents(
        lambda p, x, e: jnp.full_like(x, -c),
        None,
        jnp.zeros((n, 1, 2)),
        jnp.zeros((1, 1, 2)),
        jnp.arange(n),
        latent_shape=(2, 2, 3),
        alpha_bar_tau0=a,
        noise=noise,
    )
    x = np.asarray(x).reshape(-1)
    se = std(a) / np.sqrt(x.size)
    assert abs(x.mean() - np.sqrt(a) * c) < 5 * se
    assert abs(x.std() - std(a)) < 0.02


def test_initial_latents_guide_against_the_empty_prompt_and_use_fresh_noise():
    # A predictor that returns its embedding's mean: guided v = u + s (c − u) exactly.
    def apply(p, x, e):
        return jnp.broadcast_to(e.mean(axis=(1, 2))[:, None, None, None], x.shape)

    emb, unc = jnp.full((2, 1, 2), 3.0), jnp.full((1, 1, 2), 1.0)
    x = oms.initial_latents(
        apply,
        None,
        emb,
        unc,
        jnp.array([0, 1]),
        latent_shape=(2, 2, 1),
        alpha_bar_tau0=0.25,
        guidance_scale=2.0,
    )
    v = 1.0 + 2.0 * (3.0 - 1.0)
    xi = (x - np.sqrt(0.25) * (-v)) / 0.75
    # ξ is neither the seed's starting noise (the OMS input) nor shared between seeds.
    x_tilde = t2i.initial_noise(jnp.array([0, 1]), (2, 2, 1))
    assert np.abs(np.asarray(xi - x_tilde)).min() > 1e-6
    assert not np.allclose(xi[0], xi[1], atol=1e-3)
    with pytest.raises(ValueError, match="noise='other'; expected one of"):
        oms.step(0.0, 0.5, 0.0, noise="other")


def test_loss_is_the_mse_to_minus_x0():
    rs = np.random.RandomState(2)
    x0, noise = rs.randn(2, 2, 2, 1), rs.randn(2, 2, 2, 1)
    got = oms.loss(lambda p, x, e: p * x, 0.5, x0, None, noise)
    np.testing.assert_allclose(got, np.mean((0.5 * noise + x0) ** 2), rtol=1e-6, atol=1e-8)


TINY_OMS = dict(
    sample_size=8,
    in_channels=12,
    out_channels=12,
    block_out_channels=(16, 32),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    layers_per_block=1,
    cross_attention_dim=64,
    attention_head_dim=2,
    norm_num_groups=8,
    time_conditioning=False,
)


def test_time_free_unet_has_no_time_path_and_round_trips_its_class():
    cfg = UNet2DConditionConfig(**TINY_OMS)
    model = UNet2DConditionModel(cfg, rngs=nnx.Rngs(0))
    names = named_leaves(nnx.state(model, nnx.Param))
    assert not [k for k in names if "time_emb" in k]
    d = cfg.to_diffusers_dict()
    assert d["_class_name"] == "UNet2DConditionWoCTModel" and "freq_shift" not in d
    assert UNet2DConditionConfig.from_dict(d) == cfg
    x, ctx = jnp.zeros((1, 8, 8, 12)), jnp.zeros((1, 3, 64))
    with pytest.raises(ValueError, match="a time-free one \\(UNet2DConditionWoCTModel\\) takes"):
        model(x, jnp.zeros((1,)), ctx)


def test_sampler_started_from_the_seeds_noise_equals_the_plain_sampler():
    def apply(p, x, t, e):
        return 0.1 * x + e.mean()

    sample = t2i.make_t2i_sampler(
        apply, SD_SCHEDULER, num_inference_steps=4, guidance_scale=2.0, latent_shape=(2, 2, 1)
    )
    emb, unc, seeds = jnp.ones((2, 1, 3)), jnp.zeros((1, 1, 3)), jnp.array([5, 6])
    plain = sample(None, emb, unc, seeds)
    started = sample(None, emb, unc, seeds, t2i.initial_noise(seeds, (2, 2, 1)))
    np.testing.assert_allclose(started, plain, atol=1e-6)
    other = sample(None, emb, unc, seeds, jnp.zeros((2, 2, 2, 1)))
    assert np.abs(np.asarray(other - plain)).max() > 1e-3
    with pytest.raises(ValueError, match=r"x_T: expected shape \(2, 2, 2, 1\)"):
        sample(None, emb, unc, seeds, jnp.zeros((2, 4, 4, 1)))


@pytest.fixture(scope="module")
def oms_folder(tmp_path_factory):
    """An OMS folder for the shipped test bed, laid out as the published ones: the module as an
    fp16 variant only, a text-encoder config that names the model holding the weights."""
    folder = tmp_path_factory.mktemp("oms")
    cfg = UNet2DConditionConfig(**TINY_OMS)
    model = UNet2DConditionModel(cfg, rngs=nnx.Rngs(1))
    d = diffusers.save_unet(model, cfg, folder / "oms_module")
    (d / "diffusion_pytorch_model.safetensors").rename(
        d / "diffusion_pytorch_model.fp16.safetensors"
    )
    (folder / "oms_text_encoder").mkdir()
    (folder / "oms_text_encoder" / "config.json").write_text(
        json.dumps(
            {
                "_name_or_path": "testbed",
                "subfolder": "text_encoder",
                "architectures": ["CLIPTextModel"],
            }
        )
    )
    return folder, model


def test_load_needs_the_named_text_encoder_and_checks_widths(oms_folder, tmp_path):
    folder, model = oms_folder
    with pytest.raises(FileNotFoundError, match="its config names testbed/text_encoder"):
        oms.load(folder)
    base = pipeline.SHIPPED_TESTBED
    loaded = oms.load(folder, text_encoder_folder=base, latent_channels=12)
    want = named_leaves(nnx.state(model, nnx.Param))
    got = named_leaves(nnx.state(loaded.model.unet, nnx.Param))
    assert set(got) == set(want)
    for k in want:
        np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(want[k]), k)
    with pytest.raises(ValueError, match="takes 12 latent channels; the base model has 4"):
        oms.load(folder, text_encoder_folder=base, latent_channels=4)
    wide = tmp_path / "wide"
    shutil.copytree(folder, wide)
    cfg = json.loads((wide / "oms_module" / "config.json").read_text())
    cfg["cross_attention_dim"] = 32
    (wide / "oms_module" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="width 64; the OMS module's cross_attention_dim is 32"):
        oms.load(wide, text_encoder_folder=base)
    with pytest.raises(FileNotFoundError, match="not an OMS folder"):
        oms.load(tmp_path)


def test_save_writes_a_self_contained_folder_atomically(oms_folder, tmp_path):
    _, model = oms_folder
    pipe = pipeline.load()
    out = tmp_path / "trained"
    oms.save(out, model, pipe.model.text_encoder, pipe.tokenizer)
    loaded = oms.load(out, latent_channels=12)  # no text_encoder_folder: it holds the weights
    for part, want in (("unet", model), ("text_encoder", pipe.model.text_encoder)):
        got = named_leaves(nnx.state(getattr(loaded.model, part), nnx.Param))
        ref = named_leaves(nnx.state(want, nnx.Param))
        assert set(got) == set(ref)
        for k in ref:
            np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(ref[k]), k)
    prompts = ["a red square on a plain background", ""]
    np.testing.assert_array_equal(loaded.tokenize(prompts), pipe.tokenize(prompts))
    assert json.loads((out / "oms_module" / "config.json").read_text())["_class_name"] == (
        "UNet2DConditionWoCTModel"
    )

    class Broken:  # a tokenizer whose save fails half-way through the folder
        def save(self, path):
            raise OSError("disk full")

    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    with pytest.raises(OSError, match="disk full"):
        oms.save(out, model, pipe.model.text_encoder, Broken())
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    assert [p.name for p in tmp_path.iterdir()] == ["trained"]  # no temporary left behind
    timed = UNet2DConditionModel(
        UNet2DConditionConfig(**{**TINY_OMS, "time_conditioning": True}), rngs=nnx.Rngs(0)
    )
    with pytest.raises(ValueError, match="the module must be time-free"):
        oms.save(tmp_path / "x", timed, pipe.model.text_encoder, pipe.tokenizer)


@pytest.mark.slow
def test_oms_latents_then_the_base_sampler(oms_folder):
    folder, _ = oms_folder
    pipe = pipeline.load()
    o = oms.load(folder, text_encoder_folder=pipeline.SHIPPED_TESTBED, latent_channels=12)
    kw = dict(scheduler=pipe.scheduler, kind="ddim", num_inference_steps=10)
    x = o.latents(["a red square", "a blue circle"], [0, 1], guidance_scale=1.5, **kw)
    assert x.shape == (2, 8, 8, 12)
    # The seed-by-seed contract: one prompt's latent does not depend on its batch.
    np.testing.assert_allclose(
        o.latents(["a blue circle"], [1], guidance_scale=1.5, **kw)[0], x[1], atol=1e-5
    )
    gen = pipeline.generator(
        pipe, nnx.split(pipe.model)[0], num_inference_steps=10, guidance_scale=4.0, batch_size=2
    )
    state = nnx.split(pipe.model)[1:]
    images = gen(state, ["a red square", "a blue circle"], [0, 1], x_T=x)
    assert images.shape[0] == 2 and np.isfinite(images).all()
    assert np.abs(images - gen(state, ["a red square", "a blue circle"], [0, 1])).max() > 1e-3

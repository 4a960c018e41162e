"""ESD-family score distillation: target, x_t sources, loss, and parameter selections."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsafe.diffusion import schedulers
from jaxsafe.erasure import esd
from jaxsafe.erasure import params as ep

SCHED = schedulers.SchedulerConfig(beta_schedule="linear", beta_start=1e-4, beta_end=0.02)
LATENT = (4, 4, 2)


def _toy_eps(w):
    """A toy conditional denoiser: ε(x, t, c) = tanh(x · w0 + mean(c) w1 + t/1000)."""

    def eps(x, t, emb):
        c = emb.mean(axis=(1, 2))[:, None, None, None]
        return jnp.tanh(x * w[0] + c * w[1] + t[:, None, None, None] / 1000.0)

    return eps


def _embs(b=2, seed=0):
    r = np.random.default_rng(seed)
    return {k: r.standard_normal((b, 3, 5)).astype(np.float32) for k in ("c_e", "c_from", "uncond")}


class TargetTest(chex.TestCase):
    @chex.all_variants(with_pmap=False)
    def test_target_is_negative_guidance(self):
        r = np.random.default_rng(0)
        a, b, c = r.standard_normal((3, 2, 4, 4, 2)).astype(np.float32)
        out = self.variant(esd.esd_target)(a, b, c, 2.5)
        np.testing.assert_allclose(out, a - 2.5 * (b - c), rtol=1e-6, atol=1e-5)

    @chex.all_variants(with_pmap=False)
    def test_eta_zero_and_c_from_c_e_gives_zero_loss_at_the_original(self):
        w = jnp.array([0.7, 1.3])
        eps = _toy_eps(w)
        loss_fn = esd.make_esd_loss(
            lambda p, f, x, t, e: _toy_eps(p)(x, t, e),
            lambda f, x, t, e: eps(x, t, e),
            SCHED,
            eta=0.0,
            source="trained",
            num_inference_steps=5,
            latent_shape=LATENT,
        )
        batch = _embs()
        batch["c_from"] = batch["c_e"]
        loss, (metrics, _) = self.variant(loss_fn)(w, None, {}, batch, jax.random.key(0))
        # Zero up to the rounding of one batched vs one unbatched evaluation.
        assert float(loss) < 1e-12
        assert float(metrics["esd_target_gap"]) < 1e-12


def test_data_source_loss_equals_an_independent_computation():
    w_star, w = jnp.array([0.5, -0.4]), jnp.array([0.9, 0.2])
    star = _toy_eps(w_star)
    loss_fn = esd.make_esd_loss(
        lambda p, f, x, t, e: _toy_eps(p)(x, t, e),
        lambda f, x, t, e: star(x, t, e),
        SCHED,
        eta=1.5,
        source="data",
    )
    batch = _embs()
    batch["z0"] = np.random.default_rng(3).standard_normal((2, *LATENT)).astype(np.float32)
    rng = jax.random.key(11)
    loss, _ = loss_fn(w, None, {}, batch, rng)
    # Rebuild x_t and t from the same key split, then the loss in numpy.
    _, k_x, k_t = jax.random.split(rng, 3)
    t = np.asarray(jax.random.randint(k_t, (2,), 0, 1000))
    noise = np.asarray(jax.random.normal(k_x, batch["z0"].shape))
    b = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
    ab = np.cumprod(1 - b)[t][:, None, None, None]
    x_t = np.sqrt(ab) * batch["z0"] + np.sqrt(1 - ab) * noise

    def np_eps(wv, c):
        cm = c.mean(axis=(1, 2))[:, None, None, None]
        return np.tanh(x_t * wv[0] + cm * wv[1] + t[:, None, None, None] / 1000.0)

    ws = np.asarray(w_star)
    target = np_eps(ws, batch["c_from"]) - 1.5 * (
        np_eps(ws, batch["c_e"]) - np_eps(ws, batch["uncond"])
    )
    np.testing.assert_allclose(
        loss, np.mean((np_eps(np.asarray(w), batch["c_e"]) - target) ** 2), rtol=1e-4, atol=5e-6
    )


def test_without_c_from_the_guide_is_the_empty_prompt_in_two_frozen_rows_per_example():
    """A batch without ``c_from`` gives the loss of ``c_from = uncond``, and the frozen model
    sees 2B rows instead of 3B (ESD's two frozen calls)."""
    w_star, w = jnp.array([0.5, -0.4]), jnp.array([0.9, 0.2])
    rows = []

    def star(f, x, t, e):
        rows.append(x.shape[0])
        return _toy_eps(w_star)(x, t, e)

    loss_fn = esd.make_esd_loss(
        lambda p, f, x, t, e: _toy_eps(p)(x, t, e), star, SCHED, eta=1.5, source="data"
    )
    batch = _embs()
    batch["z0"] = np.random.default_rng(3).standard_normal((2, *LATENT)).astype(np.float32)
    guided, _ = loss_fn(w, None, {}, {**batch, "c_from": batch["uncond"]}, jax.random.key(5))
    assert rows == [6]
    plain = {k: v for k, v in batch.items() if k != "c_from"}
    loss, _ = loss_fn(w, None, {}, plain, jax.random.key(5))
    assert rows == [6, 4]
    np.testing.assert_allclose(float(loss), float(guided), rtol=1e-6, atol=1e-8)


def test_gradient_flows_only_through_the_trained_prediction():
    """The target is stop-gradiented: d loss/dθ = 2/N Σ (ε_θ − target) dε_θ/dθ."""
    w_star = jnp.array([0.5, -0.4])
    loss_fn = esd.make_esd_loss(
        lambda p, f, x, t, e: _toy_eps(p)(x, t, e),
        lambda f, x, t, e: _toy_eps(f)(x, t, e),
        SCHED,
        source="trained",
        num_inference_steps=4,
        latent_shape=LATENT,
    )
    batch = _embs()
    g = jax.grad(lambda p: loss_fn(p, w_star, {}, batch, jax.random.key(2))[0])(w_star)
    # At θ = θ*, sampling by the trained model equals sampling by the frozen one, and with
    # η = 1 the target differs from ε*(c_e): the gradient is non-zero, and finite.
    assert np.all(np.isfinite(g)) and float(jnp.abs(g).sum()) > 0


def test_partial_sample_runs_n_guided_ddim_steps():
    eps = _toy_eps(jnp.array([0.3, 0.8]))
    x_T = jax.random.normal(jax.random.key(0), (2, *LATENT))
    e = _embs()
    N, guidance = 6, 3.0
    ts = np.asarray(schedulers.timesteps(SCHED, N))
    prev = np.asarray(schedulers.previous_timesteps(SCHED, "ddim", N))
    for n in (0, 1, 4):
        x, t = jax.jit(esd.partial_sample, static_argnums=(0, 1, 6))(
            eps, SCHED, x_T, e["c_e"], e["uncond"], guidance, N, n
        )
        ref = np.asarray(x_T)
        for i in range(n):  # hand-written guided DDIM (η = 0), eq. 12 of Song et al.
            tt = np.full((2,), ts[i])
            eu, ec = eps(ref, tt, e["uncond"]), eps(ref, tt, e["c_e"])
            g = np.asarray(eu + guidance * (ec - eu))
            ab = np.asarray(schedulers.alphas_cumprod(SCHED))
            a, a_prev = ab[ts[i]], ab[prev[i]] if prev[i] >= 0 else ab[0]
            x0 = (ref - np.sqrt(1 - a) * g) / np.sqrt(a)
            ref = np.sqrt(a_prev) * x0 + np.sqrt(1 - a_prev) * g
        np.testing.assert_allclose(x, ref, rtol=1e-4, atol=1e-5)
        np.testing.assert_array_equal(t, np.full((2,), ts[n]))


def test_bad_source_and_missing_latent_shape():
    with pytest.raises(ValueError, match="source='noise'; expected one of"):
        esd.make_esd_loss(None, None, SCHED, source="noise")
    with pytest.raises(ValueError, match="latent_shape"):
        esd.make_esd_loss(None, None, SCHED, source="trained")


# ---------------------------------------------------------------------------- selections

NAMES = [
    "unet/conv_in/kernel",
    "unet/time_embedding/linear_1/kernel",
    "unet/conv_out/kernel",
    "unet/down_blocks/0/attentions/0/transformer_blocks/0/attn1/to_q/kernel",
    "unet/down_blocks/0/attentions/0/transformer_blocks/0/attn2/to_q/kernel",
    "unet/down_blocks/0/attentions/0/transformer_blocks/0/attn2/to_k/kernel",
    "unet/down_blocks/0/attentions/0/transformer_blocks/0/attn2/to_v/kernel",
    "unet/down_blocks/0/attentions/0/transformer_blocks/0/attn2/to_out/0/kernel",
    "unet/down_blocks/0/resnets/0/conv1/kernel",
    "text_encoder/encoder/layers/0/self_attn/k_proj/kernel",
    "unet/conv_norm_out/scale",
    "unet/up_blocks/0/resnets/0/norm1/scale",
]


@pytest.mark.parametrize(
    "method,expected",
    [
        ("xattn", {4, 5, 6, 7}),
        ("xattn-strict", {5, 6}),
        # ESD-u leaves out the output block (the reference's "out." names: norm and conv).
        ("noxattn", {0, 3, 8, 11}),
        ("selfattn", {3}),
        ("full", set(range(9)) | {10, 11}),
    ],
)
def test_train_method_selections(method, expected):
    sel = ep.selection(method, "unet")
    assert {i for i, n in enumerate(NAMES) if sel(n)} == expected


def test_unknown_train_method_and_empty_selection():
    with pytest.raises(ValueError, match="train_method='attn'; expected one of xattn"):
        ep.selection("attn")
    with pytest.raises(ValueError, match="matches no parameter"):
        ep.select({"text_encoder/x/kernel": 0}, ep.selection("xattn"))
    assert ep.cross_attention_kv({n: 0 for n in NAMES}) == [NAMES[5], NAMES[6]]

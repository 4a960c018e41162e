"""TRCE: the stage-1 [EoT] mapping, the stage-2 hinge and loss wiring, the parameter split, and
the experiment end to end."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsafe.diffusion import schedulers
from jaxsafe.erasure import trce

SCHED = schedulers.SchedulerConfig(beta_schedule="linear", beta_start=1e-4, beta_end=0.02)


def _rng(seed):
    return np.random.default_rng(seed)


def test_eot_rows_are_at_length_minus_one():
    emb = _rng(0).standard_normal((3, 7, 4)).astype(np.float32)
    lengths = np.array([2, 5, 7])
    np.testing.assert_array_equal(trce.eot_rows(emb, lengths), emb[[0, 1, 2], [1, 4, 6]])
    with pytest.raises(ValueError, match=r"lengths: expected \(3,\) token counts"):
        trce.eot_rows(emb, lengths[:2])
    with pytest.raises(ValueError, match=r"emb: expected \(N, L, D\)"):
        trce.eot_rows(emb[0], lengths)


class MappingRowsTest(chex.TestCase):
    @chex.all_variants(with_pmap=False)
    def test_rows_and_weights(self):
        r = _rng(10)
        emb_m, emb_s = r.standard_normal((2, 2, 6, 3)).astype(np.float32)
        len_m, len_s = np.array([3, 5]), np.array([4, 2])
        kw = np.array([[1, 2], [3, -1]])
        C_m, C_s, s = self.variant(
            lambda a, b, k: trce.mapping_rows(a, len_m, b, len_s, (0.5, 1.0, 2.0, 3.0), k)
        )(emb_m, emb_s, kw)
        chex.assert_shape((C_m, C_s, s), ((10, 3), (10, 3), (10,)))
        # Pair 0: [SoT], [EoT] at 2, last row, keywords 1 and 2 -> the safe prompt's last row.
        np.testing.assert_array_equal(C_m[:5], emb_m[0, [0, 2, 5, 1, 2]])
        np.testing.assert_array_equal(C_s[:5], emb_s[0, [0, 3, 5, 5, 5]])
        np.testing.assert_array_equal(C_m[5:9], emb_m[1, [0, 4, 5, 3]])
        np.testing.assert_array_equal(C_s[5:8], emb_s[1, [0, 1, 5]])
        # Weights: scale × base (1, 1, L − len, 1 per keyword, 0 for a missing one).
        np.testing.assert_allclose(
            s, [0.5, 1, 2 * 3, 3, 3, 0.5, 1, 2 * 1, 3, 0], atol=0
        )  # exact: products of small integers and halves

    def test_default_is_the_eot_row_alone(self):
        emb = _rng(11).standard_normal((2, 5, 3)).astype(np.float32)
        C_m, _, s = trce.mapping_rows(emb, [2, 4], emb, [2, 4])
        np.testing.assert_array_equal(C_m[s > 0], emb[[0, 1], [1, 3]])
        np.testing.assert_array_equal(s[s > 0], [1.0, 1.0])
        with pytest.raises(ValueError, match="token_weights: expected 3 or 4 weights"):
            trce.mapping_rows(emb, [2, 4], emb, [2, 4], (1.0, 1.0))


def test_keyword_positions(tiny_pipe):
    from experiments import erase_trce

    kw = erase_trce.keyword_positions(
        tiny_pipe, ["a red circle", "a circle", "a blue circle"], ["red", "red", "circle"]
    )
    np.testing.assert_array_equal(kw, [[2], [-1], [3]])


class Stage1Test(chex.TestCase):
    @chex.all_variants(with_pmap=False)
    def test_lambda_zero_maps_eot_rows_exactly_and_keeps_the_rest(self):
        """λ = 0, the malicious rows spanning a subspace and the preserved rows its orthogonal
        complement: every malicious row lands exactly on its target's original value, every
        preserved row keeps its value (no conflict, so both hold exactly)."""
        d_in, n = 8, 3
        r = _rng(1)
        Q, _ = np.linalg.qr(r.standard_normal((d_in, d_in)))
        c_m = (r.standard_normal((n, n)) @ Q[:, :n].T).astype(np.float32)
        c_p = (r.standard_normal((7, d_in - n)) @ Q[:, n:].T).astype(np.float32)
        c_s = r.standard_normal((n, d_in)).astype(np.float32)
        K = {
            "a": r.standard_normal((d_in, 5)).astype(np.float32),
            "b": r.standard_normal((d_in, 3)).astype(np.float32),
        }
        new = self.variant(lambda k: trce.stage1_edit(k, c_m, c_s, c_p, preserve_scale=0.01))(K)
        for name in K:
            # float32 solve: reordered reductions alone move these by up to ~5e-5.
            np.testing.assert_allclose(c_m @ new[name], c_s @ K[name], atol=3e-4)
            np.testing.assert_allclose(c_p @ new[name], c_p @ K[name], atol=3e-4)
        # With as many independent malicious rows as the width, no preservation is needed.
        c_m, c_s = r.standard_normal((2, d_in, d_in)).astype(np.float32)
        new = self.variant(lambda k: trce.stage1_edit(k, c_m, c_s))(K)
        for name in K:
            np.testing.assert_allclose(c_m @ new[name], c_s @ K[name], atol=2e-3)

    def test_pair_weights_average(self):
        """Each pair weighs 1/n: duplicating every pair changes nothing."""
        r = _rng(2)
        c_m, c_s = r.standard_normal((2, 3, 6)).astype(np.float32)
        c_p = r.standard_normal((9, 6)).astype(np.float32)
        K = {"a": r.standard_normal((6, 4)).astype(np.float32)}
        one = trce.stage1_edit(K, c_m, c_s, c_p, preserve_scale=0.5)["a"]
        two = trce.stage1_edit(
            K, np.concatenate([c_m, c_m]), np.concatenate([c_s, c_s]), c_p, preserve_scale=0.5
        )["a"]
        np.testing.assert_allclose(one, two, rtol=1e-4, atol=1e-5)


class HingeTest(chex.TestCase):
    @chex.all_variants(with_pmap=False)
    def test_against_numpy_zero_beyond_the_margin_linear_inside(self):
        r = _rng(3)
        shape = (6, 2, 2, 3)
        pred, prefer, reject = r.standard_normal((3, *shape)).astype(np.float32)
        margin, beta = 0.5, 2.0
        fn = self.variant(
            lambda p: trce.contrastive_hinge(p, prefer, reject, margin=margin, beta=beta)
        )
        loss, inside = fn(pred)
        d_pos = ((pred - prefer) ** 2).reshape(6, -1).mean(1)
        d_neg = ((pred - reject) ** 2).reshape(6, -1).mean(1)
        z = beta * (d_pos - d_neg + margin)
        np.testing.assert_allclose(loss, np.maximum(z, 0).mean(), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(inside, (z > 0).mean(), atol=1e-6)  # k/6: a miscount is 1/6
        assert 0 < (z > 0).sum() < 6  # both regimes occur in this draw
        # Gradient: zero for samples beyond the margin; inside it, the gradient of the linear
        # β (d⁺ − d⁻): β · 2 (reject − prefer) / (D · B), independent of pred.
        g = np.asarray(jax.grad(lambda p: fn(p)[0])(pred))
        D = np.prod(shape[1:])
        want = np.where((z > 0)[:, None, None, None], beta * 2 * (reject - prefer) / (D * 6), 0.0)
        np.testing.assert_allclose(g, want, rtol=1e-4, atol=1e-7)

    def test_guided_is_cfg_of_scale_one_plus_w(self):
        e_c, e_u = _rng(4).standard_normal((2, 3, 4)).astype(np.float32)
        np.testing.assert_allclose(
            trce.guided(e_c, e_u, 15.0), e_c + 15 * (e_c - e_u), rtol=1e-5, atol=5e-5
        )

    def test_shape_mismatch_is_an_error(self):
        a = np.zeros((2, 3))
        with pytest.raises(ValueError, match="must have the same shape"):
            trce.contrastive_hinge(a, a[:1], a)


def _g(emb, latent):
    """A toy 'denoiser output' from an embedding: the token mean, tiled over the latent."""
    return jnp.broadcast_to(emb.mean(1)[:, None, None, :], (emb.shape[0], *latent))


class LossTest(chex.TestCase):
    @chex.all_variants(with_pmap=False)
    @pytest.mark.slow
    def test_loss_wiring_against_numpy(self):
        """Toy networks that ignore x_t (so the trajectory sampling does not matter): the loss is
        ½ [hinge(ε_θ(c_m)) + hinge(ε_θ(∅))] + α · drift, targets from ε* with guidance w, the
        regulariser against the stage-1 model."""
        latent = (2, 2, 4)
        r = _rng(5)
        c_m, c_s, u = r.standard_normal((3, 1, 3, 4)).astype(np.float32)
        theta = {"a": np.float32(0.7)}
        eps_star = lambda f, x, t, e: _g(e, latent)
        eps_start = lambda f, x, t, e: 0.5 * _g(e, latent)
        eps_theta = lambda p, f, x, t, e: p["a"] * _g(e, latent)
        w, m, beta, alpha = 2.0, 0.3, 1.5, 10.0
        loss_fn = trce.make_trce_loss(
            eps_theta,
            eps_star,
            eps_start,
            SCHED,
            latent_shape=latent,
            guidance=w,
            margin=m,
            beta=beta,
            preserve_scale=alpha,
            max_early_step=2,
            num_inference_steps=4,
            batch_size=2,
            reg_batch_size=3,
        )
        batch = {"c_mal": c_m, "c_safe": c_s, "uncond": u}
        loss, (metrics, _) = self.variant(loss_fn)(theta, {}, None, batch, jax.random.key(0))
        g = lambda e: np.broadcast_to(e.mean(1)[:, None, None, :], (1, *latent))
        e_m, e_s, e_u = g(c_m), g(c_s), g(u)
        prefer, reject = e_s + w * (e_s - e_u), e_m + w * (e_m - e_u)
        hinge = lambda p: max(
            0.0, beta * (((p - prefer) ** 2).mean() - ((p - reject) ** 2).mean() + m)
        )
        h_m, h_u = hinge(0.7 * e_m), hinge(0.7 * e_u)
        drift = ((0.7 * e_u - 0.5 * e_u) ** 2).mean()
        np.testing.assert_allclose(metrics["hinge_malicious"], h_m, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(metrics["hinge_uncond"], h_u, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(metrics["drift"], drift, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(loss, (h_m + h_u) / 2 + alpha * drift, rtol=1e-5, atol=1e-5)
        assert h_m > 0 and h_u > 0

    def test_bad_settings(self):
        f = lambda *a: None
        with pytest.raises(ValueError, match="max_early_step=50: expected 0 <= max_early_step"):
            trce.make_trce_loss(f, f, f, SCHED, latent_shape=(2, 2, 4), max_early_step=50)
        with pytest.raises(ValueError, match="batch_size must be >= 1"):
            trce.make_trce_loss(f, f, f, SCHED, latent_shape=(2, 2, 4), batch_size=0)


def test_stage2_selection():
    sel = trce.stage2_selection()
    base = "unet/down_blocks/0/attentions/0/transformer_blocks/0"
    assert sel(f"{base}/attn1/to_q/kernel") and sel(f"{base}/attn1/to_out/0/bias")
    assert sel(f"{base}/attn2/to_q/kernel")
    assert not sel(f"{base}/attn2/to_k/kernel") and not sel(f"{base}/attn2/to_out/0/kernel")
    assert not sel(f"{base}/norm1/scale") and not sel("text_encoder/x/attn1/to_q/kernel")


def _named(model):
    from flax import nnx

    from jaxsafe.treepath import named_leaves

    return {k: np.asarray(v) for k, v in named_leaves(nnx.state(model, nnx.Param)).items()}


@pytest.mark.slow
def test_build_applies_stage1_and_trains_the_selection(tiny_folder):
    from configs.erasure import trce as trce_config
    from experiments import erase_trce
    from jaxsafe import parallel
    from jaxsafe.diffusion import pipeline
    from jaxsafe.treepath import named_leaves

    c = trce_config.get_config("smoke")
    c.model.folder = tiny_folder
    task = erase_trce.build(c, parallel.make_mesh(1, 1))
    src = _named(pipeline.load(tiny_folder).model)
    trained = set(named_leaves(task.params))
    assert trained == {n for n in src if trce.stage2_selection()(n)}
    rest = {n: np.asarray(v) for n, v in named_leaves(task.frozen["rest"]).items()}
    kv = {n for n in rest if "/attn2/to_k/" in n or "/attn2/to_v/" in n}
    # Stage 1 edited every cross-attention key and value, nothing else that stays frozen.
    assert {n for n in rest if not np.array_equal(rest[n], src[n])} == kv
    kv0 = {n: np.asarray(v) for n, v in named_leaves(task.frozen["kv_original"]).items()}
    assert set(kv0) == kv and all(np.array_equal(kv0[n], src[n]) for n in kv)


def test_stage1_without_preservation_is_underdetermined(tiny_folder):
    from configs.erasure import trce as trce_config
    from experiments import erase_trce
    from jaxsafe.diffusion import pipeline

    c = trce_config.get_config("smoke")
    c.model.folder = tiny_folder
    c.concepts.preserve = ()
    c.trce.token_weights = (0.0, 1.0, 0.0)
    with pytest.raises(
        ValueError, match="λ = 0: 17 mapped rows of rank 17 cannot determine a 32-wide projection"
    ):
        erase_trce.apply_stage1(c, pipeline.load(tiny_folder))


@pytest.mark.slow
def test_smoke_run_changes_only_the_stage_parameters(tiny_folder, erase_on_8_devices):
    """The smoke run on 8 devices end to end: the export differs from the source exactly in the
    stage-1 keys and values and the stage-2 self-attention and query parameters."""
    from jaxsafe.diffusion import pipeline

    # Margin 10: every sample inside the margin, so the hinge has a gradient.
    summary = erase_on_8_devices("trce", {"optimizer.lr": 1e-2, "trce.margin": 10.0})
    before, after = (
        _named(pipeline.load(tiny_folder).model),
        _named(pipeline.load(summary["export"]).model),
    )
    changed = {n for n in before if not np.array_equal(before[n], after[n])}
    stage1 = {n for n in before if "/attn2/to_k/" in n or "/attn2/to_v/" in n}
    stage2 = {n for n in before if trce.stage2_selection()(n)}
    assert stage1 <= changed and changed <= stage1 | stage2
    assert {n for n in changed & stage2 if "/attn1/" in n} and {
        n for n in changed & stage2 if "/attn2/to_q/" in n
    }
    assert all(n.startswith("unet/") for n in changed)

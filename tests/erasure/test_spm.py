"""SPM (jaxsafe.erasure.spm, experiments/erase_spm.py): facilitated transport against an
independent numpy computation, the anchor sampler's acceptance rule, the learning-rate schedule,
the objective's composition, per-prompt strength in the generator, and a smoke training run in
which only adapter parameters move and the export re-attaches."""

import json
import math
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxsafe.diffusion.schedulers import SchedulerConfig
from jaxsafe.erasure import spm

SPECIAL = (0, 17, 18)  # PAD, SOT, EOT of the test-bed tokenizer


def numpy_strength(emb, ids, erased_emb, erased_ids, special=SPECIAL):
    """γ = clip(max_k max(cos(vec emb, vec emb_k), |T ∩ T_k| / |T_k|), 0, 1) with python sets."""
    out = []
    for e, i in zip(np.asarray(emb, np.float64), np.asarray(ids)):
        best = -np.inf
        for ek, ik in zip(np.asarray(erased_emb, np.float64), np.asarray(erased_ids)):
            cos = e.ravel() @ ek.ravel() / (np.linalg.norm(e) * np.linalg.norm(ek))
            concept = set(ik.tolist()) - set(special)
            tok = len(concept & set(i.tolist())) / len(concept) if concept else 0.0
            best = max(best, cos, tok)
        out.append(min(max(best, 0.0), 1.0))
    return np.array(out)


class TestTransport(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_strength_matches_numpy_and_lies_in_unit_interval(self):
        rng = np.random.default_rng(0)
        erased_emb = rng.standard_normal((2, 6, 5)).astype(np.float32)
        erased_ids = np.array([[17, 3, 3, 4, 18, 0], [17, 9, 18, 0, 0, 0]], np.int32)
        emb = rng.standard_normal((6, 6, 5)).astype(np.float32)
        emb[0] = erased_emb[1]  # the concept itself: γ = 1
        emb[1] = -erased_emb[0]  # opposite of concept 0
        emb[2] = 0.3 * erased_emb[0] + rng.standard_normal((6, 5))  # partly similar
        ids = np.array(
            [
                [17, 9, 18, 0, 0, 0],  # concept 1's tokens
                [17, 5, 6, 18, 0, 0],  # no shared token
                [17, 5, 6, 18, 0, 0],
                [17, 4, 7, 18, 0, 0],  # half of concept 0's {3, 4}
                [17, 18, 0, 0, 0, 0],  # only special tokens
                [17, 3, 4, 9, 18, 0],
            ],
            np.int32,
        )  # all of both
        gamma = self.variant(lambda *a: spm.transport_strength(*a, SPECIAL))(
            emb, ids, erased_emb, erased_ids
        )
        want = numpy_strength(emb, ids, erased_emb, erased_ids)
        np.testing.assert_allclose(gamma, want, rtol=1e-5, atol=1e-6)
        assert np.all((np.asarray(gamma) >= 0) & (np.asarray(gamma) <= 1))
        np.testing.assert_allclose(
            np.asarray(gamma)[[0, 5]], 1.0, rtol=1e-6, atol=0
        )  # exact: token share k/k = 1, γ clipped to 1
        assert 0 < want[2] < 1 and want[3] >= 0.5

    def test_opposite_prompt_gets_zero(self):
        c = np.random.default_rng(1).standard_normal((1, 4, 3)).astype(np.float32)
        gamma = spm.transport_strength(
            -c, np.array([[17, 5, 18, 0]]), c, np.array([[17, 6, 18, 0]]), SPECIAL
        )
        np.testing.assert_array_equal(gamma, [0.0])  # cos = −1 clipped, no shared token

    @chex.variants(with_jit=True, without_jit=True)
    def test_token_overlap_is_a_set_share_without_special_tokens(self):
        erased = np.array([[17, 5, 5, 7, 18, 0], [17, 18, 0, 0, 0, 0]], np.int32)
        ids = np.array([[17, 7, 9, 18, 0, 0], [17, 5, 7, 7, 18, 0], [17, 18, 0, 0, 0, 0]], np.int32)
        got = self.variant(lambda a, b: spm.token_overlap(a, b, SPECIAL))(ids, erased)
        # {5, 7} vs {7, 9}: 1/2; vs {5, 7}: 1; a concept of special tokens only: 0 (not NaN).
        np.testing.assert_allclose(
            got, [[0.5, 0.0], [1.0, 0.0], [0.0, 0.0]], atol=0
        )  # exact: 1/2, 1 and 0 are exact in float32

    def test_errors(self):
        with pytest.raises(ValueError, match=r"emb \(B, L, D\) and erased_emb \(K, L, D\)"):
            spm.embedding_cosine(jnp.ones((2, 3, 4)), jnp.ones((1, 3, 5)))
        with pytest.raises(ValueError, match="one ids row per embedding"):
            spm.transport_strength(
                jnp.ones((2, 3, 4)),
                jnp.ones((3, 3), jnp.int32),
                jnp.ones((1, 3, 4)),
                jnp.ones((1, 3), jnp.int32),
                SPECIAL,
            )
        with pytest.raises(ValueError, match=r"ids must be \(B, L\)"):
            spm.token_overlap(jnp.ones((3,), jnp.int32), jnp.ones((1, 3), jnp.int32), SPECIAL)


@pytest.mark.slow
def test_anchor_acceptance_rule_and_scale():
    # In 2-D with angle θ to c, accepting u with probability min(1, 1 − cos θ) gives the density
    # ∝ 1 for cos θ ≤ 0 and 1 − cos θ above, so
    # E[cos θ] = (−2 + 2 − π/2) / (π + π − 2) = −π / (4π − 4) ≈ −0.367 (no rejection: 0).
    c = jnp.array([[3.0, 0.0]])
    a = np.asarray(spm.sample_anchors(jax.random.key(0), c, 4000)).reshape(-1, 2)
    norm = np.linalg.norm(a, axis=-1)
    cos = a[:, 0] / norm  # std ≈ 0.66, so the mean's standard error is ≈ 0.01
    assert abs(cos.mean() + math.pi / (4 * math.pi - 4)) < 0.04, cos.mean()
    # and no direction with cos θ > 0 is favoured: P(cos > 0) = (π − 2) / (2π − 2) ≈ 0.27
    assert abs((cos > 0).mean() - (math.pi - 2) / (2 * math.pi - 2)) < 0.03
    assert 0.8 * 3 - 1e-5 <= norm.min() < 0.85 * 3 and 1.15 * 3 < norm.max() <= 1.2 * 3 + 1e-5
    b = spm.sample_anchors(jax.random.key(1), jnp.ones((4, 8)), 3)
    assert b.shape == (3, 4, 8)
    with pytest.raises(ValueError, match=r"c must be one embedding \(L, D\)"):
        spm.sample_anchors(jax.random.key(0), jnp.ones((2, 4, 8)), 3)


def test_cosine_with_hard_restarts_schedule():
    w, T, C, lr = 500, 3000, 3, 1e-4

    def diffusers(k):  # get_cosine_with_hard_restarts_schedule_with_warmup's lr_lambda
        if k < w:
            return k / max(1, w)
        p = (k - w) / max(1, T - w)
        return 0.0 if p >= 1 else max(0.0, 0.5 * (1 + math.cos(math.pi * ((C * p) % 1.0))))

    sched = spm.cosine_with_hard_restarts(lr, w, T, C)
    for k in (0, 1, 250, 499, 500, 501, 1000, 1333, 1334, 1500, 2166, 2167, 2999, 3000, 4000):
        np.testing.assert_allclose(sched(k), lr * diffusers(k), rtol=1e-4, atol=1e-10)
    with pytest.raises(ValueError, match="warmup_steps < total_steps"):
        spm.cosine_with_hard_restarts(lr, 10, 10)


class TestObjective:
    """A toy ε that reads only the mean of the embedding, so every term is known in closed form
    whatever x_t the partial sampling produced: ε(x, t, c) = w · mean(c)."""

    sched = SchedulerConfig()

    @staticmethod
    def eps(w, x, emb):
        return w * jnp.mean(emb, axis=(1, 2))[:, None, None, None] + 0.0 * x

    def loss(self, weight=1000.0, num_anchors=3, batch_size=None, anchor_batch="reference"):
        return spm.make_spm_loss(
            lambda p, f, x, t, e: self.eps(p["w"], x, e),
            lambda f, x, t, e: self.eps(f["w"], x, e),
            self.sched,
            latent_shape=(2, 2, 1),
            anchor_weight=weight,
            num_anchors=num_anchors,
            num_inference_steps=4,
            batch_size=batch_size,
            anchor_batch=anchor_batch,
        )

    @pytest.mark.parametrize("anchor_batch", ["reference", "sampled"])
    def test_anchor_batch(self, anchor_batch):
        """The anchor term against the anchors rebuilt here from the loss's key: M sampled
        surrogates, or (the reference's batch) every other one replaced by ∅ = ``uncond``."""
        batch, key, m = self.batch(), jax.random.key(5), 4
        w_theta, w_star = 1.7, 2.0
        _, (metrics, _) = self.loss(num_anchors=m, anchor_batch=anchor_batch)(
            {"w": w_theta}, {"w": w_star}, None, batch, key
        )
        k_a = jax.random.split(key, 4)[3]
        means = []
        for k, c in zip(jax.random.split(k_a, 2), batch["c_e"]):
            anchors = np.array(spm.sample_anchors(k, c, m, (0.8, 1.2)))
            if anchor_batch == "reference":
                anchors[0::2] = np.asarray(batch["uncond"][0])
            means += list(anchors.mean(axis=(1, 2)))
        expected = np.mean(((w_theta - w_star) * np.asarray(means)) ** 2)
        np.testing.assert_allclose(metrics["spm_anchor"], expected, rtol=1e-5, atol=1e-6)

    def batch(self):
        rng = np.random.default_rng(0)
        c_e = jnp.asarray(rng.standard_normal((2, 3, 4)) + 1.0, jnp.float32)
        c_n = jnp.asarray(rng.standard_normal((1, 3, 4)), jnp.float32)
        return {
            "c_e": c_e,
            "c_from": jnp.broadcast_to(c_n, c_e.shape),
            "uncond": jnp.asarray(rng.standard_normal((1, 3, 4)), jnp.float32),
        }

    @pytest.mark.slow
    def test_erase_term_is_the_negatively_guided_target(self):
        batch, key = self.batch(), jax.random.key(3)
        w_theta, w_star = 1.7, 2.0
        loss, (m, _) = jax.jit(self.loss())({"w": w_theta}, {"w": w_star}, None, batch, key)
        m_e = np.mean(np.asarray(batch["c_e"]), axis=(1, 2))
        m_n = np.mean(np.asarray(batch["c_from"]), axis=(1, 2))
        target = w_star * m_n - 1.0 * (w_star * m_e - w_star * m_n)  # η = 1, neutral c_n
        np.testing.assert_allclose(
            m["spm_erase"], np.mean((w_theta * m_e - target) ** 2), rtol=1e-5, atol=1e-4
        )
        np.testing.assert_allclose(
            loss, m["spm_erase"] + 1000.0 * m["spm_anchor"], rtol=1e-5, atol=1e-4
        )
        assert m["spm_anchor"] > 0  # the membrane moved the anchors' predictions
        # λ scales only the anchor term; M = 0 drops it.
        loss0, _ = self.loss(weight=0.0)({"w": w_theta}, {"w": w_star}, None, batch, key)
        np.testing.assert_allclose(loss0, m["spm_erase"], rtol=1e-5, atol=1e-4)
        _, (m_none, _) = self.loss(num_anchors=0)({"w": w_theta}, {"w": w_star}, None, batch, key)
        assert float(m_none["spm_anchor"]) == 0.0

    def test_each_step_draws_batch_size_rows_of_the_pool(self):
        batch, w_theta, w_star = self.batch(), 1.7, 2.0
        m_e = np.mean(np.asarray(batch["c_e"]), axis=(1, 2))
        m_n = np.mean(np.asarray(batch["c_from"]), axis=(1, 2))
        per_row = (w_theta * m_e - (w_star * m_n - (w_star * m_e - w_star * m_n))) ** 2
        loss = jax.jit(self.loss(batch_size=1))
        seen = set()
        for i in range(12):
            _, (m, _) = loss({"w": w_theta}, {"w": w_star}, None, batch, jax.random.key(i))
            match = np.flatnonzero(np.isclose(float(m["spm_erase"]), per_row, rtol=1e-5, atol=1e-4))
            assert len(match) == 1
            seen.add(int(match[0]))
        assert seen == {0, 1}

    def test_at_the_original_the_anchor_term_vanishes(self):
        _, (m, _) = self.loss()({"w": 2.0}, {"w": 2.0}, None, self.batch(), jax.random.key(4))
        assert float(m["spm_anchor"]) == 0.0
        np.testing.assert_allclose(m["spm_erase"], m["esd_target_gap"], rtol=1e-6, atol=1e-5)

    def test_errors(self):
        with pytest.raises(ValueError, match="anchor_batch='half'; expected one of"):
            spm.make_spm_loss(None, None, self.sched, latent_shape=(2, 2, 1), anchor_batch="half")
        with pytest.raises(ValueError, match="num_anchors must be >= 0"):
            spm.make_spm_loss(None, None, self.sched, latent_shape=(2, 2, 1), num_anchors=-1)
        with pytest.raises(ValueError, match="c_e and c_from must be"):
            b = self.batch()
            self.loss()(
                {"w": 1.0}, {"w": 1.0}, None, {**b, "c_from": b["c_e"][:1]}, jax.random.key(0)
            )


# ------------------------------------------------------------------ the experiment


@pytest.mark.slow
def test_transport_of_the_pipeline_uses_the_text_encoder_and_word_tokens(tiny_pipe):
    from experiments import erase_spm

    tok = tiny_pipe.tokenizer
    assert erase_spm.special_token_ids(tok) == tuple(
        sorted({tok.pad_token_id, tok.bos_token_id, tok.eos_token_id})
    )
    transport = erase_spm.Transport.for_concepts(tiny_pipe, ["square"])
    prompts = ["a red square on a striped background", "a box", "a circle", ""]
    ids = tiny_pipe.tokenize(prompts)
    emb = tiny_pipe.embed(prompts)
    want = numpy_strength(
        emb,
        ids,
        tiny_pipe.embed(["square"]),
        tiny_pipe.tokenize(["square"]),
        erase_spm.special_token_ids(tok),
    )
    np.testing.assert_allclose(transport(jnp.asarray(ids), emb), want, rtol=1e-5, atol=1e-6)
    assert want[0] == 1.0 and all(0 <= g < 1 for g in want[1:])
    off = erase_spm.Transport.for_concepts(tiny_pipe, ["square"], enabled=False)
    np.testing.assert_array_equal(off(jnp.asarray(ids), emb), np.ones(4))
    # The reference code's weighting (both adapter factors times γ): γ².
    ref = erase_spm.Transport.for_concepts(tiny_pipe, ["square"], power=2)
    np.testing.assert_allclose(ref(jnp.asarray(ids), emb), want**2, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="power must be 1"):
        erase_spm.Transport.for_concepts(tiny_pipe, ["square"], power=3)


@pytest.mark.slow
def test_generator_applies_each_prompts_strength(tiny_pipe):
    from experiments import erase_spm
    from jaxsafe.diffusion import pipeline
    from jaxsafe.nn import adapters

    original = nnx.split(tiny_pipe.model)
    erase_spm.attach_adapters(tiny_pipe, rank=1, alpha=1.0)
    names = [n for n in adapters.adapter_params(tiny_pipe.model.unet) if n.endswith("up/kernel")]
    rng = np.random.default_rng(0)
    adapters.load_adapter_params(
        tiny_pipe.model.unet,
        {
            n: 0.2 * rng.standard_normal(v.shape).astype(np.float32)
            for n, v in adapters.adapter_params(tiny_pipe.model.unet).items()
        },
    )
    assert names
    graphdef, state = nnx.split(tiny_pipe.model)
    sampling = {"kind": "ddim", "num_inference_steps": 3, "guidance_scale": 4.0, "batch_size": 2}
    square = tiny_pipe.tokenizer.vocab["square"]
    # γ = 1 for prompts naming "square", 0 otherwise, in one batch.
    transport = lambda ids, emb: (ids[:, 2] == square).astype(jnp.float32)  # [SOT, a, w, ..]
    captions, seeds = ["a square", "a circle"], np.array([3, 4])
    spm_images = erase_spm.make_spm_generator(tiny_pipe, graphdef, transport, **sampling)(
        (state,), captions, seeds
    )
    full = pipeline.generator(tiny_pipe, graphdef, **sampling)((state,), captions, seeds)
    base = pipeline.generator(tiny_pipe, original[0], **sampling)((original[1],), captions, seeds)
    assert np.abs(full - base).max() > 1e-3  # the adapters matter
    np.testing.assert_allclose(spm_images[0], full[0], atol=1e-5)
    np.testing.assert_allclose(spm_images[1], base[1], atol=1e-5)


@pytest.mark.slow
def test_smoke_training_moves_only_adapters_and_the_export_reattaches(tiny_folder, tmp_path):
    from configs.erasure import spm as spm_config
    from experiments import erase_spm
    from jaxsafe import parallel, train
    from jaxsafe.diffusion import pipeline
    from jaxsafe.erasure import model as em
    from jaxsafe.nn import adapters
    from jaxsafe.treepath import named_leaves

    c = spm_config.get_config("smoke")
    c.model.folder = tiny_folder
    c.eval.enabled = False
    mesh = parallel.make_mesh(1, 1)
    task = erase_spm.build(c, mesh)
    assert all("/adapter/" in n for n in named_leaves(task.params))
    state = train.run(task, c.train, str(tmp_path), mesh)
    summary = erase_spm.summarize(c, state, task, str(tmp_path))

    trained = em.trained_model(task.graphdef, state.params, state.frozen)
    after = {n: np.asarray(v) for n, v in named_leaves(nnx.state(trained, nnx.Param)).items()}
    before = {
        n: np.asarray(v)
        for n, v in named_leaves(nnx.state(pipeline.load(tiny_folder).model, nnx.Param)).items()
    }
    assert {n for n in after if "/adapter/" not in n} == set(before)
    for n, v in before.items():  # everything but the adapters is bit-identical
        np.testing.assert_array_equal(after[n], v, err_msg=n)
    ups = [v for n, v in after.items() if n.endswith("/adapter/up/kernel")]
    assert ups and any(np.abs(u).max() > 0 for u in ups)  # the membranes trained

    export = summary["export"]
    with open(os.path.join(export, "spm.json")) as f:
        settings = json.load(f)
    assert settings["rank"] == 1 and settings["concepts"] == list(c.concepts.erase)
    with open(os.path.join(tiny_folder, "unet", "diffusion_pytorch_model.safetensors"), "rb") as f:
        original_unet = f.read()
    with open(os.path.join(export, "unet", "diffusion_pytorch_model.safetensors"), "rb") as f:
        assert f.read() == original_unet  # the UNet is exported untouched
    pipe, transport = erase_spm.load(export)
    loaded = {n: np.asarray(v) for n, v in adapters.adapter_params(pipe.model.unet).items()}
    want = {n[len("unet/") :]: v for n, v in after.items() if "/adapter/" in n}
    assert loaded.keys() == want.keys()
    for n, v in want.items():
        np.testing.assert_array_equal(loaded[n], v, err_msg=n)
    assert transport.enabled and transport.power == 1
    np.testing.assert_allclose(
        transport.erased_emb, pipe.embed(list(c.concepts.erase)), atol=0
    )  # exact: load() computes it by this same pipe.embed

"""SAFREE: projectors, trigger detection, the orthogonal token projection, self-validating
filtering, the timestep switch of the sampler, and the training-free export."""

import json
import math
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsafe.diffusion import schedulers
from jaxsafe.erasure import safree

D = 16


def _unit(v):
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


class ProjectorTest(chex.TestCase):
    @chex.all_variants(with_pmap=False)
    def test_projector_matches_the_pseudo_inverse_formula(self):
        E = np.random.default_rng(0).standard_normal((2, 3, D))
        E[1, 2] = 0.0  # a zero row (a padding position) adds nothing to the span
        P = np.asarray(self.variant(safree.subspace_projector)(jnp.asarray(E, jnp.float32)))
        for b in range(2):
            ref = E[b].T @ np.linalg.pinv(E[b] @ E[b].T) @ E[b]
            np.testing.assert_allclose(P[b], ref, atol=1e-5)
            np.testing.assert_allclose(P[b] @ P[b], P[b], atol=1e-5)
        assert np.isclose(np.trace(P[0]), 3, atol=1e-4) and np.isclose(np.trace(P[1]), 2, atol=1e-4)

    def test_all_zero_rows_give_the_zero_projector(self):
        np.testing.assert_array_equal(
            safree.subspace_projector(jnp.zeros((4, D))), np.zeros((D, D))
        )


def _constructed_prompt(toxic_at=2, n_words=4, L=8, seed=0):
    """Embeddings of a prompt whose word ``toxic_at`` (1-based position) carries a toxic
    direction: masked-prompt embeddings are normalised sums of the other words' vectors, as a
    layer-normed pooled state would be. Toxic subspace: span(e0, e1)."""
    r = np.random.default_rng(seed)
    C = np.zeros((2, D))
    C[0, 0], C[1, 1] = 1.0, 1.0
    words = r.standard_normal((n_words, D))
    words[:, :2] *= 0.1  # benign words: mostly outside the toxic subspace
    words[toxic_at - 1] = 0.0
    words[toxic_at - 1, :2] = (3.0, 2.0)  # the toxic word: inside it
    base = r.standard_normal(D)
    p_masked = np.zeros((1, L, D))
    for i in range(1, n_words + 1):
        p_masked[0, i] = _unit(base + words.sum(0) - words[i - 1])
    emb = r.standard_normal((1, L, D))
    return (
        emb.astype(np.float32),
        p_masked.astype(np.float32),
        np.array([n_words + 2]),
        C.astype(np.float32),
    )


class TriggerTest(chex.TestCase):
    @chex.all_variants(with_pmap=False)
    def test_an_injected_toxic_token_is_flagged(self):
        emb, p_masked, lengths, C = _constructed_prompt(toxic_at=3)
        out = self.variant(lambda *a: safree.safree_filter(*a, alpha=0.01))(
            emb, p_masked, lengths, C
        )
        # Positions: SOT, four words (the third is toxic), EOT, padding.
        np.testing.assert_array_equal(out["trigger"][0], [0, 0, 0, 1, 0, 0, 0, 0])
        # Independent: d_i = ‖(I − P_C) p̄_i‖ = ‖p̄_i[2:]‖ here, and the rule against the others.
        d = np.linalg.norm(p_masked[0, 1:5, 2:], axis=-1)
        np.testing.assert_allclose(out["distance"][0, 1:5], d, rtol=1e-5, atol=1e-6)
        flags = [d[i] >= 1.01 * np.delete(d, i).mean() for i in range(4)]
        assert flags == [False, False, True, False]

    def test_a_large_alpha_flags_nothing_and_a_lone_word_is_flagged(self):
        emb, p_masked, lengths, C = _constructed_prompt(toxic_at=1)
        assert not np.any(safree.safree_filter(emb, p_masked, lengths, C, alpha=10.0)["trigger"])
        # One word token: no other token to compare with; the reference's NaN comparison flags it.
        out = safree.safree_filter(emb, p_masked, np.array([3]), C)
        np.testing.assert_array_equal(out["trigger"][0], [0, 1, 0, 0, 0, 0, 0, 0])
        # The empty prompt (SOT, EOT) has no word tokens: nothing flagged, nothing changed.
        out = safree.safree_filter(emb, p_masked, np.array([2]), C)
        assert not np.any(out["trigger"])
        np.testing.assert_array_equal(out["embedding"], emb)

    @chex.all_variants(with_pmap=False)
    def test_projected_tokens_are_orthogonal_to_the_toxic_subspace_and_others_unchanged(self):
        r = np.random.default_rng(3)
        B, L, K = 3, 10, 4
        emb = r.standard_normal((B, L, D)).astype(np.float32) * 5
        p_masked = r.standard_normal((B, L, D)).astype(np.float32)
        C = r.standard_normal((K, D)).astype(np.float32)
        lengths = np.array([9, 5, 7])
        out = self.variant(lambda *a: safree.safree_filter(*a, alpha=-0.5))(
            emb, p_masked, lengths, C
        )
        m, filt = np.asarray(out["trigger"]), np.asarray(out["embedding"])
        assert m.any() and not m.all()
        basis = np.linalg.qr(C.T)[0]  # orthonormal basis of the toxic subspace
        comp = np.abs(filt @ basis)[m]
        assert comp.max() < 1e-5 * np.abs(emb).max()
        np.testing.assert_array_equal(filt[~m], emb[~m])
        # The projection itself: (I − P_C) P_I p, with P_I from the masked word rows.
        for b in range(B):
            Em = p_masked[b, 1 : lengths[b] - 1].astype(np.float64)
            P_I = Em.T @ np.linalg.pinv(Em @ Em.T) @ Em
            P_C = C.T @ np.linalg.pinv(C @ C.T) @ C
            ref = (emb[b] @ P_I) @ (np.eye(D) - P_C)
            np.testing.assert_allclose(out["projected"][b], ref, atol=2e-4)
        # Only word positions can be triggers (never SOT, EOT, padding).
        words, _ = safree.token_masks(lengths, L)
        assert not np.any(m & ~np.asarray(words))


def _np_f_beta(z, upperbound=10):
    """The reference's f_beta (sigmoid branch), written out."""
    return round(upperbound / (1 + math.exp(-(2.0 * 2.5 * (10 * z - 5.333)))))


class SelfValidatingFilterTest(chex.TestCase):
    @chex.all_variants(with_pmap=False)
    @pytest.mark.slow
    def test_step_count_matches_an_independent_computation(self):
        r = np.random.default_rng(4)
        B, L = 6, 9
        emb = r.standard_normal((B, L, D)).astype(np.float32)
        p_masked = r.standard_normal((B, L, D)).astype(np.float32)
        C = r.standard_normal((5, D)).astype(np.float32)
        lengths = np.array([4, 9, 6, 5, 8, 3])
        out = self.variant(lambda *a: safree.safree_filter(*a))(emb, p_masked, lengths, C)
        steps = np.asarray(safree.svf_steps(out["beta"]))
        proj = np.asarray(out["projected"], np.float64)
        for b in range(B):
            n = lengths[b]  # attended positions: SOT, words, EOT
            cos = [
                proj[b, j] @ emb[b, j] / np.linalg.norm(proj[b, j]) / np.linalg.norm(emb[b, j])
                for j in range(n)
            ]
            beta = 1 - np.mean(cos)
            np.testing.assert_allclose(out["beta"][b], beta, atol=1e-5)
            assert steps[b] == _np_f_beta(beta)

    def test_the_step_map_against_the_reference_formula(self):
        betas = np.linspace(0.0, 1.0, 201)
        got = np.asarray(safree.svf_steps(jnp.asarray(betas)))
        ref = np.array([_np_f_beta(z) for z in betas])
        # float32 vs float64 can only differ where γσ(.) sits on a rounding boundary.
        assert (got != ref).sum() <= 1
        assert got[0] == 0 and got[-1] == 10 and np.all(np.diff(got) >= 0)


def test_the_sampler_switches_from_filtered_to_original_after_the_last_filtered_step():
    sched = schedulers.SchedulerConfig()
    ts = schedulers.timesteps(sched, 10)
    filtered, original = jnp.ones((2, 3, 4)), jnp.zeros((2, 3, 4))
    packed = safree.pack(filtered, original, jnp.array([0, 2]), jnp.array([3, 5]))
    f, o, first, last = safree.unpack(packed)
    np.testing.assert_array_equal(f, filtered)
    np.testing.assert_array_equal(o, original)
    apply = jax.jit(safree.make_safree_apply(lambda p, x, t, e: e[:, 0, 0], ts))
    used = np.stack([apply(None, None, jnp.full((2,), t), packed) for t in ts])
    np.testing.assert_array_equal(used[:, 0], [1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(used[:, 1], [0, 0, 1, 1, 1, 1, 0, 0, 0, 0])


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match=r"C must be \(K, D\) with D = 16"):
        safree.safree_filter(
            np.zeros((1, 4, 16)), np.zeros((1, 4, 16)), np.array([4]), np.zeros((2, 8))
        )
    with pytest.raises(ValueError, match="emb and p_masked must both be"):
        safree.safree_filter(
            np.zeros((1, 4, 16)), np.zeros((1, 5, 16)), np.array([4]), np.zeros((2, 16))
        )
    with pytest.raises(ValueError, match=r"lengths must be \(1,\)"):
        safree.safree_filter(
            np.zeros((1, 4, 16)), np.zeros((1, 4, 16)), np.array([4, 4]), np.zeros((2, 16))
        )


@pytest.mark.slow
def test_generation_is_unchanged_when_nothing_is_flagged(tiny_pipe):
    """With no trigger (α large) SAFREE's sampler reproduces the plain sampler bit for bit; with
    every word flagged (α = −1) the images change."""
    from flax import nnx

    from configs.erasure import safree as safree_config
    from experiments import erase_safree
    from jaxsafe.diffusion import pipeline

    c = safree_config.get_config("smoke")
    graphdef, state = nnx.split(tiny_pipe.model)
    C = erase_safree.toxic_embeddings(tiny_pipe, erase_safree.keywords(c), c.safree.pooling)
    sampling = dict(kind="ddim", num_inference_steps=3, guidance_scale=4.0, batch_size=2)
    prompts, seeds = ["a red square", "a blue circle on a plain background"], [0, 1]
    plain = pipeline.generator(tiny_pipe, graphdef, **sampling)((state,), prompts, seeds)
    out = {}
    for alpha in (100.0, -1.0):
        c.safree.alpha = alpha
        c.sampling.update(sampling)
        apply, encode, _ = erase_safree.safree_functions(c, tiny_pipe, graphdef, C)
        gen = pipeline.make_generator(tiny_pipe, apply, encode, **sampling)
        out[alpha] = gen((state,), prompts, seeds)
    np.testing.assert_array_equal(out[100.0], plain)
    assert np.abs(out[-1.0] - plain).max() > 1e-3


@pytest.mark.slow
def test_the_negative_prompt_is_guidance_against_its_plain_embedding(tiny_pipe):
    """SAFREE's generation with its negative prompt (the test bed's: the erased words) equals
    classifier-free guidance whose unconditional embedding is that prompt's text-encoder output,
    computed here with the bare sampler; every prompt token flagged (α = −1) must not touch the
    negative prompt, which the reference never projects."""
    from flax import nnx

    from configs.erasure import safree as safree_config
    from experiments import erase_safree
    from jaxsafe.diffusion import pipeline, t2i

    c = safree_config.get_config("smoke")
    c.concepts.erase = ("square",)
    assert erase_safree.negative_prompt(c) == "square box"
    assert erase_safree.negative_prompt(safree_config.get_config()) == ", ".join(
        safree_config.NUDITY_KEYWORDS
    )
    graphdef, state = nnx.split(tiny_pipe.model)
    C = erase_safree.toxic_embeddings(tiny_pipe, erase_safree.keywords(c), c.safree.pooling)
    sampling = dict(kind="ddim", num_inference_steps=3, guidance_scale=4.0, batch_size=2)
    prompts, seeds = ["a red square", "a blue circle on a plain background"], [0, 1]
    sampler = t2i.make_t2i_sampler(
        lambda p, x, t, e: tiny_pipe.model(x, t, e),
        tiny_pipe.scheduler,
        latent_shape=tiny_pipe.latent_shape,
        **{k: v for k, v in sampling.items() if k != "batch_size"},
    )
    expected = np.asarray(
        tiny_pipe.decode(
            sampler(
                None,
                tiny_pipe.embed(prompts),
                tiny_pipe.embed(["square box"]),
                np.asarray(seeds, np.int32),
            )
        )
    )
    c.safree.alpha = 100.0  # nothing flagged: the prompts' embeddings are the plain ones
    c.sampling.update(sampling)
    apply, encode, encode_negative = erase_safree.safree_functions(c, tiny_pipe, graphdef, C)
    gen = pipeline.make_generator(
        tiny_pipe,
        apply,
        encode,
        encode_negative=encode_negative,
        negative_prompt=erase_safree.negative_prompt(c),
        **sampling,
    )
    # Images in [−1, 1]; the two programs fuse differently (measured 2.4e-5 apart); a wrong
    # negative prompt moves pixels by ~0.1.
    np.testing.assert_allclose(gen((state,), prompts, seeds), expected, atol=1e-4)
    neg_ids = np.asarray(tiny_pipe.tokenize(["square box"]))
    plain_neg = np.asarray(encode_negative((state,), neg_ids))
    L = tiny_pipe.tokenize([""]).shape[1]
    np.testing.assert_allclose(plain_neg[:, :L], tiny_pipe.embed(["square box"]), atol=1e-6)
    np.testing.assert_allclose(plain_neg[:, L : 2 * L], plain_neg[:, :L], atol=0)  # exact: a copy


@pytest.mark.slow
def test_edit_writes_the_settings_next_to_an_unchanged_model(tiny_folder, erase_on_8_devices):
    """The smoke run on 8 devices (evaluation generates through the filter on the mesh): the
    settings are written next to an unchanged model."""
    from configs.erasure import safree as safree_config
    from jaxsafe.weights.convert import read_safetensors

    c = safree_config.get_config("smoke")
    summary = erase_on_8_devices("safree")
    with open(os.path.join(summary["export"], "safree.json")) as f:
        written = json.load(f)
    from jaxsafe.erasure.prompts import testbed_keywords

    erased = list(c.concepts.erase)
    assert written["keywords"] == testbed_keywords(erased) and written["keywords"][0] == erased[0]
    assert written["pooling"] == "mean"
    assert written["svf"] and written["alpha"] == 0.01 and written["gamma"] == 4.0  # γ = N
    assert written["latent_re_attention"] is False and written["negative_prompt"] == "red"
    for part in ("unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):
        a = read_safetensors([os.path.join(tiny_folder, part)])
        b = read_safetensors([os.path.join(summary["export"], part)])
        assert all(np.array_equal(np.asarray(a[k]), np.asarray(b[k])) for k in a), part


def test_testbed_keywords_are_phrases_of_the_concept_and_its_synonyms():
    from jaxsafe.erasure.prompts import testbed_keywords

    assert testbed_keywords(["red"]) == [
        "red",
        "a red",
        "a red circle",
        "a red ellipse",
        "a red square",
        "a red triangle",
    ]
    kw = testbed_keywords(["square"])
    assert kw[:3] == ["square", "a square", "a red square"] and "an orange box" in kw
    from jaxsafe.data import shapes

    assert all(shapes.parse_caption(k) for k in kw)  # every phrase is in the test-bed vocabulary

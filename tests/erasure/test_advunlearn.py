"""AdvUnlearn: the text encoder from embeddings, the prefix, the soft-prompt attack, the retain
term, and a smoke run that changes the text encoder only."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxsafe.diffusion import pipeline
from jaxsafe.erasure import advunlearn as au
from jaxsafe.erasure import model as em
from jaxsafe.erasure import params as ep
from jaxsafe.nn.clip_text import CLIPTextConfig, CLIPTextModel
from jaxsafe.treepath import named_leaves


def _tiny_clip(seed=0):
    cfg = CLIPTextConfig(
        vocab_size=19,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=12,
        eos_token_id=18,
    )
    return CLIPTextModel(cfg, rngs=nnx.Rngs(seed))


class TestEncodeEmbeddings(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_true_token_embeddings_give_the_ids_path(self):
        te = _tiny_clip()
        graphdef, state = nnx.split(te)
        ids = jnp.asarray(
            [[17, 3, 5, 18, 0, 0, 0, 0, 0, 0, 0, 0], [17, 9, 18, 0, 0, 0, 0, 0, 0, 0, 0, 0]],
            jnp.int32,
        )

        @self.variant
        def both(state, ids):
            m = nnx.merge(graphdef, state)
            return (
                au.encode_embeddings(m, au.token_embeddings(m, ids)),
                m(ids)["last_hidden_state"],
            )

        got, want = both(state, ids)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)

    @pytest.mark.slow
    def test_causal_mask_position_t_ignores_later_tokens(self):
        te = _tiny_clip()
        x = jax.random.normal(jax.random.key(1), (1, 12, 16))
        y = x.at[:, 7:].add(jax.random.normal(jax.random.key(2), (1, 5, 16)))
        a, b = au.encode_embeddings(te, x), au.encode_embeddings(te, y)
        np.testing.assert_allclose(a[:, :7], b[:, :7], rtol=1e-5, atol=1e-6)
        assert np.abs(np.asarray(a[:, 7:] - b[:, 7:])).max() > 1e-3

    def test_bad_shapes_raise(self):
        te = _tiny_clip()
        with pytest.raises(ValueError, match=r"inputs_embeds: expected \(B, L, 16\) with L <= 12"):
            au.encode_embeddings(te, jnp.zeros((1, 13, 16)))
        with pytest.raises(ValueError, match=r"inputs_embeds: expected \(B, L, 16\)"):
            au.encode_embeddings(te, jnp.zeros((1, 12, 8)))
        with pytest.raises(ValueError, match=r"ids: expected integer \(B, L\)"):
            au.token_embeddings(te, jnp.zeros((1, 12)))


class TestInsertPrefix(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_prefix_after_sot_and_last_k_dropped(self):
        w = np.arange(2 * 6 * 3, dtype=np.float32).reshape(2, 6, 3)
        adv = -np.arange(2 * 3, dtype=np.float32).reshape(2, 3) - 1
        got = np.asarray(self.variant(au.insert_prefix)(jnp.asarray(w), jnp.asarray(adv)))
        for b in range(2):
            want = np.concatenate([w[b, :1], adv, w[b, 1:4]])
            np.testing.assert_array_equal(got[b], want)

    def test_errors(self):
        with pytest.raises(ValueError, match=r"adv: expected \(k, 3\) with 1 <= k <= 4"):
            au.insert_prefix(jnp.zeros((1, 6, 3)), jnp.zeros((5, 3)))
        with pytest.raises(ValueError, match="'a red box' has 5 tokens: with a 8-token"):
            au.check_prefix_fits([3, 5], 8, 12, ["square", "a red box"])
        au.check_prefix_fits([3, 5], 7, 12)  # fits: no error


def test_text_encoder_selection_matches_the_reference_param_choices():
    names = [
        "text_encoder/embeddings/token_embedding/embedding",
        "text_encoder/embeddings/position_embedding/embedding",
        "text_encoder/encoder/layers/0/self_attn/q_proj/kernel",
        "text_encoder/encoder/layers/0/mlp/fc1/kernel",
        "text_encoder/encoder/layers/1/self_attn/q_proj/kernel",
        "text_encoder/encoder/layers/11/mlp/fc2/bias",
        "text_encoder/final_layer_norm/scale",
        "unet/down_blocks/0/attentions/0/transformer_blocks/0/attn2/to_k/kernel",
    ]

    def chosen(**kw):
        return [n for n in names if au.text_encoder_selection(**kw)(n)]

    assert chosen() == names[2:7]  # text_encoder_full: layers + final LN, no embeddings
    assert chosen(component="ffn") == [names[3], names[5]]
    assert chosen(layers=(0, 11)) == [names[2], names[3], names[5]]
    assert chosen(layers=(1,), final_layer_norm=True) == [names[4], names[6]]
    with pytest.raises(ValueError, match="component='mlp'"):
        au.text_encoder_selection(component="mlp")


def _method(pipe, **kw):
    sel = ep.nnx_filter(au.text_encoder_selection())
    graphdef, params, frozen = em.split_trainable(pipe.model, sel)

    def model(p, f):
        return em.trained_model(graphdef, p, f)

    method = au.make_advunlearn(
        lambda p, f, x, t, e: model(p, f)(x, t, e),
        lambda f, x, t, e: em.original_model(graphdef, f)(x, t, e),
        lambda p, f, x: au.encode_embeddings(model(p, f).text_encoder, x),
        lambda p, f, ids: au.token_embeddings(model(p, f).text_encoder, ids),
        pipe.scheduler,
        None,
        latent_shape=pipe.latent_shape,
        vocab_size=pipe.model.text_encoder.config.vocab_size,
        num_inference_steps=3,
        **kw,
    )
    return method, graphdef, params, frozen


@pytest.mark.slow
def test_attack_decreases_the_attack_objective(tiny_pipe):
    """With the (x_t, t) draw held fixed, Adam on δ lowers ℓ_atk; the result is a (k, D) prefix."""
    method, _, params, frozen = _method(tiny_pipe, k=2)
    ids = jnp.asarray(tiny_pipe.tokenize(["square"]))
    c_e, uncond = tiny_pipe.embed(["square"]), tiny_pipe.embed([""])
    key = jax.random.key(3)

    @jax.jit
    def attack(params, frozen):
        w_e = au.token_embeddings(tiny_pipe.model.text_encoder, ids)
        adv0 = method.init_adv(params, frozen, jax.random.key(0))

        def objective(adv, _):
            return method.attack_loss(params, frozen, w_e, c_e, uncond, adv, key)

        return au.soft_prompt_attack(objective, adv0, jax.random.key(1), steps=12, lr=0.05)

    adv, losses = attack(params, frozen)
    assert adv.shape == (2, tiny_pipe.model.text_encoder.config.hidden_size)
    losses = np.asarray(losses)
    assert np.all(np.isfinite(losses))
    assert losses[-1] < 0.9 * losses[0], losses


@pytest.mark.slow
def test_retain_term_equals_an_independent_computation(tiny_pipe):
    gamma, eta = 0.7, 1.0
    method, graphdef, params, frozen = _method(
        tiny_pipe, retain_weight=gamma, eta=eta, retain_batch=2
    )
    # A perturbed text encoder, so that the trained model differs from the original.
    keys = iter(jax.random.split(jax.random.key(5), len(jax.tree.leaves(params))))
    params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(next(keys), p.shape), params)
    retain = ["a red circle", "a triangle on a dotted background"]
    ids_e, ids_r = tiny_pipe.tokenize(["square"]), tiny_pipe.tokenize(retain)
    c_e, uncond, c_r = (np.asarray(tiny_pipe.embed(p)) for p in (["square"], [""], retain))
    x = np.asarray(jax.random.normal(jax.random.key(6), (3, *tiny_pipe.latent_shape)))
    t = np.asarray([500, 120, 880], np.int32)
    trained = em.trained_model(graphdef, params, frozen)
    prompts = {
        "x_e": au.token_embeddings(trained.text_encoder, jnp.asarray(ids_e)),
        "c_e": c_e,
        "uncond": uncond,
        "ids_r": ids_r,
        "c_r": c_r,
    }
    total, metrics = jax.jit(method.loss)(params, frozen, prompts, x, t)

    # Independent: the modules called directly, token ids through the ordinary text encoder.
    @jax.jit
    def independent(params, frozen):
        trained = em.trained_model(graphdef, params, frozen)
        original = em.original_model(graphdef, frozen)
        emb = trained.text_encoder(jnp.asarray(np.concatenate([ids_e, ids_r])))
        pred = trained(x, t, emb["last_hidden_state"])
        star = original(
            np.concatenate([x[:1], x]),
            np.concatenate([t[:1], t]),
            np.concatenate([uncond, c_e, c_r]),
        )
        return pred, star

    pred, star = (np.asarray(a, np.float64) for a in independent(params, frozen))
    e0, ep_, e_r = star[:1], star[1:2], star[2:]
    l_r = np.mean((pred[1:] - e_r) ** 2)
    l_u = np.mean((pred[:1] - (e0 - eta * (ep_ - e0))) ** 2)
    assert l_r > 1e-6  # the perturbation shows
    np.testing.assert_allclose(metrics["retain_loss"], l_r, rtol=2e-4, atol=1e-5)
    np.testing.assert_allclose(metrics["unlearn_loss"], l_u, rtol=2e-4, atol=1e-5)
    np.testing.assert_allclose(total, l_u + gamma * l_r, rtol=2e-4, atol=1e-5)


def test_make_advunlearn_rejects_bad_options():
    with pytest.raises(ValueError, match="attack_method='sgd'"):
        au.make_advunlearn(
            None,
            None,
            None,
            None,
            None,
            None,
            latent_shape=(1, 1, 1),
            vocab_size=2,
            attack_method="sgd",
        )
    with pytest.raises(ValueError, match="attack_init='zeros'"):
        au.make_advunlearn(
            None,
            None,
            None,
            None,
            None,
            None,
            latent_shape=(1, 1, 1),
            vocab_size=2,
            attack_init="zeros",
        )


@pytest.mark.slow
def test_smoke_run_changes_only_the_text_encoder(tiny_folder, erase_on_8_devices):
    """The smoke run on 8 devices: the exported UNet and token/position embeddings are
    bit-identical to the original, the trained text-encoder layers moved."""
    summary = erase_on_8_devices("advunlearn")
    before = named_leaves(nnx.state(pipeline.load(tiny_folder).model, nnx.Param))
    after = named_leaves(nnx.state(pipeline.load(summary["export"]).model, nnx.Param))
    assert before.keys() == after.keys()
    trained = au.text_encoder_selection()
    moved = []
    for name in before:
        a, b = np.asarray(before[name]), np.asarray(after[name])
        if trained(name):
            moved.append(not np.array_equal(a, b))
        else:
            np.testing.assert_array_equal(a, b, err_msg=name)
    assert any(n.startswith("unet/") for n in before)
    assert moved and sum(moved) >= len(moved) // 2, f"{sum(moved)}/{len(moved)} tensors moved"


def test_testbed_retain_names_no_target_and_parses():
    from jaxsafe.data import shapes
    from jaxsafe.erasure.prompts import testbed_retain

    for erase, banned in ((["square"], {"square", "box"}), (["red"], {"red"})):
        prompts = testbed_retain(erase)
        assert prompts and len(set(prompts)) == len(prompts)
        for p in prompts:
            assert not banned & set(p.split()), p
            shapes.parse_caption(p)  # in the vocabulary, one value per attribute
            assert p.split()[0] == ("an" if p.split()[1][0] in "aeiou" else "a"), p
    assert "an orange ellipse" in testbed_retain(["red"])  # the near concept is retained


@pytest.mark.slow
def test_concept_prompts_are_the_template_forms_and_the_paper_keeps_the_bare_word(tiny_folder):
    from configs.erasure import advunlearn as cfg
    from experiments.erase_advunlearn import build
    from jaxsafe import parallel
    from jaxsafe.diffusion import pipeline

    pipe = pipeline.load(tiny_folder)
    mesh = parallel.make_mesh(-1, 1)
    config = cfg.get_config("smoke")
    config.model.folder = tiny_folder
    ids = np.asarray(build(config, mesh).train_data["ids_e"])
    # One row per caption form that holds the erased colour (each once), none the bare word.
    forms = ["a red"] + [
        f"a red {s}" + b
        for s in ("circle", "ellipse", "square", "triangle")
        for b in (
            "",
            " on a dotted background",
            " on a plain background",
            " on a striped background",
        )
    ]
    np.testing.assert_array_equal(ids, np.asarray(pipe.tokenize(sorted(forms))))
    config.concepts.templates = ()  # the reference's: the concept word alone
    ids = np.asarray(build(config, mesh).train_data["ids_e"])
    np.testing.assert_array_equal(ids[:1], np.asarray(pipe.tokenize(["red"])))

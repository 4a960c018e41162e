"""The text-to-image test bed: configs, latent map, loss, oracle, metrics, smoke runs, export."""

import importlib
import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsafe.data import shapes, shapes_metrics
from jaxsafe.nn import oracle as oracle_lib
from jaxsafe.nn import patch_pca

testbed_config = importlib.import_module("configs.t2i.testbed")


@pytest.fixture(scope="module")
def oracle():
    return oracle_lib.load()


def render_caption(caption: str, rng: np.random.Generator, swap=None) -> np.ndarray:
    """A perfect generator: renders the caption's attributes (optionally `swap`ping one
    (attribute, value) for another), random where the caption is silent; in [-1, 1]."""
    label = [
        v if v >= 0 else int(rng.integers(len(vals)))
        for v, (_, vals) in zip(shapes.parse_caption(caption), shapes.ATTRIBUTES)
    ]
    if swap is not None and label[swap[0]] == swap[1]:
        label[swap[0]] = swap[2]
    return shapes.render(label, shapes._nuisance(rng)) / 127.5 - 1.0


# ---------------------------------------------------------------------------------- configs


@pytest.mark.parametrize("arg", [None, "cpu", "smoke", "oracle", "oracle_smoke"])
def test_config_variants(arg):
    c = testbed_config.get_config(arg)
    assert c.experiment == (
        "train_testbed_oracle" if arg and arg.startswith("oracle") else "t2i_testbed"
    )
    assert c.train.num_steps % c.train.steps_per_call == 0
    if c.experiment == "t2i_testbed":
        assert (c.scheduler.beta_schedule, c.scheduler.prediction_type) == ("linear", "epsilon")
        assert c.data.caption_dropout == 0.1 and c.sampling.kind == "ddim"


def test_unknown_config_variant():
    with pytest.raises(ValueError, match=r"config argument 'gpu'; expected one of"):
        testbed_config.get_config("gpu")


# ------------------------------------------------------------------------------ latent map


class LatentTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_unshuffle_layout_and_inverse(self):
        from jaxsafe.nn.patch_pca import from_latent, to_latent

        x = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
        z = self.variant(lambda x: to_latent(x, 4))(x)
        assert z.shape == (2, 8, 8, 48)
        # Latent pixel (i, j) is the 4×4×3 patch at rows 4i.., columns 4j.., row-major.
        for i, j in ((0, 0), (2, 5), (7, 7)):
            np.testing.assert_array_equal(
                z[1, i, j], x[1, 4 * i : 4 * i + 4, 4 * j : 4 * j + 4].ravel()
            )
        np.testing.assert_array_equal(self.variant(lambda z: from_latent(z, 4))(z), x)

    @chex.variants(with_jit=True, without_jit=True)
    def test_patch_pca(self):
        from jaxsafe.nn.patch_pca import PatchPCA, fit_patch_pca

        images = shapes.ShapesDataset(6).arrays(0, 40)["image"] / 127.5 - 1.0
        rows = images.reshape(40, 8, 4, 8, 4, 3).transpose(0, 1, 3, 2, 4, 5).reshape(-1, 48)
        mean, basis, scale = fit_patch_pca(images, 4, 12)
        np.testing.assert_allclose(
            mean, rows.mean(0), atol=1e-7
        )  # fit_patch_pca rounds the pixels to float32
        np.testing.assert_allclose(basis @ basis.T, np.eye(12), atol=1e-10)  # orthonormal
        # The top-12 directions span the top-12 eigenvectors of the patch covariance.
        w, v = np.linalg.eigh(np.cov(rows, rowvar=False))
        top = v[:, np.argsort(w)[::-1][:12]]
        np.testing.assert_allclose(np.abs(np.linalg.svd(top.T @ basis.T)[1]), 1, atol=1e-6)
        pca = PatchPCA(mean, basis, scale, 4)
        z = self.variant(pca.encode)(images.astype(np.float32))
        assert z.shape == (40, 8, 8, 12)
        np.testing.assert_allclose(np.std(z), 1.0, rtol=1e-4, atol=1e-6)  # the scale s
        recon = self.variant(pca.decode)(z)
        projected = (rows - mean) @ basis.T @ basis + mean
        np.testing.assert_allclose(
            recon,
            projected.reshape(40, 8, 8, 4, 4, 3).transpose(0, 1, 3, 2, 4, 5).reshape(images.shape),
            atol=1e-5,
        )
        full = PatchPCA(*fit_patch_pca(images, 4, 48), 4)  # all components: lossless
        np.testing.assert_allclose(
            full.decode(full.encode(images.astype(np.float32))), images, atol=1e-5
        )
        with pytest.raises(ValueError, match=r"latent.components=49; expected 1..48"):
            fit_patch_pca(images, 4, 49)


# ------------------------------------------------------------------------------------ oracle


def test_shipped_oracle_is_accurate_on_a_heldout_stream(oracle):
    # Stream 2: neither the oracle's training stream (0) nor its validation stream (1).
    data = shapes.ShapesDataset(seed=2).arrays(0, 1000)
    pred = shapes_metrics.oracle_predict(oracle, data["image"] / 127.5 - 1.0)
    per_attribute = np.mean(pred == data["label"], 0)
    assert np.all(per_attribute >= 0.99), per_attribute
    assert np.mean(np.all(pred == data["label"], -1)) >= 0.99


def test_oracle_predictions_compile_once_per_batch_shape(oracle, compile_log):
    images = shapes.ShapesDataset(seed=3).arrays(0, 14)["image"] / 127.5 - 1.0
    first = shapes_metrics.oracle_predict(oracle, images, batch_size=7)
    with compile_log() as names:  # the same shapes again: nothing is compiled
        again = shapes_metrics.oracle_predict(oracle, images, batch_size=7)
    assert names == [], names
    np.testing.assert_array_equal(first, again)
    # One batch of 14 is the same computation per image as two of 7.
    np.testing.assert_array_equal(first, shapes_metrics.oracle_predict(oracle, images))


def test_oracle_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"oracle weights .*nothing.npz' not found"):
        oracle_lib.load(str(tmp_path / "nothing.npz"))
    np.savez(tmp_path / "other.npz", w=np.zeros(3))
    with pytest.raises(ValueError, match=r"not oracle weights"):
        oracle_lib.load(str(tmp_path / "other.npz"))
    with pytest.raises(ValueError, match=r"x must be \(B, 32, 32, 3\) images"):
        oracle_lib.load().features(jnp.zeros((1, 16, 16, 3)))


def test_oracle_frechet_distance(oracle):
    a = shapes.ShapesDataset(seed=3).arrays(0, 200)["image"] / 127.5 - 1.0
    b = shapes.ShapesDataset(seed=4).arrays(0, 200)["image"] / 127.5 - 1.0
    assert abs(shapes_metrics.oracle_frechet_distance(oracle, a, a)) < 1e-3  # round-off only
    same_distribution = shapes_metrics.oracle_frechet_distance(oracle, a, b)
    # Only red shapes: a different distribution must be much farther.
    red = np.stack([render_caption("a red circle", np.random.default_rng(i)) for i in range(200)])
    assert shapes_metrics.oracle_frechet_distance(oracle, a, red) > 5 * same_distribution > 0


# ----------------------------------------------------------------------------------- metrics


def test_concept_prompts_name_their_concept():
    for concept in shapes.CONCEPTS:
        captions, labels = shapes_metrics.concept_prompts(concept, 12, seed=1)
        attr, value = shapes.CONCEPTS[concept]
        assert np.all(labels[:, attr] == value)
        for caption, label in zip(captions, labels):
            assert concept in caption.split()
            assert shapes.parse_caption(caption) == tuple(int(v) for v in label)
        assert captions == shapes_metrics.concept_prompts(concept, 12, seed=1)[0]
    with pytest.raises(ValueError, match=r"concept='dog'; expected one of"):
        shapes_metrics.concept_prompts("dog", 4)


def test_erasure_report_on_known_generators(oracle):
    def perfect(captions, seeds):
        return np.stack(
            [render_caption(c, np.random.default_rng(s)) for c, s in zip(captions, seeds)]
        )

    def circle_erased(captions, seeds):  # every circle comes out as a square
        return np.stack(
            [
                render_caption(c, np.random.default_rng(s), swap=(0, 0, 2))
                for c, s in zip(captions, seeds)
            ]
        )

    concepts = ["circle", "ellipse", "square", "box", "red", "dotted"]
    base = shapes_metrics.erasure_report(perfect, oracle, concepts=concepts, k=8)
    assert all(base[f"acc/{w}"] == 1.0 for w in concepts)
    assert base["other_accuracy"] == 1.0 and "target_accuracy" not in base
    erased = shapes_metrics.erasure_report(
        circle_erased, oracle, targets=["circle"], concepts=concepts, k=8
    )
    assert erased["acc/circle"] == 0.0 and erased["fidelity/circle"] == 0.0
    assert erased["target_accuracy"] == 0.0
    assert erased["near_accuracy"] == 1.0  # ellipse
    assert erased["other_accuracy"] == 1.0 and "synonym_accuracy" not in erased
    square = shapes_metrics.erasure_report(
        perfect, oracle, targets=["square"], concepts=concepts, k=4
    )
    assert square["synonym_accuracy"] == 1.0  # "box" leaks: the perfect model still draws it
    with pytest.raises(ValueError, match=r"unknown concept\(s\) \['dog'\]"):
        shapes_metrics.erasure_report(perfect, oracle, targets=["dog"])


def test_attribute_prior_reads_what_a_caption_without_the_attribute_draws(oracle):
    seen = []

    def round_default(captions, seeds):  # draws a circle when the caption names no shape
        seen.extend(captions)
        out = []
        for c, s in zip(captions, seeds):
            rng = np.random.default_rng(s)
            label = [
                v if v >= 0 else 0 if a == 0 else int(rng.integers(len(vals)))
                for a, (v, (_, vals)) in enumerate(zip(shapes.parse_caption(c), shapes.ATTRIBUTES))
            ]
            out.append(shapes.render(label, shapes._nuisance(rng)) / 127.5 - 1.0)
        return np.stack(out)

    prior = shapes_metrics.attribute_prior(round_default, oracle, "shape", k=16)
    assert prior == {"circle": 1.0, "ellipse": 0.0, "square": 0.0, "triangle": 0.0}
    assert len(seen) == 16 and not any(set(c.split()) & set(shapes.SHAPES) for c in seen)
    assert all(shapes.parse_caption(c)[0] == -1 and shapes.parse_caption(c)[1] >= 0 for c in seen)
    colour = shapes_metrics.attribute_prior(round_default, oracle, "colour", k=64)
    # Colour-less captions: the renderer draws colours uniformly; every colour turns up.
    assert set(colour) == set(shapes.COLOURS) and min(colour.values()) > 0
    assert sum(colour.values()) == pytest.approx(1.0, abs=1e-9)
    with pytest.raises(ValueError, match="attribute='size'; expected one of shape, colour"):
        shapes_metrics.attribute_prior(round_default, oracle, "size")


def test_generate_must_return_one_image_per_caption(oracle):
    with pytest.raises(ValueError, match=r"generate must return \(n, 32, 32, 3\) images"):
        shapes_metrics.concept_accuracy(lambda c, s: np.zeros((1, 32, 32, 3)), oracle, "red", k=3)


# ------------------------------------------------------------------------------------- model
# Building even the smoke UNet eagerly takes tens of seconds on 2 shared CPU cores: slow tests.


@pytest.fixture(scope="module")
def smoke_model():
    from experiments import t2i_testbed as tb
    from jaxsafe.train import split_model

    c = testbed_config.get_config("smoke")
    tok = shapes.tokenizer(c.data.max_length)
    graphdef, params, frozen = split_model(tb.build_model(c, tok))
    return c, tok, graphdef, params, frozen


@pytest.mark.slow
def test_loss_is_the_epsilon_prediction_objective(smoke_model):
    from flax import nnx

    from experiments import t2i_testbed as tb

    c, tok, graphdef, params, frozen = smoke_model
    data = shapes.ShapesDataset(5).arrays(0, 4)
    batch = {"image": data["image"] / 127.5 - 1.0, "input_ids": tok(data["caption"])}
    T = c.scheduler.num_train_timesteps
    alpha_bar = np.cumprod(1 - np.linspace(1e-4, 0.02, T))  # DDPM's linear betas
    model = nnx.merge(graphdef, params, frozen)
    lat = model.latent
    for dropout in (0.0, 1.0):
        loss_fn = tb.make_loss_fn(graphdef, tb.scheduler_config(c), tok(""), dropout)
        key = jax.random.key(7)
        loss, _ = loss_fn(params, frozen, {}, batch, key)
        # The loss's draws, re-derived from its key: t, then ε (dropout is all-or-nothing here).
        k_t, k_eps, _ = jax.random.split(key, 3)
        t = np.asarray(jax.random.randint(k_t, (4,), 0, T))
        patches = (
            batch["image"]
            .reshape(4, 8, 4, 8, 4, 3)
            .transpose(0, 1, 3, 2, 4, 5)
            .reshape(4, 8, 8, 48)
        )
        z0 = (
            (patches - np.asarray(lat.mean[...]))
            @ np.asarray(lat.basis[...]).T
            * float(lat.scale[...])
        )
        eps = np.asarray(jax.random.normal(k_eps, z0.shape), np.float64)
        ab = alpha_bar[t][:, None, None, None]
        z_t = np.sqrt(ab) * z0 + np.sqrt(1 - ab) * eps
        ids = np.repeat(tok("")[None], 4, 0) if dropout else batch["input_ids"]
        eps_hat = model(jnp.asarray(z_t, jnp.float32), t, ids)
        np.testing.assert_allclose(
            loss, np.mean((np.asarray(eps_hat) - eps) ** 2), rtol=2e-4, atol=1e-5
        )


@pytest.mark.slow
def test_export_round_trip(smoke_model, tmp_path):
    from flax import nnx

    from experiments import t2i_testbed as tb
    from jaxsafe.data.word_tokenizer import WordTokenizer
    from jaxsafe.diffusion import schedulers
    from jaxsafe.weights import diffusers

    c, tok, graphdef, params, frozen = smoke_model
    tb.export(c, graphdef, params, frozen, str(tmp_path))
    pipe = diffusers.load_pipeline(str(tmp_path))
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["testbed_latent"] == "latent/patch_pca.npz" and "tokenizer" not in index
    assert schedulers.SchedulerConfig.from_dict(pipe["scheduler_config"]) == tb.scheduler_config(c)
    assert WordTokenizer.load(str(tmp_path / "tokenizer")).vocab == tok.vocab
    model = nnx.merge(graphdef, params, frozen)
    ids = tok(["a red circle", "a box on a dotted background"])
    emb = model.text_encoder(ids)["last_hidden_state"]
    np.testing.assert_allclose(pipe["text_encoder"](ids)["last_hidden_state"], emb, atol=1e-6)
    z = jax.random.normal(jax.random.key(0), (2, 8, 8, 12))
    np.testing.assert_allclose(
        patch_pca.load(str(tmp_path)).decode(z), model.latent.decode(z), atol=1e-6
    )
    with pytest.raises(FileNotFoundError, match=r"latent map .* not found"):
        patch_pca.load(str(tmp_path / "unet"))
    np.testing.assert_allclose(
        pipe["unet"](z, jnp.array([10, 900]), emb),
        model.unet(z, jnp.array([10, 900]), emb),
        atol=1e-5,
    )


@pytest.mark.slow
def test_sampling_is_deterministic_per_seed(smoke_model):
    from experiments import t2i_testbed as tb

    c, tok, graphdef, params, frozen = smoke_model
    generate = tb.make_generator(graphdef, c, tok)
    captions = ["a red circle", "a green box on a striped background", "an ellipse"]
    a = generate((params, frozen), captions, [1, 2, 3])
    b = generate((params, frozen), captions, [1, 2, 3])
    assert a.shape == (3, 32, 32, 3) and np.abs(a).max() <= 1.0
    np.testing.assert_array_equal(a, b)
    alone = generate((params, frozen), captions[1:2], [2])  # same image outside its batch
    np.testing.assert_allclose(alone[0], a[1], atol=1e-5)
    other = generate((params, frozen), captions, [4, 5, 6])
    assert np.abs(other - a).max() > 0.1
    with pytest.raises(ValueError, match=r"one seed per prompt: got 3 prompts and 2 seeds"):
        generate((params, frozen), captions, [1, 2])


# ------------------------------------------------------------------------------- smoke runs


@pytest.mark.slow
def test_smoke_run_lowers_the_loss_and_exports(tmp_path):
    from experiments import run_experiment
    from experiments import t2i_testbed as tb
    from jaxsafe import train
    from jaxsafe.weights import diffusers

    c = testbed_config.get_config("smoke")
    final = run_experiment(c, str(tmp_path))
    rows = train.read_jsonl(str(tmp_path / "metrics.jsonl"))
    heldout = [r["heldout/loss"] for r in rows if "heldout/loss" in r]
    assert len(heldout) == 3 and heldout[-1] < heldout[0]
    assert 0 <= final["other_accuracy"] <= 1 and np.isfinite(final["oracle_fd"])
    assert final["loss"] == pytest.approx(heldout[-1], rel=1e-5, abs=1e-6)
    assert len(list((tmp_path / "images").glob("samples_grid_*.png"))) == 3
    graphdef, params, frozen, step = tb.restore(c, str(tmp_path))
    assert step == c.train.num_steps
    tb.export(c, graphdef, params, frozen, str(tmp_path / "export"))
    assert set(diffusers.load_pipeline(str(tmp_path / "export"))) >= {"unet", "text_encoder"}


@pytest.mark.slow
def test_oracle_smoke_run(tmp_path):
    from experiments import run_experiment
    from jaxsafe import train

    c = testbed_config.get_config("oracle_smoke")
    with c.unlocked():
        c.oracle.out = str(tmp_path / "oracle.npz")
    final = run_experiment(c, str(tmp_path))
    rows = train.read_jsonl(str(tmp_path / "metrics.jsonl"))
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    assert losses[-1] < losses[0]
    assert final["colour_accuracy"] > 0.5  # colour is learnt first (chance: 0.25)
    loaded = oracle_lib.load(str(tmp_path / "oracle.npz"))
    assert loaded.dense.kernel.shape == (1024, 128)

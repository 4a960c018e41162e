"""The captioned shapes set: determinism, caption ⇔ label ⇔ pixels, batches for grain."""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxsafe.data import shapes, shapes_metrics

# The world, typed in independently of the module.
SHAPE_WORDS = {0: {"circle"}, 1: {"ellipse"}, 2: {"square", "box"}, 3: {"triangle"}}
COLOUR_WORDS = ["red", "orange", "green", "blue"]
BACKGROUND_WORDS = ["plain", "striped", "dotted"]
RGB = np.array([[210, 35, 35], [235, 130, 20], [40, 170, 60], [40, 80, 210]])


def detect(image: np.ndarray) -> tuple[int, int, int]:
    """An analytic reading of (shape, colour, background) from the pixels."""
    x = image.astype(np.float64)
    # Over a grey background a pixel covered by a fraction c of the shape has saturation
    # (max - min channel) c times the shape colour's.
    saturation = x.max(-1) - x.min(-1)
    full = saturation > 0.8 * saturation.max()
    colour = int(np.argmin(((RGB - x[full].mean(0)) ** 2).sum(-1)))
    cover = np.clip(saturation / np.median(saturation[full]), 0, 1)
    # Shape: area over the (sub-pixel) bounding box, and the box's aspect ratio.
    w, h = cover.max(0).sum(), cover.max(1).sum()
    fill, aspect = cover.sum() / (w * h), min(w, h) / max(w, h)
    if fill > 0.9:
        shape = 2  # square: 1
    elif fill < 0.65:
        shape = 3  # triangle: 1/2
    else:
        shape = 1 if aspect < 0.75 else 0  # ellipse / circle: pi/4
    # Background, on grey pixels away from the shape: stripes are constant along rows or along
    # columns, dots along neither.
    near = np.zeros(cover.shape, bool)
    for dy in range(-2, 3):
        for dx in range(-2, 3):
            near |= np.roll(cover > 0.02, (dy, dx), (0, 1))
    grey = np.ma.masked_array(x[..., 0], near)
    if grey.max() - grey.min() < 10:
        background = 0
    else:
        along = min(grey.std(axis=1).mean(), grey.std(axis=0).mean())
        background = 1 if along < 3 else 2
    return shape, colour, background


def test_examples_are_deterministic_and_random_access():
    a = [shapes.example(3, i) for i in (0, 7, 123456)]
    ds = shapes.ShapesDataset(seed=3)
    for e, i in zip(a, (0, 7, 123456)):
        b = ds[i]
        np.testing.assert_array_equal(e["image"], b["image"])
        np.testing.assert_array_equal(e["label"], b["label"])
        assert e["caption"] == b["caption"]
    other = shapes.ShapesDataset(seed=4)
    assert any(not np.array_equal(ds[i]["image"], other[i]["image"]) for i in range(5))
    assert a[0]["image"].shape == (32, 32, 3) and a[0]["image"].dtype == np.uint8


def test_caption_words_match_the_label():
    seen_synonym = seen_partial = False
    for i in range(400):
        e = shapes.example(0, i)
        s, c, b = (int(v) for v in e["label"])
        words = e["caption"].split()
        nouns = [w for w in words if w in {"circle", "ellipse", "square", "box", "triangle"}]
        assert len(nouns) == 1 and nouns[0] in SHAPE_WORDS[s], e
        colours = [w for w in words if w in COLOUR_WORDS]
        assert colours in ([], [COLOUR_WORDS[c]]), e
        backgrounds = [w for w in words if w in BACKGROUND_WORDS]
        assert backgrounds in ([], [BACKGROUND_WORDS[b]]), e
        if backgrounds:
            assert words[-4:] == ["on", "a", BACKGROUND_WORDS[b], "background"], e
        assert words[0] == ("an" if words[1][0] in "aeiou" else "a"), e
        assert shapes.parse_caption(e["caption"]) == (
            s,
            c if colours else -1,
            b if backgrounds else -1,
        )
        seen_synonym |= "box" in words
        seen_partial |= not colours or not backgrounds
    assert seen_synonym and seen_partial


def test_rendered_pixels_match_the_label():
    labels, detected = [], []
    for i in range(300):
        e = shapes.example(1, i)
        labels.append(tuple(int(v) for v in e["label"]))
        detected.append(detect(e["image"]))
    assert detected == labels
    assert len(set(labels)) == 48  # every combination occurs in 300 draws


@pytest.mark.parametrize("shape", range(4))
def test_render_attributes_for_every_shape(shape):
    rng = np.random.default_rng(shape)
    for colour in range(4):
        for background in range(3):
            label = (shape, colour, background)
            image = shapes.render(label, shapes._nuisance(rng))
            assert detect(image) == label


def test_bad_labels_and_captions_raise():
    with pytest.raises(ValueError, match=r"label must be \(shape, colour, background\) indices"):
        shapes.render((4, 0, 0), shapes._nuisance(np.random.default_rng(0)))
    with pytest.raises(ValueError, match=r"unknown word 'dog'"):
        shapes.parse_caption("a red dog")
    with pytest.raises(ValueError, match=r"names two values of attribute 'colour'"):
        shapes.parse_caption("a red blue circle")
    with pytest.raises(ValueError, match=r"attribute='size'; expected one of"):
        shapes.concept_words("size")


def test_concept_tables():
    assert shapes.CONCEPTS["box"] == shapes.CONCEPTS["square"] == (0, 2)
    assert shapes.CONCEPTS["orange"] == (1, 1) and shapes.CONCEPTS["dotted"] == (2, 2)
    assert set(shapes.concept_words("shape")) == {"circle", "ellipse", "square", "box", "triangle"}
    assert shapes.tokenizer().vocab_size == 16 + 3


def test_batches_are_the_examples_of_each_step():
    tok = shapes.tokenizer()
    ds = shapes.ShapesDataset(seed=2, num_examples=20)
    batches = shapes.shapes_batches(ds, tok, 8)
    b = batches[3]  # examples 24..31 mod 20 = 4..11
    assert b["image"].shape == (8, 32, 32, 3) and b["image"].dtype == np.float32
    for j, i in enumerate(range(4, 12)):
        e = shapes.example(2, i)
        np.testing.assert_allclose(b["image"][j], e["image"] / 127.5 - 1.0, atol=1e-6)
        np.testing.assert_array_equal(b["label"][j], e["label"])
        assert tok.decode(b["input_ids"][j]) == e["caption"]
    again = shapes.shapes_batches(ds, tok, 8)[3]
    np.testing.assert_array_equal(again["input_ids"], b["input_ids"])
    shares = [
        shapes.shapes_batches(ds, tok, 8, process_index=p, process_count=2)[3] for p in range(2)
    ]
    np.testing.assert_array_equal(np.concatenate([s["image"] for s in shares]), b["image"])
    with pytest.raises(ValueError, match=r"batch_size=6 must be divisible by process_count=4"):
        shapes.shapes_batches(ds, tok, 6, process_index=0, process_count=4)


def test_shape_weights_rebalance_the_shape_draw_only():
    """Weights (1, 2, 1, 1) draw the ellipse with probability 2/5 (binomial: 2,000 draws put the
    share within 0.4 ± 0.035 at 3.2σ); the uniform stream is the one without weights; bad
    weights are named."""
    from jaxsafe.data import shapes as sh

    w = sh.ShapesDataset(0, shape_weights=(1, 2, 1, 1))
    labels = np.stack([w[i]["label"] for i in range(2000)])
    share = np.bincount(labels[:, 0], minlength=4) / len(labels)
    np.testing.assert_allclose(share, [0.2, 0.4, 0.2, 0.2], atol=0.035)
    np.testing.assert_allclose(np.bincount(labels[:, 1], minlength=4) / 2000, 0.25, atol=0.035)
    plain = sh.ShapesDataset(0)
    assert all(plain[i]["caption"] == sh.example(0, i)["caption"] for i in range(20))
    with pytest.raises(ValueError, match="shape_weights must be 4 non-negative numbers"):
        sh.ShapesDataset(0, shape_weights=(1, 1, 1))
    with pytest.raises(ValueError, match="shape_weights must be 4 non-negative numbers"):
        sh.ShapesDataset(0, shape_weights=(0, 0, 0, 0))


# The lightness world (One More Step's test bed).


def test_lightness_backgrounds_are_flat_at_their_levels_and_the_grey_world_is_unchanged():
    grey = shapes.ShapesDataset(0).arrays(0, 40)
    assert np.all(grey["label"][:, 2] < len(shapes.BACKGROUNDS))
    data = shapes.ShapesDataset(0, world="lightness").arrays(0, 300)
    bg = data["label"][:, 2]
    assert set(bg.tolist()) == set(range(5))
    for i, (word, (lo, hi)) in enumerate(shapes.LIGHTNESS_LEVELS.items()):
        images = data["image"][bg == len(shapes.BACKGROUNDS) + i].astype(np.float64)
        # The shape covers under a third of the image: the median pixel is the background.
        med = np.median(images.reshape(len(images), -1, 3), axis=1)
        assert np.all(med >= np.floor(lo)) and np.all(med <= np.ceil(hi)), word
        np.testing.assert_array_equal(med[:, 0], med[:, 1])  # grey: equal channels
        assert all(
            f"on a {word} background" in c or "background" not in c
            for c, b in zip(data["caption"], bg)
            if b == len(shapes.BACKGROUNDS) + i
        )


def test_lightness_words_parse_and_tokenize_only_in_their_world():
    assert shapes.parse_caption("a red circle on a black background") == (0, 0, 3)
    assert shapes.parse_caption("a white background") == (-1, -1, 4)
    with pytest.raises(ValueError, match="two values of attribute 'background'"):
        shapes.parse_caption("a circle on a black white background")
    assert shapes.tokenizer().vocab_size == len(shapes.VOCABULARY) + 3  # PAD, SOT, EOT
    tok = shapes.tokenizer(world="lightness")
    assert tok.vocab_size == len(shapes.VOCABULARY) + 2 + 3
    with pytest.raises(ValueError, match="black"):
        shapes.tokenizer()(["a black background"])
    tok(["a black background"])
    with pytest.raises(ValueError, match=r"world='dark'; expected one of \('grey', 'lightness'\)"):
        shapes.ShapesDataset(0, world="dark")


def test_lightness_prompts_cover_every_pair_and_the_report_scores_them():
    captions, labels = shapes_metrics.lightness_prompts("white", 32, seed=3)
    assert [shapes.parse_caption(c) for c in captions] == [tuple(x) for x in labels]
    assert len({tuple(x) for x in labels[:16]}) == 16  # one cycle of all (shape, colour) pairs

    class FixedOracle:  # always answers (circle, red, plain)
        def predict(self, x):
            return jnp.zeros((x.shape[0], 3), jnp.int32)

    level = {"black": -0.8, "white": 0.6}

    def generate(caps, seeds):
        return np.stack([np.full((32, 32, 3), level[c.split()[-2]], np.float32) for c in caps])

    out = shapes_metrics.lightness_report(generate, FixedOracle(), k=16, seed=1, batch_size=5)
    for w, v in level.items():
        np.testing.assert_allclose(out[f"brightness/{w}"], (v + 1) * 127.5, atol=1e-3)
        assert out[f"shape/{w}"] == 0.25 and out[f"colour/{w}"] == 0.25  # 1 value in 4


def test_zero_weights_leave_concepts_out_of_the_stream():
    from configs.t2i import testbed

    c = testbed.get_config("without")
    ds = shapes.ShapesDataset(
        0, shape_weights=c.data.shape_weights, colour_weights=c.data.colour_weights
    )
    items = ds.arrays(0, 300)
    assert set(items["label"][:, 0]) == {1, 3} and set(items["label"][:, 1]) == {1, 3}
    banned = {"circle", "square", "box", "red", "green"}
    assert not any(banned & set(text.split()) for text in items["caption"])
    # None is the uniform stream, unchanged by the option's existence
    plain = shapes.ShapesDataset(0).arrays(0, 20)
    again = shapes.ShapesDataset(0, colour_weights=None).arrays(0, 20)
    np.testing.assert_array_equal(plain["image"], again["image"])
    with pytest.raises(ValueError, match="colour_weights must be 4 non-negative numbers"):
        shapes.ShapesDataset(0, colour_weights=(1.0, 0.0))

"""The digits feature classifier: the shipped weights, an independent numpy forward pass, I/O."""

import numpy as np
import pytest
from flax import nnx

from jaxsafe.data import images
from jaxsafe.nn import digits_classifier as dc
from jaxsafe.treepath import named_leaves


@pytest.fixture(scope="module")
def shipped():
    return dc.load()


def test_shipped_weights_reach_97_percent_on_held_out_digits(shipped):
    test = images.digits(16, "test")
    logits = shipped(images.to_float(test["image"]))
    assert np.mean(np.argmax(logits, -1) == test["label"]) >= 0.97


def test_32px_digits_are_resized_and_still_recognised(shipped):
    test = images.digits(32, "test")
    assert np.mean(np.argmax(shipped(images.to_float(test["image"])), -1) == test["label"]) >= 0.95


def numpy_features(model, x):
    """conv3×3 'SAME' + bias, ReLU, 2×2 mean pool (twice), flatten, dense + ReLU, in float64."""

    def conv(h, layer):
        k, b = np.asarray(layer.kernel[...], np.float64), np.asarray(layer.bias[...], np.float64)
        p = np.pad(h, ((0, 0), (1, 1), (1, 1), (0, 0)))
        hh, ww = h.shape[1:3]
        out = sum(p[:, i : i + hh, j : j + ww] @ k[i, j] for i in range(3) for j in range(3))
        return out + b

    def pool(h):
        b, hh, ww, c = h.shape
        return h.reshape(b, hh // 2, 2, ww // 2, 2, c).mean((2, 4))

    h = pool(np.maximum(conv(x.astype(np.float64), model.conv1), 0))
    h = pool(np.maximum(conv(h, model.conv2), 0))
    d = model.dense
    return np.maximum(
        h.reshape(len(h), -1) @ np.asarray(d.kernel[...]) + np.asarray(d.bias[...]), 0
    )


def test_features_match_an_independent_numpy_forward_pass(shipped):
    x = images.to_float(images.digits(16)["image"][:5])
    got = shipped.features(x)
    assert got.shape == (5, 128)
    np.testing.assert_allclose(got, numpy_features(shipped, x), rtol=1e-4, atol=1e-4)


def test_save_load_round_trip_and_errors(tmp_path):
    model = dc.DigitsClassifier(rngs=nnx.Rngs(7))
    path = str(tmp_path / "w.npz")
    dc.save(model, path)
    loaded = named_leaves(nnx.state(dc.load(path), nnx.Param))
    want = named_leaves(nnx.state(model, nnx.Param))
    assert (
        sorted(loaded)
        == sorted(want)
        == [f"{m}/{p}" for m in ("conv1", "conv2", "dense", "head") for p in ("bias", "kernel")]
    )
    for name, x in want.items():
        np.testing.assert_array_equal(loaded[name], x)
    with pytest.raises(FileNotFoundError, match="digits classifier weights '.*nope.npz' not found"):
        dc.load(str(tmp_path / "nope.npz"))
    dc.save(dc.DigitsClassifier(width=8, rngs=nnx.Rngs(0)), path)
    with pytest.raises(ValueError, match=r"'conv1/bias' has shape \(8,\), model needs \(32,\)"):
        dc.load(path)
    with pytest.raises(
        ValueError, match=r"x must be \(B, H, W, 1\) grey images, got shape \(2, 16, 16, 3\)"
    ):
        model(np.zeros((2, 16, 16, 3), np.float32))

"""A small CNN on scikit-learn's digits: the offline feature network for Fréchet distances.

The Fréchet Inception Distance (Heusel et al., 2017) compares Gaussian fits of a pretrained
network's features; Inception-v3 weights cannot be fetched offline, and ImageNet features say
little about 16×16 digits anyway. This classifier, trained in the project on the digits' train
split (``launch/train_digits_classifier.py``) and shipped in ``jaxsafe/data/assets/``, plays
Inception's part for the CPU runs: its 128-d penultimate ReLU layer (like Inception's pool3) is
the feature vector. Input: (B, H, W, 1) in [-1, 1]; images other than 16×16 are first resized
to 16×16 (linear, antialiased), so 32×32 digits work too.

Architecture: conv3×3(32)-ReLU-avgpool2, conv3×3(64)-ReLU-avgpool2, dense(128)-ReLU, dense(10).
"""

from __future__ import annotations

import os

import jax
import numpy as np
from flax import nnx

from jaxsafe.treepath import named_leaves, replace_by_name

RESOLUTION = 16
NUM_CLASSES = 10
DEFAULT_WEIGHTS = os.path.join(
    os.path.dirname(os.path.dirname(__file__)), "data", "assets", "digits_classifier.npz"
)


class DigitsClassifier(nnx.Module):
    def __init__(self, *, width: int = 32, num_features: int = 128, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(1, width, (3, 3), rngs=rngs)
        self.conv2 = nnx.Conv(width, 2 * width, (3, 3), rngs=rngs)
        quarter = RESOLUTION // 4
        self.dense = nnx.Linear(2 * width * quarter * quarter, num_features, rngs=rngs)
        self.head = nnx.Linear(num_features, NUM_CLASSES, rngs=rngs)

    def features(self, x: jax.Array) -> jax.Array:
        """(B, H, W, 1) images in [-1, 1] -> (B, num_features) penultimate activations."""
        if x.ndim != 4 or x.shape[-1] != 1:
            raise ValueError(f"x must be (B, H, W, 1) grey images, got shape {x.shape}")
        if x.shape[1:3] != (RESOLUTION, RESOLUTION):
            x = jax.image.resize(x, (x.shape[0], RESOLUTION, RESOLUTION, 1), "linear")
        pool = lambda h: nnx.avg_pool(h, (2, 2), strides=(2, 2))
        h = pool(nnx.relu(self.conv1(x)))
        h = pool(nnx.relu(self.conv2(h)))
        return nnx.relu(self.dense(h.reshape(h.shape[0], -1)))

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.head(self.features(x))


def save(model: DigitsClassifier, path: str) -> None:
    """Writes the parameters as float32 arrays named by their tree path ('conv1/kernel')."""
    arrays = {
        k: np.asarray(v, np.float32) for k, v in named_leaves(nnx.state(model, nnx.Param)).items()
    }
    np.savez_compressed(path, **arrays)


def load(path: str | None = None) -> DigitsClassifier:
    """The classifier with the weights in ``path`` (default: the shipped ones)."""
    path = path or DEFAULT_WEIGHTS
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"digits classifier weights {path!r} not found; create them with "
            "`python -m launch.train_digits_classifier`"
        )
    model = DigitsClassifier(rngs=nnx.Rngs(0))
    state = nnx.state(model, nnx.Param)
    with np.load(path) as f:
        stored = dict(f)
    wanted = named_leaves(state)
    if set(stored) != set(wanted):
        raise ValueError(
            f"{path}: tensors {sorted(stored)} do not match the model's {sorted(wanted)}"
        )
    for name, x in wanted.items():
        if stored[name].shape != x.shape:
            raise ValueError(
                f"{path}: {name!r} has shape {stored[name].shape}, model needs {x.shape}"
            )
    nnx.update(model, replace_by_name(state, stored, complete=True, what=path))
    return model

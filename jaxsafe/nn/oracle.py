"""The test bed's oracle: a small CNN that reads shape, colour and background off a 32×32 image.

Concept-erasure papers score generations with pretrained detectors (ESD: a ResNet-50 ImageNet
classifier for object erasure, NudeNet for nudity; UCE/RECE likewise) and image quality with FID
on Inception features. In the offline test bed (``jaxsafe.data.shapes``) this network plays both
parts: three softmax heads classify the label tuple ``y = (shape, colour, background)``, and its
penultimate 128-d ReLU layer is the feature vector for the Fréchet distance (Heusel et al., 2017).
It is trained on the procedural set with Gaussian pixel noise (``experiments/
train_testbed_oracle.py``) and shipped in ``jaxsafe/data/assets/testbed_oracle.npz``.

Architecture: three × [conv3×3 → ReLU → avgpool2] (widths w, 2w, 2w; 32 → 4 pixels), dense(128)
→ ReLU (the features), then one linear head per attribute. Input (B, 32, 32, 3) in [-1, 1].
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxsafe.treepath import named_leaves, replace_by_name

RESOLUTION = 32
NUM_CLASSES = (4, 4, 3)  # (shape, colour, background), as jaxsafe.data.shapes.ATTRIBUTES
DEFAULT_WEIGHTS = os.path.join(
    os.path.dirname(os.path.dirname(__file__)), "data", "assets", "testbed_oracle.npz"
)


class ShapesOracle(nnx.Module):
    def __init__(
        self,
        *,
        width: int = 32,
        num_features: int = 128,
        num_classes: tuple[int, ...] = NUM_CLASSES,
        rngs: nnx.Rngs,
    ):
        self.convs = nnx.List(
            [
                nnx.Conv(a, b, (3, 3), rngs=rngs)
                for a, b in ((3, width), (width, 2 * width), (2 * width, 2 * width))
            ]
        )
        side = RESOLUTION // 8
        self.dense = nnx.Linear(2 * width * side * side, num_features, rngs=rngs)
        self.heads = nnx.List([nnx.Linear(num_features, n, rngs=rngs) for n in num_classes])

    def features(self, x: jax.Array) -> jax.Array:
        """(B, 32, 32, 3) images in [-1, 1] -> (B, num_features) penultimate activations."""
        if x.ndim != 4 or x.shape[1:] != (RESOLUTION, RESOLUTION, 3):
            raise ValueError(
                f"x must be (B, {RESOLUTION}, {RESOLUTION}, 3) images, got shape {x.shape}"
            )
        h = x
        for conv in self.convs:
            h = nnx.avg_pool(nnx.relu(conv(h)), (2, 2), strides=(2, 2))
        return nnx.relu(self.dense(h.reshape(h.shape[0], -1)))

    def __call__(self, x: jax.Array) -> tuple[jax.Array, ...]:
        """Logits of each attribute: a tuple of (B, num_classes[a])."""
        f = self.features(x)
        return tuple(head(f) for head in self.heads)

    def predict(self, x: jax.Array) -> jax.Array:
        """(B, num attributes) int32: the most likely value of each attribute."""
        return jnp.stack([jnp.argmax(z, -1) for z in self(x)], -1).astype(jnp.int32)


def save(model: ShapesOracle, path: str) -> None:
    """Writes the parameters as float32 arrays named by their tree path ('convs/0/kernel')."""
    arrays = named_leaves(nnx.state(model, nnx.Param))
    np.savez_compressed(path, **{k: np.asarray(v, np.float32) for k, v in arrays.items()})


def load(path: str | None = None) -> ShapesOracle:
    """The oracle with the weights in ``path`` (default: the shipped ones); widths and class
    counts are read off the stored shapes."""
    path = path or DEFAULT_WEIGHTS
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"oracle weights {path!r} not found; create them with `python -m "
            "launch.train --config=configs/t2i/testbed.py:oracle ...` (see "
            "docs/testbed.md)"
        )
    with np.load(path) as f:
        stored = dict(f)
    heads = sorted(
        (k for k in stored if k.startswith("heads/") and k.endswith("/bias")),
        key=lambda k: int(k.split("/")[1]),
    )
    try:
        # Abstract construction: running the initialisers eagerly is slow on a busy CPU.
        model = nnx.eval_shape(
            lambda: ShapesOracle(
                width=stored["convs/0/kernel"].shape[-1],
                num_features=stored["dense/bias"].shape[0],
                num_classes=tuple(stored[k].shape[0] for k in heads),
                rngs=nnx.Rngs(0),
            )
        )
    except KeyError as e:
        raise ValueError(f"{path}: not oracle weights (no tensor {e})") from None
    state = nnx.state(model, nnx.Param)
    wanted = {k: v.shape for k, v in named_leaves(state).items()}
    got = {k: v.shape for k, v in stored.items()}
    if wanted != got:
        raise ValueError(f"{path}: tensors {got} do not match the model's {wanted}")
    nnx.update(model, replace_by_name(state, stored, complete=True, what=path))
    return model

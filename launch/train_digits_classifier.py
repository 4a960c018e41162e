r"""Trains the digits feature classifier and writes its weights (about a minute on 2 CPU cores).

    python -m launch.train_digits_classifier [--out=jaxsafe/data/assets/digits_classifier.npz]

Data: `jaxsafe.data.images.digits(16, 'train')` (1,438 images); the 359 `'test'` images are held
out and only used for the printed accuracy. Augmentation (so features stay meaningful on imperfect
generated samples): random shifts of up to one pixel and Gaussian pixel noise of std 0.1.
Adam, lr 1e-3, batch 128, weight decay 1e-4.
"""

import os

import numpy as np
from absl import flags

from launch import user_errors

_OUT = flags.DEFINE_string("out", None, "Where to write the .npz (default: the shipped asset).")
_STEPS = flags.DEFINE_integer("steps", 2000, "Optimizer steps.")
_SEED = flags.DEFINE_integer("seed", 0, "Initialisation and batching seed.")


def augment(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    shifted = np.empty_like(x)
    for i, (dy, dx) in enumerate(rng.integers(-1, 2, size=(len(x), 2))):
        shifted[i] = np.roll(x[i], (dy, dx), axis=(0, 1))
    return shifted + 0.1 * rng.standard_normal(x.shape).astype(np.float32)


def accuracy(model, x, y) -> float:
    import jax.numpy as jnp

    return float(jnp.mean(jnp.argmax(model(jnp.asarray(x)), -1) == y))


def main(argv):
    del argv
    import jax
    import optax
    from flax import nnx

    from jaxsafe.data import images
    from jaxsafe.nn import digits_classifier as dc

    out = _OUT.value or dc.DEFAULT_WEIGHTS
    folder = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(folder):  # before training, not after it
        raise FileNotFoundError(f"--out {out!r}: no folder {folder!r}")
    if _STEPS.value < 1:
        raise ValueError(f"--steps={_STEPS.value}: expected at least 1")

    train = images.digits(dc.RESOLUTION, "train")
    test = images.digits(dc.RESOLUTION, "test")
    x_train, y_train = images.to_float(train["image"]), train["label"]
    x_test, y_test = images.to_float(test["image"]), test["label"]

    model = dc.DigitsClassifier(rngs=nnx.Rngs(_SEED.value))
    opt = nnx.Optimizer(model, optax.adamw(1e-3, weight_decay=1e-4), wrt=nnx.Param)

    @nnx.jit
    def step(model, opt, x, y):
        def loss_fn(m):
            return optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        opt.update(model, grads)
        return loss

    rng = np.random.default_rng(_SEED.value)
    for s in range(_STEPS.value):
        idx = rng.choice(len(y_train), 128, replace=False)
        loss = step(model, opt, jax.numpy.asarray(augment(x_train[idx], rng)), y_train[idx])
        if (s + 1) % 500 == 0:
            print(
                f"step {s + 1}: loss {float(loss):.4f}  test accuracy "
                f"{accuracy(model, x_test, y_test):.4f}"
            )
    print(
        f"train accuracy {accuracy(model, x_train, y_train):.4f}, "
        f"held-out test accuracy {accuracy(model, x_test, y_test):.4f} ({len(y_test)} images)"
    )
    dc.save(model, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    user_errors.run(main)

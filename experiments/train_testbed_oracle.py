"""Trains the test bed's oracle (``jaxsafe.nn.oracle.ShapesOracle``) and writes its weights.

    python -m launch.train --config=configs/t2i/testbed.py:oracle --workdir=/tmp/oracle \
        --config.oracle.out=jaxsafe/data/assets/testbed_oracle.npz

Loss: the sum of the three attributes' cross-entropies on stream ``data.train_seed`` of
``jaxsafe.data.shapes``. So that the oracle reads imperfect generations as it reads the data, each
training image is degraded at random: blended with its 3×3 box blur (weight ~ U[0, 1], half of
the images) and given Gaussian pixel noise of std ~ U[0, ``oracle.noise_max``] (on the [-1, 1]
scale). ``summarize`` reports the accuracy on ``data.heldout_size`` clean images of stream
``data.heldout_seed`` and writes ``<workdir>/testbed_oracle.npz`` (and ``oracle.out`` if set).
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxsafe.data import shapes
from jaxsafe.nn import oracle as oracle_lib
from jaxsafe.parallel import fetch, is_primary
from jaxsafe.train import Task, split_model


def degrade(x: jax.Array, key: jax.Array, noise_max: float) -> jax.Array:
    """Random blur blend and Gaussian noise, per image (see module docstring)."""
    kb, kw, kn, ks = jax.random.split(key, 4)
    b = x.shape[0]
    blurred = nnx.avg_pool(
        jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge"), (3, 3), strides=(1, 1)
    )
    w = jax.random.uniform(kw, (b, 1, 1, 1)) * jax.random.bernoulli(kb, 0.5, (b, 1, 1, 1))
    sigma = jax.random.uniform(ks, (b, 1, 1, 1), maxval=noise_max)
    return (1 - w) * x + w * blurred + sigma * jax.random.normal(kn, x.shape)


def make_loss_fn(graphdef, noise_max: float):
    def loss_fn(params, frozen, extra, batch, rng):
        model = nnx.merge(graphdef, params, frozen)
        logits = model(degrade(batch["image"], rng, noise_max))
        metrics = {}
        loss = 0.0
        for (name, _), z, y in zip(shapes.ATTRIBUTES, logits, batch["label"].T):
            loss += optax.softmax_cross_entropy_with_integer_labels(z, y).mean()
            metrics[f"{name}_accuracy"] = jnp.mean(jnp.argmax(z, -1) == y)
        return loss, (metrics, extra)

    return loss_fn


def heldout_accuracy(
    graphdef, params, frozen, images: np.ndarray, labels: np.ndarray, batch: int = 500
) -> dict:
    """Per-attribute and all-three accuracy on clean images (uint8)."""
    predict = jax.jit(lambda p, f, x: nnx.merge(graphdef, p, f).predict(x))
    pred = np.concatenate(
        [
            fetch(predict(params, frozen, images[i : i + batch] / 127.5 - 1.0))
            for i in range(0, len(images), batch)
        ]
    )
    out = {
        f"{name}_accuracy": float(np.mean(pred[:, a] == labels[:, a]))
        for a, (name, _) in enumerate(shapes.ATTRIBUTES)
    }
    out["accuracy"] = float(np.mean(np.all(pred == labels, -1)))
    return out


def build(config, mesh) -> Task:
    d, o = config.data, config.oracle
    model = oracle_lib.ShapesOracle(
        width=o.width, num_features=o.num_features, rngs=nnx.Rngs(config.train.seed)
    )
    graphdef, params, frozen = split_model(model)
    train = shapes.shapes_batches(
        shapes.ShapesDataset(d.train_seed),
        shapes.tokenizer(),
        config.train.batch_size,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    heldout = shapes.ShapesDataset(d.heldout_seed).arrays(0, d.heldout_size)

    def evaluate(state):
        return heldout_accuracy(
            graphdef, state.params, state.frozen, heldout["image"], heldout["label"]
        )

    return Task(
        graphdef=graphdef,
        params=params,
        frozen=frozen,
        optimizer=optax.adamw(config.optimizer.lr, weight_decay=config.optimizer.weight_decay),
        loss_fn=make_loss_fn(graphdef, o.noise_max),
        train_data=train,
        evaluators={"heldout": evaluate},
    )


def summarize(config, state, task, workdir: str) -> dict:
    """Held-out accuracy; writes the weights (process 0) to ``oracle.out`` (if set) and
    ``<workdir>/testbed_oracle.npz``."""
    out = dict(task.evaluators["heldout"](state))
    model = nnx.merge(task.graphdef, fetch(state.params), fetch(state.frozen))
    paths = [os.path.join(workdir, "testbed_oracle.npz")]
    paths += [config.oracle.out] if config.oracle.out else []
    for path in paths if is_primary() else []:
        oracle_lib.save(model, path)
    return out

"""Grokking at the Edge of Numerical Stability (Prieto et al., ICLR 2025): the paper's runs.

Full-batch training of the paper's MLP (or 1-layer transformer) on modular arithmetic or sparse
parity, with softmax or StableMax cross-entropy in float32 or float64, and AdamW / SGD with or
without ⊥Grad. Logged every step: loss, accuracy, Softmax Collapse fraction, fraction of exactly
zero losses, and the cosine between weights and the negative gradient (naive loss minimisation).
The `eval` evaluator reports train and test accuracy/loss.

The full training set is one batch. To split it over devices it is padded to a multiple of the
number of batch shards with rows of weight 0 (`mask`), so the loss is the same mean over the real
examples on any number of devices.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxsafe import grokking, optim
from jaxsafe.data import algorithmic
from jaxsafe.nn import GrokMLP, GrokTransformer
from jaxsafe.parallel import batch_shards, fetch
from jaxsafe.train import Task, split_model

LOSSES = {"softmax": grokking.softmax_cross_entropy, "stablemax": grokking.stablemax_cross_entropy}


def load_data(cfg) -> dict:
    if cfg.name == "modular":
        return algorithmic.modular_arithmetic(
            p=cfg.p,
            op=cfg.op,
            train_fraction=cfg.train_fraction,
            seed=cfg.seed,
            first_operand=cfg.first_operand,
        )
    if cfg.name == "sparse_parity":
        return algorithmic.sparse_parity(
            n=cfg.n, k=cfg.k, num_train=cfg.num_train, num_test=cfg.num_test, seed=cfg.seed
        )
    raise ValueError(f"data.name={cfg.name!r}; expected 'modular' or 'sparse_parity'")


def build_model(config, data: dict):
    m, d = config.model, config.data
    rngs = nnx.Rngs(config.train.seed)
    if d.name == "modular":
        num_inputs, num_classes, vocab = 2 * d.p, d.p, d.p
    else:
        num_inputs, num_classes, vocab = d.n, 2, None
    if m.name == "mlp":
        return GrokMLP(
            num_inputs,
            num_classes,
            hidden=tuple(m.hidden),
            use_bias=m.use_bias,
            alpha=m.alpha,
            vocab_size=vocab,
            rngs=rngs,
        )
    if m.name == "transformer":
        if vocab is None:
            raise ValueError("model.name='transformer' needs data.name='modular'")
        return GrokTransformer(
            vocab,
            num_classes,
            d_model=m.d_model,
            num_heads=m.num_heads,
            dim_feedforward=m.dim_feedforward,
            dropout_rate=m.dropout,
            alpha=m.alpha,
            rngs=rngs,
        )
    raise ValueError(f"model.name={m.name!r}; expected 'mlp' or 'transformer'")


def make_optimizer(cfg, alpha: float = 1.0) -> optax.GradientTransformation:
    """AdamW or SGD, optionally after ⊥Grad. As in the reference, lr is divided by alpha**2."""
    lr = cfg.lr / alpha**2
    if cfg.name == "adamw":
        base = optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay)
    elif cfg.name == "sgd":
        base = optax.chain(
            optax.add_decayed_weights(cfg.weight_decay),
            optax.sgd(lr, momentum=cfg.momentum or None),
        )
    else:
        raise ValueError(f"optimizer.name={cfg.name!r}; expected 'adamw' or 'sgd'")
    if cfg.perp is None:
        return base
    return optax.chain(optim.perpgrad(mode=cfg.perp, rescale=cfg.perp_rescale), base)


def pad_split(split: dict, multiple: int) -> dict:
    """Pads `split` to a multiple of `multiple` rows; `mask` is 1 on real rows, 0 on padding."""
    n = len(split["y"])
    pad = -n % multiple
    out = {
        k: np.concatenate([v, np.zeros((pad,) + v.shape[1:], v.dtype)]) for k, v in split.items()
    }
    out["mask"] = np.concatenate([np.ones(n, np.float32), np.zeros(pad, np.float32)])
    return out


def process_slice(split: dict) -> dict:
    """This process's contiguous share of a padded split (`global_batch` reassembles it)."""
    n = len(split["y"]) // jax.process_count()
    i = jax.process_index()
    return {k: v[i * n : (i + 1) * n] for k, v in split.items()}


def loss_dtype(name: str):
    return {"float32": jnp.float32, "float64": jnp.float64}[name]


def sc_dtype(loss_cfg):
    """The dtype Softmax Collapse is measured in: ``loss.sc_dtype``, a dtype name or "loss"
    (the loss's own dtype). The reference measures it at ``--softmax_precision`` (default 32),
    which is also the loss's precision for softmax but not for StableMax (always float64)."""
    name = loss_cfg.sc_dtype
    if name == "loss":
        return loss_dtype(loss_cfg.dtype)
    if name not in ("float32", "float64"):
        raise ValueError(f"loss.sc_dtype={name!r}; expected 'float32', 'float64' or 'loss'")
    return loss_dtype(name)


def make_loss_fn(graphdef, config):
    dtype, collapse_dtype = loss_dtype(config.loss.dtype), sc_dtype(config.loss)
    cross_entropy = functools.partial(LOSSES[config.loss.name], dtype=dtype)

    def loss_fn(params, frozen, extra, batch, rng):
        model = nnx.merge(graphdef, params, frozen)
        logits = model(batch["x"], rngs=nnx.Rngs(dropout=rng))  # dropout keys from (seed, step)
        per_example = cross_entropy(logits, batch["y"])
        mask = batch["mask"]
        n = jnp.sum(mask)
        loss = jnp.sum(per_example * mask) / n
        metrics = {
            "accuracy": grokking.accuracy(logits, batch["y"], mask=mask),
            "sc_fraction": grokking.softmax_collapse_fraction(logits, collapse_dtype, mask=mask),
            "zero_loss_fraction": grokking.zero_loss_fraction(per_example, mask=mask),
        }
        return loss.astype(jnp.float32), (metrics, extra)

    return loss_fn


def make_evaluator(graphdef, config, data: dict):
    dtype, collapse_dtype = loss_dtype(config.loss.dtype), sc_dtype(config.loss)
    cross_entropy = functools.partial(LOSSES[config.loss.name], dtype=dtype)

    @jax.jit
    def evaluate(params, frozen, x, y):
        model = nnx.merge(graphdef, params, frozen)
        model.eval()  # no dropout
        logits = model(x)
        return {
            "loss": jnp.mean(cross_entropy(logits, y)).astype(jnp.float32),
            "accuracy": grokking.accuracy(logits, y),
            "sc_fraction": grokking.softmax_collapse_fraction(logits, collapse_dtype),
        }

    def run(state):
        out = {}
        for split in ("train", "test"):
            values = fetch(evaluate(state.params, state.frozen, data[split]["x"], data[split]["y"]))
            out.update({f"{split}_{k}": v for k, v in values.items()})
        return out

    return run


def build(config, mesh) -> Task:
    if config.loss.dtype == "float64" and not jax.config.jax_enable_x64:
        jax.config.update("jax_enable_x64", True)  # the config asks for it: enable before tracing
    data = load_data(config.data)
    model = build_model(config, data)
    graphdef, params, frozen = split_model(model)
    shards = batch_shards(mesh)
    train_batch = process_slice(pad_split(data["train"], shards))

    def grad_metrics(params, grads):
        per_tensor = {f"nlm_cosine/{k}": v for k, v in grokking.nlm_cosine(params, grads).items()}
        return {"nlm_cosine": grokking.global_nlm_cosine(params, grads), **per_tensor}

    return Task(
        graphdef=graphdef,
        params=params,
        frozen=frozen,
        optimizer=make_optimizer(config.optimizer, config.model.alpha),
        loss_fn=make_loss_fn(graphdef, config),
        train_data=train_batch,
        evaluators={"eval": make_evaluator(graphdef, config, data)},
        grad_metrics=grad_metrics,
    )


def summarize(config, state, task, workdir) -> dict:
    del workdir
    return {k: float(v) for k, v in task.evaluators["eval"](state).items()}

"""DBPM (Lan et al., ICLR 2024): SimCLR pre-training of a 1-D ResNet with Dynamic Bad Pair Mining.

"Towards Enhancing Time Series Contrastive Learning: A Dynamic Bad Pair Mining Approach"
(arXiv:2302.03357; reference code github.com/lanxiang1017/DynamicBadPairMining_ICLR24,
`models/dbpm_model.py`). Each step takes a batch of `B` instances `x_i` with their dataset ids,
draws the two views `u_i = weak(x_i)`, `v_i = strong(x_i)` (`jaxsafe.contrastive.augment`),
projects them with `g(f(.))` (encoder `f` = 1-D ResNet, head `g`) and minimises

    L = 1/B sum_i w_(i,e) l_i,      l_i = NT-Xent of the pair (u_i, v_i), t = 0.2,

with `w` from DBPM's memory (`jaxsafe.contrastive.dbpm.reweight`; `w = 1` when `dbpm.enabled` is
False or while `e < warmup`). The memory `M (E, N)` lives in `TrainState.extra['memory']`: the loss
records this batch's unweighted `l_i` at the current epoch `e = step // steps_per_epoch` (the
batch carries its epoch and ids, `jaxsafe.data.timeseries.contrastive_batches`), so it is
checkpointed and a resumed run equals an uninterrupted one. BatchNorm running statistics are in
`extra['batch_stats']`; as in the reference, the two views go through the network in two
separate calls (each with its own batch statistics). With more than one device the NT-Xent
negatives are all-gathered (`ntxent_per_pair_sharded`), so the loss is that of the global batch.

Evaluation (`probe` evaluator): the reference's linear evaluation: frozen encoder features `f(x)`
(running BN statistics) of the clean train and test splits, standardised with the train
statistics, a linear classifier fitted on train, test accuracy (macro AUROC for multi-label
PTB-XL). Deviation: the reference trains the linear layer with minibatch Adam (lr 1e-3, batch
512, 40 epochs); here it is fitted full-batch with L-BFGS (`probe.steps` iterations, jitted) plus
a small L2 penalty, i.e. the (near) optimum of the same convex problem, which does not depend on
an early-stopping budget. The `dbpm` evaluator reports how many pairs DBPM flags at the current
epoch and, when bad pairs were injected, their precision and recall.

Bad-pair injection (`bad_pairs` config, for the benchmark of the paper's claim): a fraction of
the pre-training instances is replaced by Gaussian noise (noisy positive pairs: both views hold
only noise) and for another, disjoint fraction the strong view is replaced by a random shuffle of
all time steps (`faulty_view='shuffle'`: an augmentation that destroys the signal's temporal
structure) or by N(0, 1) noise (`'noise'`: nothing of the signal is left); these are the faulty
positive pairs. The probe always uses the clean splits.

Step counts are given in epochs: `config.epochs`, with `steps_per_epoch = ceil(N / B)` for the
`N` training series and the batch `B = train.batch_size`. :func:`resolve` (which
`experiments.run_experiment` calls before it writes `config.json`, so that file holds the numbers
the run used) returns a copy of the config in which `train.num_steps = -1` becomes
`epochs * steps_per_epoch`, `train.log_every = -1` one epoch, `train.eval_every = -1` the end
of training, `train.checkpoint_every = -1` every eighth of the run (whole epochs), and
`train.steps_per_call = -1` the largest divisor of the epoch length up to 8. :func:`build` reads
the config and never writes into it; callers that train its task themselves resolve first.
"""

from __future__ import annotations

import copy
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxsafe.contrastive import augment, dbpm, ntxent_per_pair, ntxent_per_pair_sharded
from jaxsafe.data import timeseries as ts
from jaxsafe.nn.resnet1d import ProjectionHead, ResNet1D, apply_with_batch_stats
from jaxsafe.parallel import batch_shards, fetch
from jaxsafe.train import Task

MODELS = {
    "resnet34": ((64, 128, 256, 512), (3, 4, 6, 3)),
    "resnet_small": ((16, 32, 64, 128), (3, 4, 6, 3)),
}
SOURCES = ("bundled", "ucr_uea", "uci_har", "ptbxl", "sleep_edf")


# ------------------------------------------------------------------------------------ data


def load_data(cfg) -> ts.TimeSeriesData:
    """The configured set, standardised per channel with train statistics, NaN filled with 0."""
    if cfg.source == "bundled":
        data = ts.load_bundled(cfg.dataset)
    elif cfg.source == "ucr_uea":
        data = ts.load_ucr_uea(cfg.path, cfg.dataset)
    elif cfg.source == "uci_har":
        data = ts.load_uci_har(cfg.path)
    elif cfg.source == "ptbxl":
        data = ts.load_ptbxl(cfg.path, sampling_rate=cfg.sampling_rate, task=cfg.task)
    elif cfg.source == "sleep_edf":
        data = ts.load_sleep_edf(cfg.path, seed=cfg.seed)
    else:
        raise ValueError(f"data.source={cfg.source!r}; expected one of {SOURCES}")
    if cfg.resplit:
        data = ts.resplit(data, cfg.resplit, seed=cfg.seed)
    if cfg.standardize:
        data = ts.standardize(data)
    return ts.fill_missing(data)


def inject_bad_pairs(x: np.ndarray, noisy_fraction: float, faulty_fraction: float, seed: int):
    """`(x', noisy, faulty)`: x with `round(noisy_fraction N)` instances replaced by N(0, 1) noise
    (the data are standardised, so the noise has the data's scale), and `(N,)` bool masks of
    those instances and of a disjoint `round(faulty_fraction N)` set whose strong views
    `destroy_signal` replaces in the loss."""
    n = x.shape[0]
    if not (0 <= noisy_fraction and 0 <= faulty_fraction and noisy_fraction + faulty_fraction < 1):
        raise ValueError(
            f"bad_pairs: noisy_fraction={noisy_fraction}, faulty_fraction="
            f"{faulty_fraction}; expected non-negative fractions with sum < 1"
        )
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    n_noisy, n_faulty = round(noisy_fraction * n), round(faulty_fraction * n)
    noisy, faulty = np.zeros(n, bool), np.zeros(n, bool)
    noisy[order[:n_noisy]] = True
    faulty[order[n_noisy : n_noisy + n_faulty]] = True
    x = x.copy()
    x[noisy] = rng.standard_normal(x[noisy].shape).astype(x.dtype)
    return x, noisy, faulty


FAULTY_VIEWS = ("shuffle", "noise")


def destroy_signal(rng, x, kind: str = "shuffle"):
    """Faulty views: each series' time steps in an independent uniformly random order
    (`shuffle`: the values survive, the temporal structure does not), or N(0, 1) noise in place of
    the view (`noise`: nothing of the signal survives)."""
    if kind == "noise":
        return jax.random.normal(rng, x.shape, x.dtype)
    if kind != "shuffle":
        raise ValueError(f"bad_pairs.faulty_view={kind!r}; expected one of {FAULTY_VIEWS}")
    keys = jax.random.split(rng, x.shape[0])
    return jax.vmap(lambda k, s: s[jax.random.permutation(k, s.shape[0])])(keys, x)


# ----------------------------------------------------------------------------------- model


class SimCLR(nnx.Module):
    """Encoder `f` (1-D ResNet with the reference's final `fc`) and projection head `g`."""

    def __init__(self, in_channels: int, cfg, *, rngs: nnx.Rngs):
        if cfg.name in MODELS:
            widths, blocks = MODELS[cfg.name]
        elif cfg.name == "custom":
            widths, blocks = tuple(cfg.widths), tuple(cfg.blocks)
        else:
            raise ValueError(
                f"model.name={cfg.name!r}; expected one of {sorted(MODELS) + ['custom']}"
            )
        self.encoder = ResNet1D(
            in_channels, widths=widths, blocks=blocks, out_features=cfg.features, rngs=rngs
        )
        self.head = ProjectionHead(cfg.features, cfg.head_hidden, cfg.head_out, rngs=rngs)

    def __call__(self, x):
        return self.head(self.encoder(x))


def split(model: nnx.Module):
    """`(graphdef, params, batch_stats, rest)`."""
    return nnx.split(model, nnx.Param, nnx.BatchStat, ...)


# ------------------------------------------------------------------------------ objective


def dbpm_config(config) -> dbpm.DBPMConfig:
    d = config.dbpm
    return dbpm.DBPMConfig(
        warmup=d.warmup,
        num_epochs=config.epochs,
        beta_np=d.beta_np,
        beta_fp=d.beta_fp,
        mode=d.mode,
        normalized=d.normalized,
    )


def make_loss_fn(graphdef, config, mesh):
    """`(params, frozen, extra, batch, rng) -> (L, (metrics, new_extra))`, see module docstring."""
    t = config.temperature
    cfg = dbpm_config(config)
    aug = config.augment
    variant = augment.variant_kwargs(aug.variant)
    faulty_views = config.bad_pairs.faulty_fraction > 0
    if mesh.size > 1:
        per_pair = functools.partial(ntxent_per_pair_sharded, temperature=t, mesh=mesh)
    else:
        per_pair = functools.partial(ntxent_per_pair, temperature=t)

    def loss_fn(params, frozen, extra, batch, rng):
        k_weak, k_strong, k_destroy = jax.random.split(rng, 3)
        x = batch["x"]
        u = augment.weak(
            k_weak,
            x,
            scale_sigma=aug.scale_sigma,
            scale_mean=variant["scale_mean"],
            per_timestep=aug.per_timestep,
        )
        v = augment.strong(
            k_strong,
            x,
            jitter_sigma=aug.jitter_sigma,
            max_segments=variant["max_segments"],
            min_segments=variant["min_segments"],
        )
        if faulty_views:
            v = jnp.where(
                batch["faulty"][:, None, None],
                destroy_signal(k_destroy, x, config.bad_pairs.faulty_view),
                v,
            )
        (z1, z2), batch_stats = apply_with_batch_stats(
            graphdef, params, extra["batch_stats"], frozen, lambda m, a, b: (m(a), m(b)), u, v
        )
        losses = per_pair(z1, z2)
        epoch = batch["epoch"][0]
        if config.dbpm.enabled:
            loss, memory, metrics = dbpm.reweight(losses, batch["id"], extra["memory"], epoch, cfg)
        else:
            loss = jnp.mean(losses)
            memory, metrics = dbpm.record(extra["memory"], epoch, batch["id"], losses), {}
        metrics = {"pair_loss": jnp.mean(losses), "epoch": epoch.astype(jnp.float32), **metrics}
        return loss, (metrics, {"memory": memory, "batch_stats": batch_stats})

    return loss_fn


# ----------------------------------------------------------------------------- evaluation


def _average_ranks(s: np.ndarray) -> np.ndarray:
    """1-based ranks, ties sharing their average rank."""
    _, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    return (ends - (counts - 1) / 2.0)[inverse]


def macro_auroc(y_true: np.ndarray, scores: np.ndarray) -> float:
    """Mean over classes of the ROC AUC (Mann-Whitney U / (n_pos n_neg), ties count 1/2).

    Classes whose test labels are all 0 or all 1 have no AUC and are skipped (scikit-learn,
    used by the reference, raises an error for them instead).
    """
    y_true, scores = np.asarray(y_true), np.asarray(scores, np.float64)
    if y_true.shape != scores.shape or y_true.ndim != 2:
        raise ValueError(f"y_true {y_true.shape} and scores {scores.shape} must both be (N, K)")
    aucs = []
    for k in range(y_true.shape[1]):
        pos = y_true[:, k] > 0.5
        n_pos, n_neg = int(pos.sum()), int((~pos).sum())
        if n_pos and n_neg:
            ranks = _average_ranks(scores[:, k])
            aucs.append((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
    if not aucs:
        raise ValueError("macro_auroc: no class has both positive and negative test labels")
    return float(np.mean(aucs))


@functools.partial(jax.jit, static_argnames=("num_classes", "multi_label", "steps"))
def _fit_linear(f, y, *, num_classes: int, multi_label: bool, steps: int, l2):
    d = f.shape[1]
    params = {
        "w": jnp.zeros((d, num_classes), jnp.float32),
        "b": jnp.zeros((num_classes,), jnp.float32),
    }

    def objective(p):
        logits = f @ p["w"] + p["b"]
        if multi_label:
            data = jnp.mean(optax.sigmoid_binary_cross_entropy(logits, y))
        else:
            data = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))
        return data + 0.5 * l2 * jnp.sum(jnp.square(p["w"]))

    opt = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(objective)

    def step(carry, _):
        p, state = carry
        value, grad = value_and_grad(p, state=state)
        updates, state = opt.update(grad, state, p, value=value, grad=grad, value_fn=objective)
        return (optax.apply_updates(p, updates), state), value

    (params, _), values = jax.lax.scan(step, (params, opt.init(params)), length=steps)
    return params, values[-1]


def linear_probe(
    f_train,
    y_train,
    f_test,
    y_test,
    *,
    multi_label: bool = False,
    num_classes: int | None = None,
    steps: int = 300,
    l2: float = 1e-4,
) -> dict:
    """Fits `softmax(W f + b)` (or per-class sigmoids) on standardised train features; returns
    train/test accuracy, or macro AUROC for multi-label targets. See the module docstring."""
    f_train, f_test = np.asarray(f_train, np.float32), np.asarray(f_test, np.float32)
    if f_train.ndim != 2 or f_test.ndim != 2 or f_train.shape[1] != f_test.shape[1]:
        raise ValueError(
            f"features must be (N, D) with the same D, got {f_train.shape} and {f_test.shape}"
        )
    mean, std = f_train.mean(0), f_train.std(0)
    std = np.where(std > 0, std, 1.0)
    f_train, f_test = (f_train - mean) / std, (f_test - mean) / std
    if multi_label:
        num_classes = y_train.shape[1]
        y = jnp.asarray(y_train, jnp.float32)
    else:
        num_classes = num_classes or int(max(y_train.max(), y_test.max())) + 1
        y = jnp.asarray(y_train, jnp.int32)
    params, objective = _fit_linear(
        jnp.asarray(f_train),
        y,
        num_classes=num_classes,
        multi_label=multi_label,
        steps=steps,
        l2=l2,
    )
    w, b = np.asarray(params["w"]), np.asarray(params["b"])
    logits_train, logits_test = f_train @ w + b, f_test @ w + b
    out = {"objective": float(objective)}
    if multi_label:
        out["auroc"] = macro_auroc(y_test, logits_test)
        out["train_auroc"] = macro_auroc(y_train, logits_train)
    else:
        out["accuracy"] = float(np.mean(logits_test.argmax(1) == y_test))
        out["train_accuracy"] = float(np.mean(logits_train.argmax(1) == y_train))
    return out


def make_encoder_fn(graphdef, mesh, chunk: int = 256):
    """`features(state, x) -> (N, D)` numpy: the encoder in evaluation mode, in fixed chunks."""

    @jax.jit
    def encode(params, batch_stats, rest, x):
        model = nnx.merge(graphdef, params, batch_stats, rest)
        return model.encoder(x, use_running_average=True)

    replicated = NamedSharding(mesh, P())

    def features(state, x):
        out = []
        for i in range(0, len(x), chunk):
            part = x[i : i + chunk]
            padded = np.concatenate(
                [part, np.zeros((chunk - len(part),) + part.shape[1:], part.dtype)]
            )
            f = encode(
                state.params,
                state.extra["batch_stats"],
                state.frozen,
                jax.device_put(padded, replicated),
            )
            out.append(fetch(f)[: len(part)])
        return np.concatenate(out)

    return features


def make_probe_evaluator(graphdef, config, data: ts.TimeSeriesData, mesh):
    features = make_encoder_fn(graphdef, mesh)
    last = {}  # step -> result: `summarize` after the final evaluation does not refit

    def evaluate(state):
        step = int(fetch(state.step))
        if step not in last:
            last.clear()
            last[step] = linear_probe(
                features(state, data.train["x"]),
                data.train["y"],
                features(state, data.test["x"]),
                data.test["y"],
                multi_label=data.multi_label,
                num_classes=len(data.classes),
                steps=config.probe.steps,
                l2=config.probe.l2,
            )
        return last[step]

    return evaluate


def flag_report(noisy_flag, faulty_flag, noisy_truth=None, faulty_truth=None) -> dict:
    """Counts of flagged pairs and, given the injected ground truth, precision and recall
    (per kind and for both kinds together; precision is 0 when nothing is flagged)."""
    noisy_flag, faulty_flag = np.asarray(noisy_flag, bool), np.asarray(faulty_flag, bool)
    out = {"flagged_noisy": int(noisy_flag.sum()), "flagged_faulty": int(faulty_flag.sum())}
    if noisy_truth is None:
        return out
    truth = {"noisy": np.asarray(noisy_truth, bool), "faulty": np.asarray(faulty_truth, bool)}
    truth["bad"] = truth["noisy"] | truth["faulty"]
    flagged = {"noisy": noisy_flag, "faulty": faulty_flag, "bad": noisy_flag | faulty_flag}
    for kind in ("noisy", "faulty", "bad"):
        hits = int(np.sum(flagged[kind] & truth[kind]))
        out[f"{kind}_precision"] = hits / max(int(flagged[kind].sum()), 1)
        out[f"{kind}_recall"] = hits / max(int(truth[kind].sum()), 1)
    return out


def current_flags(config, memory, epoch: int):
    """DBPM's noisy / faulty flags `(N,)` at `epoch` (from the epochs before it)."""
    d = config.dbpm
    return dbpm.flags(
        memory, epoch, warmup=d.warmup, beta_np=d.beta_np, beta_fp=d.beta_fp, mode=d.mode
    )


# ---------------------------------------------------------------------------------- build


EPOCH_FIELDS = ("num_steps", "steps_per_call", "log_every", "eval_every", "checkpoint_every")


def epoch_steps(epochs: int, steps_per_epoch: int, num_steps: int = -1) -> dict:
    """The per-epoch values of the `train` fields in :data:`EPOCH_FIELDS` (module docstring);
    `num_steps`: the run's length when given (not -1), which `eval_every` then follows."""
    spe = steps_per_epoch
    num_steps = epochs * spe if num_steps == -1 else num_steps
    return dict(
        num_steps=num_steps,
        steps_per_call=max(k for k in range(1, 9) if spe % k == 0),
        log_every=spe,
        eval_every=num_steps,
        checkpoint_every=spe * max(1, epochs // 8),
    )


def resolve(config):
    """A copy of `config` (locked if it was) with each `-1` in `config.train`'s
    :data:`EPOCH_FIELDS` replaced by its per-epoch value (module docstring). Pure: `config` is
    not changed. Loads the configured data set to count its training series, unless no field
    is -1."""
    new = copy.deepcopy(config)
    tc = new.train
    if all(tc[k] != -1 for k in EPOCH_FIELDS):
        return new
    n = len(load_data(new.data).train["x"])
    derived = epoch_steps(new.epochs, ts.steps_per_epoch(n, tc.batch_size), tc.num_steps)
    for k in EPOCH_FIELDS:
        if tc[k] == -1:
            tc[k] = derived[k]
    return new


def prepare(config, mesh):
    """`(data, pretrain_x, noisy, faulty)`: clean splits, the pre-training inputs with injected
    bad pairs and the ground-truth masks."""
    data = load_data(config.data)
    b = config.bad_pairs
    x, noisy, faulty = inject_bad_pairs(
        data.train["x"], b.noisy_fraction, b.faulty_fraction, b.seed
    )
    shards, b = batch_shards(mesh), config.train.batch_size
    if b % shards:
        raise ValueError(
            f"train.batch_size={b} must be a multiple of the {shards} batch shards of the mesh"
        )
    if b > len(x):
        raise ValueError(f"train.batch_size={b} exceeds the {len(x)} training series")
    return data, x, noisy, faulty


def build(config, mesh) -> Task:
    data, x, noisy, faulty = prepare(config, mesh)
    n = len(x)
    spe = ts.steps_per_epoch(n, config.train.batch_size)
    model = SimCLR(x.shape[2], config.model, rngs=nnx.Rngs(config.train.seed))
    graphdef, params, batch_stats, rest = split(model)
    arrays = {"x": x}
    if config.bad_pairs.faulty_fraction > 0:
        arrays["faulty"] = faulty
    train_data = ts.contrastive_batches(
        arrays,
        config.train.batch_size,
        seed=config.train.seed,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    injected = config.bad_pairs.noisy_fraction > 0 or config.bad_pairs.faulty_fraction > 0

    def flags_now(state):
        epoch = int(fetch(state.step)) // spe
        flagged = fetch(current_flags(config, state.extra["memory"], epoch))
        return flag_report(*flagged, *((noisy, faulty) if injected else ()))

    return Task(
        graphdef=graphdef,
        params=params,
        frozen=rest,
        optimizer=optax.adam(config.optimizer.lr),
        loss_fn=make_loss_fn(graphdef, config, mesh),
        train_data=train_data,
        extra={"memory": dbpm.init_memory(n, config.epochs), "batch_stats": batch_stats},
        evaluators={"probe": make_probe_evaluator(graphdef, config, data, mesh), "dbpm": flags_now},
        sharding_rules=[(r"^extra/memory/", "replicate")],
    )


def summarize(config, state, task, workdir) -> dict:
    del workdir
    out = {f"probe_{k}": v for k, v in task.evaluators["probe"](state).items()}
    out.update({f"dbpm_{k}": v for k, v in task.evaluators["dbpm"](state).items()})
    return out

"""SiD (and SFD) distillation of a class-conditional EDM / PFGM++ teacher into a one-step
generator (``jaxsafe.diffusion.sid``, ``jaxsafe.diffusion.sfd``). Config: ``configs/sid/``.

The teacher is a ``launch.train`` run of ``configs/pfgmpp`` (``teacher.workdir``, its EMA
weights); G and f_ψ start as copies of it. ``state.params = {"G", "psi"}``,
``state.frozen = {"teacher", "rest"}`` (the teacher's weights and the non-trained state of the
architecture), ``state.extra["ema"]`` the EMA of G with EDM's half-life schedule. No data are
read. ``sfd.forget`` (with ``sfd.override``) turns SiD into SFD. ``init.workdir`` (a run of this
experiment) starts G from that run's EMA generator and f_ψ from its fake score instead of the
teacher: SFD's two-stage variant (SiD first, then forgetting; the reference's "SFD-Two-Stage").

Evaluator (digits teachers): the one-step EMA generator's Fréchet distance on the digits
classifier's features against all real digits, the teacher's (``sampler.num_steps`` Heun steps,
computed once) next to it, and per label the digits classifier's accuracy on one-step samples of
that label (``acc/<k>``): for a forgotten label the rate at which it is still drawn, and
``override/<k>`` the rate at which it is drawn as its override label.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxsafe.data import images
from jaxsafe.diffusion import edm, sfd, sid
from jaxsafe.diffusion import image_model as im
from jaxsafe.parallel import batch_shards, fetch
from jaxsafe.train import Task


def teacher(config):
    """``(teacher_config, graphdef, params, rest)``: the EMA weights of ``teacher.workdir``."""
    if not config.teacher.workdir:
        raise ValueError(
            "config.teacher.workdir: the launch.train run directory of a "
            "configs/pfgmpp teacher is required"
        )
    tc = im.load_config(config.teacher.workdir)
    graphdef, params, rest, _ = im.load_model(
        tc, config.teacher.workdir, step=config.teacher.step or None
    )
    return tc, graphdef, params, rest


def stage_one(config, params):
    """``(G, ψ)``: copies of the teacher's ``params``, or the EMA generator and the fake score
    of the run in ``init.workdir`` (checkpoint ``init.step``, 0 = the latest)."""
    init = config.get("init") or {}
    if not init.get("workdir"):
        return jax.tree.map(jnp.copy, params), jax.tree.map(jnp.copy, params)
    from jaxsafe import train

    ckpt = f"{init.workdir}/checkpoints"
    _, tree = train.load_arrays(ckpt, init.get("step") or None)
    if "ema" not in tree.get("extra", {}) or "psi" not in tree.get("params", {}):
        raise ValueError(
            f"init.workdir {init.workdir!r}: not a run of experiments/sid.py "
            "(its checkpoint has no G EMA and fake score)"
        )
    return (
        im.restore_like(params, tree["extra"]["ema"]),
        im.restore_like(params, tree["params"]["psi"]),
    )


def make_denoise(graphdef, rest, tc) -> sid.Denoise:
    """``denoise(params, x, σ, one-hot labels, dropout key or None)`` of the teacher's
    architecture; no key = evaluation mode (no dropout)."""

    def denoise(params, x, sigma, cond, key):
        model = nnx.merge(graphdef, params, rest)
        if key is None:
            model.eval()
        return im.make_denoiser(
            model, tc.pfgmpp.sigma_data, None if key is None else nnx.Rngs(dropout=key)
        )(x, sigma, cond)

    return denoise


def forget_map(config) -> dict[int, int]:
    f, o = tuple(config.sfd.forget), tuple(config.sfd.override)
    if len(f) != len(o):
        raise ValueError(f"sfd.forget {f} and sfd.override {o} must pair up one to one")
    return dict(zip(f, o))


def build(config, mesh) -> Task:
    tc, graphdef, params, rest = teacher(config)
    k = im.num_classes(tc)
    b = config.train.batch_size
    denoise = make_denoise(graphdef, rest, tc)
    o = config.optimizer
    g_tx = optax.adam(o.lr_g, b1=o.b1, b2=o.b2, eps=o.eps)
    psi_tx = optax.adam(o.lr_psi, b1=o.b1, b2=o.b2, eps=o.eps)
    e = config.ema
    step = sid.make_sid_step(
        denoise,
        sfd.class_terms(k, b, forget=forget_map(config), forget_weight=config.sfd.forget_weight),
        g_optimizer=g_tx,
        psi_optimizer=psi_tx,
        latent_shape=im.image_shape(tc.data),
        batch_size=b,
        alpha=config.sid.alpha,
        g_loss_scale=config.sid.g_loss_scale,
        kernel=sid.edm_kernel(
            sigma_init=config.sid.sigma_init,
            tmax=config.sid.tmax,
            D=im.augmentation_dim(tc.pfgmpp.D),
            P_mean=tc.pfgmpp.P_mean,
            P_std=tc.pfgmpp.P_std,
            sigma_data=tc.pfgmpp.sigma_data,
        ),
        ema_beta=lambda n: edm.ema_beta(n, b, e.halflife_kimg, e.rampup_ratio or None),
    )

    G, psi = stage_one(config, params)
    evaluators = (
        {"samples": make_evaluator(config, tc, graphdef, denoise)}
        if config.eval.num_samples
        else {}
    )
    return Task(
        graphdef=graphdef,
        params={"G": G, "psi": psi},
        frozen={"teacher": params, "rest": rest},
        optimizer=sid.pair_optimizer(g_tx, psi_tx),
        # No data: the trainer's fixed batch is a placeholder, one row per batch shard.
        train_data={"unused": np.zeros((batch_shards(mesh),), np.float32)},
        extra={"ema": jax.tree.map(jnp.copy, G)},
        step_fn=step,
        evaluators=evaluators,
    )


def one_step_sampler(denoise, sigma_init: float, shape):
    """Jitted ``sample(G, key, labels) -> images`` of the one-step generator."""

    @jax.jit
    def sample(G, key, labels):
        z = jax.random.normal(key, (labels.shape[0],) + tuple(shape))
        return sid.one_step(denoise, G, z, labels, sigma_init)

    return sample


def make_evaluator(config, tc, graphdef, denoise):
    ev = config.eval
    k = im.num_classes(tc)
    shape = im.image_shape(tc.data)
    sample = one_step_sampler(denoise, config.sid.sigma_init, shape)
    digits = tc.data.name == "digits"
    cache = {}

    def labels(i):  # evaluation labels: every class equally often
        return jnp.arange(i * ev.batch_size, (i + 1) * ev.batch_size) % max(k, 1)

    def evaluate(state):
        G = state.extra["ema"]
        key = jax.random.key(ev.seed)
        xs, ys = [], []
        for i in range(-(-ev.num_samples // ev.batch_size)):
            y = labels(i)
            onehot = jax.nn.one_hot(y, k) if k else None
            xs.append(np.asarray(fetch(sample(G, jax.random.fold_in(key, i), onehot))))
            ys.append(np.asarray(y))
        x, y = np.concatenate(xs)[: ev.num_samples], np.concatenate(ys)[: ev.num_samples]
        out = {"samples": images.image_grid(x[: ev.grid])}
        if digits:
            if "stats" not in cache:
                features, _, stats = im.digits_features(tc.data.resolution)
                cache.update(features=features, stats=stats)
                if ev.teacher_fd:
                    heun = im.make_sample_fn(graphdef, tc)
                    xt, _ = im.generate(
                        heun,
                        state.frozen["teacher"],
                        state.frozen["rest"],
                        key,
                        ev.num_samples,
                        ev.batch_size,
                        k,
                    )
                    cache["teacher_fd"] = im.frechet_distance_to(
                        stats, np.asarray(features(jnp.asarray(xt)))
                    )
            out["fd"] = im.frechet_distance_to(
                cache["stats"], np.asarray(cache["features"](jnp.asarray(x)))
            )
            if "teacher_fd" in cache:
                out["teacher_fd"] = cache["teacher_fd"]
            if k:
                from jaxsafe.nn import digits_classifier

                if "classifier" not in cache:
                    net = digits_classifier.load()
                    cache["classifier"] = jax.jit(lambda v: jnp.argmax(net(v), -1))
                pred = np.asarray(cache["classifier"](jnp.asarray(x)))
                out.update({f"acc/{c}": float(np.mean(pred[y == c] == c)) for c in range(k)})
                out.update(
                    {
                        f"override/{c}": float(np.mean(pred[y == c] == o))
                        for c, o in forget_map(config).items()
                    }
                )
        return out

    return evaluate


def summarize(config, state, task, workdir) -> dict:
    del workdir
    if "samples" not in task.evaluators:
        return {}
    out = task.evaluators["samples"](state)
    return {name: float(v) for name, v in out.items() if np.ndim(v) == 0}

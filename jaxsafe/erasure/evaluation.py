r"""Test-bed erasure metrics and the export of an erased model.

On the test bed the oracle classifier reads every concept off a generated image
(``jaxsafe.data.shapes_metrics``), so an erased model is measured by: per-concept generation
accuracy (``erasure_report``: targets, synonym leakage, near concepts, the rest), the held-out
denoising loss on images without the erased concepts, and, for utility, the oracle Fréchet
distance (``oracle_fd``) between the edited model's and the *original* model's generations for
retained prompts: held-out captions that name no erased concept (nor a synonym), the two sets
drawn with independent sampler seeds. The original model against itself gives the floor of
that number (sampling noise alone; its ``oracle_fd`` in the table). :func:`summarize` is what every
trained method's experiment reports: the export and, on the test bed, these metrics.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxsafe.diffusion import pipeline, schedulers
from jaxsafe.erasure import model as erasure_model
from jaxsafe.treepath import named_leaves

FID_SEED_OFFSET = 10**6  # sampler seeds of the Fréchet-distance set: not the concept prompts'


def heldout_loss(
    pipe: pipeline.Pipeline,
    apply: Callable,
    encode: Callable,
    params,
    n: int = 256,
    seed: int = 0,
    exclude: Sequence[str] = (),
) -> float:
    """ε-prediction loss on fixed held-out test-bed images, timesteps, noise and captions of the
    denoiser ``apply(params, x, t, emb)`` with text encoder ``encode(params, ids)``. Images whose
    label has an ``exclude`` concept are left out (the first ``n`` of the others are used): an
    erased model is meant to fail on those, so utility is measured on the rest."""
    from jaxsafe.data import shapes

    bad = {shapes.CONCEPTS[w] for w in exclude}
    # Draw candidates until n are free of the excluded concepts (two colours out of four leave
    # about half), at most 16 n.
    size = n
    while True:
        data = shapes.ShapesDataset(1).arrays(0, size)
        keep = np.flatnonzero(
            [not any((a, v) in bad for a, v in enumerate(label)) for label in data["label"]]
        )[:n]
        if len(keep) == n or size >= 16 * n:
            break
        size *= 2
    if len(keep) < n:
        raise ValueError(f"only {len(keep)} of {size} held-out images are free of {exclude}")
    data = {k: np.asarray(v)[keep] for k, v in data.items()}
    z0 = pipe.encode_image(jnp.asarray(data["image"], jnp.float32) / 127.5 - 1.0)
    k_t, k_e = jax.random.split(jax.random.key(seed))
    t = jax.random.randint(k_t, (n,), 0, pipe.scheduler.num_train_timesteps)
    eps = jax.random.normal(k_e, z0.shape)
    ids = jnp.asarray(pipe.tokenize(data["caption"]))

    @jax.jit
    def loss(params):
        x_t = schedulers.add_noise(pipe.scheduler, z0, eps, t)
        return jnp.mean((apply(params, x_t, t, encode(params, ids)) - eps) ** 2)

    return float(loss(params))


def retained_captions(targets: Sequence[str], n: int, seed: int = 0) -> list[str]:
    """The first ``n`` captions of held-out shapes stream 1, from index ``seed · 10⁵`` on, that
    name none of ``targets`` (synonyms included)."""
    from jaxsafe.data import shapes

    bad = {shapes.CONCEPTS[w] for w in targets}
    out, i = [], seed * 10**5
    while len(out) < n:
        c = shapes.example(1, i)["caption"]
        if not any(shapes.CONCEPTS.get(w) in bad for w in c.split()):
            out.append(c)
        i += 1
    return out


_REFERENCE_FEATURES: dict = {}  # (folder, captions, seeds, sampling) -> oracle features


def _reference_features(folder: str, captions, seeds, sampling: dict, oracle) -> np.ndarray:
    """Oracle features of the original model's generations, computed once per process."""
    from jaxsafe.data import shapes_metrics

    key = (folder, tuple(captions), tuple(int(x) for x in seeds), tuple(sorted(sampling.items())))
    if key not in _REFERENCE_FEATURES:
        original = pipeline.load(folder)
        graphdef, state = nnx.split(original.model)
        images = pipeline.generator(original, graphdef, **sampling)((state,), captions, seeds)
        _REFERENCE_FEATURES[key] = shapes_metrics.oracle_features(oracle, images)
    return _REFERENCE_FEATURES[key]


def evaluate(
    pipe: pipeline.Pipeline,
    generate: Callable,
    targets: Sequence[str],
    *,
    k: int = 16,
    seed: int = 0,
    fid_samples: int = 256,
    sampling: dict | None = None,
    loss_fn: Callable | None = None,
) -> dict:
    """Test-bed erasure metrics of ``generate(captions, seeds)`` (module docstring), the
    original model (``pipe.folder``) sampled with ``sampling`` for the Fréchet distance;
    ``loss_fn()`` -> held-out denoising loss, if given."""
    from jaxsafe.data import shapes_metrics
    from jaxsafe.nn import oracle as oracle_lib

    if not pipe.testbed:
        raise ValueError(
            "erasure metrics need the test bed's oracle: the model folder must be a test-bed export"
        )
    oracle = oracle_lib.load()
    out = shapes_metrics.erasure_report(generate, oracle, targets=list(targets), k=k, seed=seed)
    if fid_samples:
        captions = retained_captions(targets, fid_samples, seed)
        idx = np.arange(fid_samples)
        fake = shapes_metrics.oracle_features(
            oracle, generate(captions, FID_SEED_OFFSET + seed * 10**5 + idx)
        )
        ref = _reference_features(
            pipe.folder,
            captions,
            2 * FID_SEED_OFFSET + seed * 10**5 + idx,
            dict(sampling or {}),
            oracle,
        )
        out["oracle_fd"] = shapes_metrics.frechet_distance(
            *shapes_metrics.gaussian_stats(fake), *shapes_metrics.gaussian_stats(ref)
        )
    if loss_fn is not None:
        out["heldout_loss"] = loss_fn()
    return out


def evaluate_model(config, pipe: pipeline.Pipeline, graphdef, state: tuple, mesh=None) -> dict:
    """:func:`evaluate` of the T2I module ``nnx.merge(graphdef, *state)`` with the config's
    sampling and ``eval`` settings (targets: the erased concepts); generation is split over
    ``mesh`` (default: the config's mesh when there is more than one device)."""
    if mesh is None and jax.device_count() > 1:
        from jaxsafe import parallel

        mesh = parallel.make_mesh(config.mesh.data, config.mesh.fsdp)
    generate = pipeline.generator(pipe, graphdef, mesh=mesh, **dict(config.sampling))
    e = config.eval
    apply = lambda s, x, t, emb: nnx.merge(graphdef, *s)(x, t, emb)
    encode = lambda s, ids: nnx.merge(graphdef, *s).encode(ids)
    return evaluate(
        pipe,
        lambda c, s: generate(state, c, s),
        list(config.concepts.erase),
        k=e.samples_per_concept,
        seed=e.seed,
        fid_samples=e.fid_samples,
        sampling=dict(config.sampling),
        loss_fn=lambda: heldout_loss(
            pipe,
            apply,
            encode,
            state,
            n=e.heldout_examples,
            seed=e.seed,
            exclude=list(config.concepts.erase),
        ),
    )


def summarize(config, state, task, workdir: str, mesh=None) -> dict:
    """Exports a trained erasure run's model to ``<workdir>/export`` (unet, and text_encoder when
    any of its parameters trained) and, on the test bed with ``eval.enabled``, returns its
    metrics."""
    from jaxsafe.parallel import fetch

    pipe = pipeline.from_config(config.model)
    params, frozen = fetch(state.params), fetch(state.frozen)
    model = erasure_model.trained_model(task.graphdef, params, frozen)
    trained = {n.split("/")[0] for n in named_leaves(params)}
    out = {
        "export": pipeline.save(
            pipe,
            os.path.join(workdir, "export"),
            unet=model.unet if "unet" in trained else None,
            text_encoder=model.text_encoder if "text_encoder" in trained else None,
        )
    }
    if config.eval.enabled and pipe.testbed:
        graphdef, st = nnx.split(model)
        out.update(evaluate_model(config, pipe, graphdef, (st,), mesh))
    return out

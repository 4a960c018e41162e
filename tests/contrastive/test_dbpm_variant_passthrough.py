"""experiments/dbpm.py's loss draws its two views with the configured augmentation variant:
``augment.variant='ts_tcc'`` gives TS-TCC's scaling mean and segment range, the default the
authors'. The views are caught where the loss hands them to the encoder."""

import importlib

import jax
import numpy as np
import pytest

from experiments import dbpm as E
from jaxsafe.contrastive import augment


class _Caught(Exception):
    pass


def _views(monkeypatch, config, x, rng):
    """``(u, v)`` that ``make_loss_fn``'s loss passes to the encoder for batch ``x``."""
    seen = {}

    def catch(graphdef, params, batch_stats, frozen, fn, u, v):
        seen["views"] = (np.asarray(u), np.asarray(v))
        raise _Caught

    monkeypatch.setattr(E, "apply_with_batch_stats", catch)
    mesh = type("Mesh", (), {"size": 1})()  # make_loss_fn reads only mesh.size
    loss_fn = E.make_loss_fn(None, config, mesh)
    batch = {"x": x, "id": np.arange(len(x)), "epoch": np.zeros(len(x), np.int32)}
    with pytest.raises(_Caught):
        loss_fn(None, None, {"batch_stats": None, "memory": None}, batch, rng)
    return seen["views"]


# Typed in from the reference code: TS-TCC dataloader/augmentations.py, N(2, 1.1^2) scaling and
# np.random.randint(1, 8) = 1..7 segments; the authors' dataset.py, N(1, 1.1^2) and 2..8.
TS_TCC = dict(scale_mean=2.0, min_segments=1, max_segments=7)
AUTHORS = dict(scale_mean=1.0, min_segments=2, max_segments=8)


@pytest.mark.parametrize(
    "variant,want,other", [("ts_tcc", TS_TCC, AUTHORS), (None, AUTHORS, TS_TCC)]
)
def test_the_configured_variant_reaches_the_views(monkeypatch, variant, want, other):
    config = importlib.import_module("configs.dbpm.basic_motions").get_config("smoke")
    if variant is not None:
        config.augment.variant = variant
    x = np.random.default_rng(0).standard_normal((32, 16, 2)).astype(np.float32) + 3.0
    rng = jax.random.key(5)
    u, v = _views(monkeypatch, config, x, rng)
    k_weak, k_strong, _ = jax.random.split(rng, 3)  # the loss's split of its step key

    def library(kw):
        weak = augment.weak(k_weak, x, scale_sigma=1.1, scale_mean=kw["scale_mean"])
        strong = augment.strong(
            k_strong,
            x,
            jitter_sigma=0.8,
            max_segments=kw["max_segments"],
            min_segments=kw["min_segments"],
        )
        return np.asarray(weak), np.asarray(strong)

    for got, expected in zip((u, v), library(want)):
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    # The other variant's views differ (scaling mean 1 vs 2, another segment range), so the
    # comparison above tells the variants apart.
    for got, expected in zip((u, v), library(other)):
        assert np.abs(got - expected).max() > 0.1

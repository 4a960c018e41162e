"""Fréchet Inception Distance: Inception pool3 features, reference statistics files, the FID.

FID = ‖μ_g − μ_r‖² + Tr(C_g + C_r − 2 (C_g C_r)^{1/2}) between Gaussians fitted to the 2048-d
pool3 features of :mod:`jaxsafe.nn.inception` (Heusel et al., 2017), as pytorch-fid
(``src/pytorch_fid/fid_score.py``) and EDM (``fid.py``) compute it: unbiased covariances, images
quantised to uint8 before the network (both score saved 8-bit images). Reference statistics are
``.npz`` files with ``mu`` (2048,) and ``sigma`` (2048, 2048), the keys pytorch-fid's
``--save-stats`` writes (its files load here; EDM's ``.npz`` use the same keys but its own
Inception graph, whose features differ slightly from pytorch-fid's). Our files add ``num`` and
``source`` so a table can say what it compares against.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx

from jaxsafe.data import images as image_data
from jaxsafe.diffusion import metrics

__all__ = ["feature_fn", "features", "source_stats", "save_stats", "load_stats", "fid"]


def feature_fn(net):
    """A jitted ``uint8 or [-1, 1] float (B, H, W, C) -> (B, 2048)`` of an Inception module."""
    graphdef, state = nnx.split(net)
    apply = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))

    def fn(x):
        x = np.asarray(x)
        # Floats go through 8 bits first: FID is defined on saved images.
        return apply(
            state, image_data.to_float(x if x.dtype == np.uint8 else image_data.to_uint8(x))
        )

    return fn


def features(fn, images: Sequence, batch_size: int = 64) -> np.ndarray:
    """Features of ``images`` (an array or a source of ``{'image': uint8}``), batch by batch.

    The last batch is padded to ``batch_size`` so one program serves every batch.
    """
    n = len(images)
    if n == 0:
        raise ValueError("no images to compute features of")
    out = []
    for start in range(0, n, batch_size):
        idx = range(start, min(start + batch_size, n))
        batch = np.stack([_image(images[i]) for i in idx])
        pad = batch_size - len(batch)
        if pad:
            batch = np.concatenate([batch, np.repeat(batch[-1:], pad, 0)])
        out.append(np.asarray(fn(batch))[: len(idx)])
    return np.concatenate(out).astype(np.float64)


def _image(item):
    return item["image"] if isinstance(item, dict) else item


def source_stats(fn, source: Sequence, batch_size: int = 64, num: int | None = None):
    """(μ, C) of the features of the first ``num`` (default: all) images of ``source``."""
    if num is not None:
        if num < 2:
            raise ValueError(f"num must be >= 2 to estimate a covariance, got {num}")
        if num > len(source):
            raise ValueError(f"num={num} but the source has only {len(source)} images")
        source = _Prefix(source, num)
    return metrics.gaussian_stats(features(fn, source, batch_size))


class _Prefix(Sequence):
    def __init__(self, seq, n):
        self.seq, self.n = seq, n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if not 0 <= i < self.n:
            raise IndexError(i)
        return self.seq[i]


def save_stats(path: str, mu, sigma, *, num: int, source: str) -> None:
    """Writes ``mu``, ``sigma``, ``num``, ``source`` to ``path`` (whole or not at all)."""
    tmp = path + ".tmp.npz"
    np.savez(
        tmp,
        mu=np.asarray(mu, np.float64),
        sigma=np.asarray(sigma, np.float64),
        num=np.int64(num),
        source=np.str_(source),
    )
    os.replace(tmp, path)


def load_stats(path: str):
    """(μ, C) from a statistics file; a missing file or key, or a wrong shape, raises ValueError
    or FileNotFoundError naming the file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"FID reference statistics {path!r} not found (make them with "
            "`python -m launch.fid_stats`)"
        )
    if not zipfile.is_zipfile(path):  # np.load would try it as a pickle
        with open(path, "rb") as fh:
            npy = fh.read(6) == b"\x93NUMPY"
        raise ValueError(
            f"{path}: cannot read as .npz ("
            + (
                "it is a single .npy array)"
                if npy
                else "not a zip archive: damaged, or not "
                "written by launch.fid_stats or pytorch-fid's --save-stats)"
            )
        )
    try:
        f = np.load(path)
    except (OSError, EOFError, ValueError, zipfile.BadZipFile) as e:  # a damaged archive
        raise ValueError(f"{path}: cannot read as .npz ({e})") from e
    with f:
        if "mu" not in f or "sigma" not in f:
            raise ValueError(
                f"{path}: FID statistics need 'mu' and 'sigma', found {sorted(f.files)}"
            )
        try:
            mu, sigma = f["mu"], f["sigma"]
        except (OSError, EOFError, ValueError, zipfile.BadZipFile) as e:
            raise ValueError(f"{path}: cannot read 'mu' and 'sigma' ({e})") from e
    d = mu.shape[0] if mu.ndim == 1 else -1
    if d < 1 or sigma.shape != (d, d):
        raise ValueError(
            f"{path}: 'mu' {mu.shape} and 'sigma' {sigma.shape} are not (d,) and (d, d)"
        )
    for name, x in (("mu", mu), ("sigma", sigma)):
        if not np.issubdtype(x.dtype, np.number) or not np.isfinite(x).all():
            raise ValueError(
                f"{path}: {name!r} holds non-finite values (or is not numeric): "
                "damaged statistics would make every FID NaN"
            )
    return mu.astype(np.float64), sigma.astype(np.float64)


def fid(feats, reference: str) -> float:
    """The FID of features (n, d) against the statistics file ``reference``."""
    mu, sigma = load_stats(reference)
    if np.shape(feats)[-1] != mu.shape[0]:
        raise ValueError(
            f"features have {np.shape(feats)[-1]} dimensions, {reference} has {mu.shape[0]}"
        )
    return metrics.frechet_distance(*metrics.gaussian_stats(feats), mu, sigma)

r"""The test bed's latent map: a fixed linear autoencoder, the PCA of p×p pixel patches.

.. math::

    E(x) = s\, \bigl(\mathrm{unshuffle}_p(x) - \mu\bigr) V^\top, \qquad
    D(z) = \mathrm{shuffle}_p\bigl(z V / s + \mu\bigr),

V the top principal directions of the patches of some training images, μ their mean and s the
scale that gives z unit standard deviation (Stable Diffusion's ``scaling_factor`` idea). It takes
the place of SD's VAE in the miniature text-to-image test bed (docs/testbed.md: why not pixels,
why not the plain unshuffle). An exported model ships it as ``latent/patch_pca.npz``
(:data:`LATENT_FILE`; :func:`save` / :func:`load`).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

LATENT_FILE = os.path.join("latent", "patch_pca.npz")


def to_latent(x: jax.Array, p: int) -> jax.Array:
    """(B, H, W, C) -> (B, H/p, W/p, p·p·C) pixel unshuffle (space-to-depth)."""
    b, h, w, c = x.shape
    return (
        x.reshape(b, h // p, p, w // p, p, c)
        .transpose(0, 1, 3, 2, 4, 5)
        .reshape(b, h // p, w // p, p * p * c)
    )


def from_latent(z: jax.Array, p: int) -> jax.Array:
    """Inverse of :func:`to_latent`: (B, h, w, p·p·C) -> (B, h·p, w·p, C)."""
    b, h, w, d = z.shape
    c = d // (p * p)
    return z.reshape(b, h, w, p, p, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, h * p, w * p, c)


class Fixed(nnx.Variable):
    """A constant of the model (not trained, checkpointed and exported with it)."""


class PatchPCA(nnx.Module):
    """E(x) = s · (unshuffle_p(x) − μ) Vᵀ and D(z) = shuffle_p(z V / s + μ); see module doc."""

    def __init__(self, mean, basis, scale, patch: int):
        self.patch = patch
        self.mean = Fixed(jnp.asarray(mean, jnp.float32))
        self.basis = Fixed(jnp.asarray(basis, jnp.float32))
        self.scale = Fixed(jnp.asarray(scale, jnp.float32))

    @property
    def channels(self) -> int:
        return self.basis.shape[0]

    def encode(self, x: jax.Array) -> jax.Array:
        return (to_latent(x, self.patch) - self.mean[...]) @ self.basis[...].T * self.scale[...]

    def decode(self, z: jax.Array) -> jax.Array:
        return from_latent(z @ self.basis[...] / self.scale[...] + self.mean[...], self.patch)


def fit_patch_pca(images: np.ndarray, patch: int, components: int):
    """(μ, V, s) of :class:`PatchPCA` from float images in [−1, 1]; each direction's sign is
    fixed (largest entry positive) so the fit is reproducible."""
    rows = np.asarray(to_latent(jnp.asarray(images, jnp.float32), patch), np.float64)
    rows = rows.reshape(-1, rows.shape[-1])
    if not 1 <= components <= rows.shape[1]:
        raise ValueError(
            f"latent.components={components}; expected 1..{rows.shape[1]} "
            f"(3·patch² for patch={patch})"
        )
    mean = rows.mean(0)
    _, _, vt = np.linalg.svd(rows - mean, full_matrices=False)
    basis = vt[:components]
    basis *= np.sign(basis[np.arange(components), np.abs(basis).argmax(1)])[:, None]
    scale = 1.0 / ((rows - mean) @ basis.T).std()
    return mean, basis, scale


def save(pca: PatchPCA, folder: str) -> str:
    """Writes ``<folder>/latent/patch_pca.npz`` (mean, basis, scale, patch)."""
    path = os.path.join(folder, LATENT_FILE)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    np.savez(
        path,
        patch=pca.patch,
        mean=np.asarray(pca.mean[...]),
        basis=np.asarray(pca.basis[...]),
        scale=np.asarray(pca.scale[...]),
    )
    return path


def load(folder: str) -> PatchPCA:
    """The latent map of an exported test-bed folder."""
    path = os.path.join(folder, LATENT_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"latent map {path!r} not found: folder must be a test-bed "
            "export (jaxsafe.diffusion.pipeline.export_testbed)"
        )
    try:
        f = np.load(path)
    except (OSError, EOFError, ValueError) as e:
        raise ValueError(f"{path}: cannot read the latent map as .npz ({e})") from e
    if not isinstance(f, np.lib.npyio.NpzFile):
        raise ValueError(f"{path}: expected an .npz archive, got a single array")
    with f:
        missing = [k for k in ("mean", "basis", "scale", "patch") if k not in f]
        if missing:
            raise ValueError(f"{path}: the latent map lacks {missing} (has {sorted(f.files)})")
        return PatchPCA(f["mean"], f["basis"], f["scale"], int(f["patch"]))

r"""Fréchet distance between Gaussians fitted to features (FID when the features are Inception's).

Heusel, Ramsauer, Unterthiner, Nessler & Hochreiter, "GANs Trained by a Two Time-Scale Update
Rule Converge to a Local Nash Equilibrium", NeurIPS 2017; the Fréchet (2-Wasserstein) distance
between N(μ1, C1) and N(μ2, C2) (Dowson & Landau, 1982):

.. math::

    d^2 = \lVert \mu_1 - \mu_2 \rVert^2
        + \operatorname{Tr}\bigl(C_1 + C_2 - 2\, (C_1 C_2)^{1/2}\bigr).

Computed in NumPy float64. Tr((C1 C2)^{1/2}) is taken as Σ_k √λ_k with λ_k the eigenvalues of
the symmetric PSD matrix M = C1^{1/2} C2 C1^{1/2}, which has the eigenvalues of C1 C2: two
symmetric eigendecompositions, no complex intermediate and no failure for singular covariances
(scipy.linalg.sqrtm, used by pytorch-fid / EDM's fid.py, needs an ε-regularised retry there).
Round-off eigenvalues below 0 are clipped to 0.
"""

from __future__ import annotations

import numpy as np

__all__ = ["frechet_distance", "gaussian_stats"]


def gaussian_stats(features):
    """(μ, C): the mean (d,) and unbiased covariance (d, d) of features (n, d), float64.

    Unbiased (1/(n − 1)) as in EDM's fid.py and pytorch-fid's np.cov.
    """
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"features must have shape (n, d) with n >= 2, got {f.shape}.")
    if not np.all(np.isfinite(f)):
        raise ValueError("features must be finite; got NaN or inf.")
    return f.mean(axis=0), np.cov(f, rowvar=False, ddof=1).reshape(f.shape[1], f.shape[1])


def _psd_sqrt(C):
    w, V = np.linalg.eigh(C)
    return (V * np.sqrt(np.clip(w, 0.0, None))) @ V.T


def frechet_distance(mu1, cov1, mu2, cov2) -> float:
    """‖μ1 − μ2‖² + Tr(C1 + C2 − 2 (C1 C2)^{1/2}) for symmetric PSD C1, C2, in float64."""
    mu1, mu2 = (np.asarray(m, dtype=np.float64) for m in (mu1, mu2))
    cov1, cov2 = (np.asarray(c, dtype=np.float64) for c in (cov1, cov2))
    if mu1.ndim != 1 or mu1.shape != mu2.shape:
        raise ValueError(f"mu1 and mu2 must both have shape (d,), got {mu1.shape} and {mu2.shape}.")
    d = mu1.shape[0]
    for name, c in (("cov1", cov1), ("cov2", cov2)):
        if c.shape != (d, d):
            raise ValueError(
                f"{name} must have shape ({d}, {d}) to match the means, got {c.shape}."
            )
    for name, a in (("mu1", mu1), ("cov1", cov1), ("mu2", mu2), ("cov2", cov2)):
        if not np.all(np.isfinite(a)):
            raise ValueError(f"{name} must be finite; got NaN or inf.")
    # Symmetrise so round-off asymmetry in user-built covariances cannot bias eigh.
    cov1, cov2 = (cov1 + cov1.T) / 2, (cov2 + cov2.T) / 2
    s1 = _psd_sqrt(cov1)
    M = s1 @ cov2 @ s1
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((M + M.T) / 2), 0.0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(cov1) + np.trace(cov2) - 2.0 * tr_sqrt)

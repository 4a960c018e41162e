"""Fréchet distance vs scipy.linalg.sqrtm and closed forms; Gaussian statistics vs NumPy."""

import numpy as np
import pytest
import scipy.linalg

from jaxsafe.diffusion import frechet_distance, gaussian_stats


def random_psd(d, rng, rank=None):
    a = rng.standard_normal((d, rank or d))
    return a @ a.T / d


def scipy_fd(mu1, c1, mu2, c2):
    """The pytorch-fid formula: ‖Δμ‖² + Tr C1 + Tr C2 − 2 Tr sqrtm(C1 C2)."""
    covmean = scipy.linalg.sqrtm(c1 @ c2).real
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(c1) + np.trace(c2) - 2 * np.trace(covmean))


def test_matches_scipy_sqrtm():
    rng = np.random.default_rng(0)
    for d in (1, 5, 64):
        mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
        c1, c2 = random_psd(d, rng), random_psd(d, rng)
        np.testing.assert_allclose(
            frechet_distance(mu1, c1, mu2, c2), scipy_fd(mu1, c1, mu2, c2), rtol=1e-9, atol=1e-9
        )


def test_identical_gaussians_are_at_zero_and_distance_is_symmetric():
    rng = np.random.default_rng(1)
    mu, c = rng.standard_normal(32), random_psd(32, rng)
    assert abs(frechet_distance(mu, c, mu, c)) < 1e-9
    c2 = random_psd(32, rng)
    np.testing.assert_allclose(
        frechet_distance(mu, c, 0 * mu, c2),
        frechet_distance(0 * mu, c2, mu, c),
        rtol=1e-12,
        atol=1e-10,
    )


def test_isotropic_closed_form():
    # N(0, I) vs N(m, s² I) in d dimensions: ‖m‖² + d (1 − s)².
    d, s = 10, 2.5
    m = np.arange(d, dtype=float) / 3
    np.testing.assert_allclose(
        frechet_distance(np.zeros(d), np.eye(d), m, s**2 * np.eye(d)),
        m @ m + d * (1 - s) ** 2,
        rtol=1e-12,
        atol=1e-10,
    )


def test_diagonal_closed_form_including_singular():
    a, b = np.array([1.0, 4.0, 0.0, 9.0]), np.array([0.25, 4.0, 1.0, 0.0])
    m1, m2 = np.array([0.0, 1.0, 2.0, 3.0]), np.array([1.0, 1.0, 0.0, 3.0])
    want = np.sum((m1 - m2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    np.testing.assert_allclose(
        frechet_distance(m1, np.diag(a), m2, np.diag(b)), want, rtol=1e-12, atol=1e-11
    )


def test_non_commuting_2x2_closed_form():
    # For 2×2 PSD M, Tr √M = √(Tr M + 2 √det M); with M = C1 C2 (same eigenvalues as C1^½ C2 C1^½).
    c1 = np.array([[2.0, 0.9], [0.9, 1.0]])
    c2 = np.array([[0.5, -0.3], [-0.3, 3.0]])
    tr_sqrt = np.sqrt(np.trace(c1 @ c2) + 2 * np.sqrt(np.linalg.det(c1) * np.linalg.det(c2)))
    want = np.trace(c1) + np.trace(c2) - 2 * tr_sqrt
    np.testing.assert_allclose(
        frechet_distance(np.zeros(2), c1, np.zeros(2), c2), want, rtol=1e-12, atol=1e-12
    )


def test_rank_deficient_covariances_are_handled():
    # Fewer samples than dimensions, as for small FID runs: sqrtm struggles, eigh does not.
    rng = np.random.default_rng(2)
    d = 40
    c1, c2 = random_psd(d, rng, rank=10), random_psd(d, rng, rank=12)
    got = frechet_distance(np.zeros(d), c1, np.zeros(d), c2)
    # Reference through the symmetric form in high precision: Tr √(C1^½ C2 C1^½).
    s1 = scipy.linalg.sqrtm(c1).real
    want = np.trace(c1) + np.trace(c2) - 2 * np.trace(scipy.linalg.sqrtm(s1 @ c2 @ s1).real)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    assert got >= 0


def test_gaussian_stats_matches_numpy_and_recovers_a_known_gaussian():
    rng = np.random.default_rng(3)
    f = rng.standard_normal((7, 3)).astype(np.float32)
    mu, cov = gaussian_stats(f)
    assert mu.dtype == np.float64 and cov.shape == (3, 3)
    np.testing.assert_allclose(
        mu, f.astype(np.float64).mean(0), rtol=1e-12, atol=0
    )  # exact: same float64 ops
    np.testing.assert_allclose(
        cov, np.cov(f.astype(np.float64).T, ddof=1), rtol=1e-12, atol=0
    )  # exact: same np.cov
    # FD of samples from one Gaussian to the true statistics shrinks like d² / n.
    true_cov = np.array([[1.0, 0.5], [0.5, 2.0]])
    x = rng.multivariate_normal([1.0, -1.0], true_cov, size=100_000)
    assert frechet_distance(*gaussian_stats(x), np.array([1.0, -1.0]), true_cov) < 1e-3
    # One feature: (n, 1) gives a (1, 1) covariance.
    assert gaussian_stats(np.arange(5.0)[:, None])[1].shape == (1, 1)


@pytest.mark.parametrize(
    "features, msg",
    [
        (np.zeros(5), r"features must have shape \(n, d\) with n >= 2, got \(5,\)"),
        (np.zeros((1, 4)), r"features must have shape \(n, d\) with n >= 2, got \(1, 4\)"),
        (np.array([[0.0, np.nan], [1.0, 2.0]]), r"features must be finite"),
    ],
)
def test_gaussian_stats_bad_input_raises(features, msg):
    with pytest.raises(ValueError, match=msg):
        gaussian_stats(features)


def test_frechet_bad_input_raises():
    with pytest.raises(
        ValueError, match=r"mu1 and mu2 must both have shape \(d,\), got \(3,\) and \(4,\)"
    ):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(
        ValueError, match=r"cov2 must have shape \(3, 3\) to match the means, got \(2, 2\)"
    ):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(2))
    with pytest.raises(ValueError, match=r"cov1 must be finite"):
        frechet_distance(np.zeros(2), np.full((2, 2), np.inf), np.zeros(2), np.eye(2))

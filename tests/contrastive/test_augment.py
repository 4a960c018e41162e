"""Weak (scaling) and strong (segment permutation + jitter) augmentations: exact structure,
views equal to the authors' and TS-TCC's constructions in NumPy from the same random numbers,
distributions against both sampling schemes, determinism per key."""

import chex
import jax
import numpy as np
import pytest

from jaxsafe.contrastive import augment


def _x(b=3, t=40, c=2, seed=0):
    return np.random.default_rng(seed).standard_normal((b, t, c)).astype(np.float32) + 3.0


def _runs(idx):
    """Number of maximal runs of consecutive time indices (t, t + 1, ...) in a warp."""
    return 1 + int(np.sum(np.diff(idx) != 1))


class WeakTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_one_factor_per_time_step_shared_by_channels(self):
        # The authors' Scaling: factors of shape (1, T), the same for every channel.
        x = _x()
        y = self.variant(augment.weak)(jax.random.key(0), x)
        ratio = np.asarray(y) / x
        np.testing.assert_allclose(
            ratio, np.broadcast_to(ratio[:, :, :1], ratio.shape), rtol=1e-5, atol=1e-5
        )
        assert len(np.unique(np.round(ratio[:, :, 0], 5))) == x.shape[0] * x.shape[1]

    @chex.variants(with_jit=True, without_jit=True)
    def test_per_channel_factor_option(self):
        x = _x()
        y = self.variant(lambda k, x: augment.weak(k, x, per_timestep=False))(jax.random.key(0), x)
        ratio = np.asarray(y) / x
        # Constant over time, different between channels and samples.
        np.testing.assert_allclose(
            ratio, np.broadcast_to(ratio[:, :1], ratio.shape), rtol=1e-5, atol=1e-5
        )
        assert len(np.unique(np.round(ratio[:, 0], 5))) == x.shape[0] * x.shape[2]

    def test_factor_distribution_per_variant(self):
        # 4000 x 5 factors: the sample mean's std is 1.1 / sqrt(20000) = 0.008, the std's ~0.006.
        x = np.ones((4000, 5, 2), np.float32)
        for variant, mean in (("dbpm", 1.0), ("ts_tcc", 2.0)):
            kw = augment.variant_kwargs(variant)
            a = np.asarray(augment.weak(jax.random.key(1), x, scale_mean=kw["scale_mean"]))
            a = a[:, :, 0].ravel()
            assert abs(a.mean() - mean) < 0.04, (variant, a.mean())
            assert abs(a.std() - 1.1) < 0.03, (variant, a.std())
        b = np.asarray(augment.weak(jax.random.key(1), x, scale_sigma=0.5, scale_mean=3.0))
        assert abs(b[:, :, 0].std() - 0.5) < 0.02 and abs(b[:, :, 0].mean() - 3.0) < 0.02

    def test_deterministic_per_key(self):
        x = _x()
        k = jax.random.key(3)
        np.testing.assert_array_equal(augment.weak(k, x), augment.weak(k, x))
        assert not np.allclose(augment.weak(k, x), augment.weak(jax.random.key(4), x), atol=1e-5)


class StrongTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_permutation_moves_whole_segments(self):
        b, t, max_seg = 64, 50, 8
        # Channel c holds 1000 c + time, so the output reveals the time index it came from.
        x = (np.arange(t)[None, :, None] + 1000.0 * np.arange(3)[None, None, :]).repeat(b, 0)
        y = np.asarray(
            self.variant(lambda k, x: augment.strong(k, x, jitter_sigma=0.0))(jax.random.key(0), x)
        )
        idx = y[:, :, 0].astype(int)
        for i in range(b):
            # A permutation of the time steps (multiset preserved), the same for every channel,
            # made of at most max_segments contiguous runs.
            np.testing.assert_array_equal(np.sort(idx[i]), np.arange(t))
            np.testing.assert_array_equal(y[i], x[i][idx[i]])
            assert _runs(idx[i]) <= max_seg, idx[i]
        assert max(_runs(r) for r in idx) > 3  # segments really move

    def test_permutation_preserves_multiset_of_each_series(self):
        x = _x(b=8, t=30, c=3)
        y = np.asarray(augment.permutation(jax.random.key(2), x, max_segments=5))
        np.testing.assert_array_equal(np.sort(y, axis=1), np.sort(x, axis=1))

    def test_number_of_segments_distribution(self):
        # Two segments at most. The split point p is uniform on {0, ..., T - 3}: p = 0 leaves an
        # empty first segment (identity), otherwise the two segments swap w.p. 1/2. The
        # authors' code always cuts (n = 2): P(identity) = 1/98 + 97/98 / 2. TS-TCC's draws
        # n = 1 (identity) w.p. 1/2 first: P(identity) = 1/2 + 1/2 (1/98 + 97/98 / 2).
        t, n = 100, 4000
        cut = 1 / 98 + 97 / 98 / 2
        for lo, p_identity in ((2, cut), (1, 0.5 + 0.5 * cut)):
            idx = np.asarray(
                augment.permutation_indices(
                    jax.random.key(5), n, t, max_segments=2, min_segments=lo
                )
            )
            runs = np.array([_runs(r) for r in idx])
            assert set(runs) <= {1, 2}
            assert abs(np.mean(runs == 1) - p_identity) < 0.03, (lo, np.mean(runs == 1))
            # A swapped pair of segments starts with the second one, which never starts at 0.
            swapped = idx[runs == 2]
            assert np.all(swapped[:, 0] > 0) and np.all(swapped[:, 0] <= t - 3)

    def test_variant_segment_ranges(self):
        # The authors' 2..8 segments against TS-TCC's 1..7, on T = 200: with n segments the warp
        # has at most n runs; n = 8 shows up only in the authors' range.
        t, n = 200, 3000
        for variant, most in (("dbpm", 8), ("ts_tcc", 7)):
            kw = augment.variant_kwargs(variant)
            idx = np.asarray(
                augment.permutation_indices(
                    jax.random.key(9),
                    n,
                    t,
                    max_segments=kw["max_segments"],
                    min_segments=kw["min_segments"],
                )
            )
            runs = np.array([_runs(r) for r in idx])
            assert runs.max() == most, (variant, runs.max())
        with pytest.raises(
            ValueError,
            match=r"augmentation variant 'tstcc'; expected one of "
            r"\('dbpm', 'ts_tcc'\)",
        ):
            augment.variant_kwargs("tstcc")

    def test_jitter_is_normal_0_0p8(self):
        # On a zero series the permutation is invisible and strong(x) is the jitter alone.
        y = np.asarray(augment.strong(jax.random.key(7), np.zeros((200, 100, 2), np.float32)))
        assert abs(y.mean()) < 0.01 and abs(y.std() - 0.8) < 0.01, (y.mean(), y.std())

    def test_deterministic_per_key(self):
        x = _x()
        k = jax.random.key(3)
        np.testing.assert_array_equal(augment.strong(k, x), augment.strong(k, x))
        assert not np.allclose(
            augment.strong(k, x), augment.strong(jax.random.key(4), x), atol=1e-5
        )
        i1 = augment.permutation_indices(k, 16, 40)
        np.testing.assert_array_equal(i1, augment.permutation_indices(k, 16, 40))

    def test_bad_input(self):
        k = jax.random.key(0)
        with pytest.raises(ValueError, match=r"x must have shape \(B, T, C\).*got \(3, 40\)"):
            augment.weak(k, np.ones((3, 40)))
        with pytest.raises(ValueError, match=r"series length T=8 must be > max_segments=8"):
            augment.strong(k, np.ones((2, 8, 1)))
        with pytest.raises(ValueError, match=r"segments 3..2; expected 1 <= min_segments"):
            augment.permutation(k, np.ones((2, 6, 1)), max_segments=2, min_segments=3)


# --- Exact views from the same random numbers, built the authors' / TS-TCC's way in NumPy -----

# The two variants' parameters, typed in from the reference code (not from augment.VARIANTS):
# DynamicBadPairMining_ICLR24 dataset.py with config_ecg.yaml (scale_ratio 1.1, max_seg 8):
# N(1, 1.1^2), np.random.randint(1, 8) + 1 = 2..8 segments; TS-TCC dataloader/augmentations.py:
# N(2, 1.1^2), np.random.randint(1, 8) = 1..7 segments.
REFERENCE = {"dbpm": (1.0, 2, 8), "ts_tcc": (2.0, 1, 7)}


def _hand_warp(u, t, lo, hi):
    """``(warp, n)`` of one series from ``permutation_indices``' uniforms ``u`` (length
    1 + (T - 2) + hi, drawn again from the same key): n = lo + floor(u_0 (hi - lo + 1))
    segments, the split points the n - 1 positions of {0..T-3} with the largest u_1..u_{T-2},
    then the authors' construction (``np.split`` at the sorted points, the segments concatenated
    in the order of the ranks of the last uniforms)."""
    n = lo + min(int(np.floor(u[0] * (hi - lo + 1))), hi - lo)
    points = np.sort(np.argsort(-u[1 : t - 1])[: n - 1])
    splits = np.split(np.arange(t), points)
    order = np.argsort(np.argsort(u[t - 1 :])[:n])
    return np.concatenate([splits[s] for s in order]), n


def _hand_strong(key, x, lo, hi, sigma=0.8):
    """DBPM's / TS-TCC's ``jitter(permutation(x))`` per sample in NumPy: the permutation key and
    the jitter key are ``jax.random.split(key)``, as in ``augment.strong``."""
    b, t, c = x.shape
    k_perm, k_jit = jax.random.split(key)
    u = np.asarray(jax.random.uniform(k_perm, (b, 1 + (t - 2) + hi)), np.float64)
    eps = np.asarray(jax.random.normal(k_jit, x.shape, x.dtype))
    warps = [_hand_warp(u[i], t, lo, hi) for i in range(b)]
    out = np.stack([x[i][w] for i, (w, _) in enumerate(warps)]) + sigma * eps
    return out, np.array([n for _, n in warps])


@pytest.mark.parametrize("variant", ["dbpm", "ts_tcc"])
def test_weak_view_equals_the_reference_scaling(variant):
    # The authors' Scaling on a (C, T) sample: factor ~ N(1, 1.1^2) of size (1, T), multiplied
    # by np.ones((C, 1)) @ factor; TS-TCC's scaling on a (B, C, T) batch: factor ~ N(2, 1.1^2)
    # of size (B, T), x[:, i, :] * factor for every channel i. Both: one factor per (sample,
    # time step), shared by the channels. The N(0, 1) draws are jax's, from the same key.
    mean, _, _ = REFERENCE[variant]
    x = _x(b=3, t=12, c=4)
    key = jax.random.key(11)
    kw = augment.variant_kwargs(variant)
    y = np.asarray(augment.weak(key, x, scale_mean=kw["scale_mean"]))
    z = np.asarray(jax.random.normal(key, (3, 12, 1), np.float32))[:, :, 0]  # (B, T)
    factor = mean + 1.1 * z
    x_ct = np.transpose(x, (0, 2, 1))  # the references' (B, C, T) layout
    if variant == "dbpm":
        want = np.stack([x_ct[i] * (np.ones((4, 1)) @ factor[i][None]) for i in range(3)])
    else:
        want = np.stack([x_ct[:, i, :] * factor for i in range(4)], axis=1)
    np.testing.assert_allclose(y, np.transpose(want, (0, 2, 1)), rtol=0, atol=1e-5)
    # The per-channel option (Um et al.): a (B, 1, C) factor, constant over time.
    y = np.asarray(augment.weak(key, x, scale_mean=mean, per_timestep=False))
    z = np.asarray(jax.random.normal(key, (3, 1, 4), np.float32))
    np.testing.assert_allclose(y, x * (mean + 1.1 * z), rtol=0, atol=1e-5)


@pytest.mark.parametrize("variant", ["dbpm", "ts_tcc"])
def test_strong_view_equals_the_reference_permutation_and_jitter(variant):
    # 64 series of length 10, every one compared with the hand construction from the same
    # uniforms; with few time steps, split points at 0 (an empty first segment) and segments
    # left in place occur and must match too.
    _, lo, hi = REFERENCE[variant]
    kw = augment.variant_kwargs(variant)
    x = _x(b=64, t=10, c=3, seed=1)
    key = jax.random.key(12)
    y = augment.strong(key, x, max_segments=kw["max_segments"], min_segments=kw["min_segments"])
    want, n = _hand_strong(key, x, lo, hi)
    np.testing.assert_allclose(y, want, rtol=0, atol=1e-5)
    assert set(n) == set(range(lo, hi + 1))  # every segment count was exercised


@pytest.mark.parametrize("variant", ["dbpm", "ts_tcc"])
def test_segment_counts_cover_exactly_the_reference_range(variant):
    # 3,000 draws whose warps all equal the hand construction, so their segment counts n are
    # the implementation's: exactly lo..hi, each with probability 1/7 (3-sigma band 0.019).
    _, lo, hi = REFERENCE[variant]
    kw = augment.variant_kwargs(variant)
    key, b, t = jax.random.key(13), 3000, 12
    idx = np.asarray(
        augment.permutation_indices(
            key, b, t, max_segments=kw["max_segments"], min_segments=kw["min_segments"]
        )
    )
    u = np.asarray(jax.random.uniform(key, (b, 1 + (t - 2) + hi)), np.float64)
    n = np.empty(b, int)
    for i in range(b):
        warp, n[i] = _hand_warp(u[i], t, lo, hi)
        np.testing.assert_array_equal(idx[i], warp)
    counts = np.bincount(n, minlength=hi + 2)
    assert set(np.flatnonzero(counts)) == set(range(lo, hi + 1)), counts
    np.testing.assert_allclose(counts[lo : hi + 1] / b, np.full(7, 1 / 7), rtol=0, atol=0.02)


def _authors_permutation(rng, t, max_segments, ts_tcc):
    """The reference's Permutation with NumPy's own generator (``np.random.permutation`` of the
    ragged list of splits is written as a permutation of their indices)."""
    num = rng.integers(1, max_segments) + (0 if ts_tcc else 1)
    if num == 1:  # TS-TCC: ret[i] = pat
        return np.arange(t)
    points = np.sort(rng.choice(t - 2, num - 1, replace=False))
    splits = np.split(np.arange(t), points)
    return np.concatenate([splits[i] for i in rng.permutation(len(splits))])


def test_run_count_distribution_matches_the_reference_code():
    # Observable from the warp alone: the number of contiguous runs (segments that stay in
    # order merge). Its distribution under jaxsafe and under the reference code run with
    # NumPy's generator agree (total variation < 0.05 on 6,000 draws each; same-law noise
    # ~0.025) and the two variants' differ (~0.15).
    t, b = 20, 6000
    rng = np.random.default_rng(0)
    hists = {}
    for variant, ts_tcc in (("dbpm", False), ("ts_tcc", True)):
        kw = augment.variant_kwargs(variant)
        idx = np.asarray(
            augment.permutation_indices(
                jax.random.key(14),
                b,
                t,
                max_segments=kw["max_segments"],
                min_segments=kw["min_segments"],
            )
        )
        ours = np.bincount(1 + np.sum(np.diff(idx, axis=1) != 1, axis=1), minlength=10) / b
        ref = [_runs(_authors_permutation(rng, t, 8, ts_tcc)) for _ in range(b)]
        ref = np.bincount(ref, minlength=10) / b
        assert 0.5 * np.abs(ours - ref).sum() < 0.05, (variant, ours, ref)
        hists[variant] = ours
    assert 0.5 * np.abs(hists["dbpm"] - hists["ts_tcc"]).sum() > 0.1

"""Weak (scaling) and strong (segment permutation + jitter) augmentations: exact structure,
distributions against the authors' and TS-TCC's sampling schemes, determinism per key."""

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

"""DBPM memory, statistics, thresholds and weights against hand computations on a fixed history.

The Gaussian weights are checked with ``scipy.stats.norm(mu, sd).pdf`` (what the reference code
calls) and the epoch-weighted mean with the reference's formula written out in NumPy. The hand
computations use the paper's plain mean (``mode='mean'``, bound below); the default,
epoch-weighted mode has its own tests."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.stats import norm

from jaxsafe.contrastive import dbpm
from jaxsafe.contrastive.dbpm import DBPMConfig, init_memory, record, reweight

flags = functools.partial(dbpm.flags, mode="mean")
pair_weights = functools.partial(dbpm.pair_weights, mode="mean")
statistics = functools.partial(dbpm.statistics, mode="mean")

# Losses of N = 8 instances in epochs 0 and 1 (of E = 4). Per-instance plain means:
# m = [1, 2, 2, 2, 2, 2, 2, 5]: mu = 18/8 = 2.25,
# sigma = sqrt((1.5625 + 6 * 0.0625 + 7.5625) / 8) = sqrt(9.5 / 8) = 1.0897247...
L0 = np.array([0.5, 1.0, 3.0, 2.0, 2.5, 1.5, 2.0, 6.0], np.float32)
L1 = np.array([1.5, 3.0, 1.0, 2.0, 1.5, 2.5, 2.0, 4.0], np.float32)
M_MEAN = np.array([1, 2, 2, 2, 2, 2, 2, 5], np.float64)
MU, SIGMA = 2.25, np.sqrt(9.5 / 8)
E = 4


def _memory(epochs=(L0, L1), num_epochs=E):
    mem = init_memory(len(L0), num_epochs)
    for e, losses in enumerate(epochs):
        mem = record(mem, e, np.arange(len(losses)), losses)
    return mem


class MemoryTest(chex.TestCase):
    def test_init_memory_is_a_pytree_of_arrays(self):
        mem = init_memory(5, 3)
        assert set(mem) == {"losses", "recorded"}
        chex.assert_shape([mem["losses"], mem["recorded"]], (3, 5))
        assert mem["losses"].dtype == jnp.float32 and mem["recorded"].dtype == jnp.bool_
        assert not mem["recorded"].any()
        assert len(jax.tree.leaves(mem)) == 2
        with pytest.raises(ValueError, match="num_instances=0, num_epochs=3; both must be >= 1"):
            init_memory(0, 3)

    @chex.variants(with_jit=True, without_jit=True)
    def test_record_writes_epoch_row_at_ids(self):
        mem = init_memory(6, 3)
        ids = np.array([4, 0, 2], np.int32)
        loss = np.array([1.5, 2.5, 3.5], np.float32)
        mem = self.variant(record)(mem, 1, ids, loss)
        expected = np.zeros((3, 6), np.float32)
        expected[1, [4, 0, 2]] = [1.5, 2.5, 3.5]
        np.testing.assert_array_equal(mem["losses"], expected)
        np.testing.assert_array_equal(mem["recorded"], expected != 0)

    @chex.variants(with_jit=True, without_jit=True)
    def test_record_drops_invalid_and_out_of_range_rows(self):
        mem = init_memory(4, 2)
        ids = np.array([0, 1, -1, 4, 3], np.int32)
        loss = np.array([1.0, 2.0, 3.0, 4.0, 5.0], np.float32)
        valid = np.array([True, False, True, True, True])
        mem = self.variant(record)(mem, 0, ids, loss, valid)
        # id 1 is padding, -1 and 4 are out of range: only ids 0 and 3 are written.
        np.testing.assert_array_equal(mem["losses"][0], [1.0, 0.0, 0.0, 5.0])
        np.testing.assert_array_equal(mem["recorded"][0], [True, False, False, True])
        assert not mem["recorded"][1].any()

    def test_record_is_stop_gradient(self):
        def f(scale):
            mem = record(init_memory(3, 2), 0, np.arange(3), scale * jnp.arange(3.0))
            return mem["losses"].sum()

        assert jax.grad(f)(2.0) == 0.0

    def test_bad_input(self):
        mem = init_memory(4, 2)
        with pytest.raises(ValueError, match=r"per_pair_loss must have shape \(B,\), got \(2, 2\)"):
            record(mem, 0, np.arange(4), np.ones((2, 2)))
        with pytest.raises(ValueError, match=r"instance_ids shape \(3,\) must equal per_pair_loss"):
            record(mem, 0, np.arange(3), np.ones(4))
        with pytest.raises(ValueError, match=r"epoch=2; expected 0 <= epoch < num_epochs=2"):
            record(mem, 2, np.arange(4), np.ones(4))
        with pytest.raises(ValueError, match=r"epoch=-1; expected 0 <= epoch"):
            record(mem, -1, np.arange(4), np.ones(4))
        with pytest.raises(ValueError, match="instance_ids must be integer indices"):
            record(mem, 0, np.ones(4), np.ones(4))
        with pytest.raises(ValueError, match=r"keys \['losses', 'recorded'\], got \['losses'\]"):
            statistics({"losses": mem["losses"]}, 1)
        with pytest.raises(ValueError, match=r"mode='median'; expected one of \('mean', 'epoch_w"):
            statistics(mem, 1, mode="median")


class StatisticsTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_default_is_the_epoch_weighted_mean(self):
        # The authors' code: m_i = mean_e ((e + 1) / E) L_(i,e); instance 1 (losses 1, 3):
        # (1/4 + 6/4) / 2 = 0.875.
        m, _, _ = self.variant(dbpm.statistics)(_memory(), 2)
        np.testing.assert_allclose(m[1], 0.875, rtol=1e-6, atol=0)  # exact: 7 / 8

    @chex.variants(with_jit=True, without_jit=True)
    def test_plain_mean_matches_hand_computation(self):
        m, mu, sigma = self.variant(statistics)(_memory(), 2)
        np.testing.assert_allclose(m, M_MEAN, rtol=1e-6, atol=0)  # exact: sums of halves / 2
        np.testing.assert_allclose(mu, MU, rtol=1e-6, atol=0)  # exact: 18 / 8
        np.testing.assert_allclose(sigma, SIGMA, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(sigma, np.std(M_MEAN), rtol=1e-6, atol=1e-6)  # population std

    @chex.variants(with_jit=True, without_jit=True)
    def test_only_epochs_before_epoch_count(self):
        # A row recorded at the current epoch (and later ones) must not enter m.
        mem = _memory((L0, L1, 100 * np.ones(8, np.float32)))
        m, _, _ = self.variant(statistics)(mem, 2)
        np.testing.assert_allclose(m, M_MEAN, rtol=1e-6, atol=0)  # exact: sums of halves / 2
        m1, mu1, _ = self.variant(statistics)(mem, 1)
        np.testing.assert_allclose(m1, L0, rtol=1e-6, atol=0)  # exact: mean of one value
        np.testing.assert_allclose(mu1, L0.mean(), rtol=1e-6, atol=0)  # exact: 18.5 / 8

    @chex.variants(with_jit=True, without_jit=True)
    def test_epoch_weighted_is_the_reference_formula(self):
        # Reference: np.mean(np.array(v) * [(1 + k) / max_epochs for k in range(epoch)]).
        m, mu, sigma = self.variant(lambda mem: statistics(mem, 2, mode="epoch_weighted"))(
            _memory()
        )
        ref = np.array([np.mean(np.array([a, b]) * [1 / E, 2 / E]) for a, b in zip(L0, L1)])
        np.testing.assert_allclose(m, ref, rtol=1e-6, atol=0)  # exact: multiples of 1/16
        np.testing.assert_allclose(mu, ref.mean(), rtol=1e-6, atol=0)  # exact: multiple of 1/128
        np.testing.assert_allclose(sigma, ref.std(), rtol=1e-6, atol=1e-6)
        # Not a normalised average: instance 1 (losses 1, 3) gets (1/4 + 6/4) / 2 = 0.875.
        np.testing.assert_allclose(m[1], 0.875, rtol=1e-6, atol=0)  # exact: 7 / 8

    def test_unseen_instances_are_excluded(self):
        mem = init_memory(4, 3)
        mem = record(mem, 0, np.array([0, 1, 2]), np.array([1.0, 2.0, 6.0]))
        mem = record(mem, 1, np.array([0, 1]), np.array([3.0, 4.0]))
        m, mu, sigma = statistics(mem, 2)
        # m = [2, 3, 6] over the seen instances (instance 2 seen once), instance 3 never.
        np.testing.assert_allclose(m, [2.0, 3.0, 6.0, 0.0], rtol=1e-6, atol=0)  # exact: integers
        np.testing.assert_allclose(mu, 11 / 3, rtol=1e-6, atol=4e-6)
        np.testing.assert_allclose(sigma, np.std([2.0, 3.0, 6.0]), rtol=1e-6, atol=2e-6)
        noisy, faulty = flags(mem, 2, warmup=0, beta_np=0.0, beta_fp=0.0)
        assert not noisy[3] and not faulty[3]


class FlagsAndWeightsTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_thresholds_match_hand_computation(self):
        f = self.variant(lambda mem, e: flags(mem, e, warmup=2, beta_np=1.0, beta_fp=2.0))
        noisy, faulty = f(_memory(), 2)
        # t_np = 2.25 - 1.0897 = 1.160 -> instance 0 (m = 1); t_fp = 2.25 + 2.1794 = 4.429 -> 7.
        np.testing.assert_array_equal(noisy, np.arange(8) == 0)
        np.testing.assert_array_equal(faulty, np.arange(8) == 7)
        # Paper defaults (2, 3): t_np = 0.07, t_fp = 5.52: nothing is flagged here.
        noisy, faulty = flags(_memory(), 2, warmup=2)
        assert not noisy.any() and not faulty.any()

    def test_thresholds_are_inclusive(self):
        # m = [0, 2, 2, 4]: mu = 2, sigma = sqrt(2); beta = sqrt(2) puts t at exactly 0 and 4.
        mem = record(init_memory(4, 2), 0, np.arange(4), np.array([0.0, 2.0, 2.0, 4.0]))
        b = float(np.float32(np.sqrt(2.0)))
        noisy, faulty = flags(mem, 1, warmup=1, beta_np=b * 0.999, beta_fp=b * 0.999)
        np.testing.assert_array_equal(noisy, [True, False, False, False])
        np.testing.assert_array_equal(faulty, [False, False, False, True])

    @chex.variants(with_jit=True, without_jit=True)
    def test_weights_are_gaussian_density_for_flagged_pairs(self):
        mem = _memory()
        ids = np.array([7, 3, 0, 5], np.int32)
        loss = np.array([4.0, 1.0, 0.3, 2.6], np.float32)
        w = self.variant(
            lambda losses, i, m: pair_weights(losses, i, m, 2, warmup=2, beta_np=1.0, beta_fp=2.0)
        )(loss, ids, mem)
        expected = np.ones(4)
        expected[0] = norm(MU, SIGMA).pdf(4.0)  # instance 7: faulty
        expected[2] = norm(MU, SIGMA).pdf(0.3)  # instance 0: noisy
        np.testing.assert_allclose(w, expected, rtol=1e-5, atol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_normalized_weights_are_at_most_one(self):
        # Tight history (sigma << 1/sqrt(2 pi)): the density exceeds 1 near mu, the normalised
        # variant is exp(-(L - mu)^2 / (2 sigma^2)) <= 1.
        base = np.full(20, 1.0, np.float32)
        base[0], base[-1] = 0.9, 1.1
        mem = record(init_memory(20, 2), 0, np.arange(20), base)
        mu, sigma = base.mean(), base.std()
        ids = np.array([0, 19, 0, 5], np.int32)
        loss = np.array([mu, mu + 0.01, 0.95, 1.0], np.float32)
        kw = dict(warmup=1, beta_np=2.0, beta_fp=2.0)
        dens = pair_weights(loss, ids, mem, 1, **kw)
        w = self.variant(lambda losses, i, m: pair_weights(losses, i, m, 1, normalized=True, **kw))(
            loss, ids, mem
        )
        assert dens[0] > 1.0  # at mu: 1 / (sigma sqrt(2 pi)) = 12.6 (sigma = 0.0316)
        np.testing.assert_allclose(dens[:3], norm(mu, sigma).pdf(loss[:3]), rtol=1e-4, atol=5e-5)
        np.testing.assert_allclose(
            w[:3], np.exp(-((loss[:3] - mu) ** 2) / (2 * sigma**2)), rtol=1e-4, atol=5e-6
        )
        assert np.all(np.asarray(w) <= 1.0) and w[3] == 1.0

    @chex.variants(with_jit=True, without_jit=True)
    def test_all_weights_one_before_warmup(self):
        mem = _memory()
        ids = np.arange(8, dtype=np.int32)
        f = self.variant(
            lambda e: pair_weights(L1, ids, mem, e, warmup=3, beta_np=0.1, beta_fp=0.1)
        )
        np.testing.assert_array_equal(f(2), np.ones(8))
        assert not np.all(np.asarray(f(3)) == 1.0)  # the same history flags pairs from epoch 3
        noisy, faulty = flags(mem, 2, warmup=3, beta_np=0.1, beta_fp=0.1)
        assert not noisy.any() and not faulty.any()

    def test_zero_sigma_flags_nothing(self):
        mem = record(init_memory(5, 2), 0, np.arange(5), np.full(5, 2.0, np.float32))
        noisy, faulty = flags(mem, 1, warmup=0)
        assert not noisy.any() and not faulty.any()
        np.testing.assert_array_equal(
            pair_weights(np.ones(5), np.arange(5), mem, 1, warmup=0), np.ones(5)
        )

    def test_out_of_range_ids_get_weight_one(self):
        w = pair_weights(
            np.array([0.3, 0.3]),
            np.array([0, -1]),
            _memory(),
            2,
            warmup=2,
            beta_np=1.0,
            beta_fp=2.0,
        )
        assert w[0] != 1.0 and w[1] == 1.0

    def test_weights_are_stop_gradient(self):
        # l_i(theta) = (a_i . theta)^2; d/dtheta sum_i w_i l_i must be sum_i w_i dl_i/dtheta even
        # though w is computed from l.
        rng = np.random.default_rng(0)
        a = rng.standard_normal((4, 3)).astype(np.float32)
        theta = np.array([0.3, -0.5, 0.8], np.float32)
        ids = np.array([0, 7, 1, 2], np.int32)
        mem = _memory()
        kw = dict(warmup=2, beta_np=1.0, beta_fp=2.0)

        def objective(th):
            losses = (a @ th) ** 2
            return jnp.sum(pair_weights(losses, ids, mem, 2, **kw) * losses)

        w = np.asarray(pair_weights((a @ theta) ** 2, ids, mem, 2, **kw), np.float64)
        assert w[0] != 1.0 and w[1] != 1.0  # two flagged pairs, so the check is not trivial
        expected = np.sum(w[:, None] * 2 * (a @ theta)[:, None] * a, axis=0)
        np.testing.assert_allclose(jax.grad(objective)(theta), expected, rtol=1e-5, atol=5e-6)
        assert np.all(
            np.asarray(
                jax.grad(lambda losses: pair_weights(losses, ids, mem, 2, **kw).sum())(
                    (a @ theta) ** 2
                )
            )
            == 0
        )


class ReweightTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_reweight_loss_memory_and_metrics(self):
        cfg = DBPMConfig(warmup=2, num_epochs=E, beta_np=1.0, beta_fp=2.0, mode="mean")
        mem = _memory()
        ids = np.array([7, 3, 0, 5], np.int32)
        loss = np.array([4.0, 1.0, 0.3, 2.6], np.float32)
        total, new_mem, metrics = self.variant(lambda losses, i, m: reweight(losses, i, m, 2, cfg))(
            loss, ids, mem
        )
        w = np.array([norm(MU, SIGMA).pdf(4.0), 1.0, norm(MU, SIGMA).pdf(0.3), 1.0])
        np.testing.assert_allclose(total, np.mean(w * loss), rtol=1e-5, atol=5e-6)
        # The unweighted losses go into the memory at epoch 2.
        np.testing.assert_array_equal(new_mem["losses"][2, ids], loss)
        assert int(new_mem["recorded"][2].sum()) == 4
        np.testing.assert_array_equal(metrics["dbpm/noisy_fraction"], 0.25)
        np.testing.assert_array_equal(metrics["dbpm/faulty_fraction"], 0.25)
        np.testing.assert_allclose(
            metrics["dbpm/flagged_weight"], (w[0] + w[2]) / 2, rtol=1e-5, atol=5e-7
        )

    def test_reweight_ignores_padding_rows(self):
        cfg = DBPMConfig(warmup=2, num_epochs=E, beta_np=1.0, beta_fp=2.0, mode="mean")
        ids = np.array([7, 3, 0, 5], np.int32)
        loss = np.array([4.0, 1.0, 0.3, 2.6], np.float32)
        valid = np.array([True, True, False, False])
        total, new_mem, metrics = reweight(loss, ids, _memory(), 2, cfg, valid=valid)
        np.testing.assert_allclose(
            total, (norm(MU, SIGMA).pdf(4.0) * 4.0 + 1.0) / 2, rtol=1e-5, atol=5e-6
        )
        np.testing.assert_array_equal(np.flatnonzero(new_mem["recorded"][2]), [3, 7])
        np.testing.assert_array_equal(metrics["dbpm/noisy_fraction"], 0.0)
        np.testing.assert_array_equal(metrics["dbpm/faulty_fraction"], 0.5)

    def test_config_defaults_and_validation(self):
        cfg = DBPMConfig()
        assert (cfg.warmup, cfg.num_epochs, cfg.beta_np, cfg.beta_fp, cfg.mode, cfg.normalized) == (
            50,
            80,
            2.0,
            3.0,
            "epoch_weighted",
            False,
        )
        assert cfg.kwargs() == dict(warmup=50, beta_np=2.0, beta_fp=3.0, mode="epoch_weighted")
        with pytest.raises(ValueError, match=r"mode='weighted'; expected one of"):
            DBPMConfig(mode="weighted")
        with pytest.raises(ValueError, match=r"warmup=90; expected 0 <= warmup <= num_epochs=80"):
            DBPMConfig(warmup=90)
        with pytest.raises(ValueError, match=r"beta_np=-1.0, beta_fp=3.0; expected >= 0"):
            DBPMConfig(beta_np=-1.0)
        assert dbpm.MODES == ("mean", "epoch_weighted")

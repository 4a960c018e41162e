"""The DBPM experiment: paper configs, the linear probe, the loss's memory bookkeeping, bad-pair
injection, and end-to-end runs (loss goes down, exact resume, DBPM inactive == disabled)."""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import dbpm as E
from experiments import run_experiment
from jaxsafe import parallel, train


def config(setting, arg=None):
    return importlib.import_module(f"configs.dbpm.{setting}").get_config(arg)


@pytest.mark.parametrize("setting", ["har", "ptbxl", "sleep_edf"])
def test_paper_configs_hold_the_paper_values(setting):
    # Typed in from the reference's config/config_ecg.yaml, run.sh and models/loss.py.
    c = config(setting)
    assert (c.train.batch_size, c.epochs, c.dbpm.warmup) == (512, 80, 50)
    assert (c.dbpm.beta_np, c.dbpm.beta_fp, c.dbpm.enabled) == (2.0, 3.0, True)
    assert c.optimizer.lr == 3e-4 and c.temperature == 0.2
    assert (c.model.name, c.model.features, c.model.head_hidden, c.model.head_out) == (
        "resnet34",
        256,
        512,
        256,
    )
    assert (
        c.augment.variant,
        c.augment.scale_sigma,
        c.augment.jitter_sigma,
        c.augment.per_timestep,
    ) == ("dbpm", 1.1, 0.8, True)
    assert c.dbpm.mode == "epoch_weighted"


def test_cpu_variant_scales_the_warmup_with_the_run():
    c = config("har", "cpu")
    assert c.epochs == 40 and c.dbpm.warmup == 25  # 50/80 of the epochs, as the paper


def test_unknown_names_fail_clearly():
    c = config("basic_motions", "smoke")
    with pytest.raises(ValueError, match=r"data.source='ucr'; expected one of \('bundled'"):
        E.load_data(_with(c.data, source="ucr"))
    with pytest.raises(ValueError, match=r"model.name='resnet50'; expected one of"):
        E.SimCLR(6, _with(c.model, name="resnet50"), rngs=None)
    with pytest.raises(ValueError, match=r"config argument 'tiny'; expected one of"):
        config("basic_motions", "tiny")


def _with(cfg, **kw):
    new = cfg.copy_and_resolve_references()
    new.update(kw)
    return new


def test_missing_local_data_names_the_path(tmp_path):
    c = config("har", "smoke")
    with c.unlocked():
        c.data.path = str(tmp_path / "UCI HAR Dataset")
    with pytest.raises(FileNotFoundError, match=r"UCI-HAR: no directory '.*UCI HAR Dataset'"):
        E.load_data(c.data)


# --------------------------------------------------------------------------- linear probe


def test_probe_reaches_full_accuracy_on_linearly_separable_features():
    rng = np.random.default_rng(0)
    k, d = 4, 10
    centers = 6.0 * rng.normal(size=(k, d))
    y_train, y_test = rng.integers(0, k, 400), rng.integers(0, k, 200)
    f_train = centers[y_train] + rng.normal(size=(400, d))
    f_test = centers[y_test] + rng.normal(size=(200, d))
    # Independent check that the classes are separable: nearest centre classifies all correctly.
    assert (np.linalg.norm(f_test[:, None] - centers, axis=-1).argmin(1) == y_test).all()
    out = E.linear_probe(f_train, y_train, f_test, y_test, num_classes=k)
    assert out["accuracy"] == 1.0 and out["train_accuracy"] == 1.0


def test_probe_is_at_chance_on_features_unrelated_to_labels():
    rng = np.random.default_rng(1)
    out = E.linear_probe(
        rng.normal(size=(300, 5)),
        rng.integers(0, 2, 300),
        rng.normal(size=(2000, 5)),
        rng.integers(0, 2, 2000),
    )
    assert abs(out["accuracy"] - 0.5) < 0.05


def test_multilabel_probe_auroc_near_one_when_labels_are_linear():
    rng = np.random.default_rng(2)
    a = rng.normal(size=(8, 3))
    f_train, f_test = rng.normal(size=(500, 8)), rng.normal(size=(300, 8))
    y_train, y_test = (f_train @ a > 0).astype(np.float32), (f_test @ a > 0).astype(np.float32)
    out = E.linear_probe(f_train, y_train, f_test, y_test, multi_label=True)
    assert out["auroc"] > 0.99


def pairwise_auc(y, s):
    pos, neg = s[y > 0.5], s[y < 0.5]
    diff = pos[:, None] - neg[None, :]
    return ((diff > 0).sum() + 0.5 * (diff == 0).sum()) / diff.size


def test_macro_auroc_matches_pairwise_counting_with_ties():
    rng = np.random.default_rng(3)
    y = (rng.random((60, 4)) < 0.3).astype(np.float32)
    s = np.round(rng.normal(size=(60, 4)), 1)  # rounding creates ties
    y[:, 3] = 0  # a class without positives is skipped
    want = np.mean([pairwise_auc(y[:, k], s[:, k]) for k in range(3)])
    np.testing.assert_allclose(
        E.macro_auroc(y, s), want, rtol=1e-12, atol=0
    )  # exact: both are U / (n_pos n_neg)
    with pytest.raises(ValueError, match=r"y_true \(60, 4\) and scores \(60, 3\) must both be"):
        E.macro_auroc(y, s[:, :3])


# ---------------------------------------------------------------------------- bad pairs


def test_inject_bad_pairs_fractions_disjoint_and_only_noisy_rows_change():
    x = np.random.default_rng(0).normal(size=(200, 7, 2)).astype(np.float32) + 5.0
    new, noisy, faulty = E.inject_bad_pairs(x, 0.1, 0.05, seed=4)
    assert noisy.sum() == 20 and faulty.sum() == 10 and not (noisy & faulty).any()
    np.testing.assert_array_equal(new[~noisy], x[~noisy])
    assert abs(new[noisy].mean()) < 0.3 and abs(new[noisy].std() - 1) < 0.2  # N(0, 1), not x
    again = E.inject_bad_pairs(x, 0.1, 0.05, seed=4)
    np.testing.assert_array_equal(again[0], new)
    with pytest.raises(ValueError, match=r"noisy_fraction=0.6, faulty_fraction=0.5; expected"):
        E.inject_bad_pairs(x, 0.6, 0.5, seed=0)


def test_destroy_signal_permutes_each_series_time_steps():
    x = jnp.arange(3 * 16, dtype=jnp.float32).reshape(3, 16, 1)
    y = np.asarray(E.destroy_signal(jax.random.key(0), x))
    for i in range(3):
        assert sorted(y[i, :, 0].tolist()) == np.asarray(x)[i, :, 0].tolist()
        assert not np.array_equal(y[i], np.asarray(x)[i])


def test_noise_views_keep_nothing_of_the_signal_and_unknown_kinds_fail():
    x = jnp.full((64, 32, 2), 7.0)
    y = np.asarray(E.destroy_signal(jax.random.key(1), x, "noise"))
    assert abs(y.mean()) < 0.05 and abs(y.std() - 1) < 0.05
    with pytest.raises(ValueError, match=r"bad_pairs.faulty_view='mask'; expected one of"):
        E.destroy_signal(jax.random.key(1), x, "mask")


def test_flag_report_precision_and_recall():
    truth_noisy = np.array([1, 1, 0, 0, 0, 0], bool)
    truth_faulty = np.array([0, 0, 1, 1, 0, 0], bool)
    flag_noisy = np.array([1, 0, 0, 0, 1, 0], bool)
    flag_faulty = np.array([0, 0, 1, 1, 0, 0], bool)
    r = E.flag_report(flag_noisy, flag_faulty, truth_noisy, truth_faulty)
    assert (r["noisy_precision"], r["noisy_recall"]) == (0.5, 0.5)
    assert (r["faulty_precision"], r["faulty_recall"]) == (1.0, 1.0)
    assert (r["bad_precision"], r["bad_recall"]) == (0.75, 0.75)
    assert (r["flagged_noisy"], r["flagged_faulty"]) == (2, 2)


# ------------------------------------------------------------------------ loss function


@pytest.mark.slow
def test_loss_records_each_pair_loss_at_the_batch_epoch():
    c = config("basic_motions", "smoke")
    with c.unlocked():
        c.dbpm.enabled = False
    mesh = parallel.make_mesh(1, 1, devices=jax.devices()[:1])
    task = E.build(E.resolve(c), mesh)
    batch = task.train_data[3]  # epoch 1 (two steps per epoch)
    assert (batch["epoch"] == 1).all()
    loss, (metrics, extra) = jax.jit(task.loss_fn)(
        task.params, task.frozen, task.extra, batch, jax.random.key(0)
    )
    recorded = np.asarray(extra["memory"]["recorded"])
    assert recorded.sum() == len(batch["id"]) and recorded[1, batch["id"]].all()
    losses = np.asarray(extra["memory"]["losses"])[1, batch["id"]]
    np.testing.assert_allclose(
        loss, losses.mean(), rtol=1e-6, atol=1e-5
    )  # disabled: L = mean of l_i
    assert (losses > 0).all()
    # BatchNorm statistics moved (training mode) and are returned in extra, not in params.
    before = jax.tree.leaves(task.extra["batch_stats"])
    after = jax.tree.leaves(extra["batch_stats"])
    assert any(not np.array_equal(a, b) for a, b in zip(before, after))


# ---------------------------------------------------------------------- end-to-end runs


def run_cfg(epochs=4, num_steps=-1, warmup=1, enabled=True, lr=3e-4):
    c = config("basic_motions", "smoke")
    with c.unlocked():
        c.epochs, c.dbpm.warmup, c.dbpm.enabled = epochs, warmup, enabled
        c.optimizer.lr = lr
        c.train.update(
            num_steps=num_steps,
            steps_per_call=1,
            log_every=1,
            eval_every=0,
            checkpoint_every=2,
            async_checkpointing=False,
        )
    return c


def run(c, workdir):
    mesh = parallel.make_mesh()
    c = E.resolve(c)
    task = E.build(c, mesh)
    return train.run(task, c.train, str(workdir), mesh)


def assert_states_equal(a, b):
    for part in ("params", "extra", "opt_state"):
        for x, y in zip(jax.tree.leaves(getattr(a, part)), jax.tree.leaves(getattr(b, part))):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=part)


@pytest.mark.slow
def test_smoke_run_lowers_the_loss_and_resumes_exactly(tmp_path):
    full = run(run_cfg(epochs=6), tmp_path / "full")
    rows = train.read_jsonl(str(tmp_path / "full" / "metrics.jsonl"))
    pair = [r["train/pair_loss"] for r in rows]
    assert len(pair) == 12 and np.mean(pair[-4:]) < np.mean(pair[:4])
    # DBPM acted (warm-up 1): some pairs were flagged in the later epochs.
    assert any(
        r["train/dbpm/noisy_fraction"] + r["train/dbpm/faulty_fraction"] > 0 for r in rows[2:]
    )
    # Two phases in one workdir (stopped after 5 steps, mid-epoch) equal the uninterrupted run,
    # DBPM memory and BatchNorm statistics included.
    half = run(run_cfg(epochs=6, num_steps=6), tmp_path / "resumed")
    assert int(half.step) == 6
    resumed = run(run_cfg(epochs=6), tmp_path / "resumed")
    assert int(resumed.step) == 12
    assert_states_equal(full, resumed)
    memory = np.asarray(resumed.extra["memory"]["recorded"])
    assert memory.all()  # every instance recorded in every epoch


@pytest.mark.slow
def test_dbpm_with_warmup_beyond_the_run_equals_disabled_bitwise(tmp_path):
    # Memory for 80 epochs, warm-up 50, but only 3 epochs run: the weights are exactly 1.
    on = run(run_cfg(epochs=80, num_steps=6, warmup=50, enabled=True), tmp_path / "on")
    off = run(run_cfg(epochs=80, num_steps=6, warmup=50, enabled=False), tmp_path / "off")
    assert_states_equal(on, off)
    # ... while an active DBPM (warm-up 1) changes the parameters.
    active = run(run_cfg(epochs=80, num_steps=6, warmup=1, enabled=True), tmp_path / "active")
    assert any(
        not np.array_equal(a, b)
        for a, b in zip(jax.tree.leaves(active.params), jax.tree.leaves(off.params))
    )


@pytest.mark.slow
def test_smoke_experiment_reports_probe_and_flags(tmp_path):
    c = config("japanese_vowels", "smoke")
    with c.unlocked():
        c.bad_pairs.update(noisy_fraction=0.05, faulty_fraction=0.05)
    final = run_experiment(c, str(tmp_path))
    assert 0 <= final["probe_accuracy"] <= 1 and final["probe_accuracy"] > 1 / 9
    for k in ("noisy", "faulty", "bad"):
        assert 0 <= final[f"dbpm_{k}_precision"] <= 1 and 0 <= final[f"dbpm_{k}_recall"] <= 1
    rows = train.read_jsonl(str(tmp_path / "metrics.jsonl"))
    assert any("probe/accuracy" in r for r in rows) and any("dbpm/flagged_noisy" in r for r in rows)

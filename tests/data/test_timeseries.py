"""jaxsafe.data.timeseries: the .ts parser, UCI-HAR / PTB-XL / Sleep-EDF loaders on trees the tests
write, the offline sets shipped with aeon, preprocessing and the contrastive batches."""

import os
import sys

import numpy as np
import pytest

from jaxsafe.data import timeseries as ts

UNIVARIATE = """\
# a comment line
@problemName Tiny
@timeStamps false
@missing true
@univariate true
@equalLength true
@seriesLength 4
@classLabel true up down

@data
1,2,3,4:up
4,3,?,1:down
0.5,-1e-3,2.5E2,7:up
"""

MULTIVARIATE_UNEQUAL = """\
@problemName Multi
@timeStamps false
@univariate false
@dimensions 2
@equalLength false
@classLabel true a b c
@data
1,2,3:10,20,30:c
4:40:a
"""


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_read_ts_univariate_values_labels_and_missing(tmp_path):
    f = ts.read_ts(write(tmp_path, "u.ts", UNIVARIATE))
    assert f.x.shape == (3, 4, 1) and f.x.dtype == np.float32
    np.testing.assert_array_equal(f.x[0, :, 0], [1, 2, 3, 4])
    np.testing.assert_array_equal(f.x[2, :, 0], np.float32([0.5, -0.001, 250.0, 7]))
    assert np.isnan(f.x[1, 2, 0]) and f.x[1, 3, 0] == 1
    assert f.labels.tolist() == ["up", "down", "up"]
    assert f.class_labels == ("up", "down") and f.header["problemname"] == "Tiny"


def test_read_ts_multivariate_unequal_lengths_pad_with_nan(tmp_path):
    f = ts.read_ts(write(tmp_path, "m.ts", MULTIVARIATE_UNEQUAL))
    assert f.x.shape == (2, 3, 2)
    np.testing.assert_array_equal(f.x[0], [[1, 10], [2, 20], [3, 30]])
    np.testing.assert_array_equal(f.x[1, 0], [4, 40])
    assert np.isnan(f.x[1, 1:]).all()
    assert f.lengths.tolist() == [3, 1]


@pytest.mark.parametrize(
    "text, message",
    [
        (
            UNIVARIATE.replace("4,3,?,1:down", "4,3,x1,1:down"),
            r"u\.ts:12: could not parse value 'x1' as a number",
        ),
        (
            UNIVARIATE.replace("4,3,?,1:down", "4,3,2,1:left"),
            r"u\.ts:12: class label 'left' is not one of the @classLabel labels \['up', 'down'\]",
        ),
        (
            UNIVARIATE.replace("4,3,?,1:down", "4,3,2:1:down"),
            r"u\.ts:12: expected 1 dimension\(s\) and a label separated by ':', got 3 field\(s\)",
        ),
        (
            UNIVARIATE.replace("4,3,?,1:down", "4,3,2:down"),
            r"u\.ts:12: series has 3 values, but @seriesLength is 4",
        ),
        (
            UNIVARIATE.replace("@univariate true", "@univariate maybe"),
            r"u\.ts:5: expected true or false, got 'maybe'",
        ),
        (
            UNIVARIATE.replace("@univariate true", "@frequency 12"),
            r"u\.ts:5: unknown header tag '@frequency'",
        ),
        (
            UNIVARIATE.replace("@timeStamps false", "@timeStamps true"),
            r"u\.ts:10: '@timeStamps true' series are not supported",
        ),
        (UNIVARIATE.replace("@data\n", ""), r"u\.ts:10: data before the @data tag"),
        (UNIVARIATE + "@missing false\n", r"u\.ts:14: header tag '@missing' after @data"),
        (UNIVARIATE.split("@data")[0] + "@data\n", r"u\.ts: no series after @data"),
        (
            UNIVARIATE.replace("4,3,?,1:down", "4,inf,2,1:down"),
            r"u\.ts:12: value 'inf' is infinite \(or beyond float32's range\)",
        ),
        (
            UNIVARIATE.replace("4,3,?,1:down", "4,1e39,2,1:down"),
            r"u\.ts:12: value '1e39' is infinite",
        ),
        (UNIVARIATE.replace("4,3,?,1:down", ":down"), r"u\.ts:12: the series has no values"),
        (
            UNIVARIATE.replace("@seriesLength 4", "@seriesLength 0"),
            r"u\.ts:\d+: @serieslength must be at least 1, got 0",
        ),
    ],
)
def test_read_ts_malformed_files_name_the_line(tmp_path, text, message):
    with pytest.raises(ValueError, match=message):
        ts.read_ts(write(tmp_path, "u.ts", text))


def test_missing_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no \.ts file at '.*nope\.ts'"):
        ts.read_ts(str(tmp_path / "nope.ts"))
    with pytest.raises(FileNotFoundError, match=r"expected Foo_TRAIN\.ts and Foo_TEST\.ts in"):
        ts.load_ucr_uea(str(tmp_path), "Foo")
    with pytest.raises(FileNotFoundError, match=r"UCI-HAR: no directory"):
        ts.load_uci_har(str(tmp_path / "UCI HAR Dataset"))


def test_load_ucr_uea_maps_labels_and_pads_to_common_length(tmp_path):
    d = tmp_path / "Multi"
    d.mkdir()
    write(d, "Multi_TRAIN.ts", MULTIVARIATE_UNEQUAL)
    write(d, "Multi_TEST.ts", MULTIVARIATE_UNEQUAL.replace("1,2,3:10,20,30:c", "1,2,3,4:5,6,7,8:b"))
    data = ts.load_ucr_uea(str(tmp_path), "Multi")
    assert data.classes == ("a", "b", "c") and not data.multi_label
    assert data.train["y"].tolist() == [2, 0] and data.test["y"].tolist() == [1, 0]
    assert data.train["x"].shape == (2, 4, 2) and data.test["x"].shape == (2, 4, 2)
    assert np.isnan(data.train["x"][0, 3]).all()  # padded to the test split's length 4


def test_test_labels_outside_train_classes_fail(tmp_path):
    write(tmp_path, "X_TRAIN.ts", UNIVARIATE)
    write(
        tmp_path,
        "X_TEST.ts",
        UNIVARIATE.replace("up down", "up down left").replace("4,3,?,1:down", "4,3,2,1:left"),
    )
    with pytest.raises(
        ValueError,
        match=r"X_TEST\.ts: labels \['left'\] are not among the train "
        r"classes \('up', 'down'\)",
    ):
        ts.load_ucr_uea(str(tmp_path), "X")


# The sets documented in ts.BUNDLED, as listed by the UCR/UEA archive
# (timeseriesclassification.com).
ARCHIVE = {
    "BasicMotions": (40, 40, 100, 6, 4),
    "GunPoint": (50, 150, 150, 1, 2),
    "ItalyPowerDemand": (67, 1029, 24, 1, 2),
    "ArrowHead": (36, 175, 251, 1, 3),
    "JapaneseVowels": (270, 370, 29, 12, 9),
    "OSULeaf": (200, 242, 427, 1, 6),
}


@pytest.mark.parametrize("name", sorted(ARCHIVE))
def test_bundled_sets_have_the_archive_shapes(name):
    n_train, n_test, t, c, k = ARCHIVE[name]
    assert ts.BUNDLED[name] == ARCHIVE[name]
    data = ts.load_bundled(name)
    assert data.train["x"].shape == (n_train, t, c) and data.test["x"].shape == (n_test, t, c)
    assert len(data.classes) == k
    assert set(np.unique(data.train["y"])) == set(range(k))


def test_basic_motions_offline_default():
    data = ts.load_bundled("BasicMotions")
    assert data.classes == ("Standing", "Running", "Walking", "Badminton")
    # Balanced: 10 series of each activity in each split.
    assert np.bincount(data.train["y"]).tolist() == [10] * 4
    assert np.bincount(data.test["y"]).tolist() == [10] * 4
    assert np.isfinite(data.train["x"]).all()


def test_parser_agrees_with_aeons_own_reader():
    """aeon's loader (an independent implementation) on the same files, incl. unequal lengths."""
    aeon_datasets = pytest.importorskip("aeon.datasets")
    for name in ("BasicMotions", "JapaneseVowels"):
        path = os.path.join(ts.bundled_dir(), name, f"{name}_TRAIN.ts")
        ours = ts.read_ts(path)
        X, y = aeon_datasets.load_from_ts_file(path)
        assert len(X) == len(ours.x)
        for i, series in enumerate(X):  # aeon: (C, T_i) per series
            t = series.shape[1]
            np.testing.assert_allclose(ours.x[i, :t], np.asarray(series).T, rtol=1e-6, atol=1e-6)
            assert np.isnan(ours.x[i, t:]).all()
        assert [a.lower() for a in ours.labels] == [b.lower() for b in y]


def test_unknown_bundled_name():
    with pytest.raises(ValueError, match=r"bundled dataset 'Gunpoint'; expected one of \["):
        ts.load_bundled("Gunpoint")


# ------------------------------------------------------------------------------------ UCI-HAR


def write_har(root, n_train=5, n_test=3, steps=128, seed=0):
    rng = np.random.default_rng(seed)
    (root).mkdir(parents=True)
    (root / "activity_labels.txt").write_text(
        "1 WALKING\n2 WALKING_UPSTAIRS\n3 WALKING_DOWNSTAIRS\n4 SITTING\n5 STANDING\n6 LAYING\n"
    )
    truth = {}
    for split, n in (("train", n_train), ("test", n_test)):
        (root / split / "Inertial Signals").mkdir(parents=True)
        x = rng.normal(size=(n, steps, 9)).astype(np.float32)
        y = rng.integers(1, 7, size=n)
        for c, sig in enumerate(ts.HAR_SIGNALS):
            np.savetxt(
                root / split / "Inertial Signals" / f"{sig}_{split}.txt", x[:, :, c], fmt="%.8e"
            )
        np.savetxt(root / split / f"y_{split}.txt", y, fmt="%d")
        truth[split] = (x, y)
    return truth


def test_uci_har_loader_on_a_fake_tree(tmp_path):
    root = tmp_path / "UCI HAR Dataset"
    truth = write_har(root)
    data = ts.load_uci_har(str(root))
    assert data.classes[0] == "WALKING" and data.classes[5] == "LAYING"
    for split in ("train", "test"):
        x, y = truth[split]
        assert getattr(data, split)["x"].shape == (len(y), 128, 9)
        np.testing.assert_allclose(
            getattr(data, split)["x"], x, rtol=1e-6, atol=0
        )  # exact: %.8e (9 digits) round-trips float32
        assert getattr(data, split)["y"].tolist() == (y - 1).tolist()
    # The channel order is body_acc xyz, body_gyro xyz, total_acc xyz.
    body_gyro_y = np.loadtxt(root / "train" / "Inertial Signals" / "body_gyro_y_train.txt")
    np.testing.assert_allclose(data.train["x"][:, :, 4], body_gyro_y, rtol=1e-6, atol=1e-6)


def test_uci_har_missing_signal_file_is_named(tmp_path):
    root = tmp_path / "UCI HAR Dataset"
    write_har(root)
    os.remove(root / "test" / "Inertial Signals" / "total_acc_z_test.txt")
    with pytest.raises(
        FileNotFoundError, match=r"UCI-HAR: expected the file .*total_acc_z_test\.txt"
    ):
        ts.load_uci_har(str(root))


# ------------------------------------------------------------------------------------- PTB-XL

SCP = """,description,diagnostic,form,rhythm,diagnostic_class,diagnostic_subclass
NDT,non-diagnostic T,1.0,1.0,,STTC,STTC
NORM,normal ECG,1.0,,,NORM,NORM
IMI,inferior MI,1.0,,,MI,IMI
ASMI,anteroseptal MI,1.0,,,MI,AMI
SR,sinus rhythm,,,1.0,,
LVOLT,low QRS voltages,,1.0,,,
"""

DATABASE = """ecg_id,patient_id,scp_codes,strat_fold,filename_lr,filename_hr
1,10,"{'NORM': 100.0, 'SR': 0.0}",3,records100/00000/00001_lr,records500/00000/00001_hr
2,11,"{'IMI': 50.0, 'ASMI': 15.0, 'SR': 0.0}",10,records100/00000/00002_lr,records500/00000/00002_hr
3,12,"{'SR': 0.0, 'LVOLT': 0.0}",1,records100/00000/00003_lr,records500/00000/00003_hr
4,13,"{'NDT': 100.0}",9,records100/00000/00004_lr,records500/00000/00004_hr
5,14,"{'ASMI': 100.0}",10,records100/00000/00005_lr,records500/00000/00005_hr
"""


def fake_reader(path):
    """Stands in for wfdb.rdsamp: a (1000, 12) signal whose value encodes the record number."""
    number = int(os.path.basename(path).split("_")[0])
    return np.full((1000, 12), float(number), np.float64)


@pytest.fixture
def ptbxl_dir(tmp_path):
    (tmp_path / "scp_statements.csv").write_text(SCP)
    (tmp_path / "ptbxl_database.csv").write_text(DATABASE)
    return str(tmp_path)


def test_ptbxl_diagnostic_labels_and_folds(ptbxl_dir):
    data = ts.load_ptbxl(ptbxl_dir, read_record=fake_reader)
    assert data.multi_label and data.classes == ("ASMI", "IMI", "NDT", "NORM")
    # Record 3 has no diagnostic statement and is dropped; fold 10 is the test split.
    np.testing.assert_array_equal(data.train["x"][:, 0, 0], [1, 4])
    np.testing.assert_array_equal(data.test["x"][:, 0, 0], [2, 5])
    np.testing.assert_array_equal(data.train["y"], [[0, 0, 0, 1], [0, 0, 1, 0]])
    np.testing.assert_array_equal(data.test["y"], [[1, 1, 0, 0], [1, 0, 0, 0]])
    assert data.train["x"].shape == (2, 1000, 12) and data.train["x"].dtype == np.float32


def test_ptbxl_superdiagnostic_aggregates(ptbxl_dir):
    data = ts.load_ptbxl(ptbxl_dir, task="superdiagnostic", read_record=fake_reader)
    assert data.classes == ("MI", "NORM", "STTC")
    np.testing.assert_array_equal(data.test["y"], [[1, 0, 0], [1, 0, 0]])  # IMI+ASMI -> one MI


def test_ptbxl_without_wfdb_says_how_to_install(ptbxl_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "wfdb", None)  # import wfdb now raises ImportError
    with pytest.raises(ImportError, match=r"optional 'wfdb' package: pip install"):
        ts.load_ptbxl(ptbxl_dir)


def test_ptbxl_bad_arguments(ptbxl_dir, tmp_path):
    with pytest.raises(ValueError, match=r"task='rhythm'; expected one of"):
        ts.load_ptbxl(ptbxl_dir, task="rhythm")
    with pytest.raises(ValueError, match=r"sampling_rate=250; expected 100 or 500"):
        ts.load_ptbxl(ptbxl_dir, sampling_rate=250)
    with pytest.raises(FileNotFoundError, match=r"PTB-XL: expected the file .*ptbxl_database\.csv"):
        ts.load_ptbxl(str(tmp_path / "empty"))


def test_sleep_edf_npz_recordings_split_by_file(tmp_path):
    for i in range(5):
        np.savez(
            tmp_path / f"SC40{i}1E0.npz",
            x=np.full((3 + i, 3000), i, np.float32),
            y=np.arange(3 + i) % 5,
            fs=100.0,
        )
    data = ts.load_sleep_edf(str(tmp_path), test_fraction=0.2, seed=1)
    train_ids = set(np.unique(data.train["x"][:, 0, 0]))
    test_ids = set(np.unique(data.test["x"][:, 0, 0]))
    assert len(test_ids) == 1 and train_ids | test_ids == set(range(5)) and not train_ids & test_ids
    assert data.train["x"].shape[1:] == (3000, 1) and data.classes == ts.SLEEP_STAGES
    assert len(data.train["y"]) + len(data.test["y"]) == sum(3 + i for i in range(5))


# ------------------------------------------------------------------------------ preprocessing


def test_standardize_uses_train_statistics_per_channel():
    rng = np.random.default_rng(0)
    train = rng.normal([1.0, -5.0], [2.0, 0.5], size=(50, 20, 2)).astype(np.float32)
    test = rng.normal(size=(10, 20, 2)).astype(np.float32)
    train[0, 0, 0] = np.nan
    data = ts.standardize(ts.TimeSeriesData({"x": train, "y": None}, {"x": test, "y": None}, ()))
    flat = train.reshape(-1, 2)
    mean, std = np.nanmean(flat, 0), np.nanstd(flat, 0)
    np.testing.assert_allclose(data.test["x"], (test - mean) / std, rtol=1e-5, atol=1e-6)
    assert abs(np.nanmean(data.train["x"][..., 1])) < 1e-5
    filled = ts.fill_missing(data)
    assert filled.train["x"][0, 0, 0] == 0 and np.isfinite(filled.train["x"]).all()


def test_resplit_is_stratified_and_keeps_every_series():
    data = ts.load_bundled("GunPoint")
    new = ts.resplit(data, test_fraction=0.3, seed=0)
    assert len(new.train["y"]) + len(new.test["y"]) == 200
    for c in (0, 1):  # 100 of each class in the archive: 30 go to the test split
        assert np.sum(new.test["y"] == c) == 30
    everything = np.concatenate([data.train["x"], data.test["x"]]).reshape(200, -1)
    pooled = np.concatenate([new.train["x"], new.test["x"]]).reshape(200, -1)
    assert sorted(map(bytes, everything)) == sorted(map(bytes, pooled))


# ---------------------------------------------------------------------------------- batching


def test_contrastive_batches_cover_every_instance_each_epoch():
    n, b = 10, 4  # 3 steps per epoch; the third batch wraps around to the epoch's start
    x = np.arange(n, dtype=np.float32)[:, None, None] * np.ones((1, 5, 2), np.float32)
    ds = ts.contrastive_batches({"x": x}, b, seed=3)
    assert ts.steps_per_epoch(n, b) == 3
    for epoch in range(3):
        steps = [ds[epoch * 3 + j] for j in range(3)]
        ids = np.concatenate([s["id"] for s in steps])
        assert set(ids.tolist()) == set(range(n))
        assert all(len(set(s["id"].tolist())) == b for s in steps)  # no duplicate in a batch
        assert all((s["epoch"] == epoch).all() for s in steps)
        for s in steps:
            np.testing.assert_array_equal(s["x"][:, 0, 0], s["id"])  # x follows its id
        perm = np.random.default_rng([3, epoch]).permutation(n)
        np.testing.assert_array_equal(ids, np.concatenate([perm, perm[:2]]))
    assert not np.array_equal(ds[0]["id"], ds[3]["id"])  # a new permutation each epoch


def test_contrastive_batches_process_shares_form_the_global_batch():
    x = np.random.default_rng(0).normal(size=(13, 4, 1)).astype(np.float32)
    whole = ts.contrastive_batches({"x": x}, 6, seed=1)
    parts = [
        ts.contrastive_batches({"x": x}, 6, seed=1, process_index=p, process_count=2)
        for p in range(2)
    ]
    for step in (0, 2, 7):
        np.testing.assert_array_equal(
            np.concatenate([p[step]["id"] for p in parts]), whole[step]["id"]
        )


def test_contrastive_batches_bad_arguments():
    x = np.zeros((8, 4, 1), np.float32)
    with pytest.raises(ValueError, match=r"batch_size=9; expected an integer in \[1, 8\]"):
        ts.contrastive_batches({"x": x}, 9)
    with pytest.raises(ValueError, match=r"batch_size=6 must be divisible by process_count=4"):
        ts.contrastive_batches({"x": x}, 6, process_index=0, process_count=4)
    with pytest.raises(ValueError, match=r"must not contain the key 'id'"):
        ts.contrastive_batches({"x": x, "id": np.arange(8)}, 4)

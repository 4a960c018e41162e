"""Time-series classification data for contrastive pre-training, from local files or offline.

The data used by Dynamic Bad Pair Mining (Lan et al., "Towards Enhancing Time Series Contrastive
Learning: A Dynamic Bad Pair Mining Approach", ICLR 2024; reference code
``lanxiang1017/DynamicBadPairMining_ICLR24``): PTB-XL, UCI-HAR, Sleep-EDF and Epilepsy, plus
the UCR/UEA archive's `.ts` files. Every loader returns a `TimeSeriesData`: `x` float32
`(N, T, C)` (time before channels, as the encoders take it) and `y` int32 `(N,)` class indices,
or float32 `(N, K)` multi-hot labels for PTB-XL. All sources are local, nothing is downloaded:

* `read_ts` / `load_ucr_uea`: the UCR/UEA `.ts` format; unequal-length series are padded with
  NaN, which `fill_missing` turns into 0 once the data are standardised;
* `load_bundled`: the UCR/UEA sets that the `aeon` package ships inside its wheel (aeon is
  located, never imported), the offline default of the DBPM demo and benchmarks;
* `load_uci_har`, `load_ptbxl` (with the optional `wfdb` package), `load_sleep_edf` (after the
  usual DeepSleepNet/TS-TCC preparation; raw EDF files are not read).

Deviation: the reference splits PTB-XL at random (20 % test); here the release's `strat_fold`
column does (train folds 1-9, test fold 10 by default), as the PTB-XL authors recommend.
`contrastive_batches` makes the training input: a `grain.MapDataset` whose item `step` is this
process's share of that step's global batch, with the instance ids DBPM's memory is indexed by
and the epoch the step belongs to.
"""

from __future__ import annotations

import ast
import csv
import functools
import glob
import importlib.util
import math
import os
import sys
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np

__all__ = [
    "BUNDLED",
    "HAR_SIGNALS",
    "TimeSeriesData",
    "TsFile",
    "bundled_dir",
    "contrastive_batches",
    "fill_missing",
    "load_bundled",
    "load_ptbxl",
    "load_sleep_edf",
    "load_ts",
    "load_uci_har",
    "load_ucr_uea",
    "read_ts",
    "resplit",
    "standardize",
    "steps_per_epoch",
]


class TimeSeriesData(NamedTuple):
    """A classification set: `train` / `test` = {'x': (N, T, C) float32, 'y': labels}.

    `y` is int32 `(N,)` class indices, or float32 `(N, K)` multi-hot when `multi_label`.
    """

    train: dict
    test: dict
    classes: tuple[str, ...]
    multi_label: bool = False


class TsFile(NamedTuple):
    """One parsed `.ts` file. `x` is NaN after each series' `lengths[i]` steps and where missing."""

    x: np.ndarray  # (N, T_max, C) float32
    labels: np.ndarray  # (N,) str, or None without @classLabel
    class_labels: tuple[str, ...] | None
    lengths: np.ndarray  # (N,) int
    header: dict


# ----------------------------------------------------------------------------------- .ts files

_BOOL_TAGS = ("timestamps", "missing", "univariate", "equallength", "targetlabel")


def _parse_bool(value: str, where: str) -> bool:
    if value.lower() not in ("true", "false"):
        raise ValueError(f"{where}: expected true or false, got {value!r}")
    return value.lower() == "true"


def _parse_header(tag: str, rest: str, where: str, header: dict) -> None:
    if tag in _BOOL_TAGS:
        header[tag] = _parse_bool(rest, where)
    elif tag in ("dimensions", "serieslength"):
        try:
            header[tag] = int(rest)
        except ValueError:
            raise ValueError(f"{where}: @{tag} needs an integer, got {rest!r}") from None
        if header[tag] < 1:
            raise ValueError(f"{where}: @{tag} must be at least 1, got {header[tag]}")
    elif tag == "problemname":
        header[tag] = rest
    elif tag == "classlabel":
        flag, *labels = rest.split()
        if _parse_bool(flag, where):
            if not labels:
                raise ValueError(f"{where}: '@classLabel true' must list the class labels")
            header[tag] = tuple(labels)
        else:
            header[tag] = None
    else:
        raise ValueError(f"{where}: unknown header tag '@{tag}'")


def _parse_values(text: str, where: str) -> np.ndarray:
    text = text.strip()
    if not text:
        return np.zeros(0, np.float32)
    try:
        values = np.array(
            [math.nan if v.strip() == "?" else float(v) for v in text.split(",")], np.float32
        )
    except ValueError:
        bad = next(v for v in text.split(",") if v.strip() != "?" and not _is_float(v))
        raise ValueError(f"{where}: could not parse value {bad.strip()!r} as a number") from None
    infinite = np.flatnonzero(np.isinf(values))
    if infinite.size:  # standardising would turn the whole channel into NaN, then into zeros
        bad = text.split(",")[infinite[0]].strip()
        raise ValueError(
            f"{where}: value {bad!r} is infinite (or beyond float32's range); a "
            "missing value is written '?'"
        )
    return values


def _is_float(v: str) -> bool:
    try:
        float(v)
        return True
    except ValueError:
        return False


def read_ts(path: str) -> TsFile:
    """Parses a UCR/UEA `.ts` file (header tags, then one series per line after `@data`).

    A data line holds the dimensions separated by ':' (values by ',', '?' = missing) and, when
    `@classLabel true ...` or `@targetLabel true`, the label as a last ':' field. Errors name the
    file and line. Time-stamped series (`@timeStamps true`) are not supported.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no .ts file at {path!r}")
    header: dict = {"classlabel": None}
    rows, labels = [], []
    in_data = False
    dims = None
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            line = line.strip()
            where = f"{path}:{number}"
            if not line or line.startswith("#"):
                continue
            if line.startswith("@"):
                tag, _, rest = line[1:].partition(" ")
                tag = tag.lower()
                if in_data:
                    raise ValueError(f"{where}: header tag '@{tag}' after @data")
                if tag == "data":
                    if header.get("timestamps"):
                        raise ValueError(f"{where}: '@timeStamps true' series are not supported")
                    in_data = True
                    dims = header.get("dimensions", 1 if header.get("univariate", True) else None)
                    continue
                _parse_header(tag, rest.strip(), where, header)
                continue
            if not in_data:
                raise ValueError(f"{where}: data before the @data tag")
            fields = line.split(":")
            has_label = header["classlabel"] is not None or header.get("targetlabel", False)
            if has_label:
                *fields, label = fields
                label = label.strip()
                if header["classlabel"] is not None and label not in header["classlabel"]:
                    raise ValueError(
                        f"{where}: class label {label!r} is not one of the "
                        f"@classLabel labels {list(header['classlabel'])}"
                    )
                labels.append(label)
            if dims is None:
                dims = len(fields)
            if len(fields) != dims:
                expected = f"{dims} dimension(s)" + (" and a label" if has_label else "")
                raise ValueError(
                    f"{where}: expected {expected} separated by ':', got "
                    f"{len(fields) + has_label} field(s)"
                )
            series = [_parse_values(v, where) for v in fields]
            length = max(len(s) for s in series)
            if length == 0:
                raise ValueError(f"{where}: the series has no values")
            if (
                header.get("equallength")
                and "serieslength" in header
                and length != header["serieslength"]
            ):
                raise ValueError(
                    f"{where}: series has {length} values, but @seriesLength is "
                    f"{header['serieslength']}"
                )
            rows.append(series)
    if not in_data:
        raise ValueError(f"{path}: no @data section")
    if not rows:
        raise ValueError(f"{path}: no series after @data")
    lengths = np.array([max(len(s) for s in r) for r in rows])
    x = np.full((len(rows), lengths.max(), dims), np.nan, np.float32)
    for i, r in enumerate(rows):
        for c, s in enumerate(r):
            x[i, : len(s), c] = s
    return TsFile(x, np.array(labels) if labels else None, header["classlabel"], lengths, header)


def _pad_time(x: np.ndarray, length: int) -> np.ndarray:
    if x.shape[1] == length:
        return x
    pad = np.full((x.shape[0], length - x.shape[1], x.shape[2]), np.nan, np.float32)
    return np.concatenate([x, pad], axis=1)


def load_ts(train_path: str, test_path: str) -> TimeSeriesData:
    """A classification set from a `_TRAIN.ts` / `_TEST.ts` pair (classes from the train header)."""
    tr, te = read_ts(train_path), read_ts(test_path)
    if tr.class_labels is None:
        raise ValueError(f"{train_path}: '@classLabel true <labels>' is needed for classification")
    if tr.x.shape[2] != te.x.shape[2]:
        raise ValueError(
            f"{test_path} has {te.x.shape[2]} dimensions but {train_path} has {tr.x.shape[2]}"
        )
    classes = tr.class_labels
    index = {c: i for i, c in enumerate(classes)}
    if te.labels is None:
        raise ValueError(f"{test_path}: '@classLabel true <labels>' is needed for classification")
    unknown = sorted(str(v) for v in set(te.labels) - set(index))
    if unknown:
        raise ValueError(f"{test_path}: labels {unknown} are not among the train classes {classes}")
    length = max(tr.x.shape[1], te.x.shape[1])

    def split(f):
        return {"x": _pad_time(f.x, length), "y": np.array([index[v] for v in f.labels], np.int32)}

    return TimeSeriesData(split(tr), split(te), tuple(classes))


def load_ucr_uea(directory: str, name: str) -> TimeSeriesData:
    """`<name>_TRAIN.ts` and `<name>_TEST.ts` from `directory` or `directory/<name>`."""
    for d in (os.path.join(directory, name), directory):
        paths = [os.path.join(d, f"{name}_{s}.ts") for s in ("TRAIN", "TEST")]
        if all(os.path.isfile(p) for p in paths):
            return load_ts(*paths)
    raise FileNotFoundError(
        f"expected {name}_TRAIN.ts and {name}_TEST.ts in {directory!r} or "
        f"{os.path.join(directory, name)!r}"
    )


#: UCR/UEA classification sets in aeon's wheel: name -> (N train, N test, T, C, classes).
BUNDLED = {
    "ArrowHead": (36, 175, 251, 1, 3),
    "BasicMotions": (40, 40, 100, 6, 4),
    "GunPoint": (50, 150, 150, 1, 2),
    "ItalyPowerDemand": (67, 1029, 24, 1, 2),
    "JapaneseVowels": (270, 370, 29, 12, 9),
    "OSULeaf": (200, 242, 427, 1, 6),
}


def bundled_dir() -> str:
    """The folder of `.ts` files inside the installed `aeon` package (located, not imported)."""
    spec = importlib.util.find_spec("aeon")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the offline UCR/UEA sets come from the 'aeon' package's data "
            "files: pip install 'aeon>=1.0'"
        )
    return os.path.join(list(spec.submodule_search_locations)[0], "datasets", "data")


def load_bundled(name: str) -> TimeSeriesData:
    """A UCR/UEA set shipped with aeon (see `BUNDLED`), read with this module's `.ts` parser."""
    if name not in BUNDLED:
        raise ValueError(f"bundled dataset {name!r}; expected one of {sorted(BUNDLED)}")
    return load_ucr_uea(bundled_dir(), name)


# ---------------------------------------------------------------------------------- UCI-HAR

HAR_SIGNALS = tuple(
    f"{kind}_{axis}" for kind in ("body_acc", "body_gyro", "total_acc") for axis in "xyz"
)


def _require_file(path: str, what: str) -> str:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what}: expected the file {path!r}")
    return path


def load_uci_har(directory: str) -> TimeSeriesData:
    """The "UCI HAR Dataset" folder: `{train,test}/Inertial Signals/<signal>_<split>.txt`,
    `{train,test}/y_<split>.txt` (1-6) and `activity_labels.txt`. x is (N, 128, 9), the
    channels in the order of TS-TCC's preprocessing (body_acc, body_gyro, total_acc; x, y, z)."""
    if not os.path.isdir(directory):
        raise FileNotFoundError(
            f"UCI-HAR: no directory {directory!r} (the unpacked 'UCI HAR Dataset' folder)"
        )
    names = {}
    with open(_require_file(os.path.join(directory, "activity_labels.txt"), "UCI-HAR")) as f:
        for line in f:
            if line.strip():
                i, name = line.split()
                names[int(i)] = name
    classes = tuple(names[i] for i in sorted(names))

    def split(s):
        signals = [
            np.loadtxt(
                _require_file(
                    os.path.join(directory, s, "Inertial Signals", f"{sig}_{s}.txt"), "UCI-HAR"
                ),
                dtype=np.float32,
                ndmin=2,
            )
            for sig in HAR_SIGNALS
        ]
        y = np.loadtxt(
            _require_file(os.path.join(directory, s, f"y_{s}.txt"), "UCI-HAR"),
            dtype=np.int64,
            ndmin=1,
        )
        if {a.shape for a in signals} != {signals[0].shape} or signals[0].shape[0] != len(y):
            raise ValueError(
                f"UCI-HAR {s}: the signal files and y_{s}.txt disagree on the number "
                f"of windows ({[a.shape for a in signals]}, {len(y)} labels)"
            )
        if y.min() < 1 or y.max() > len(classes):
            raise ValueError(
                f"UCI-HAR {s}: labels must be in 1..{len(classes)}, got {y.min()}..{y.max()}"
            )
        return {"x": np.stack(signals, axis=-1), "y": (y - 1).astype(np.int32)}

    return TimeSeriesData(split("train"), split("test"), classes)


# ----------------------------------------------------------------------------------- PTB-XL

PTBXL_TASKS = {
    "diagnostic": None,
    "subdiagnostic": "diagnostic_subclass",
    "superdiagnostic": "diagnostic_class",
}


def _wfdb_reader(path: str) -> np.ndarray:
    try:
        import wfdb
    except ImportError:
        raise ImportError(
            "reading PTB-XL's WFDB records needs the optional 'wfdb' package: "
            "pip install 'wfdb>=4.1'"
        ) from None
    signal, _ = wfdb.rdsamp(path)
    return signal


def load_ptbxl(
    directory: str,
    *,
    sampling_rate: int = 100,
    task: str = "diagnostic",
    test_folds: Sequence[int] = (10,),
    train_folds: Sequence[int] = tuple(range(1, 10)),
    read_record: Callable[[str], np.ndarray] | None = None,
) -> TimeSeriesData:
    """PTB-XL's multi-label SCP statements; x is (N, 10 * sampling_rate, 12), y multi-hot.

    Labels follow the PTB-XL benchmark code (Strodthoff et al. 2020) that the DBPM reference
    uses: ``diagnostic`` = the 44 SCP statements with ``diagnostic == 1``, records without one
    dropped, classes in sorted order. The WFDB records are read with the optional ``wfdb``
    package.

    Args:
      directory: the release folder with `ptbxl_database.csv`, `scp_statements.csv` and
        `records100/` or `records500/`.
      sampling_rate: 100 (the reference's choice, `filename_lr`) or 500 (`filename_hr`).
      task: 'diagnostic' (44 statements, the paper's task), 'subdiagnostic' (23) or
        'superdiagnostic' (5).
      test_folds, train_folds: `strat_fold` values of each split.
      read_record: `path -> (T, 12)` array; default `wfdb.rdsamp` (optional dependency).
    """
    if sampling_rate not in (100, 500):
        raise ValueError(f"sampling_rate={sampling_rate}; expected 100 or 500")
    if task not in PTBXL_TASKS:
        raise ValueError(f"task={task!r}; expected one of {list(PTBXL_TASKS)}")
    read_record = read_record or _wfdb_reader
    database = _require_file(os.path.join(directory, "ptbxl_database.csv"), "PTB-XL")
    statements = _require_file(os.path.join(directory, "scp_statements.csv"), "PTB-XL")
    with open(statements, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    columns = rows[0]
    aggregate = {}  # diagnostic statement -> the label it counts as
    for row in rows[1:]:
        r = dict(zip(columns, row))
        if r.get("diagnostic", "").strip() in ("1", "1.0"):
            column = PTBXL_TASKS[task]
            aggregate[row[0]] = row[0] if column is None else r[column]
    records, labels, folds = [], [], []
    column = "filename_lr" if sampling_rate == 100 else "filename_hr"
    with open(database, newline="", encoding="utf-8") as f:
        for line, r in enumerate(csv.DictReader(f), 2):
            try:
                codes = ast.literal_eval(r["scp_codes"])
            except (ValueError, SyntaxError):
                raise ValueError(
                    f"{database}:{line}: scp_codes {r['scp_codes']!r} is not a dict literal"
                ) from None
            found = sorted({aggregate[c] for c in codes if c in aggregate and aggregate[c]})
            if found:  # as the benchmark code: records without a label of the task are dropped
                records.append(r[column])
                labels.append(found)
                folds.append(int(float(r["strat_fold"])))
    classes = tuple(sorted({c for ls in labels for c in ls}))
    index = {c: i for i, c in enumerate(classes)}
    y = np.zeros((len(labels), len(classes)), np.float32)
    for i, ls in enumerate(labels):
        y[i, [index[c] for c in ls]] = 1
    folds = np.array(folds)

    def split(which):
        idx = np.flatnonzero(np.isin(folds, which))
        x = np.stack(
            [np.asarray(read_record(os.path.join(directory, records[i])), np.float32) for i in idx]
        )
        return {"x": x, "y": y[idx]}

    return TimeSeriesData(
        split(list(train_folds)), split(list(test_folds)), classes, multi_label=True
    )


# -------------------------------------------------------------------------------- Sleep-EDF

SLEEP_STAGES = ("W", "N1", "N2", "N3", "REM")


def load_sleep_edf(directory: str, *, test_fraction: float = 0.2, seed: int = 0) -> TimeSeriesData:
    """Prepared Sleep-EDF recordings (`*.npz` with `x` (N, 3000[, 1]) and `y` in 0..4); a random
    `test_fraction` of the recordings (at least one) forms the test split."""
    files = sorted(glob.glob(os.path.join(directory, "*.npz")))
    if len(files) < 2:
        raise FileNotFoundError(
            f"Sleep-EDF: expected at least two prepared .npz recordings in "
            f"{directory!r}, found {len(files)}"
        )
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction={test_fraction}; expected a value in (0, 1)")
    order = np.random.default_rng(seed).permutation(len(files))
    n_test = min(len(files) - 1, max(1, round(test_fraction * len(files))))

    def read(ids):
        xs, ys = [], []
        for i in sorted(ids):
            try:
                z = np.load(files[i])
            except (OSError, EOFError, ValueError) as e:
                raise ValueError(f"{files[i]}: cannot read as .npz ({e})") from e
            if not isinstance(z, np.lib.npyio.NpzFile):
                raise ValueError(
                    f"{files[i]}: expected an .npz archive with 'x' and 'y', got a single array"
                )
            with z:
                if "x" not in z or "y" not in z:
                    raise ValueError(f"{files[i]}: expected arrays 'x' and 'y', got {list(z)}")
                x = z["x"].astype(np.float32)
                if np.isinf(x).any():
                    raise ValueError(
                        f"{files[i]}: 'x' holds infinite values (NaN marks a missing one)"
                    )
                xs.append(x[..., None] if x.ndim == 2 else x)
                ys.append(z["y"].astype(np.int32))
        return {"x": np.concatenate(xs), "y": np.concatenate(ys)}

    return TimeSeriesData(read(order[n_test:]), read(order[:n_test]), SLEEP_STAGES)


# ---------------------------------------------------------------------------- preprocessing


def resplit(data: TimeSeriesData, test_fraction: float, seed: int = 0) -> TimeSeriesData:
    """Pools train and test and draws a new stratified split (single-label sets only).

    The small UCR sets have more test than train series; pre-training on a few dozen series says
    little, so the demos pool them and keep `test_fraction` of each class for testing.
    """
    if data.multi_label:
        raise ValueError("resplit: stratification needs single-label data")
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction={test_fraction}; expected a value in (0, 1)")
    x = np.concatenate([data.train["x"], data.test["x"]])
    y = np.concatenate([data.train["y"], data.test["y"]])
    rng = np.random.default_rng(seed)
    test = []
    for c in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == c))
        test.extend(members[: int(round(test_fraction * len(members)))])
    is_test = np.zeros(len(y), bool)
    is_test[test] = True
    train_idx, test_idx = rng.permutation(np.flatnonzero(~is_test)), np.flatnonzero(is_test)
    return data._replace(
        train={"x": x[train_idx], "y": y[train_idx]}, test={"x": x[test_idx], "y": y[test_idx]}
    )


def standardize(data: TimeSeriesData) -> TimeSeriesData:
    """Per-channel zero mean / unit variance with the train split's statistics (NaN ignored)."""
    mean = np.nanmean(data.train["x"], axis=(0, 1), dtype=np.float64)
    std = np.nanstd(data.train["x"], axis=(0, 1), dtype=np.float64)
    std = np.where(std > 0, std, 1.0)

    def one(split):
        return {**split, "x": ((split["x"] - mean) / std).astype(np.float32)}

    return data._replace(train=one(data.train), test=one(data.test))


def fill_missing(data: TimeSeriesData, value: float = 0.0) -> TimeSeriesData:
    """Replaces NaN (missing values, padding of shorter series) by `value`."""

    def one(split):
        return {**split, "x": np.where(np.isnan(split["x"]), value, split["x"]).astype(np.float32)}

    return data._replace(train=one(data.train), test=one(data.test))


# ---------------------------------------------------------------------------------- batching


def steps_per_epoch(num_instances: int, batch_size: int) -> int:
    """Steps of one pass over the data: ceil(N / B) (the last batch wraps around, see below)."""
    return -(-num_instances // batch_size)


def contrastive_batches(
    arrays: dict, batch_size: int, *, seed: int = 0, process_index: int = 0, process_count: int = 1
):
    """Infinite random-access batches for contrastive pre-training: `ds[step]` is this process's
    share of the global batch of `step`.

    Epoch `e = step // steps_per_epoch` draws a permutation `π_e` of the N instances from
    `(seed, e)`; batch `j` of the epoch is `π_e[(j*B + 0..B-1) mod N]`, so every instance is seen at
    least once per epoch (DBPM records each instance's loss every epoch, as the reference's
    `drop_last=False` loader does) while every batch keeps the static shape `B`. Only the last
    batch of an epoch wraps around to the epoch's first instances; they are then seen twice.

    Items are `{**{k: v[idx]}, 'id': idx (int32), 'epoch': e (int32, one per example)}`, with `idx`
    the `[p*B/P, (p+1)*B/P)` slice of the global batch for process `p` of `P`.
    """
    import grain

    if not arrays:
        raise ValueError("arrays must hold at least one array")
    arrays = {k: np.asarray(v) for k, v in arrays.items()}
    for reserved in ("id", "epoch"):
        if reserved in arrays:
            raise ValueError(f"arrays must not contain the key {reserved!r}; it is added here")
    n = next(iter(arrays.values())).shape[0]
    for k, v in arrays.items():
        if v.shape[0] != n:
            raise ValueError(
                f"all arrays need the same leading size; {k!r} has {v.shape[0]} != {n}"
            )
    if not isinstance(batch_size, (int, np.integer)) or not 1 <= batch_size <= n:
        raise ValueError(
            f"batch_size={batch_size!r}; expected an integer in [1, {n}] (the number of instances)"
        )
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(
            f"process_index={process_index}, process_count={process_count}; expected "
            "0 <= process_index < process_count"
        )
    if batch_size % process_count:
        raise ValueError(
            f"batch_size={batch_size} must be divisible by process_count={process_count}"
        )
    spe = steps_per_epoch(n, batch_size)
    local = batch_size // process_count

    @functools.lru_cache(maxsize=2)
    def permutation(epoch):
        return np.random.default_rng([seed, epoch]).permutation(n)

    def take(step):
        epoch, j = divmod(int(step), spe)
        idx = permutation(epoch)[(j * batch_size + np.arange(batch_size)) % n]
        idx = idx[process_index * local : (process_index + 1) * local]
        out = {k: v[idx] for k, v in arrays.items()}
        out["id"] = idx.astype(np.int32)
        out["epoch"] = np.full(local, epoch, np.int32)
        return out

    return grain.MapDataset.source(range(sys.maxsize)).map(take)

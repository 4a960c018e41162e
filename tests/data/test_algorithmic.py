"""Tests for jaxsafe.data.algorithmic (modular arithmetic, sparse parity, grain batches)."""

import numpy as np
import pytest

from jaxsafe.data.algorithmic import (
    grain_batches,
    modular_arithmetic,
    one_hot_operands,
    sparse_parity,
)

PY_OPS = {
    "add": lambda a, b, p: (a + b) % p,
    "product": lambda a, b, p: (a * b) % p,
    "subtract": lambda a, b, p: (a - b) % p,  # Python % is non-negative for p > 0
}


@pytest.mark.parametrize("op", sorted(PY_OPS))
@pytest.mark.parametrize("p", [2, 13, 113])
def test_modular_labels_recomputed(op, p):
    d = modular_arithmetic(p=p, op=op, train_fraction=0.4, seed=1)
    for split in ("train", "test"):
        x, y = d[split]["x"], d[split]["y"]
        assert x.dtype == np.int32 and y.dtype == np.int32
        assert x.ndim == 2 and x.shape[1] == 2 and y.shape == (x.shape[0],)
        expected = [PY_OPS[op](int(a), int(b), p) for a, b in x.tolist()]
        assert y.tolist() == expected
        assert x.min() >= 0 and x.max() < p


@pytest.mark.parametrize("op", sorted(PY_OPS))
def test_modular_split_disjoint_and_complete(op):
    p = 31
    d = modular_arithmetic(p=p, op=op, train_fraction=0.3, seed=5)
    tr = [tuple(r) for r in d["train"]["x"].tolist()]
    te = [tuple(r) for r in d["test"]["x"].tolist()]
    assert len(set(tr)) == len(tr) and len(set(te)) == len(te)  # no duplicates
    assert not set(tr) & set(te)
    assert set(tr) | set(te) == {(a, b) for a in range(p) for b in range(p)}
    # product keeps 0 operands (the reference only drops b == 0 for division)
    assert any(a == 0 or b == 0 for a, b in tr + te)


@pytest.mark.parametrize("p,frac", [(113, 0.4), (113, 0.3), (97, 0.5), (10, 0.3), (7, 0.99)])
def test_modular_train_size_is_floor(p, frac):
    d = modular_arithmetic(p=p, train_fraction=frac)
    assert len(d["train"]["y"]) == int(frac * p * p)
    assert len(d["train"]["y"]) + len(d["test"]["y"]) == p * p


def test_modular_paper_size():
    d = modular_arithmetic()  # p=113, 40% train
    assert d["train"]["x"].shape == (5107, 2)
    assert d["test"]["x"].shape == (113 * 113 - 5107, 2)


def test_modular_seed_determinism():
    a = modular_arithmetic(p=23, seed=7)
    b = modular_arithmetic(p=23, seed=7)
    c = modular_arithmetic(p=23, seed=8)
    for s in ("train", "test"):
        np.testing.assert_array_equal(a[s]["x"], b[s]["x"])
        np.testing.assert_array_equal(a[s]["y"], b[s]["y"])
    assert not np.array_equal(a["train"]["x"], c["train"]["x"])


def test_modular_errors():
    with pytest.raises(ValueError, match=r"Unknown op 'divide'.*add, product, subtract"):
        modular_arithmetic(op="divide")
    for frac in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(
            ValueError, match=r"train_fraction must be in the open interval \(0, 1\)"
        ):
            modular_arithmetic(train_fraction=frac)
    for p in (1, 0, -5):
        with pytest.raises(ValueError, match=r"p must be an integer >= 2"):
            modular_arithmetic(p=p)
    with pytest.raises(ValueError, match=r"empty split"):
        modular_arithmetic(p=2, train_fraction=0.1)  # int(0.4) == 0 train examples


def test_modular_operands_from_one():
    # The reference's AlgorithmicDatasetTransformer: every (a, b) with 1 <= a, b <= p - 1 once.
    p = 7
    d = modular_arithmetic(p=p, op="add", train_fraction=0.5, seed=3, first_operand=1)
    x = np.concatenate([d["train"]["x"], d["test"]["x"]])
    y = np.concatenate([d["train"]["y"], d["test"]["y"]])
    pairs = sorted(map(tuple, x.tolist()))
    assert pairs == [(a, b) for a in range(1, p) for b in range(1, p)]
    assert len(d["train"]["y"]) == int(0.5 * 36)
    for (a, b), c in zip(x.tolist(), y.tolist()):
        assert c == (a + b) % p
    with pytest.raises(ValueError, match=r"first_operand must be 0 or 1, got 2"):
        modular_arithmetic(p=p, first_operand=2)


def test_one_hot_operands():
    x = np.array([[0, 0], [3, 4], [4, 1]], dtype=np.int32)
    oh = one_hot_operands(x, 5)
    assert oh.shape == (3, 10) and oh.dtype == np.float32
    expected = np.zeros((3, 10), np.float32)
    for i, (a, b) in enumerate(x.tolist()):
        expected[i, a] = 1.0
        expected[i, 5 + b] = 1.0
    np.testing.assert_array_equal(oh, expected)
    with pytest.raises(ValueError, match=r"operands must lie in \[0, 5\)"):
        one_hot_operands(np.array([[5, 0]]), 5)
    with pytest.raises(ValueError, match=r"shape \(M, 2\)"):
        one_hot_operands(np.zeros((3, 3), np.int32), 5)


@pytest.mark.parametrize(
    "n,k", [(43, 3), (10, 4), (30, 2)]
)  # n=10: sample-without-replacement path
def test_sparse_parity_labels(n, k):
    num_train, num_test = 300, 200
    d = sparse_parity(n=n, k=k, num_train=num_train, num_test=num_test, seed=3)
    x_tr, y_tr = d["train"]["x"], d["train"]["y"]
    assert x_tr.shape == (num_train, n) and d["test"]["x"].shape == (num_test, n)
    assert x_tr.dtype == np.float32 and y_tr.dtype == np.int32
    for s in ("train", "test"):
        x, y = d[s]["x"], d[s]["y"]
        assert set(np.unique(x).tolist()) <= {0.0, 1.0}
        expected = [int(sum(int(v) for v in row[:k])) % 2 for row in x.tolist()]
        assert y.tolist() == expected
    rows = [tuple(r) for r in np.concatenate([x_tr, d["test"]["x"]]).tolist()]
    assert len(set(rows)) == len(rows)  # all samples distinct, so train/test disjoint
    # both classes present and roughly balanced
    assert 0.3 < y_tr.mean() < 0.7


def test_sparse_parity_defaults_and_seed():
    d = sparse_parity()
    assert d["train"]["x"].shape == (1000, 43) and d["test"]["x"].shape == (1000, 43)
    d2 = sparse_parity()
    d3 = sparse_parity(seed=1)
    np.testing.assert_array_equal(d["train"]["x"], d2["train"]["x"])
    assert not np.array_equal(d["train"]["x"], d3["train"]["x"])
    # noise bits are not constant: the label is not trivially readable
    assert d["train"]["x"][:, 3:].std() > 0.4


def test_sparse_parity_errors():
    with pytest.raises(ValueError, match=r"only 2\*\*4 = 16 bit strings"):
        sparse_parity(n=4, k=2, num_train=10, num_test=10)
    with pytest.raises(ValueError, match=r"1 <= k <= n"):
        sparse_parity(n=4, k=5)
    # exactly all 16 strings is allowed
    d = sparse_parity(n=4, k=2, num_train=10, num_test=6)
    rows = {tuple(r) for r in np.concatenate([d["train"]["x"], d["test"]["x"]]).tolist()}
    assert len(rows) == 16


def _ids_split(n):
    # x encodes the example id so that batches can be traced back to examples.
    return {
        "x": np.arange(n, dtype=np.int32)[:, None] * np.ones((1, 2), np.int32),
        "y": np.arange(n, dtype=np.int32),
    }


def test_grain_batches_deterministic_random_access():
    split = _ids_split(50)
    ds1 = grain_batches(split, 10, seed=4)
    ds2 = grain_batches(split, 10, seed=4)
    for step in (0, 3, 7, 1234):
        b1, b2 = ds1[step], ds2[step]
        assert set(b1) == {"x", "y"}
        assert b1["x"].shape == (10, 2) and b1["y"].shape == (10,)
        np.testing.assert_array_equal(b1["y"], b2["y"])
        np.testing.assert_array_equal(b1["x"][:, 0], b1["y"])  # x and y stay aligned
    # access order does not matter (exact resume at any step)
    late = ds1[1234]["y"].copy()
    _ = [ds1[i] for i in range(5)]
    np.testing.assert_array_equal(ds1[1234]["y"], late)
    other = grain_batches(split, 10, seed=5)
    assert not all(np.array_equal(ds1[i]["y"], other[i]["y"]) for i in range(5))


def test_grain_batches_epochs_are_permutations():
    n, bs = 53, 10  # 5 full batches per epoch, 3 examples dropped per epoch
    ds = grain_batches(_ids_split(n), bs, seed=0, drop_remainder=True)
    epochs = []
    for e in range(3):
        ys = np.concatenate([ds[e * 5 + i]["y"] for i in range(5)])
        assert len(ys) == 50 and len(set(ys.tolist())) == 50  # no repeats within an epoch
        epochs.append(ys)
    assert not np.array_equal(epochs[0], epochs[1])  # reshuffled each epoch

    ds_full = grain_batches(_ids_split(40), 10, seed=2)
    for e in range(3):
        ys = np.concatenate([ds_full[e * 4 + i]["y"] for i in range(4)])
        assert sorted(ys.tolist()) == list(range(40))  # each epoch covers every example

    ds_rem = grain_batches(_ids_split(n), bs, seed=0, drop_remainder=False)
    sizes = [len(ds_rem[i]["y"]) for i in range(6)]
    assert sizes == [10, 10, 10, 10, 10, 3]
    assert sorted(np.concatenate([ds_rem[i]["y"] for i in range(6)]).tolist()) == list(range(n))

    ordered = grain_batches(_ids_split(20), 5, shuffle=False)
    assert ordered[0]["y"].tolist() == [0, 1, 2, 3, 4]
    assert ordered[4]["y"].tolist() == [0, 1, 2, 3, 4]  # epoch 1, unshuffled


@pytest.mark.parametrize("process_count", [2, 4])
def test_grain_batches_process_shards(process_count):
    split = _ids_split(64)
    bs = 16
    glob = grain_batches(split, bs, seed=9)
    shards = [
        grain_batches(split, bs, seed=9, process_index=i, process_count=process_count)
        for i in range(process_count)
    ]
    for step in (0, 1, 5, 17):
        parts = [s[step]["y"] for s in shards]
        assert all(len(p) == bs // process_count for p in parts)
        union = np.concatenate(parts)
        assert len(set(union.tolist())) == bs  # disjoint
        # the processes' shares, in process order, are exactly the global batch
        np.testing.assert_array_equal(union, glob[step]["y"])


def test_grain_batches_errors():
    split = _ids_split(30)
    with pytest.raises(
        ValueError, match=r"global batch_size=10 must be divisible by process_count=3"
    ):
        grain_batches(split, 10, process_index=0, process_count=3)
    with pytest.raises(ValueError, match=r"0 <= process_index < process_count"):
        grain_batches(split, 10, process_index=2, process_count=2)
    with pytest.raises(ValueError, match=r"exceeds the 30 examples"):
        grain_batches(split, 31)
    with pytest.raises(ValueError, match=r"same leading size"):
        grain_batches({"x": np.zeros((3, 2)), "y": np.zeros(4)}, 2)
    with pytest.raises(ValueError, match=r"last batch of each epoch has 5 examples"):
        grain_batches(_ids_split(25), 10, drop_remainder=False, process_count=2)

"""Algorithmic (grokking) datasets: modular arithmetic and sparse parity.

The data of "Grokking at the Edge of Numerical Stability" (Prieto, Barsbey, Mediano, Birdal,
ICLR 2025; reference code ``LucasPrietoAl/grokking-at-the-edge-of-numerical-stability``, files
``datasets.py``, ``binary_operations.py`` and ``utils.py``), plain numpy and fully determined by
an integer ``seed``. Modular arithmetic uses all ``p * p`` ordered pairs ``(a, b)``, ``a`` the
outer loop, labelled ``(a op b) mod p`` (the non-negative modulo), as the reference's
``AlgorithmicDataset``; the train split is the first ``int(train_fraction * p * p)`` items of a
``np.random.default_rng(seed)`` permutation (deviation: not bit for bit the reference's
``torch.utils.data.random_split`` stream). Sparse parity follows ``SparseParityDataset``: bits
in ``{0, 1}``, the label the parity of the *first* ``k`` bits, all samples (train and test)
distinct bit strings. Choices and their sources: docs/grokking_defaults.md, "Choices made in
``jaxsafe``".
"""

from __future__ import annotations

from typing import Callable, Mapping

import numpy as np

__all__ = [
    "MODULAR_OPS",
    "grain_batches",
    "modular_arithmetic",
    "one_hot_operands",
    "sparse_parity",
]

Split = dict  # {'x': np.ndarray, 'y': np.ndarray}

#: Binary operations supported by :func:`modular_arithmetic` (label before ``% p``).
MODULAR_OPS: Mapping[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "add": lambda a, b: a + b,
    "product": lambda a, b: a * b,
    "subtract": lambda a, b: a - b,
}


def _split_sizes(total: int, train_fraction: float) -> tuple[int, int]:
    if not isinstance(train_fraction, (int, float)) or not 0.0 < train_fraction < 1.0:
        raise ValueError(
            f"train_fraction must be in the open interval (0, 1), got {train_fraction!r}."
        )
    n_train = int(train_fraction * total)  # floor, as the reference split_dataset
    n_test = total - n_train
    if n_train < 1 or n_test < 1:
        raise ValueError(
            f"train_fraction={train_fraction} of {total} examples leaves an empty split "
            f"(train={n_train}, test={n_test})."
        )
    return n_train, n_test


def modular_arithmetic(
    p: int = 113,
    op: str = "add",
    train_fraction: float = 0.4,
    seed: int = 0,
    first_operand: int = 0,
) -> dict[str, Split]:
    """All equations ``a op b = c (mod p)`` with ``a, b`` in ``first_operand .. p-1``, shuffled
    and split.

    Args:
      p: Modulus (the paper uses 113). Must be ``>= 2``.
      op: One of ``'add'``, ``'product'``, ``'subtract'``.
      train_fraction: Fraction of the pairs used for training, in ``(0, 1)``. The
        train split has ``int(train_fraction * number of pairs)`` examples.
        The paper's main runs use 0.4 (reference ``run_main_experiments.sh``;
        the reference argparse default is 0.3).
      seed: Seed of the ``numpy`` permutation used for the split.
      first_operand: 0 (all ``p*p`` pairs, the reference's ``AlgorithmicDataset`` for the MLP)
        or 1 (the ``(p-1)^2`` pairs of ``1 .. p-1``, its ``AlgorithmicDatasetTransformer``).

    Returns:
      ``{'train': {'x', 'y'}, 'test': {'x', 'y'}}`` where ``x`` is an ``int32``
      array ``(M, 2)`` of operands ``(a, b)`` and ``y`` an ``int32`` array ``(M,)``
      of labels in ``[0, p)``. Train and test are disjoint and together hold every
      pair exactly once.
    """
    if op not in MODULAR_OPS:
        raise ValueError(f"Unknown op {op!r}; valid ops are: {', '.join(sorted(MODULAR_OPS))}.")
    if isinstance(p, bool) or not isinstance(p, (int, np.integer)) or p < 2:
        raise ValueError(f"p must be an integer >= 2, got {p!r}.")
    p = int(p)
    if first_operand not in (0, 1):
        raise ValueError(f"first_operand must be 0 or 1, got {first_operand!r}.")
    n = p - first_operand
    total = n * n
    n_train, _ = _split_sizes(total, train_fraction)

    # a is the outer loop, b the inner one (index = a * n + b), as in the reference.
    a, b = np.divmod(np.arange(total, dtype=np.int64), n)
    a, b = a + first_operand, b + first_operand
    y = np.mod(MODULAR_OPS[op](a, b), p)  # np.mod is non-negative for p > 0
    x = np.stack([a, b], axis=1).astype(np.int32)
    y = y.astype(np.int32)

    perm = np.random.default_rng(seed).permutation(total)
    tr, te = perm[:n_train], perm[n_train:]
    return {
        "train": {"x": x[tr], "y": y[tr]},
        "test": {"x": x[te], "y": y[te]},
    }


def one_hot_operands(x: np.ndarray, p: int, dtype=np.float32) -> np.ndarray:
    """Concatenated one-hot encodings ``[onehot(a), onehot(b)]``, shape ``(M, 2p)``.

    This is the MLP input of the paper / reference ``AlgorithmicDataset``
    (``one_hot=True``). Column ``a`` is hot in the first half, column ``p + b``
    in the second half.
    """
    x = np.asarray(x)
    if x.ndim != 2 or x.shape[1] != 2:
        raise ValueError(f"x must have shape (M, 2), got {x.shape}.")
    if not np.issubdtype(x.dtype, np.integer):
        raise ValueError(f"x must hold integer operands, got dtype {x.dtype}.")
    if x.size and (x.min() < 0 or x.max() >= p):
        raise ValueError(f"operands must lie in [0, {p}), got range [{x.min()}, {x.max()}].")
    out = np.zeros((x.shape[0], 2 * p), dtype=dtype)
    rows = np.arange(x.shape[0])
    out[rows, x[:, 0]] = 1
    out[rows, p + x[:, 1]] = 1
    return out


def _unique_bit_rows(n: int, m: int, rng: np.random.Generator) -> np.ndarray:
    """``m`` distinct rows of ``n`` uniform random bits, in random order."""
    if n <= 24:
        # Small space: sample integer codes without replacement, then decode.
        codes = rng.choice(2**n, size=m, replace=False)
        shifts = np.arange(n - 1, -1, -1)
        return ((codes[:, None] >> shifts) & 1).astype(np.uint8)
    # Large space: rejection of duplicates (collisions are rare, m << 2**n).
    rows = np.empty((0, n), dtype=np.uint8)
    while rows.shape[0] < m:
        need = m - rows.shape[0]
        cand = rng.integers(0, 2, size=(need + need // 8 + 8, n), dtype=np.uint8)
        allr = np.concatenate([rows, cand], axis=0)
        _, first = np.unique(allr, axis=0, return_index=True)
        rows = allr[np.sort(first)]  # keep first occurrences, original order
    return rows[:m]


def sparse_parity(
    n: int = 43,
    k: int = 3,
    num_train: int = 1000,
    num_test: int = 1000,
    seed: int = 0,
) -> dict[str, Split]:
    """Sparse parity: label is the parity of the first ``k`` of ``n`` random bits.

    Defaults follow the paper's sparse-parity run (reference
    ``run_main_experiments.sh``, Figure 4: ``--num_parity_features 3
    --num_noise_features 40 --num_samples 2000 --train_fraction 0.5``), i.e.
    ``n = 3 + 40 = 43`` bits, ``k = 3``, 1000 train and 1000 test samples.

    Bits are in ``{0, 1}`` (reference ``unique_random_combinations`` with
    ``domain = [0, 1]``); the parity bits are the *first* ``k`` columns, the
    remaining ``n - k`` are noise. All ``num_train + num_test`` bit strings are
    distinct, so train and test never share an input.

    Returns:
      ``{'train': {'x', 'y'}, 'test': {'x', 'y'}}`` with ``x`` ``float32``
      ``(M, n)`` in ``{0., 1.}`` (the MLP consumes floats) and ``y`` ``int32``
      ``(M,)`` in ``{0, 1}``.
    """
    if n < 1 or not 1 <= k <= n:
        raise ValueError(f"need n >= 1 and 1 <= k <= n, got n={n}, k={k}.")
    if num_train < 1 or num_test < 1:
        raise ValueError(f"num_train and num_test must be >= 1, got {num_train}, {num_test}.")
    m = num_train + num_test
    if n < 63 and m > 2**n:
        raise ValueError(
            f"num_train + num_test = {m} distinct samples requested but only 2**{n} = "
            f"{2**n} bit strings exist."
        )
    rng = np.random.default_rng(seed)
    bits = _unique_bit_rows(n, m, rng)
    y = (bits[:, :k].sum(axis=1) % 2).astype(np.int32)
    x = bits.astype(np.float32)
    return {
        "train": {"x": x[:num_train], "y": y[:num_train]},
        "test": {"x": x[num_train:], "y": y[num_train:]},
    }


def grain_batches(
    split: Mapping[str, np.ndarray],
    batch_size: int,
    seed: int = 0,
    shuffle: bool = True,
    drop_remainder: bool = True,
    *,
    process_index: int = 0,
    process_count: int = 1,
):
    """Infinite, random-access ``grain.MapDataset`` of training batches.

    ``ds[step]`` is the batch for training step ``step`` (a dict with the same
    keys as ``split``), so resuming at step ``s`` is exact: no iterator state
    needs checkpointing. Epoch ``e`` is a fresh permutation of the examples
    (grain's ``shuffle`` folds the epoch into the seed) and batches never cross
    an epoch boundary; with ``drop_remainder=True`` the last ``M % batch_size``
    examples of each epoch's permutation are skipped.

    Multi-host: ``batch_size`` is the *global* batch size. Every process builds
    the same global batch of example indices and keeps the contiguous block
    ``[process_index * b, (process_index + 1) * b)`` with
    ``b = batch_size // process_count``, so the processes' shares are disjoint
    and together form the global batch.

    Pipeline: ``MapDataset.source(range(M)) -> .shuffle(seed) -> .batch(batch_size)
    -> .map(take this process's slice and gather the arrays) -> .repeat()``.
    For full-batch training (the paper) pass ``batch_size=M``.
    """
    import grain  # local import: the rest of this module is numpy-only

    keys = list(split)
    if not keys:
        raise ValueError("split must contain at least one array.")
    arrays = {k: np.asarray(v) for k, v in split.items()}
    num = arrays[keys[0]].shape[0]
    for k, v in arrays.items():
        if v.shape[0] != num:
            raise ValueError(
                f"all arrays need the same leading size; {k!r} has {v.shape[0]} != {num}."
            )
    if num < 1:
        raise ValueError("split is empty.")
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
    if batch_size > num and drop_remainder:
        raise ValueError(
            f"batch_size={batch_size} exceeds the {num} examples and drop_remainder=True "
            "would yield no batch."
        )
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(
            f"need process_count >= 1 and 0 <= process_index < process_count, got "
            f"process_index={process_index}, process_count={process_count}."
        )
    if batch_size % process_count:
        raise ValueError(
            f"global batch_size={batch_size} must be divisible by process_count="
            f"{process_count} (each process loads batch_size // process_count examples)."
        )
    remainder = num % batch_size
    if not drop_remainder and remainder and remainder % process_count:
        raise ValueError(
            f"with drop_remainder=False the last batch of each epoch has {remainder} "
            f"examples, which is not divisible by process_count={process_count}; use "
            "drop_remainder=True or another batch_size."
        )
    if not 0 <= seed < 2**32:
        raise ValueError(f"seed must be in [0, 2**32), got {seed}.")

    ds = grain.MapDataset.source(range(num))
    if shuffle:
        ds = ds.shuffle(seed=int(seed))
    ds = ds.batch(int(batch_size), drop_remainder=drop_remainder)

    def take(global_idx: np.ndarray) -> dict[str, np.ndarray]:
        idx = np.asarray(global_idx, dtype=np.int64)
        local = idx.shape[0] // process_count
        idx = idx[process_index * local : (process_index + 1) * local]
        return {k: v[idx] for k, v in arrays.items()}

    return ds.map(take).repeat()

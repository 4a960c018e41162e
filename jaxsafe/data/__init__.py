"""Datasets and input pipelines."""

from jaxsafe.data.algorithmic import (
    MODULAR_OPS,
    grain_batches,
    modular_arithmetic,
    one_hot_operands,
    sparse_parity,
)

__all__ = [
    "MODULAR_OPS",
    "grain_batches",
    "modular_arithmetic",
    "one_hot_operands",
    "sparse_parity",
]

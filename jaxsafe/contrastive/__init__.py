"""Contrastive learning for time series: per-pair NT-Xent, Dynamic Bad Pair Mining (DBPM) and
the weak/strong augmentations of DBPM's SimCLR baseline (Lan et al., ICLR 2024)."""

from jaxsafe.contrastive import augment, dbpm
from jaxsafe.contrastive.dbpm import (
    DBPMConfig,
    flags,
    gaussian_weight,
    init_memory,
    pair_weights,
    record,
    reweight,
    statistics,
)
from jaxsafe.contrastive.ntxent import l2_normalize, ntxent_per_pair, ntxent_per_pair_sharded

__all__ = [
    "DBPMConfig",
    "augment",
    "dbpm",
    "flags",
    "gaussian_weight",
    "init_memory",
    "l2_normalize",
    "ntxent_per_pair",
    "ntxent_per_pair_sharded",
    "pair_weights",
    "record",
    "reweight",
    "statistics",
]

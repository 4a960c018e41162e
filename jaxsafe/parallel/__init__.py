"""Meshes, sharding rules, multi-host start-up and batch feeding. No `pmap` anywhere."""

from jaxsafe.parallel.distributed import initialize, is_primary
from jaxsafe.parallel.mesh import BATCH_AXES, make_mesh
from jaxsafe.parallel.sharding import (
    batch_sharding,
    batch_shards,
    fetch,
    fsdp_spec,
    global_batch,
    replicated,
    rules_from_config,
    shardings_for,
    tile_to_shards,
)

__all__ = [
    "BATCH_AXES",
    "batch_sharding",
    "batch_shards",
    "fetch",
    "fsdp_spec",
    "global_batch",
    "initialize",
    "is_primary",
    "make_mesh",
    "replicated",
    "rules_from_config",
    "shardings_for",
    "tile_to_shards",
]

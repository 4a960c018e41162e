"""Sharding rules for parameters/optimizer state and for batches.

Rules follow big_vision: an ordered list of `(regex, spec)` matched against each leaf's path
('layers/0/kernel'); the first match wins. `spec` is a `PartitionSpec`, `"replicate"` or
`"fsdp"` (split the largest dimension divisible by the `fsdp` axis size). Leaves matching no
rule use `"fsdp"`; leaves smaller than `min_size` elements are replicated, because sharding a
bias only adds communication.
"""

import math
import re
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxsafe.parallel.mesh import BATCH_AXES, FSDP
from jaxsafe.treepath import path_name

Rule = tuple[str, Any]


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def fsdp_spec(shape: Sequence[int], fsdp_size: int, min_size: int = 2**10) -> P:
    """Splits the largest dimension that the fsdp axis divides; replicates otherwise."""
    if fsdp_size == 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
        return P()
    for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
        if shape[dim] % fsdp_size == 0:
            spec = [None] * len(shape)
            spec[dim] = FSDP
            return P(*spec)
    return P()


def shardings_for(tree: Any, mesh: Mesh, rules: Sequence[Rule] = (), min_size: int = 2**10) -> Any:
    """A `NamedSharding` per leaf of `tree` (arrays or `ShapeDtypeStruct`s)."""
    fsdp_size = mesh.shape[FSDP]

    def one(path, leaf):
        shape = np.shape(leaf)
        name = path_name(path)
        spec = "fsdp"
        for pattern, rule_spec in rules:
            if re.search(pattern, name):
                spec = rule_spec
                break
        if spec == "fsdp":
            spec = fsdp_spec(shape, fsdp_size, min_size)
        elif spec == "replicate":
            spec = P()
        elif not isinstance(spec, P):
            raise ValueError(
                f"sharding rule for {name!r}: expected PartitionSpec, 'fsdp' or "
                f"'replicate', got {spec!r}"
            )
        return NamedSharding(mesh, spec)

    return jax.tree_util.tree_map_with_path(one, tree)


def rules_from_config(rules, axis_names) -> list[Rule]:
    """``config.sharding_rules`` as ``jaxsafe.parallel.shardings_for`` rules: each ``(regex,
    spec)`` with ``spec`` a tuple/list with one entry per dimension (``None``, a mesh axis name,
    or a tuple of axis names), ``None`` or ``()`` (replicated), ``"replicate"``, ``"fsdp"`` or a
    ``PartitionSpec``. A malformed rule (not a pair, a regex that does not compile, an axis name
    not in ``axis_names``) raises a ``ValueError`` naming it."""
    out = []
    for rule in rules or ():
        where = f"config.sharding_rules: rule {rule!r}"
        if not isinstance(rule, (tuple, list)) or len(rule) != 2:
            raise ValueError(f"{where} is not a (regex, spec) pair")
        pattern, spec = rule
        if not isinstance(pattern, str):
            raise ValueError(f"{where}: the regex must be a string, got {pattern!r}")
        try:
            re.compile(pattern)
        except re.error as e:
            raise ValueError(f"{where}: bad regex {pattern!r} ({e})") from None
        if spec in ("replicate", "fsdp") or isinstance(spec, P):
            out.append((pattern, spec))
            continue
        if spec is None:
            spec = ()
        if not isinstance(spec, (tuple, list)):
            raise ValueError(
                f"{where}: spec {spec!r}; expected a tuple of mesh axis names or None per "
                "dimension, 'replicate' or 'fsdp'"
            )
        for entry in spec:
            names = entry if isinstance(entry, (tuple, list)) else (entry,)
            bad = [a for a in names if a is not None and a not in axis_names]
            if bad or (isinstance(entry, (tuple, list)) and None in entry):
                raise ValueError(
                    f"{where}: axis {entry!r} is not one of the mesh's axes "
                    f"{tuple(axis_names)} (or None)"
                )
        out.append((pattern, P(*(tuple(e) if isinstance(e, list) else e for e in spec))))
    return out


def batch_sharding(mesh: Mesh, leading: int = 0) -> NamedSharding:
    """Batch axis split over (data, fsdp); `leading` unsplit axes before it (e.g. scan steps)."""
    return NamedSharding(mesh, P(*([None] * leading), BATCH_AXES))


def batch_shards(mesh: Mesh) -> int:
    """How many pieces the batch axis is split into: the product of the batch axes' sizes."""
    n = 1
    for a in BATCH_AXES:
        n *= mesh.shape[a]
    return n


def tile_to_shards(tree: Any, shards: int) -> Any:
    """Each leaf's rows (axis 0) repeated whole, the fewest times that makes their count divide
    ``shards`` (a one-row batch becomes ``shards`` rows). Whole copies keep a uniform draw over the
    rows uniform, and a mean over the rows unchanged; all leaves must have the same row count."""
    leaves = jax.tree.leaves(tree)
    counts = {np.shape(x)[0] for x in leaves}
    if len(counts) > 1:
        raise ValueError(f"tile_to_shards: leaves have different row counts {sorted(counts)}")
    if not leaves:
        return tree
    reps = shards // math.gcd(counts.pop(), shards)
    return jax.tree.map(lambda x: np.concatenate([np.asarray(x)] * reps), tree)


def global_batch(local_batch: Any, mesh: Mesh, leading: int = 0) -> Any:
    """Assembles each process's part of the batch into one global `jax.Array`.

    The batch axis (after `leading` axes) of every leaf holds this process's examples; the global
    batch is their concatenation in process order.
    """
    sharding = batch_sharding(mesh, leading)
    n_batch_shards = batch_shards(mesh)
    local_shards = n_batch_shards // jax.process_count()

    def one(path, x):
        x = np.asarray(x)
        if x.ndim <= leading or x.shape[leading] % local_shards:
            raise ValueError(
                f"batch leaf {path_name(path)!r} has shape {x.shape}: axis {leading} must exist "
                f"and divide by the {local_shards} batch shards on this process"
            )
        return jax.make_array_from_process_local_data(sharding, x)

    return jax.tree_util.tree_map_with_path(one, local_batch)


def fetch(tree: Any) -> Any:
    """Host numpy copies of replicated (or fully addressable) arrays, on every process."""

    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            if not x.sharding.is_fully_replicated:
                raise ValueError(f"fetch needs a replicated array, got sharding {x.sharding}")
            return np.asarray(x.addressable_data(0))
        return np.asarray(x)

    return jax.tree.map(one, tree)

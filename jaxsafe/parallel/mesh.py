"""Device mesh with a `data` axis (pure data parallelism) and an `fsdp` axis.

The batch is split over both axes; parameters and optimizer state are split over `fsdp` only
(ZeRO-3 style), so `data=N, fsdp=1` is plain data parallelism and `data=1, fsdp=N` is full FSDP.
"""

from collections.abc import Sequence

import jax
from jax.sharding import AxisType, Mesh

DATA, FSDP = "data", "fsdp"
BATCH_AXES = (DATA, FSDP)


def make_mesh(data: int = -1, fsdp: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Builds a `(data, fsdp)` mesh over all (global) devices.

    One of `data`, `fsdp` may be -1, meaning "all remaining devices".
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    for name, size in (("data", data), ("fsdp", fsdp)):
        if size != -1 and size < 1:
            raise ValueError(
                f"mesh: {name}={size}; sizes must be positive or -1 (all remaining devices)"
            )
    if data == -1 and fsdp == -1:
        raise ValueError("mesh: only one of data, fsdp may be -1")
    if data == -1:
        if n % fsdp:
            raise ValueError(f"mesh: fsdp={fsdp} does not divide the {n} devices")
        data = n // fsdp
    if fsdp == -1:
        if n % data:
            raise ValueError(f"mesh: data={data} does not divide the {n} devices")
        fsdp = n // data
    if data * fsdp != n:
        raise ValueError(
            f"mesh: data*fsdp = {data}*{fsdp} = {data * fsdp}, but there are {n} devices"
        )
    return jax.make_mesh((data, fsdp), BATCH_AXES, axis_types=(AxisType.Auto,) * 2, devices=devices)

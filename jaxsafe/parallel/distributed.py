"""Multi-host start-up.

On TPU pods and SLURM clusters `jax.distributed.initialize()` finds the coordinator itself; on
plain machines (and in our two-process localhost tests) pass the address, process count and id.
CPU processes exchange collectives through gloo.
"""

import jax


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
    """Calls `jax.distributed.initialize` once; must run before any other JAX call."""
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)


def is_primary() -> bool:
    """True on the process that writes logs, metrics and plots."""
    return jax.process_index() == 0

r"""Trains any experiment: the config names it.

    python -m launch.train --config=configs/grokking/perp_adamw.py:smoke --workdir=/tmp/run \
        [--config.train.num_steps=2000]

Rerunning with the same workdir resumes from its latest checkpoint. Multi-host: pass
--distributed (TPU pods / SLURM, where JAX finds the coordinator) or the coordinator flags.
"""

import json
import os

from absl import app, flags, logging
from ml_collections import config_flags

from jaxsafe import compilation_cache as cache
from jaxsafe import host_memory
from launch import user_errors

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file.", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and plots.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed",
    os.environ.get("JAXSAFE_DISTRIBUTED", "") == "1",
    "Call jax.distributed.initialize() (automatic on TPU pods and SLURM).",
)
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
_HEARTBEAT = flags.DEFINE_integer(
    "heartbeat_timeout",
    100,
    "Multi-process: seconds without a heartbeat after which JAX "
    "considers a process dead; the survivors stop with one line after a quarter of it.",
)
cache.define_flag()
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    from jaxsafe.train.metrics import quiet_orbax

    quiet_orbax()
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    host_memory.retain()  # XLA's temporaries stay mapped between calls (before any thread)
    if _DISTRIBUTED.value or _COORDINATOR.value:
        from jaxsafe.parallel import initialize

        initialize(
            _COORDINATOR.value,
            _NUM_PROCESSES.value,
            _PROCESS_ID.value,
            heartbeat_timeout_s=_HEARTBEAT.value,
            prog="train",
        )
    import jax

    from experiments import run_experiment
    from jaxsafe.parallel import is_primary

    cache.enable_from_flag()

    logging.info(
        "process %d/%d, %d local / %d global devices",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )
    summary = run_experiment(_CONFIG.value, _WORKDIR.value)
    if is_primary() and summary:
        logging.info("final: %s", json.dumps(summary, sort_keys=True, default=float))


if __name__ == "__main__":
    user_errors.run(main)

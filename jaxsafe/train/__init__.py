"""The generic training loop, its state, checkpoints and metrics."""

from jaxsafe.train.checkpoint import (
    CheckpointCorruptError,
    Checkpointer,
    CheckpointMismatchError,
    fingerprint,
    load_arrays,
)
from jaxsafe.train.loop import (
    NonFiniteError,
    compile_train_step,
    lower_train_step,
    place_state,
    run,
)
from jaxsafe.train.metrics import MetricWriter, read_jsonl
from jaxsafe.train.state import TrainState, ema_after_update, init_state, split_model
from jaxsafe.train.task import Task, default_step

__all__ = [
    "CheckpointCorruptError",
    "CheckpointMismatchError",
    "Checkpointer",
    "MetricWriter",
    "NonFiniteError",
    "Task",
    "TrainState",
    "compile_train_step",
    "lower_train_step",
    "default_step",
    "ema_after_update",
    "fingerprint",
    "init_state",
    "load_arrays",
    "place_state",
    "read_jsonl",
    "run",
    "split_model",
]

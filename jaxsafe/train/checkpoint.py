"""Orbax checkpoints of the whole `TrainState`.

Orbax writes each step into a temporary directory and renames it when complete, so a run killed
mid-save leaves the previous checkpoint as the latest one; the partial directory is ignored and
cleaned up on the next start.
"""

import os

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxsafe.treepath import path_name


class CheckpointMismatchError(ValueError):
    """The checkpoint on disk does not fit the state the experiment built."""


class Checkpointer:
    def __init__(self, directory: str, keep: int = 3, save_every: int = 1000, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        self.save_every = save_every
        self._mgr = ocp.CheckpointManager(
            self.directory,
            item_handlers=ocp.StandardCheckpointHandler(),
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep,
                save_interval_steps=1,  # we decide when to save
                create=True,
                cleanup_tmp_directories=True,
                enable_async_checkpointing=async_save,
            ),
        )

    def latest_step(self) -> int | None:
        return self._mgr.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._mgr.all_steps())

    def save(self, step: int, state, force: bool = False) -> bool:
        if not force and (step % self.save_every):
            return False
        if step in self._mgr.all_steps():
            return False
        return self._mgr.save(step, args=ocp.args.StandardSave(state), force=True)

    def restore(self, state_like, step: int | None = None):
        """Restores into the structure, shapes, dtypes and shardings of `state_like`."""
        step = self._mgr.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        self._check_matches(step, state_like)
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=getattr(x, "sharding", None)),
            state_like)
        return self._mgr.restore(step, args=ocp.args.StandardRestore(abstract))

    def _check_matches(self, step: int, state_like) -> None:
        meta = self._mgr.item_metadata(step)
        meta = getattr(meta, "tree", meta)
        on_disk = {path_name(p): tuple(m.shape) for p, m in
                   jax.tree_util.tree_flatten_with_path(meta, is_leaf=lambda m: hasattr(m, "shape"))[0]}
        wanted = {path_name(p): tuple(np.shape(x)) for p, x in
                  jax.tree_util.tree_flatten_with_path(state_like)[0]}
        where = f"checkpoint {self.directory}/{step}"
        missing = sorted(set(wanted) - set(on_disk))
        unexpected = sorted(set(on_disk) - set(wanted))
        if missing:
            raise CheckpointMismatchError(f"{where} lacks {len(missing)} tensors the model has, "
                                          f"e.g. {missing[:3]}")
        if unexpected:
            raise CheckpointMismatchError(f"{where} has {len(unexpected)} tensors the model lacks, "
                                          f"e.g. {unexpected[:3]}")
        for name, shape in wanted.items():
            if on_disk[name] != shape:
                raise CheckpointMismatchError(
                    f"{where}: tensor {name!r} has shape {on_disk[name]} on disk but {shape} in the model")

    def wait(self) -> None:
        self._mgr.wait_until_finished()

    def close(self) -> None:
        self._mgr.wait_until_finished()
        self._mgr.close()


def load_arrays(directory: str, step: int | None = None):
    """The raw state tree of a checkpoint, on this process's first device, whatever topology
    wrote it (for inspection, sampling and tests; `Checkpointer.restore` is for resuming)."""
    mgr = Checkpointer(directory, async_save=False)
    try:
        step = mgr.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {mgr.directory}")
        meta = mgr._mgr.item_metadata(step)
        meta = getattr(meta, "tree", meta)
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), meta,
                              is_leaf=lambda m: hasattr(m, "shape"))
        return step, mgr._mgr.restore(step, args=ocp.args.StandardRestore(target))
    finally:
        mgr.close()

"""Orbax checkpoints of the whole `TrainState`, verified on restore.

Each step directory holds two orbax items, committed together by orbax's atomic rename (a run
killed mid-save leaves the previous checkpoint as the latest; the partial directory is removed on
the next start):

* ``state``: the `TrainState` arrays;
* ``manifest``: JSON with the step, every array's name, shape and dtype, one uint32
  :func:`fingerprint` per array, and a CRC-32 of all of it. The fingerprints are one jitted
  pass over each array on its devices; the host waits only for those passes (orbax's own
  device-to-host copy waits for the same state), never for the write (cost measured in
  docs/reliability.md by ``benchmarks/checkpoint_integrity.py``).

Restore reads the manifest, checks it against the state the experiment built (a different model
is a `CheckpointMismatchError`: a user error, nothing is moved), restores, and recomputes the
fingerprints. A step that cannot be read, lacks its commit marker, or does not match its
checksums is reported with its step and its first bad array, renamed ``<step>.corrupt``
(nothing is deleted), and the newest intact step is restored instead; with none intact,
`CheckpointCorruptError`. ``verify=False`` skips the fingerprints, on save and on restore.
"""

import json
import os
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax import lax

from jaxsafe.treepath import named_leaves, path_name

_COMMIT_MARKER = "commit_success.txt"  # orbax writes it inside the step before the rename


class CheckpointMismatchError(ValueError):
    """The checkpoint on disk does not fit the state the experiment built."""


class CheckpointCorruptError(ValueError):
    """No intact checkpoint: every step is unreadable or fails its checksums."""


class _Damaged(Exception):
    """One step is unreadable or fails its checksums (the message says which array)."""


def _words(x) -> jax.Array:
    """The bits of `x` as uint32 words (8-byte values give a trailing axis of 2)."""
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    size = x.dtype.itemsize
    if size in (4, 8):
        return lax.bitcast_convert_type(x, jnp.uint32)
    return lax.bitcast_convert_type(x, {1: jnp.uint8, 2: jnp.uint16}[size]).astype(jnp.uint32)


def _fmix32(h):
    """MurmurHash3's finaliser: a bijection of uint32 that spreads every input bit."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


@jax.jit
def _fingerprint_one(x) -> jax.Array:
    w = _words(x)
    index = jnp.zeros(w.shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(w.ndim)):  # the row-major position, without a reshape
        index = index + lax.broadcasted_iota(jnp.uint32, w.shape, axis) * jnp.uint32(stride)
        stride = stride * w.shape[axis] % 2**32
    return jnp.sum(_fmix32(w ^ (index * jnp.uint32(0x9E3779B9))), dtype=jnp.uint32)


def fingerprint(tree) -> np.ndarray:
    """One uint32 per leaf of `tree`, in `jax.tree.leaves` order:

        f(x) = Σ_i fmix32(w_i ⊕ 0x9E3779B9·i)  (mod 2³²)

    over the array's bits as uint32 words `w_i` in row-major order. fmix32 is a bijection, so
    changing any one word always changes `f`, and a word moved to another position does too;
    two or more changes go unnoticed with probability about 2⁻³². Sharded arrays reduce in
    place (no gather). One small program per distinct shape, dtype and sharding, not one
    program for the whole tree: a model's state has a few dozen distinct shapes among hundreds
    of arrays, and the whole-tree program took seconds to compile (docs/reliability.md)."""
    leaves = jax.tree.leaves(tree) or [jnp.zeros((), jnp.uint32)]
    return np.asarray(jax.device_get([_fingerprint_one(x) for x in leaves]), np.uint32)


def _manifest(state, step: int, checksums: list | None) -> dict:
    flat = jax.tree_util.tree_flatten_with_path(state)[0]
    arrays = [[path_name(p), list(np.shape(x)), str(x.dtype)] for p, x in flat]
    body = {"step": int(step), "arrays": arrays, "checksums": checksums}
    return {**body, "crc32": zlib.crc32(json.dumps(body, sort_keys=True).encode())}


def _check_manifest(manifest) -> dict:
    body = {k: manifest.get(k) for k in ("step", "arrays", "checksums")}
    if manifest.get("crc32") != zlib.crc32(json.dumps(body, sort_keys=True).encode()):
        raise _Damaged("has a manifest that fails its CRC-32")
    return body


def _first_line(e: Exception) -> str:
    text = str(e).split(" See full TensorStore details")[0].strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


# The types orbax's default registry handles besides jax.Array (whose handler is replaced below).
_OTHER_TYPES = (int, float, bytes, np.number, np.ndarray, str, type(ocp.PLACEHOLDER))


class _StateHandler(ocp.StandardCheckpointHandler):
    """Orbax's standard handler, with replica-parallel writes only when there are several
    processes.

    Orbax splits a replicated array between its replicas so that each host writes a share. In
    one process every replica is on the same host, so the split only adds an eager slice per
    replica and array (docs/reliability.md). This class's constructor takes no type handlers,
    so the handler it wraps is rebuilt with a registry of orbax's own handlers but this one for
    jax.Array."""

    def __init__(self):
        super().__init__()
        handlers = [(t, ocp.type_handlers.get_type_handler(t)) for t in _OTHER_TYPES]
        arrays = ocp.type_handlers.ArrayHandler(use_replica_parallel=jax.process_count() > 1)
        registry = ocp.type_handlers.create_type_handler_registry(*handlers, (jax.Array, arrays))
        # The rest as StandardCheckpointHandler's defaults.
        self._impl = ocp.PyTreeCheckpointHandler(
            save_concurrent_gb=96,
            restore_concurrent_gb=96,
            use_ocdbt=True,
            type_handler_registry=registry,
        )


def _handlers():
    """The two items' handlers, registered for the arguments the checkpointer passes."""
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    state, manifest = _StateHandler(), ocp.JsonCheckpointHandler()
    for args in (ocp.args.StandardSave, ocp.args.StandardRestore):
        registry.add("state", args, state)
    for args in (ocp.args.JsonSave, ocp.args.JsonRestore):
        registry.add("manifest", args, manifest)
    return registry


class Checkpointer:
    """Saves and restores `TrainState`s under ``directory/<step>`` (see module docstring)."""

    def __init__(
        self,
        directory: str,
        keep: int = 3,
        save_every: int = 1000,
        async_save: bool = True,
        verify: bool = True,
    ):
        self.directory = os.path.abspath(directory)
        self.save_every = save_every
        self.verify = verify
        self._mgr = ocp.CheckpointManager(
            self.directory,
            handler_registry=_handlers(),
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
        return sorted(self._mgr.all_steps())

    def save(self, step: int, state, force: bool = False) -> bool:
        if not force and (step % self.save_every):
            return False
        if step in self._mgr.all_steps():
            return False
        checksums = np.asarray(fingerprint(state)).tolist() if self.verify else None
        return self._mgr.save(
            step,
            force=True,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                manifest=ocp.args.JsonSave(_manifest(state, step, checksums)),
            ),
        )

    def restore(self, state_like, step: int | None = None):
        """Restores into the structure, shapes, dtypes and shardings of `state_like`.

        Without `step`, the newest intact step: damaged ones are moved aside with a warning."""
        if step is not None:
            try:
                return self._restore(step, _abstract(state_like))
            except _Damaged as e:
                raise CheckpointCorruptError(f"checkpoint {self.directory}/{step} {e}") from None
        return self._newest_intact(_abstract(state_like), move_aside=True)[1]

    def restore_raw(self, step: int | None = None):
        """`(step, tree)`: the state as saved, on this process's first device, whatever topology
        wrote it (for inspection and sampling). Without `step`, the newest intact one; nothing
        is moved (a reader must not rename a running trainer's files)."""
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

        def target(step, arrays):
            leaves = [
                jax.ShapeDtypeStruct(tuple(s), jnp.dtype(d), sharding=device) for _, s, d in arrays
            ]
            return _tree_like(self._mgr.item_metadata(step).state, arrays, leaves)

        if step is not None:
            try:
                return step, self._restore(step, target)
            except _Damaged as e:
                raise CheckpointCorruptError(f"checkpoint {self.directory}/{step} {e}") from None
        return self._newest_intact(target, move_aside=False)

    def _newest_intact(self, target, move_aside: bool):
        problems = []
        for step in sorted(self._mgr.all_steps(), reverse=True):
            try:
                restored = self._restore(step, target)
            except _Damaged as e:
                where = f"{self.directory}/{step}"
                aside = self._move_aside(step) if move_aside else None
                problems.append(f"step {step} {e}" + (f" (moved to {aside})" if aside else ""))
                logging.warning(
                    "checkpoint %s %s; %s",
                    where,
                    e,
                    f"moved to {aside}, trying the previous one"
                    if aside
                    else "trying the previous one",
                )
                continue
            if problems:
                logging.warning(
                    "restored checkpoint step %d instead of the damaged newer one(s)", step
                )
            return step, restored
        if problems:
            rerun = "; a rerun starts from step 0" if move_aside else ""
            raise CheckpointCorruptError(
                f"no intact checkpoint in {self.directory}: " + "; ".join(problems) + rerun
            )
        raise FileNotFoundError(f"no checkpoint in {self.directory}")

    def _read_manifest(self, step: int) -> dict:
        path = os.path.join(self.directory, str(step))
        if not os.path.exists(os.path.join(path, _COMMIT_MARKER)):
            raise _Damaged(f"lacks its commit marker {_COMMIT_MARKER}")
        try:
            manifest = self._mgr.restore(
                step, args=ocp.args.Composite(manifest=ocp.args.JsonRestore())
            ).manifest
        except Exception as e:  # orbax/tensorstore raise many types for a damaged file
            raise _Damaged(f"has an unreadable manifest ({_first_line(e)})") from None
        if not isinstance(manifest, dict):
            raise _Damaged("has an unreadable manifest")
        return _check_manifest(manifest)

    def _restore(self, step: int, target):
        manifest = self._read_manifest(step)
        arrays = manifest["arrays"]
        if callable(target):
            try:
                target = target(step, arrays)
            except _Damaged:
                raise
            except Exception as e:
                raise _Damaged(f"has unreadable metadata ({_first_line(e)})") from None
        else:
            self._check_matches(step, arrays, target)
        names = [name for name, _, _ in arrays]
        checked = self.verify and manifest["checksums"] is not None
        if self.verify and not checked:
            logging.warning(
                "checkpoint %s/%d was saved without checksums: restored unverified",
                self.directory,
                step,
            )
        try:
            state = self._mgr.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))
            ).state
        except Exception as e:
            bad = self._first_unreadable(step, target, names)
            at = f" at array {bad!r}" if bad else ""
            raise _Damaged(f"is unreadable{at} ({_first_line(e)})") from None
        if checked:
            restored = named_leaves(state)  # in the manifest's order, whatever the tree's
            now = np.asarray(fingerprint([restored[n] for n in names]))
            bad = np.flatnonzero(np.asarray(manifest["checksums"], np.uint32) != now)
            if bad.size:
                raise _Damaged(
                    f"fails its checksum at array {names[bad[0]]!r} "
                    f"({bad.size} of {len(names)} arrays differ)"
                )
        return state

    def _first_unreadable(self, step: int, target, names) -> str | None:
        """The first array that cannot be read on its own (only run once a restore failed)."""
        leaves, treedef = jax.tree.flatten(target)
        for i, leaf in enumerate(leaves):
            only = [leaf if j == i else ocp.PLACEHOLDER for j in range(len(leaves))]
            try:
                self._mgr.restore(
                    step,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(jax.tree.unflatten(treedef, only))
                    ),
                )
            except Exception:
                return names[i]
        return None

    def _move_aside(self, step: int) -> str:
        src = os.path.join(self.directory, str(step))
        dst = src + ".corrupt"
        n = 1
        while os.path.exists(dst):
            dst, n = f"{src}.corrupt.{n}", n + 1
        _sync("jaxsafe_checkpoint_before_move")
        if jax.process_index() == 0:
            os.rename(src, dst)
        _sync("jaxsafe_checkpoint_after_move")
        self._mgr.reload()
        return dst

    def _check_matches(self, step: int, arrays, state_like) -> None:
        on_disk = {name: (tuple(shape), dtype) for name, shape, dtype in arrays}
        wanted = {
            path_name(p): (tuple(np.shape(x)), str(x.dtype))
            for p, x in jax.tree_util.tree_flatten_with_path(state_like)[0]
        }
        where = f"checkpoint {self.directory}/{step}"
        missing = sorted(set(wanted) - set(on_disk))
        unexpected = sorted(set(on_disk) - set(wanted))
        if missing:
            raise CheckpointMismatchError(
                f"{where} lacks {len(missing)} tensors the model has, e.g. {missing[:3]}"
            )
        if unexpected:
            raise CheckpointMismatchError(
                f"{where} has {len(unexpected)} tensors the model lacks, e.g. {unexpected[:3]}"
            )
        for name, (shape, dtype) in wanted.items():
            if on_disk[name][0] != shape:
                raise CheckpointMismatchError(
                    f"{where}: tensor {name!r} has shape {on_disk[name][0]} on disk but {shape} "
                    "in the model"
                )
            if on_disk[name][1] != dtype:
                raise CheckpointMismatchError(
                    f"{where}: tensor {name!r} is {on_disk[name][1]} on "
                    f"disk but {dtype} in the model"
                )

    def wait(self) -> None:
        self._mgr.wait_until_finished()

    def close(self) -> None:
        self._mgr.wait_until_finished()
        self._mgr.close()


def _abstract(state_like):
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=getattr(x, "sharding", None)),
        state_like,
    )


def _tree_like(metadata, arrays, leaves):
    """`leaves` (in manifest order) placed in the tree structure of orbax's item metadata."""
    metadata = getattr(metadata, "tree", metadata)
    flat, treedef = jax.tree_util.tree_flatten_with_path(
        metadata, is_leaf=lambda m: hasattr(m, "shape")
    )
    by_name = {name: leaf for (name, _, _), leaf in zip(arrays, leaves, strict=True)}
    names = [path_name(p) for p, _ in flat]
    if sorted(names) != sorted(by_name):
        raise _Damaged("has metadata that disagrees with its manifest")
    return jax.tree.unflatten(treedef, [by_name[n] for n in names])


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def load_arrays(directory: str, step: int | None = None):
    """`(step, tree)`: a checkpoint's state tree, verified, on this process's first device,
    whatever topology wrote it (for inspection, sampling and tests; `Checkpointer.restore` is
    for resuming). Without `step`, the newest intact checkpoint."""
    mgr = Checkpointer(directory, async_save=False)
    try:
        return mgr.restore_raw(step)
    finally:
        mgr.close()

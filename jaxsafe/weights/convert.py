"""PyTorch state dict <-> NNX parameter conversion and safetensors I/O (no torch needed).

Our SD modules use diffusers'/transformers' module names, so a parameter path maps to a
PyTorch key by joining with '.' and renaming the leaf:

=====================================  =====================================  ================
NNX leaf (shape)                       PyTorch leaf (shape)                   transform
=====================================  =====================================  ================
``kernel`` Linear ``(in, out)``        ``weight`` ``(out, in)``               transpose
``kernel`` Conv ``(kh, kw, in, out)``  ``weight`` ``(out, in, kh, kw)``       HWIO -> OIHW
``scale`` (Layer/GroupNorm)            ``weight``                             --
``embedding`` ``(V, D)``               ``weight`` ``(V, D)``                  --
``bias``                               ``bias``                               --
``mean`` / ``var`` (frozen BN)         ``running_mean`` / ``running_var``     --
=====================================  =====================================  ================

A Linear kernel may also be read from a ``(out, in, 1, 1)`` tensor (the 1x1-conv-shaped
attention weights of converted original-LDM checkpoints). A missing, unexpected or wrongly
shaped tensor raises :class:`CheckpointError` naming it. Every safetensors file jaxsafe writes
(:func:`write_safetensors`) carries the CRC-32 of each tensor's bytes in its header metadata
(``CHECKSUM_KEY``), which :func:`read_safetensors` verifies; files of other tools load unverified.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import zlib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from jaxsafe.treepath import named_leaves, path_name

__all__ = [
    "CHECKSUM_KEY",
    "CheckpointError",
    "from_torch",
    "load_params",
    "model_params",
    "params_to_state_dict",
    "read_safetensors",
    "state_dict_to_params",
    "to_torch",
    "torch_key",
    "write_safetensors",
]

#: The safetensors header metadata key of the per-tensor CRC-32 checksums (module docstring): a
#: JSON object tensor name -> ``zlib.crc32`` of the tensor's bytes.
CHECKSUM_KEY = "jaxsafe.crc32"

_LEAF = {
    "kernel": "weight",
    "scale": "weight",
    "embedding": "weight",
    "bias": "bias",
    "mean": "running_mean",
    "var": "running_var",
}


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model (or cannot be read); the message names the
    tensor or file."""


def torch_key(path: str, prefix: str = "") -> str:
    """``'down_blocks/0/conv1/kernel'`` -> ``prefix + 'down_blocks.0.conv1.weight'``."""
    *parents, leaf = path.split("/")
    if leaf not in _LEAF:
        raise ValueError(
            f"parameter {path!r}: unknown leaf {leaf!r}; expected one of {list(_LEAF)}"
        )
    return prefix + ".".join([*parents, _LEAF[leaf]])


def to_torch(path: str, value) -> np.ndarray:
    """An NNX parameter in PyTorch layout."""
    x = np.asarray(value)
    if path.endswith("kernel"):
        if x.ndim == 2:
            return np.ascontiguousarray(x.T)
        if x.ndim == 4:
            return np.ascontiguousarray(x.transpose(3, 2, 0, 1))
    return x


def torch_shape(path: str, shape: Sequence[int]) -> tuple[int, ...]:
    shape = tuple(shape)
    if path.endswith("kernel"):
        if len(shape) == 2:
            return shape[::-1]
        if len(shape) == 4:
            return (shape[3], shape[2], shape[0], shape[1])
    return shape


def from_torch(path: str, tensor: np.ndarray, shape: Sequence[int]) -> np.ndarray | None:
    """A PyTorch tensor in NNX layout, or None when its shape cannot give ``shape``."""
    x = np.asarray(tensor)
    if path.endswith("kernel"):
        if len(shape) == 2 and x.ndim == 4 and x.shape[2:] == (1, 1):
            x = x[:, :, 0, 0]
        if len(shape) == 2 and x.ndim == 2:
            x = x.T
        elif len(shape) == 4 and x.ndim == 4:
            x = x.transpose(2, 3, 1, 0)
    return x if x.shape == tuple(shape) else None


def _listing(keys: Iterable[str], limit: int = 8) -> str:
    keys = sorted(keys)
    more = f" (and {len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(repr(k) for k in keys[:limit]) + more


def state_dict_to_params(
    state_dict: Mapping[str, np.ndarray],
    expected: Mapping[str, object],
    *,
    prefix: str = "",
    source: str = "checkpoint",
    renames: Sequence[tuple[str, str]] = (),
    ignore: Sequence[str] = (),
) -> dict[str, np.ndarray]:
    """Maps a PyTorch state dict onto NNX paths.

    Args:
      state_dict: PyTorch key -> array.
      expected: NNX path -> anything with a ``.shape`` (arrays, ``ShapeDtypeStruct``).
      prefix: prepended to every PyTorch key (``'text_model.'`` for CLIP).
      source: what to call the checkpoint in errors (a file name).
      renames: ``(regex, replacement)`` applied to PyTorch keys first (legacy names).
      ignore: regexes of PyTorch keys to drop (non-parameter buffers such as CLIP's
        ``position_ids``).
    """
    tensors = {}
    for key, value in state_dict.items():
        if any(re.search(p, key) for p in ignore):
            continue
        for pattern, repl in renames:
            key = re.sub(pattern, repl, key)
        tensors[key] = value
    wanted = {torch_key(p, prefix): p for p in expected}
    missing = set(wanted) - set(tensors)
    if missing:
        raise CheckpointError(f"{source}: missing tensor(s) {_listing(missing)}")
    unexpected = set(tensors) - set(wanted)
    if unexpected:
        raise CheckpointError(f"{source}: unexpected tensor(s) {_listing(unexpected)}")
    params = {}
    for key, path in wanted.items():
        shape = tuple(expected[path].shape)
        x = from_torch(path, tensors[key], shape)
        if x is None:
            raise CheckpointError(
                f"{source}: tensor {key!r} has shape {tuple(np.shape(tensors[key]))}, expected "
                f"{torch_shape(path, shape)}"
            )
        params[path] = x
    return params


def params_to_state_dict(
    params: Mapping[str, object], *, prefix: str = ""
) -> dict[str, np.ndarray]:
    """NNX path -> array into a PyTorch state dict."""
    return {torch_key(p, prefix): to_torch(p, x) for p, x in params.items()}


def model_params(model: nnx.Module) -> dict[str, jax.Array]:
    """``{path: array}`` of the model's ``nnx.Param``s ('conv_in/kernel', ...)."""
    return named_leaves(nnx.state(model, nnx.Param))


def load_params(abstract_model: nnx.Module, params: Mapping[str, np.ndarray]) -> nnx.Module:
    """A concrete model from an abstract one (``nnx.eval_shape``) and arrays for every param,
    cast to each parameter's dtype."""
    graphdef, state = nnx.split(abstract_model)

    def fill(path, leaf):
        return jax.numpy.asarray(params[path_name(path)], dtype=leaf.dtype)

    return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(fill, state))


def read_safetensors(files: Path | str | Sequence[Path | str]) -> dict[str, np.ndarray]:
    """Reads one or more safetensors files into numpy, verifying the tensors' checksums where
    the file has them (module docstring): a damaged tensor, a truncated file or a damaged header
    raises :class:`CheckpointError` naming the file (and the tensor)."""
    from safetensors import SafetensorError, safe_open

    files = [files] if isinstance(files, (str, Path)) else list(files)
    out: dict[str, np.ndarray] = {}
    for f in map(Path, files):
        if not f.is_file():
            raise FileNotFoundError(f"safetensors file {str(f)!r} not found")
        try:
            with safe_open(str(f), framework="np") as handle:
                metadata = handle.metadata() or {}
                part = {k: handle.get_tensor(k) for k in handle.keys()}
        except (SafetensorError, OSError, ValueError, TypeError) as e:
            raise CheckpointError(
                f"{f}: cannot read safetensors file ({e}); is it truncated or corrupted?"
            ) from e
        _verify_checksums(part, metadata.get(CHECKSUM_KEY), f)
        dup = set(part) & set(out)
        if dup:
            raise CheckpointError(f"{f}: tensor(s) {_listing(dup)} also appear in another shard")
        out.update(part)
    return out


def _crc32(array: np.ndarray) -> int:
    """CRC-32 of the bytes safetensors stores for ``array`` (C order, little-endian)."""
    a = np.ascontiguousarray(array, dtype=np.asarray(array).dtype.newbyteorder("<"))
    return zlib.crc32(a.reshape(-1).view(np.uint8))


def _verify_checksums(tensors: Mapping[str, np.ndarray], stored: str | None, file: Path) -> None:
    if stored is None:  # written by another tool: nothing to verify against
        return
    try:
        sums = json.loads(stored)
        if not isinstance(sums, dict) or not all(isinstance(v, int) for v in sums.values()):
            raise ValueError("not an object of integers")
    except ValueError as e:
        raise CheckpointError(
            f"{file}: damaged header: its {CHECKSUM_KEY!r} metadata is not "
            f"a JSON object tensor -> CRC-32 ({e})"
        ) from None
    if set(sums) != set(tensors):
        odd = set(sums) ^ set(tensors)
        raise CheckpointError(
            f"{file}: damaged header: the checksums and the tensors disagree "
            f"on the tensor names ({_listing(odd)})"
        )
    for name in sorted(tensors):
        crc = _crc32(tensors[name])
        if crc != sums[name]:
            raise CheckpointError(
                f"{file}: tensor {name!r} fails its CRC-32 check (stored "
                f"{sums[name]:08x}, read {crc:08x}); the file is damaged"
            )


def read_sharded_index(index_file: Path) -> list[Path]:
    """Shard files named by a ``*.safetensors.index.json`` (``weight_map``)."""
    try:
        weight_map = json.loads(Path(index_file).read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError) as e:
        raise CheckpointError(f"{index_file}: not a safetensors index (needs 'weight_map')") from e
    return [Path(index_file).parent / name for name in sorted(set(weight_map.values()))]


def write_safetensors(state_dict: Mapping[str, np.ndarray], file: Path | str) -> None:
    """Writes ``file`` (whole or not at all: a temporary sibling, then renamed) with the
    tensors' checksums (module docstring) and ``{'format': 'pt'}`` metadata, which transformers
    requires to load the file."""
    from safetensors.numpy import save_file

    tensors = {k: np.ascontiguousarray(v) for k, v in state_dict.items()}
    metadata = {
        "format": "pt",
        CHECKSUM_KEY: json.dumps({k: _crc32(v) for k, v in sorted(tensors.items())}),
    }
    file = os.fspath(file)
    fd, tmp = tempfile.mkstemp(
        prefix=os.path.basename(file) + ".",
        suffix=".tmp",
        dir=os.path.dirname(os.path.abspath(file)),
    )
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, file)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise

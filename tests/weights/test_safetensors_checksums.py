"""Verified safetensors: every file jaxsafe writes carries per-tensor CRC-32s in its header
metadata, and jaxsafe's reader refuses a damaged tensor, a truncated file or a damaged header."""

import json
import os
import zlib

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

from jaxsafe.weights import convert
from jaxsafe.weights.convert import CHECKSUM_KEY, CheckpointError


def _tensors():
    rng = np.random.default_rng(0)
    return {
        "down.0.weight": rng.standard_normal((8, 4, 3, 3)).astype(np.float32),
        "down.0.bias": rng.standard_normal(8).astype(np.float16),
        "ids": np.arange(5, dtype=np.int64),
        "empty": np.zeros((0, 3), np.float32),
    }


def _header_length(path) -> int:
    with open(path, "rb") as f:
        return int.from_bytes(f.read(8), "little")


def _offsets(path, name) -> tuple[int, int]:
    """Where tensor ``name``'s bytes lie in the file."""
    n = _header_length(path)
    with open(path, "rb") as f:
        header = json.loads(f.read(8 + n)[8:])
    start, end = header[name]["data_offsets"]
    return 8 + n + start, 8 + n + end


def _flip(path, position, out):
    data = bytearray(open(path, "rb").read())
    data[position] ^= 0x01
    with open(out, "wb") as f:
        f.write(bytes(data))
    return out


@pytest.fixture
def written(tmp_path):
    path = tmp_path / "model.safetensors"
    convert.write_safetensors(_tensors(), path)
    return path


def test_round_trip_is_exact_and_carries_the_checksums(written):
    back = convert.read_safetensors(written)
    expected = _tensors()
    assert sorted(back) == sorted(expected)
    for name, value in expected.items():
        assert back[name].dtype == value.dtype
        np.testing.assert_array_equal(back[name], value)  # exact: bytes written and read back
    with safe_open(str(written), framework="np") as f:
        metadata = f.metadata()
    assert metadata["format"] == "pt"  # transformers needs it
    sums = json.loads(metadata[CHECKSUM_KEY])
    assert sums == {k: zlib.crc32(np.ascontiguousarray(v).tobytes()) for k, v in expected.items()}
    # Written whole or not at all: no temporary file is left next to it.
    assert os.listdir(written.parent) == [written.name]


def test_a_flipped_byte_in_a_tensor_is_refused_naming_file_and_tensor(written, tmp_path):
    start, end = _offsets(written, "down.0.weight")
    bad = _flip(written, (start + end) // 2, tmp_path / "flipped.safetensors")
    with pytest.raises(
        CheckpointError,
        match=r"flipped\.safetensors: tensor 'down\.0\.weight' "
        r"fails its CRC-32 check",
    ):
        convert.read_safetensors(bad)


def test_a_truncated_file_is_refused_naming_it(written, tmp_path):
    data = open(written, "rb").read()
    for keep in (len(data) - 3, _header_length(written) + 8, 20, 0):
        cut = tmp_path / f"cut{keep}.safetensors"
        cut.write_bytes(data[:keep])
        with pytest.raises(
            CheckpointError,
            match=rf"cut{keep}\.safetensors: cannot read "
            "safetensors file .*truncated or corrupted",
        ):
            convert.read_safetensors(cut)


def test_a_damaged_header_is_refused(written, tmp_path):
    n = _header_length(written)
    header = open(written, "rb").read()[8 : 8 + n]
    sums_at = header.index(CHECKSUM_KEY.encode())
    digit_at = sums_at + header[sums_at:].index(b": ") + 2  # the first checksum's first digit
    name_at = header.index(b'"ids"') + 1
    for what, position in (
        ("length", 0),
        ("brace", 8),
        ("checksum", 8 + digit_at),
        ("name", 8 + name_at),
    ):
        bad = _flip(written, position, tmp_path / f"{what}.safetensors")
        with pytest.raises(CheckpointError, match=rf"{what}\.safetensors: "):
            convert.read_safetensors(bad)


def test_files_of_other_tools_load_unverified(tmp_path):
    plain = tmp_path / "plain.safetensors"
    save_file(_tensors(), str(plain), metadata={"format": "pt"})
    back = convert.read_safetensors(plain)
    for name, value in _tensors().items():
        np.testing.assert_array_equal(back[name], value)  # exact: a copy of the bytes
    save_file(_tensors(), str(tmp_path / "bare.safetensors"))  # no metadata at all
    assert sorted(convert.read_safetensors(tmp_path / "bare.safetensors")) == sorted(_tensors())


def test_a_failed_write_leaves_nothing(tmp_path):
    with pytest.raises(Exception):
        convert.write_safetensors({"x": np.zeros(3, object)}, tmp_path / "x.safetensors")
    assert os.listdir(tmp_path) == []

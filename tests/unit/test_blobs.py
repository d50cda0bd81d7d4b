"""Upload checks on safetensors bytes, without torch: names, shapes, dtypes, finite values."""

from __future__ import annotations

import json
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save

from store import blobs
from store.blobs import BlobStore, InvalidModel, TooLarge

REFERENCE = {"w": np.zeros((3, 2), dtype=np.float32), "b": np.zeros(2, dtype=np.float32)}


def write(tmp_path: Path, data: bytes, name: str = "m.safetensors") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def reference_header(tmp_path: Path) -> blobs.Header:
    return blobs.header_of(write(tmp_path, save(REFERENCE), "ref.safetensors"))


def test_a_good_update_passes(tmp_path: Path) -> None:
    good = {"w": np.ones((3, 2), dtype=np.float32), "b": np.full(2, -1.5, dtype=np.float32)}
    header = blobs.validate_model_file(write(tmp_path, save(good)), reference_header(tmp_path))
    assert header["w"].shape == (3, 2) and header["w"].dtype == "F32"


@pytest.mark.parametrize(
    ("tensors", "reason"),
    [
        ({"w": np.ones((3, 2), np.float32)}, "missing tensor"),
        ({**REFERENCE, "extra": np.ones(1, np.float32)}, "unexpected tensor"),
        ({"w": np.ones((2, 3), np.float32), "b": np.ones(2, np.float32)}, "shape"),
        ({"w": np.ones((3, 2), np.float64), "b": np.ones(2, np.float32)}, "dtype"),
        (
            {"w": np.array([[1, np.nan], [0, 0], [0, 0]], np.float32), "b": np.ones(2, np.float32)},
            "NaN or Inf",
        ),
        ({"w": np.ones((3, 2), np.float32), "b": np.array([np.inf, 0], np.float32)}, "NaN or Inf"),
        ({"w": np.full((3, 2), -np.inf, np.float16), "b": np.ones(2, np.float32)}, "dtype"),
    ],
)
def test_incompatible_updates_are_refused_with_the_reason(tmp_path: Path, tensors: dict, reason: str) -> None:
    with pytest.raises(InvalidModel, match=reason):
        blobs.validate_model_file(write(tmp_path, save(tensors)), reference_header(tmp_path))


def test_half_precision_nan_is_caught(tmp_path: Path) -> None:
    half = {"h": np.array([1.0, np.nan], np.float16)}
    ref = blobs.header_of(write(tmp_path, save({"h": np.zeros(2, np.float16)}), "ref16.safetensors"))
    with pytest.raises(InvalidModel, match="NaN"):
        blobs.validate_model_file(write(tmp_path, save(half)), ref)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (pickle.dumps({"w": [1.0]}), "pickle"),
        (b"PK\x03\x04" + b"\x00" * 100, "zip"),
        (b"\x01\x02", "not a safetensors"),
        (struct.pack("<Q", 10**12) + b"{}", "header length"),
        (struct.pack("<Q", 8) + b"not json", "not JSON"),
        (save(REFERENCE)[:-3], "truncated"),
        (save(REFERENCE) + b"junk", "past the last tensor"),
    ],
)
def test_corrupt_pickled_and_truncated_files_are_refused(tmp_path: Path, data: bytes, reason: str) -> None:
    with pytest.raises(InvalidModel, match=reason):
        blobs.validate_model_file(write(tmp_path, data), reference_header(tmp_path))


def test_overlapping_offsets_are_refused(tmp_path: Path) -> None:
    header = json.dumps({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                         "b": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()  # fmt: skip
    with pytest.raises(InvalidModel, match="overlaps"):
        blobs.validate_model_file(
            write(tmp_path, struct.pack("<Q", len(header)) + header + b"\x00" * 4), None
        )


def test_receive_hashes_limits_and_adopts_atomically(tmp_path: Path) -> None:
    store = BlobStore(tmp_path / "ck")
    tmp, size, sha = store.receive(iter([b"ab", b"cd"]), max_bytes=10)
    assert size == 4 and sha == blobs.sha256_file(tmp)
    final = store.adopt(tmp, "tasks/1/x.bin")
    assert final.read_bytes() == b"abcd" and not tmp.exists()
    with pytest.raises(TooLarge):
        store.receive(iter([b"x" * 6, b"y" * 6]), max_bytes=10)
    assert list((tmp_path / "ck" / "tmp").iterdir()) == []  # the partial file is gone
    with pytest.raises(ValueError, match="escapes"):
        store.path("../../etc/passwd")

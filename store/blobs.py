"""Model files under ``CHECKPOINT_DIR``: atomic writes, checksums, and safetensors checks.

Everything here works on bytes and numpy views, never torch, so the web tier can validate a
client's upload (names, shapes, dtypes, finite values) before accepting it. Files are written
to a temporary name, fsynced, then renamed into place; the database stores paths relative to
``CHECKPOINT_DIR`` and their SHA-256.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import struct
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

MAX_HEADER_BYTES = 16 << 20

# dtype name -> (itemsize, unsigned view for the bit test, exponent mask) ; mask None: no finite check
DTYPES: dict[str, tuple[int, Any, int | None]] = {
    "F64": (8, np.uint64, 0x7FF0000000000000),
    "F32": (4, np.uint32, 0x7F800000),
    "F16": (2, np.uint16, 0x7C00),
    "BF16": (2, np.uint16, 0x7F80),
    "I64": (8, None, None),
    "I32": (4, None, None),
    "I16": (2, None, None),
    "I8": (1, None, None),
    "U64": (8, None, None),
    "U32": (4, None, None),
    "U16": (2, None, None),
    "U8": (1, None, None),
    "BOOL": (1, None, None),
}


class InvalidModel(ValueError):
    """The bytes are not an acceptable safetensors model; the message says why."""


class TooLarge(ValueError):
    pass


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    begin: int  # offset in the data section
    end: int


Header = dict[str, TensorInfo]


def _sniff(prefix: bytes) -> str | None:
    if prefix[:1] == b"\x80" and len(prefix) > 1 and prefix[1] <= 5:
        return "this looks like a Python pickle; only safetensors is accepted"
    if prefix[:4] == b"PK\x03\x04":
        return "this looks like a zip archive (torch.save); only safetensors is accepted"
    return None


def read_header(f: IO[bytes], size: int) -> tuple[Header, int]:
    """Parse and check a safetensors header. Returns the tensors and the data section's offset."""
    if size < 8:
        raise InvalidModel(f"not a safetensors file: {size} bytes")
    prefix = f.read(8)
    sniffed = _sniff(prefix)
    if sniffed:
        raise InvalidModel(sniffed)
    (n,) = struct.unpack("<Q", prefix)
    if n == 0 or n > MAX_HEADER_BYTES or n > size - 8:
        raise InvalidModel(f"not a safetensors file: header length {n} does not fit a {size}-byte file")
    try:
        raw = json.loads(f.read(n))
    except (UnicodeDecodeError, ValueError):
        raise InvalidModel("not a safetensors file: header is not JSON") from None
    if not isinstance(raw, dict):
        raise InvalidModel("not a safetensors file: header is not an object")
    data_size = size - 8 - n
    tensors: Header = {}
    for name, spec in raw.items():
        if name == "__metadata__":
            continue
        if not isinstance(spec, dict):
            raise InvalidModel(f"tensor {name!r}: entry is not an object")
        dtype, shape, offsets = spec.get("dtype"), spec.get("shape"), spec.get("data_offsets")
        if dtype not in DTYPES:
            raise InvalidModel(f"tensor {name!r}: unsupported dtype {dtype!r}")
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
            raise InvalidModel(f"tensor {name!r}: bad shape {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise InvalidModel(f"tensor {name!r}: bad data_offsets")
        begin, end = offsets
        if not 0 <= begin <= end <= data_size:
            raise InvalidModel(f"tensor {name!r}: data {begin}..{end} outside the file (truncated?)")
        if end - begin != math.prod(shape) * DTYPES[dtype][0]:
            raise InvalidModel(f"tensor {name!r}: {end - begin} bytes do not match shape {shape} of {dtype}")
        tensors[name] = TensorInfo(dtype, tuple(shape), begin, end)
    spans = sorted((t.begin, t.end) for t in tensors.values())
    cursor = 0
    for begin, end in spans:
        if begin != cursor:
            raise InvalidModel("tensor data overlaps or leaves holes")
        cursor = end
    if cursor != data_size:
        raise InvalidModel(f"file has {data_size - cursor} bytes past the last tensor, or is truncated")
    return tensors, 8 + n


def header_of(path: Path) -> Header:
    with open(path, "rb") as f:
        return read_header(f, os.fstat(f.fileno()).st_size)[0]


def compatibility_error(got: Header, want: Header) -> str | None:
    """Why ``got`` cannot stand in for ``want`` (names, shapes, dtypes), or None."""
    missing = sorted(set(want) - set(got))
    extra = sorted(set(got) - set(want))
    if missing:
        return f"missing tensor(s): {', '.join(missing[:5])}"
    if extra:
        return f"unexpected tensor(s): {', '.join(extra[:5])}"
    for name, info in want.items():
        other = got[name]
        if other.shape != info.shape:
            return f"tensor {name!r} has shape {list(other.shape)}, expected {list(info.shape)}"
        if other.dtype != info.dtype:
            return f"tensor {name!r} has dtype {other.dtype}, expected {info.dtype}"
    return None


def nonfinite_tensor(path: Path, header: Header, data_offset: int, chunk: int = 1 << 22) -> str | None:
    """The name of the first tensor holding NaN or Inf, or None. Reads the file in chunks."""
    size = os.path.getsize(path)
    if size == data_offset:
        return None
    whole = np.memmap(path, dtype=np.uint8, mode="r", offset=data_offset)
    for name, info in header.items():
        _, view, mask = DTYPES[info.dtype]
        if mask is None or info.end == info.begin:
            continue
        words = whole[info.begin : info.end].view(view)
        for start in range(0, words.size, chunk):
            part = words[start : start + chunk]
            if np.any((part & view(mask)) == view(mask)):
                return name
    return None


def validate_model_file(path: Path, reference: Header | None) -> Header:
    """Full check of an uploaded model file; raises :class:`InvalidModel` with the reason."""
    with open(path, "rb") as f:
        header, data_offset = read_header(f, os.fstat(f.fileno()).st_size)
    if reference is not None:
        reason = compatibility_error(header, reference)
        if reason:
            raise InvalidModel(reason)
    bad = nonfinite_tensor(path, header, data_offset)
    if bad:
        raise InvalidModel(f"tensor {bad!r} holds NaN or Inf")
    return header


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class BlobStore:
    """Files under one root; callers pass and store paths relative to it."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).resolve()

    def path(self, rel: str) -> Path:
        full = (self.root / rel).resolve()
        if self.root not in full.parents:
            raise ValueError(f"path escapes the blob root: {rel!r}")
        return full

    def tmp_dir(self) -> Path:
        d = self.root / "tmp"
        d.mkdir(parents=True, exist_ok=True)
        return d

    def receive(self, chunks: Iterator[bytes], max_bytes: int) -> tuple[Path, int, str]:
        """Stream chunks to a temporary file, hashing as it goes; raises :class:`TooLarge`."""
        digest = hashlib.sha256()
        size = 0
        fd, name = tempfile.mkstemp(dir=self.tmp_dir(), suffix=".part")
        try:
            with os.fdopen(fd, "wb") as out:
                for chunk in chunks:
                    size += len(chunk)
                    if size > max_bytes:
                        raise TooLarge(f"body over {max_bytes} bytes")
                    digest.update(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
        except BaseException:
            Path(name).unlink(missing_ok=True)
            raise
        return Path(name), size, digest.hexdigest()

    def adopt(self, tmp: Path, rel: str) -> Path:
        """Move a received temporary file to ``rel`` atomically."""
        dest = self.path(rel)
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, dest)
        _fsync_dir(dest.parent)
        return dest

    def write(self, rel: str, data: bytes) -> str:
        """Write bytes atomically (temp file, fsync, rename); returns their SHA-256."""
        dest = self.path(rel)
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=dest.parent, suffix=".part")
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            os.replace(name, dest)
        except BaseException:
            Path(name).unlink(missing_ok=True)
            raise
        _fsync_dir(dest.parent)
        return hashlib.sha256(data).hexdigest()

    def link(self, src_rel: str, dest_rel: str) -> None:
        """Make ``dest_rel`` the same file as ``src_rel`` (a hard link, or a copy)."""
        src, dest = self.path(src_rel), self.path(dest_rel)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_suffix(dest.suffix + ".part")
        tmp.unlink(missing_ok=True)
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
        os.replace(tmp, dest)
        _fsync_dir(dest.parent)

    def remove(self, rel: str) -> None:
        full = self.path(rel)
        if full.is_dir():
            shutil.rmtree(full, ignore_errors=True)
        else:
            full.unlink(missing_ok=True)


def task_dir(task_id: int) -> str:
    return f"tasks/{task_id}"


def round_dir(task_id: int, round_no: int) -> str:
    return f"tasks/{task_id}/round-{round_no:05d}"


def global_model_rel(task_id: int, round_no: int) -> str:
    return f"{round_dir(task_id, round_no)}/global.safetensors"


def state_rel(task_id: int, round_no: int) -> str:
    return f"{round_dir(task_id, round_no)}/server-state.safetensors"


def update_rel(task_id: int, round_no: int, rank: int, assignment_id: int) -> str:
    return f"{round_dir(task_id, round_no)}/update-rank{rank}-a{assignment_id}.safetensors"


def checkpoint_rel(task_id: int, round_no: int) -> str:
    return f"tasks/{task_id}/checkpoints/round-{round_no:05d}.safetensors"

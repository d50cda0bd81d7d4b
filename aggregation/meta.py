"""Safetensors headers, read and checked without torch.

A safetensors file is ``u64 little-endian header length`` + ``JSON header`` + data. The
header maps each tensor name to ``{"dtype", "shape", "data_offsets": [begin, end]}``
(offsets relative to the end of the header) plus an optional ``__metadata__`` object.
:func:`read_meta` checks everything the streaming reader relies on (offsets inside the
file, sizes matching shapes, no overlaps), so a hostile upload cannot make it read out of
bounds.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import struct
import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .errors import InvalidFile

#: Bytes per element of the safetensors dtypes this package reads.
DTYPE_SIZES: dict[str, int] = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
}
FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16"})
MAX_HEADER_BYTES = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorMeta:
    """One tensor of a safetensors file; ``begin``/``end`` are absolute byte offsets."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def itemsize(self) -> int:
        return DTYPE_SIZES[self.dtype]

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def is_float(self) -> bool:
        return self.dtype in FLOAT_DTYPES

    def to_json(self) -> dict[str, Any]:
        return {"dtype": self.dtype, "shape": list(self.shape)}


@dataclass(frozen=True)
class FileMeta:
    """The parsed header of one safetensors file."""

    path: str
    size: int
    tensors: dict[str, TensorMeta]
    metadata: dict[str, str]

    def to_json(self) -> dict[str, dict[str, Any]]:
        """``{name: {"dtype", "shape"}}``: what :func:`aggregation.plan_slices` takes."""
        return {name: t.to_json() for name, t in self.tensors.items()}


def _fail(path: str, why: str) -> InvalidFile:
    return InvalidFile(f"{os.path.basename(path)}: {why}")


_CACHE: OrderedDict[bytes, FileMeta] = OrderedDict()
_CACHE_MAX_BYTES = 64 << 20  # of header bytes (a header larger than 1/64 of it is not cached)
_cached_bytes = 0
_LOCK = threading.Lock()


def read_meta(path: str | os.PathLike[str]) -> FileMeta:
    """Read and check the header of a safetensors file. Raises :class:`InvalidFile`.

    Parsed headers are cached by their exact bytes (with the path and file size), so a file
    read again in the same process (planning, then each slice job) is not parsed twice.
    """
    spath = os.fspath(path)
    try:
        with open(spath, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            head = fh.read(8)
            if len(head) < 8:
                raise _fail(spath, "not a safetensors file (shorter than 8 bytes)")
            (hlen,) = struct.unpack("<Q", head)
            if hlen > MAX_HEADER_BYTES or 8 + hlen > size:
                raise _fail(spath, f"not a safetensors file (header length {hlen}, file size {size})")
            raw = fh.read(hlen)
    except OSError as exc:
        raise _fail(spath, f"cannot read: {exc.strerror or exc}") from exc
    key = f"{spath}\x00{size}\x00".encode() + raw
    with _LOCK:
        meta = _CACHE.get(key)
        if meta is not None:
            _CACHE.move_to_end(key)
            return meta
    meta = _parse(spath, size, hlen, raw)
    global _cached_bytes
    with _LOCK:
        if len(key) <= _CACHE_MAX_BYTES // 64 and key not in _CACHE:
            _CACHE[key] = meta
            _cached_bytes += len(key)
            while _cached_bytes > _CACHE_MAX_BYTES:
                old, _ = _CACHE.popitem(last=False)
                _cached_bytes -= len(old)
    return meta


def _parse(spath: str, size: int, hlen: int, raw: bytes) -> FileMeta:
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _fail(spath, f"header is not JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise _fail(spath, "header is not a JSON object")
    data_start = 8 + hlen
    data_size = size - data_start
    metadata: dict[str, str] = {}
    tensors: dict[str, TensorMeta] = {}
    spans: list[tuple[int, int, str]] = []
    for name, entry in header.items():
        if name == "__metadata__":
            if not isinstance(entry, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in entry.items()
            ):
                raise _fail(spath, "__metadata__ must map strings to strings")
            metadata = dict(entry)
            continue
        if not isinstance(entry, dict):
            raise _fail(spath, f"entry {name!r} is not an object")
        dtype = entry.get("dtype")
        shape = entry.get("shape")
        offsets = entry.get("data_offsets")
        if dtype not in DTYPE_SIZES:
            raise _fail(spath, f"tensor {name!r} has unsupported dtype {dtype!r}")
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        ):
            raise _fail(spath, f"tensor {name!r} has an invalid shape")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        ):
            raise _fail(spath, f"tensor {name!r} has invalid data_offsets")
        begin, end = offsets
        numel = math.prod(shape)
        if not 0 <= begin <= end <= data_size:
            raise _fail(spath, f"tensor {name!r} lies outside the file (truncated?)")
        if end - begin != numel * DTYPE_SIZES[dtype]:
            raise _fail(spath, f"tensor {name!r}: {end - begin} bytes for shape {shape} of {dtype}")
        tensors[name] = TensorMeta(dtype, tuple(shape), data_start + begin, data_start + end)
        if end > begin:
            spans.append((begin, end, name))
    spans.sort()
    for (_, prev_end, prev), (begin, _, name) in itertools.pairwise(spans):
        if begin < prev_end:
            raise _fail(spath, f"tensors {prev!r} and {name!r} overlap")
    return FileMeta(spath, size, tensors, metadata)


def describe_mismatch(
    expected: Mapping[str, TensorMeta], got: Mapping[str, TensorMeta], *, limit: int = 3
) -> str | None:
    """Why ``got`` does not have the names, shapes and dtypes of ``expected`` (None if it does)."""

    def names(items: list[str]) -> str:
        more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
        return ", ".join(items[:limit]) + more

    missing = sorted(set(expected) - set(got))
    if missing:
        return f"missing tensors: {names(missing)}"
    extra = sorted(set(got) - set(expected))
    if extra:
        return f"unexpected tensors: {names(extra)}"
    for name in sorted(expected):
        want, have = expected[name], got[name]
        if want.shape != have.shape:
            return f"tensor {name!r} has shape {list(have.shape)}, expected {list(want.shape)}"
        if want.dtype != have.dtype:
            return f"tensor {name!r} has dtype {have.dtype}, expected {want.dtype}"
    return None

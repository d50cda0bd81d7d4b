"""Splitting a model's parameters into slices for parallel aggregation (torch-free).

A slice is an ordered list of pieces ``(name, start, stop)``: flat element ranges of the
model's tensors. Tensors are taken in sorted name order and packed greedily into slices of
at most ``max_slice_bytes`` (bytes in the global model's dtype); a tensor larger than that
is cut into nearly equal pieces whose boundaries are multiples of :data:`BLOCK` elements.
The plan is a pure function of the header and the threshold, so every worker that computes
it gets the same slices.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .meta import DTYPE_SIZES, FileMeta, TensorMeta

#: Alignment (in elements) of piece boundaries inside a tensor, of the chunks the kernels
#: work in, and of the DP noise blocks. A multiple of the 1024-element rows norms are
#: reduced over, so per-row partial sums never depend on the split.
BLOCK = 4096

_DTYPE_ALIASES = {
    "float64": "F64",
    "float32": "F32",
    "float16": "F16",
    "bfloat16": "BF16",
    "int64": "I64",
    "int32": "I32",
    "int16": "I16",
    "int8": "I8",
    "uint8": "U8",
    "bool": "BOOL",
}


@dataclass(frozen=True)
class Piece:
    """Elements ``[start, stop)`` of the flattened tensor ``name``."""

    name: str
    start: int
    stop: int

    @property
    def numel(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class Slice:
    """One unit of parallel work: pieces in a fixed order."""

    index: int
    pieces: tuple[Piece, ...]
    nbytes: int

    def to_json(self) -> list[list[Any]]:
        return [[p.name, p.start, p.stop] for p in self.pieces]

    @classmethod
    def from_json(cls, index: int, data: Any, itemsizes: Mapping[str, int] | None = None) -> Slice:
        pieces = tuple(Piece(str(n), int(a), int(b)) for n, a, b in data)
        size = sum(p.numel * (itemsizes or {}).get(p.name, 0) for p in pieces)
        return cls(index, pieces, size)


def _shape_dtype(entry: Any) -> tuple[tuple[int, ...], str]:
    if isinstance(entry, TensorMeta):
        return entry.shape, entry.dtype
    if isinstance(entry, Mapping):
        shape, dtype = entry["shape"], entry["dtype"]
    else:
        shape, dtype = entry
    dtype = str(dtype).removeprefix("torch.")
    dtype = _DTYPE_ALIASES.get(dtype, dtype)
    if dtype not in DTYPE_SIZES:
        raise ValueError(f"unsupported dtype {dtype!r}")
    return tuple(int(d) for d in shape), dtype


def plan_slices(meta: Mapping[str, Any] | FileMeta, max_slice_bytes: int) -> list[Slice]:
    """Split a model into slices of at most ``max_slice_bytes`` each.

    ``meta`` maps tensor names to ``{"shape": [...], "dtype": "F32"}`` (safetensors dtype
    codes or torch names like ``"float32"``), to ``(shape, dtype)`` pairs, or to
    :class:`~aggregation.meta.TensorMeta`; a :class:`~aggregation.meta.FileMeta` (from
    :func:`aggregation.read_meta`) works too. A tensor larger than the threshold is cut at
    multiples of :data:`BLOCK` elements, so a slice may exceed the threshold by less than
    one block when the threshold is smaller than a block.
    """
    if isinstance(meta, FileMeta):
        meta = meta.tensors
    if isinstance(max_slice_bytes, bool) or not isinstance(max_slice_bytes, int) or max_slice_bytes < 1:
        raise ValueError("max_slice_bytes must be a positive integer")
    slices: list[Slice] = []
    current: list[Piece] = []
    current_bytes = 0

    def close() -> None:
        nonlocal current, current_bytes
        if current:
            slices.append(Slice(len(slices), tuple(current), current_bytes))
        current, current_bytes = [], 0

    for name in sorted(meta):
        shape, dtype = _shape_dtype(meta[name])
        numel = math.prod(shape)
        size = numel * DTYPE_SIZES[dtype]
        if current_bytes + size <= max_slice_bytes:
            current.append(Piece(name, 0, numel))
            current_bytes += size
            continue
        close()
        if size <= max_slice_bytes:
            current.append(Piece(name, 0, numel))
            current_bytes = size
            continue
        parts = math.ceil(size / max_slice_bytes)
        step = max(BLOCK, math.ceil(math.ceil(numel / parts) / BLOCK) * BLOCK)
        for start in range(0, numel, step):
            stop = min(numel, start + step)
            current.append(Piece(name, start, stop))
            current_bytes = (stop - start) * DTYPE_SIZES[dtype]
            if stop < numel:
                close()
    close()
    return slices

"""Reading element ranges of safetensors files and in-memory state dicts into buffers."""

from __future__ import annotations

import ctypes
import os
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence

import torch

from .errors import AggregationError
from .meta import FileMeta, TensorMeta, read_meta

TORCH_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
SAFETENSORS_DTYPES: dict[torch.dtype, str] = {v: k for k, v in TORCH_DTYPES.items()}


class Source:
    """Flat element ranges of named tensors, read into caller-provided buffers."""

    def read(self, name: str, start: int, stop: int, out: torch.Tensor) -> torch.Tensor:
        """Copy elements ``[start, stop)`` of tensor ``name`` into the contiguous 1-D ``out``
        (converting the dtype if ``out`` has another one) and return ``out``."""
        raise NotImplementedError

    def read_delta(
        self, name: str, start: int, stop: int, base: torch.Tensor, out: torch.Tensor
    ) -> torch.Tensor:
        """``out = window - base`` (``out`` and ``base`` of the accumulation dtype)."""
        return self.read(name, start, stop, out).sub_(base)

    def close(self) -> None:
        """Free what the source holds."""


class MemorySource(Source):
    """Ranges of an in-memory state dict (CPU tensors)."""

    def __init__(self, tensors: Mapping[str, torch.Tensor]) -> None:
        self._flat = {k: (v if v.is_contiguous() else v.contiguous()).reshape(-1) for k, v in tensors.items()}

    def read(self, name: str, start: int, stop: int, out: torch.Tensor) -> torch.Tensor:
        return out.copy_(self._flat[name][start:stop])

    def read_delta(
        self, name: str, start: int, stop: int, base: torch.Tensor, out: torch.Tensor
    ) -> torch.Tensor:
        window = self._flat[name][start:stop]
        if window.dtype != out.dtype:
            return super().read_delta(name, start, stop, base, out)
        return torch.sub(window, base, out=out)


def _bytes(t: torch.Tensor) -> memoryview:
    """A writable view of a contiguous CPU tensor's bytes (no numpy needed)."""
    n = t.numel() * t.element_size()
    return memoryview((ctypes.c_char * n).from_address(t.data_ptr())).cast("B")


class FileSource(Source):
    """Ranges of one safetensors file, read with ``preadv`` straight into the buffers.

    The page cache holds the file; the process only holds the buffers it reads into, so
    the resident set stays bounded by the windows in use, whatever the number or size of
    the files. (Memory-mapping was measured slower here: populating and dropping page
    tables costs as much as the copy.)
    """

    def __init__(self, path: str, meta: FileMeta | None = None) -> None:
        self.meta = meta if meta is not None else read_meta(path)
        self.path = path
        self._fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        try:
            if os.fstat(self._fd).st_size != self.meta.size:
                raise AggregationError(f"{os.path.basename(path)} changed while it was being read")
        except BaseException:
            os.close(self._fd)
            raise

    def read(self, name: str, start: int, stop: int, out: torch.Tensor) -> torch.Tensor:
        tm: TensorMeta = self.meta.tensors[name]
        count = stop - start
        if count <= 0:
            return out
        dtype = TORCH_DTYPES[tm.dtype]
        raw = out if out.dtype == dtype else scratch("raw", count, dtype)
        view = _bytes(raw)
        offset = tm.begin + start * tm.itemsize
        self._pread(view, offset)
        if raw is not out:
            out.copy_(raw)
        return out

    def _pread(self, view: memoryview, offset: int) -> None:
        done = 0
        while done < len(view):
            got = os.preadv(self._fd, [view[done:]], offset + done)
            if got <= 0:
                raise AggregationError(f"{os.path.basename(self.path)} is shorter than its header says")
            done += got

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class SourcePool:
    """Opens sources on demand and keeps at most ``max_open`` of them open (LRU)."""

    def __init__(self, openers: Sequence[Callable[[], Source]], max_open: int = 256) -> None:
        self._openers = openers
        self._open: OrderedDict[int, Source] = OrderedDict()
        self._max = max(1, max_open)

    def __len__(self) -> int:
        return len(self._openers)

    def get(self, i: int) -> Source:
        src = self._open.get(i)
        if src is not None:
            self._open.move_to_end(i)
            return src
        if len(self._open) >= self._max:
            _, old = self._open.popitem(last=False)
            old.close()
        src = self._openers[i]()
        self._open[i] = src
        return src

    def close(self) -> None:
        while self._open:
            _, src = self._open.popitem()
            src.close()


# --- scratch buffers, reused across windows, slices and rounds (per thread) ---------------
class _Buffers(dict[tuple[str, torch.dtype], torch.Tensor]):
    """One thread's scratch buffers (a dict subclass, so the registry can hold it weakly)."""

    # Identity, not contents: a dict is unhashable, and the registry is a WeakSet.
    __hash__ = object.__hash__  # type: ignore[assignment]

    def __eq__(self, other: object) -> bool:
        return self is other


_local = threading.local()
#: Every thread's buffers, so :func:`release_buffers` can free those of other threads too.
_registry: weakref.WeakSet[_Buffers] = weakref.WeakSet()


def scratch(tag: str, numel: int, dtype: torch.dtype) -> torch.Tensor:
    """A flat buffer of at least ``numel`` elements, kept for reuse by later calls.

    First touch of fresh memory costs page faults (about 1 GB/s on small VMs), so the
    working buffers of the kernels live here instead of being allocated per window. Each
    thread has its own, so concurrent rounds in one process never share a buffer.
    """
    bufs: _Buffers | None = getattr(_local, "bufs", None)
    if bufs is None:
        bufs = _Buffers()
        _local.bufs = bufs
        _registry.add(bufs)
    key = (tag, dtype)
    buf = bufs.get(key)
    if buf is None or buf.numel() < numel:
        buf = torch.empty(max(numel, 1), dtype=dtype)
        bufs[key] = buf
    return buf[:numel]


def release_buffers() -> None:
    """Free the scratch buffers kept between calls, of every thread."""
    for bufs in list(_registry):
        bufs.clear()

"""What a slice job reads: the round's sources, windows over them, and delta row norms."""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from .. import _kernels as K
from .._sources import TORCH_DTYPES, FileSource, MemorySource, Source, SourcePool, scratch
from ..errors import AggregationError
from ..meta import TensorMeta, describe_mismatch, read_meta
from ..slicing import BLOCK, Piece

if TYPE_CHECKING:
    from .plan import Plan, UpdateEntry

#: Elements per window of the streaming mean (the accumulator window stays in cache).
MEAN_WINDOW = 1 << 20
#: Target bytes of one [n, c] window of the order-statistic rules (cache-sized).
COORD_WINDOW_BYTES = 16 << 20
#: Target bytes of one [n, c] window of the stats pass.
STATS_WINDOW_BYTES = 16 << 20
#: Most update files kept open at once.
MAX_OPEN_FILES = 256


def accumulation_dtype(code: str) -> torch.dtype:
    """The dtype a tensor of safetensors dtype ``code`` is aggregated in."""
    return torch.float64 if code == "F64" else torch.float32


class MemoryModels:
    """In-memory models to aggregate instead of files: the global model and the updates."""

    def __init__(
        self, global_sd: Mapping[str, torch.Tensor], updates: Sequence[Mapping[str, torch.Tensor]]
    ) -> None:
        self.global_src = MemorySource(global_sd)
        self.updates: list[Source] = [MemorySource(u) for u in updates]


class Inputs:
    """The sources one phase of a round reads: the global model, the updates (opened
    lazily, at most :data:`MAX_OPEN_FILES` at once) and the optimizer state."""

    def __init__(self, plan: Plan, memory: MemoryModels | None = None) -> None:
        self.model = plan.model
        self.state: Source | None = None
        if memory is not None:
            self.global_src: Source = memory.global_src
            self.pool = SourcePool([_constant(s) for s in memory.updates], max_open=len(memory.updates) + 1)
            self._owned = False
            return
        self._owned = True
        assert plan.global_path is not None
        global_meta = read_meta(plan.global_path)
        if describe_mismatch(self.model, global_meta.tensors):
            raise AggregationError(
                f"global model {os.path.basename(plan.global_path)} changed since the round was planned"
            )
        self.global_src = FileSource(plan.global_path, global_meta)
        if plan.state_path is not None and plan.state_present:
            self.state = FileSource(plan.state_path)
        openers = [functools.partial(self._open_update, u) for u in plan.updates]
        self.pool = SourcePool(openers, max_open=MAX_OPEN_FILES)

    def _open_update(self, update: UpdateEntry) -> Source:
        assert update.path is not None
        meta = read_meta(update.path)
        if describe_mismatch(self.model, meta.tensors):
            raise AggregationError(f"update {update.key!r} changed since the round was planned")
        return FileSource(update.path, meta)

    def update(self, index: int) -> Source:
        return self.pool.get(index)

    def close(self) -> None:
        if self._owned:
            self.pool.close()
            self.global_src.close()
            if self.state is not None:
                self.state.close()


def _constant(source: Source) -> Callable[[], Source]:
    return lambda: source


def windows(start: int, stop: int, size: int) -> list[tuple[int, int]]:
    """``[start, stop)`` cut into windows of ``size`` elements (the last one shorter)."""
    return [(a, min(stop, a + size)) for a in range(start, stop, size)]


def window_width(rows: int, itemsize: int, target: int, budget: int) -> int:
    """Columns of a ``[rows, c]`` window of at most ``min(target, budget)`` bytes, a
    multiple of BLOCK (at least one block)."""
    per_column = max(1, rows * itemsize)
    columns = min(target, budget) // per_column
    return max(BLOCK, columns // BLOCK * BLOCK)


class RowNorms:
    """Squared delta norms of ``n`` updates over one slice's float pieces.

    Per window, each :data:`~aggregation._kernels.ROW`-element row's norm goes into a small
    buffer, reduced at the end of the window in fixed groups; the per-window sums are added
    exactly at the end. The result does not depend on the thread count or on the windows.
    """

    def __init__(self, n: int) -> None:
        self.n = n
        self.parts: list[list[float]] = [[] for _ in range(n)]
        self.bad_piece: list[int | None] = [None] * n
        self.rows = torch.empty(0)

    def begin(self, columns: int) -> None:
        self.rows = scratch("row_norms", self.n * -(-columns // K.ROW), torch.float64).view(self.n, -1)

    def put(self, k: int, x: torch.Tensor) -> None:
        """Row norms of update ``k``'s delta window ``x`` (1-D)."""
        K.row_norms_into(x, self.rows[k])

    def put_all(self, x: torch.Tensor) -> None:
        """Row norms of all updates' delta windows ``x`` ([n, c])."""
        K.row_norms_into(x, self.rows)

    def end(self, piece_index: int) -> None:
        """Close the window (of piece ``piece_index``)."""
        for k, s in enumerate(K.sum_squares_of_rows(self.rows)):
            self.parts[k].append(s)
            if not math.isfinite(s) and self.bad_piece[k] is None:
                self.bad_piece[k] = piece_index

    def totals(self) -> list[float]:
        return [K.fsum(p) for p in self.parts]


def finite_or_none(values: list[float]) -> list[float | None]:
    """Slice results are strict JSON: a non-finite value (its update is refused) is null."""
    return [v if math.isfinite(v) else None for v in values]


def norm_results(
    norms: RowNorms, who: Sequence[int], inputs: Inputs, pieces: Sequence[Piece]
) -> dict[str, Any]:
    """A slice's JSON-able norm results for updates ``who``: ``sumsq`` (the partial squared
    norms, null when not finite) and ``bad`` (why each is not finite, or null)."""
    totals = norms.totals()
    return {"sumsq": finite_or_none(totals), "bad": _bad_reasons(norms, totals, who, inputs, pieces)}


def _bad_reasons(
    norms: RowNorms, totals: list[float], who: Sequence[int], inputs: Inputs, pieces: Sequence[Piece]
) -> list[str | None]:
    out: list[str | None] = []
    for k, total in enumerate(totals):
        if math.isfinite(total):
            out.append(None)
            continue
        j = norms.bad_piece[k]
        if j is None:  # only the sum overflowed
            out.append("values too large: the norm of the change overflows float64")
            continue
        out.append(
            _why_bad(inputs.update(who[k]), inputs.global_src, pieces[j], inputs.model[pieces[j].name])
        )
    return out


def _why_bad(source: Source, global_src: Source, piece: Piece, meta: TensorMeta) -> str:
    """Why the delta of ``source`` on ``piece`` has a non-finite norm (rare path)."""
    dtype = TORCH_DTYPES[meta.dtype]
    name = piece.name
    for a, b in windows(piece.start, piece.stop, MEAN_WINDOW):
        if not bool(torch.isfinite(source.read(name, a, b, scratch("why", b - a, dtype))).all()):
            return f"non-finite values (NaN or Inf) in tensor {name!r}"
    for a, b in windows(piece.start, piece.stop, MEAN_WINDOW):
        if not bool(torch.isfinite(global_src.read(name, a, b, scratch("why", b - a, dtype))).all()):
            raise AggregationError(f"the global model has non-finite values in tensor {name!r}")
    return f"values too large: the norm of the change to tensor {name!r} overflows {meta.dtype}"

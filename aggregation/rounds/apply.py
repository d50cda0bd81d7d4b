"""The apply phase: per slice, the new parameters (and optimizer state) from the decisions.

Mean rules stream one update window at a time (:func:`_mean_piece`); order-statistic rules
work on ``[n + 1, c]`` windows of all used updates (:func:`_coord_piece`); integer tensors
take the lower coordinate-wise median. Results go to a sink: the output tensors of a
single-worker round, or the pieces of a slice file.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Protocol

import torch
from safetensors.torch import save_file

from .. import _kernels as K
from .._sources import TORCH_DTYPES, scratch
from ..errors import AggregationError
from ..meta import FLOAT_DTYPES, TensorMeta
from ..slicing import Piece
from .decide import Decisions
from .inputs import (
    COORD_WINDOW_BYTES,
    MEAN_WINDOW,
    Inputs,
    RowNorms,
    accumulation_dtype,
    norm_results,
    window_width,
    windows,
)
from .optimizer import server_step
from .plan import Plan, state_kinds


class Sink(Protocol):
    """Where the apply phase writes piece ``j`` of a slice."""

    def param(self, j: int, piece: Piece) -> torch.Tensor: ...

    def state(self, j: int, kind: str, piece: Piece) -> torch.Tensor: ...


class MemorySink:
    """Writes straight into full-size output tensors (single-worker path)."""

    def __init__(self, params: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor]) -> None:
        self.params = params
        self.state_out = state

    def param(self, j: int, piece: Piece) -> torch.Tensor:
        return self.params[piece.name].view(-1)[piece.start : piece.stop]

    def state(self, j: int, kind: str, piece: Piece) -> torch.Tensor:
        return self.state_out[f"{kind}/{piece.name}"].view(-1)[piece.start : piece.stop]


class PieceSink:
    """Collects one slice's pieces as flat tensors ``p<j>``, ``m<j>``, ``v<j>``, for a slice file."""

    def __init__(self, model: Mapping[str, TensorMeta]) -> None:
        self.model = model
        self.tensors: dict[str, torch.Tensor] = {}

    def param(self, j: int, piece: Piece) -> torch.Tensor:
        t = torch.empty(piece.numel, dtype=TORCH_DTYPES[self.model[piece.name].dtype])
        self.tensors[f"p{j}"] = t
        return t

    def state(self, j: int, kind: str, piece: Piece) -> torch.Tensor:
        t = torch.empty(piece.numel, dtype=accumulation_dtype(self.model[piece.name].dtype))
        self.tensors[f"{kind}{j}"] = t
        return t


def apply_slice(plan: Mapping[str, Any], index: int, out_path: str | os.PathLike[str]) -> dict[str, Any]:
    """Apply phase of one slice: writes the slice's new parameters (``p<j>`` for piece j,
    flat) and optimizer state (``m<j>``, ``v<j>``) to ``out_path`` (safetensors) and returns
    the JSON-able partial results for :func:`advance_round`."""
    typed = Plan.from_json(plan)
    if typed.phase != "apply":
        raise AggregationError(f"the plan is in phase {typed.phase!r}, not 'apply'")
    inputs = Inputs(typed)
    try:
        sink = PieceSink(inputs.model)
        info = slice_apply(typed, index, sink, inputs)
    finally:
        inputs.close()
    save_file(sink.tensors, os.fspath(out_path))
    return info


def slice_apply(plan: Plan, index: int, sink: Sink, inputs: Inputs) -> dict[str, Any]:
    """Apply slice ``index`` into ``sink``. Returns the partial ``sumsq`` and ``bad`` of the
    used updates when the plan tracks norms here (no stats pass), else nulls."""
    decisions = plan.decided()
    pieces = plan.slices[index]
    norms = RowNorms(len(decisions.used)) if decisions.track_norms else None
    for j, piece in enumerate(pieces):
        meta = inputs.model[piece.name]
        dst = sink.param(j, piece)
        kinds = state_kinds(plan.strategy) if meta.dtype in FLOAT_DTYPES else ()
        state_dst = {kind: sink.state(j, kind, piece) for kind in kinds}
        if piece.stop <= piece.start:
            continue
        if meta.dtype not in FLOAT_DTYPES:
            _int_median(plan, piece, dst, inputs)
        elif decisions.kind == "mean":
            _mean_piece(plan, j, piece, dst, state_dst, inputs, norms)
        else:
            _coord_piece(plan, j, piece, dst, inputs, norms)
    if norms is None:
        return {"sumsq": None, "bad": None}
    return norm_results(norms, decisions.used, inputs, pieces)


def _int_median(plan: Plan, piece: Piece, dst: torch.Tensor, inputs: Inputs) -> None:
    """Integer and bool tensors (counters, masks): the lower coordinate-wise median of the
    updates the rule uses (exact, and robust to a minority of attackers)."""
    used = plan.decided().used
    n = len(used)
    width = window_width(n + 1, 8, COORD_WINDOW_BYTES, plan.chunk_bytes)
    for a, b in windows(piece.start, piece.stop, width):
        c = b - a
        x = scratch("int_x", (n + 1) * c, torch.int64).view(n + 1, c)
        for k, i in enumerate(used):
            inputs.update(i).read(piece.name, a, b, x[k])
        rows = K.sort_columns(x, n, ((n - 1) // 2,))
        dst[a - piece.start : b - piece.start].copy_(x[rows[(n - 1) // 2]])


def _mean_piece(
    plan: Plan,
    j: int,
    piece: Piece,
    dst: torch.Tensor,
    state_dst: Mapping[str, torch.Tensor],
    inputs: Inputs,
    norms: RowNorms | None,
) -> None:
    """``new = g + noise + sum_k c_k (u_k - g)``, or a server-optimizer step on that delta,
    window by window (the accumulator window stays in cache)."""
    decisions = plan.decided()
    if _copies_one_update(decisions, norms):  # Krum without clipping: the selected model, bit for bit
        for a, b in windows(piece.start, piece.stop, MEAN_WINDOW):
            inputs.update(decisions.used[0]).read(piece.name, a, b, dst[a - piece.start : b - piece.start])
        return
    acc_dtype = accumulation_dtype(inputs.model[piece.name].dtype)
    for a, b in windows(piece.start, piece.stop, MEAN_WINDOW):
        out = dst[a - piece.start : b - piece.start]
        g = inputs.global_src.read(piece.name, a, b, scratch("g", b - a, acc_dtype))
        in_place = out.dtype == acc_dtype and decisions.optimizer is None
        acc = out if in_place else scratch("acc", b - a, acc_dtype)
        _sum_deltas(plan, j, piece.name, a, b, g, acc, inputs, norms)
        if decisions.optimizer is not None:
            _optimizer_window(plan, piece, a, b, acc, g, out, state_dst, inputs)
        elif in_place:
            out.add_(g)
        else:
            out.copy_(acc.add_(g))


def _copies_one_update(decisions: Decisions, norms: RowNorms | None) -> bool:
    assert decisions.coefs is not None
    return (
        len(decisions.used) == 1
        and decisions.coefs[0] == 1.0
        and decisions.noise_std == 0
        and decisions.optimizer is None
        and norms is None
    )


def _sum_deltas(
    plan: Plan,
    j: int,
    name: str,
    a: int,
    b: int,
    g: torch.Tensor,
    acc: torch.Tensor,
    inputs: Inputs,
    norms: RowNorms | None,
) -> None:
    """``acc = sum_k c_k (u_k - g) + noise`` over elements ``[a, b)`` of tensor ``name``;
    the deltas' row norms go to ``norms`` (piece ``j``)."""
    decisions = plan.decided()
    coefs = decisions.coefs
    assert coefs is not None
    if norms is not None:
        norms.begin(b - a)
    for k, i in enumerate(decisions.used):
        delta = inputs.update(i).read_delta(name, a, b, g, scratch("u", b - a, acc.dtype))
        if k == 0:
            torch.mul(delta, coefs[0], out=acc)
        else:
            acc.add_(delta, alpha=coefs[k])
        if norms is not None:
            norms.put(k, delta)
    if norms is not None:
        norms.end(j)
    numel = inputs.model[name].numel
    K.add_noise_(acc, name, a, numel, decisions.noise_std, int(plan.params["seed"]), plan.round_seed)


def _optimizer_window(
    plan: Plan,
    piece: Piece,
    a: int,
    b: int,
    delta: torch.Tensor,
    g: torch.Tensor,
    out: torch.Tensor,
    state_dst: Mapping[str, torch.Tensor],
    inputs: Inputs,
) -> None:
    """The server optimizer's step on the aggregated ``delta`` of elements ``[a, b)``."""
    previous: dict[str, torch.Tensor] = {}
    if inputs.state is not None:
        for kind in plan.state_present:
            buffer = scratch(f"old_{kind}", b - a, delta.dtype)
            previous[kind] = inputs.state.read(f"{kind}/{piece.name}", a, b, buffer)
    new = {kind: t[a - piece.start : b - piece.start] for kind, t in state_dst.items()}
    optimizer = plan.decided().optimizer
    assert optimizer is not None
    server_step(optimizer, plan.params, delta, g, out, previous, new)


def _coord_piece(
    plan: Plan, j: int, piece: Piece, dst: torch.Tensor, inputs: Inputs, norms: RowNorms | None
) -> None:
    """Order-statistic rules, coordinate-wise over ``[n + 1, c]`` windows of all used
    updates (``chunk_bytes`` bounds the memory, not the model size). Without clipping they
    work on the models; with clipping on the clipped deltas (then + g)."""
    decisions = plan.decided()
    n = len(decisions.used)
    meta = inputs.model[piece.name]
    acc_dtype = accumulation_dtype(meta.dtype)
    width = window_width(n + 1, acc_dtype.itemsize, COORD_WINDOW_BYTES, plan.chunk_bytes)
    for a, b in windows(piece.start, piece.stop, width):
        out = dst[a - piece.start : b - piece.start]
        x, g = _coord_window(plan, j, piece.name, a, b, acc_dtype, inputs, norms)
        res = out if out.dtype == acc_dtype else scratch("res", b - a, acc_dtype)
        _order_statistic(decisions, x, n, res)
        if decisions.scales is not None:
            assert g is not None
            res.add_(g)
        K.add_noise_(
            res, piece.name, a, meta.numel, decisions.noise_std, int(plan.params["seed"]), plan.round_seed
        )
        if res is not out:
            out.copy_(res)


def _coord_window(
    plan: Plan,
    j: int,
    name: str,
    a: int,
    b: int,
    dtype: torch.dtype,
    inputs: Inputs,
    norms: RowNorms | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The used updates' elements ``[a, b)`` as rows of ``x`` ([n + 1, c]; the last row is
    scratch), clipped deltas when clipping; the global window when it was needed."""
    decisions = plan.decided()
    n, c = len(decisions.used), b - a
    x = scratch("coord_x", (n + 1) * c, dtype).view(n + 1, c)
    for k, i in enumerate(decisions.used):
        inputs.update(i).read(name, a, b, x[k])
    if norms is None and decisions.scales is None:
        return x, None
    g = inputs.global_src.read(name, a, b, scratch("g", c, dtype))
    if norms is not None:
        deltas = scratch("d", n * c, dtype).view(n, c)
        torch.sub(x[:n], g, out=deltas)
        norms.begin(c)
        norms.put_all(deltas)
        norms.end(j)
    if decisions.scales is not None:
        x[:n].sub_(g)
        for k, factor in enumerate(decisions.scales):
            if factor != 1.0:
                x[k].mul_(factor)
    return x, g


def _order_statistic(decisions: Decisions, x: torch.Tensor, n: int, out: torch.Tensor) -> None:
    """The rule's value per column of the first ``n`` rows of ``x`` into ``out``."""
    if decisions.rule == "median":
        K.median_of(x, K.sort_columns(x, n, K.median_outputs(n)), n, out)
    elif decisions.rule == "trimmed_mean":
        k = decisions.trim_k
        K.trimmed_mean_of(x, K.sort_columns(x, n, K.trimmed_outputs(n, k)), n, k, out)
    else:
        K.bulyan_of(x, K.sort_columns(x, n), n, decisions.bulyan_beta, out)

"""The stats phase: per slice, each accepted update's squared delta norm, whether it is
finite, and (Krum, Multi-Krum, Bulyan) the Gram matrix of the deltas."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from .._sources import scratch
from ..errors import AggregationError
from ..meta import FLOAT_DTYPES
from ..slicing import BLOCK, Piece
from ..spec import DISTANCE_RULES
from .inputs import (
    STATS_WINDOW_BYTES,
    Inputs,
    RowNorms,
    accumulation_dtype,
    finite_or_none,
    norm_results,
    window_width,
    windows,
)
from .plan import Plan


def stats_slice(plan: Mapping[str, Any], index: int) -> dict[str, Any]:
    """Stats phase of one slice: JSON-able partial results for :func:`advance_round`."""
    typed = Plan.from_json(plan)
    if typed.phase != "stats":
        raise AggregationError(f"the plan is in phase {typed.phase!r}, not 'stats'")
    inputs = Inputs(typed)
    try:
        return slice_stats(typed, index, inputs)
    finally:
        inputs.close()


def slice_stats(plan: Plan, index: int, inputs: Inputs) -> dict[str, Any]:
    """The stats of slice ``index``: ``members`` (the accepted updates), per member the
    partial ``sumsq`` (null when not finite) and why it is ``bad``, and the partial ``gram``."""
    members = plan.accepted()
    pieces = plan.slices[index]
    norms = RowNorms(len(members))
    gram = (
        torch.zeros(len(members), len(members), dtype=torch.float64)
        if plan.strategy in DISTANCE_RULES
        else None
    )
    for j, piece in enumerate(pieces):
        if inputs.model[piece.name].dtype in FLOAT_DTYPES and piece.stop > piece.start:
            _piece_stats(plan, j, piece, members, inputs, norms, gram)
    return {
        "members": members,
        **norm_results(norms, members, inputs, pieces),
        "gram": [finite_or_none(row) for row in gram.tolist()] if gram is not None else None,
    }


def _piece_stats(
    plan: Plan,
    j: int,
    piece: Piece,
    members: list[int],
    inputs: Inputs,
    norms: RowNorms,
    gram: torch.Tensor | None,
) -> None:
    n = len(members)
    acc = accumulation_dtype(inputs.model[piece.name].dtype)
    per_element = acc.itemsize + (8 if gram is not None and acc != torch.float64 else 0)
    width = window_width(n, per_element, STATS_WINDOW_BYTES, plan.chunk_bytes)
    for a, b in windows(piece.start, piece.stop, width):
        c = b - a
        x = scratch("stats_x", n * c, acc).view(n, c)
        g = inputs.global_src.read(piece.name, a, b, scratch("g", c, acc))
        for k, i in enumerate(members):
            inputs.update(i).read(piece.name, a, b, x[k])
        x.sub_(g)
        norms.begin(c)
        norms.put_all(x)
        norms.end(j)
        if gram is not None:
            x64 = x
            if acc != torch.float64:
                x64 = scratch("stats_x64", n * c, torch.float64).view(n, c).copy_(x)
            _add_gram(gram, x64)


def _add_gram(gram: torch.Tensor, x: torch.Tensor) -> None:
    """``gram += x @ x.T`` in float64. For few updates that is a very skinny GEMM, which BLAS
    runs slowly; batched over BLOCK-column blocks it is about twice as fast."""
    n, c = x.shape
    main = c - c % BLOCK
    if n <= 32 and main >= 2 * BLOCK:
        blocks = x[:, :main].view(n, main // BLOCK, BLOCK).transpose(0, 1)
        gram.add_(torch.bmm(blocks, blocks.transpose(1, 2)).sum(0))
        if main < c:
            gram.addmm_(x[:, main:], x[:, main:].t())
    else:
        gram.addmm_(x, x.t())

"""The end of a round: output buffers, assembling slice files, and :class:`RoundResult`."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors import safe_open

from .._sources import TORCH_DTYPES
from ..errors import AggregationError
from ..meta import FLOAT_DTYPES, TensorMeta
from ..slicing import Piece
from .inputs import accumulation_dtype
from .plan import Plan, state_kinds


@dataclass
class RoundResult:
    """What a round produced.

    ``params``: the new global model (the global model's names, shapes and dtypes), or
    None when too few valid updates remained; ``reason`` then says why. ``state``: the
    strategy state to persist (e.g. with :func:`aggregation.save_state`) and pass back
    next round; unchanged from the input when the round failed; may be empty.
    ``report``: JSON-able, see ``docs/aggregation.md``. ``plan``: the final plan
    (``plan.to_json()`` for its JSON form).
    """

    params: dict[str, torch.Tensor] | None
    state: dict[str, torch.Tensor]
    report: dict[str, Any]
    reason: str | None = None
    plan: Plan | None = field(default=None, repr=False)

    @property
    def ok(self) -> bool:
        return self.params is not None


def allocate_outputs(
    plan: Plan, reuse: RoundResult | None
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Output parameters and optimizer state for the plan's model; tensors of ``reuse`` that
    fit (name, shape, dtype, contiguous) are taken instead of new ones."""
    old_params = (reuse.params or {}) if reuse is not None else {}
    old_state = reuse.state if reuse is not None else {}
    params = {
        n: _tensor(old_params, n, meta.shape, TORCH_DTYPES[meta.dtype]) for n, meta in plan.model.items()
    }
    state: dict[str, torch.Tensor] = {}
    for kind in state_kinds(plan.strategy):
        for n, meta in plan.model.items():
            if meta.dtype in FLOAT_DTYPES:
                key = f"{kind}/{n}"
                state[key] = _tensor(old_state, key, meta.shape, accumulation_dtype(meta.dtype))
    return params, state


def _tensor(
    old: Mapping[str, torch.Tensor], key: str, shape: tuple[int, ...], dtype: torch.dtype
) -> torch.Tensor:
    t = old.get(key)
    if t is not None and tuple(t.shape) == shape and t.dtype == dtype and t.is_contiguous():
        return t
    return torch.empty(shape, dtype=dtype)


def finish_round(plan: Mapping[str, Any], slice_paths: Sequence[str | os.PathLike[str]]) -> RoundResult:
    """Assemble the slice files of the last apply phase into the round's result."""
    typed = Plan.from_json(plan)
    if typed.phase == "failed":
        return finish(typed, {}, {})
    if typed.phase != "done":
        raise AggregationError(f"the round is not finished (phase {typed.phase!r})")
    if len(slice_paths) != len(typed.slices):
        raise AggregationError(f"expected {len(typed.slices)} slice files, got {len(slice_paths)}")
    params, state = allocate_outputs(typed, None)
    for pieces, path in zip(typed.slices, slice_paths, strict=True):
        _read_slice_file(os.fspath(path), pieces, typed, params, state)
    return finish(typed, params, state)


def _read_slice_file(
    path: str,
    pieces: Sequence[Piece],
    plan: Plan,
    params: Mapping[str, torch.Tensor],
    state: Mapping[str, torch.Tensor],
) -> None:
    model: Mapping[str, TensorMeta] = plan.model
    with safe_open(path, framework="pt") as fh:
        for j, piece in enumerate(pieces):
            params[piece.name].view(-1)[piece.start : piece.stop].copy_(fh.get_tensor(f"p{j}"))
            if model[piece.name].dtype in FLOAT_DTYPES:
                for kind in state_kinds(plan.strategy):
                    target = state[f"{kind}/{piece.name}"].view(-1)[piece.start : piece.stop]
                    target.copy_(fh.get_tensor(f"{kind}{j}"))


def finish(plan: Plan, params: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> RoundResult:
    """The result of a done or failed plan; ``params`` and ``state`` hold the output."""
    assert plan.report is not None
    if plan.phase != "done":
        return RoundResult(None, _previous_state(plan), plan.report, plan.reason, plan)
    following = plan.decided().clip_norm_next
    if following is not None:
        state["clip_norm"] = torch.tensor(following, dtype=torch.float64)
    return RoundResult(params, state, plan.report, None, plan)


def _previous_state(plan: Plan) -> dict[str, torch.Tensor]:
    if plan.state_path is None:
        return {}
    out: dict[str, torch.Tensor] = {}
    with safe_open(plan.state_path, framework="pt") as fh:
        for key in fh.keys():  # noqa: SIM118 - safe_open is not a mapping
            out[key] = fh.get_tensor(key)
    return out

"""``aggregate(rule, updates, **params)``: the stateless rules over in-memory models."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ._sources import SAFETENSORS_DTYPES
from .errors import NotEnoughUpdates
from .meta import TensorMeta
from .rounds import MEAN_WINDOW, MemoryModels, RoundResult, UpdateEntry, example_shares, new_plan, run_plan
from .spec import FUNCTIONAL_RULES, normalize_without_clients, shortfall

Updates = Sequence[tuple[Mapping[str, torch.Tensor], int]]


def aggregate(
    rule: str,
    updates: Updates,
    *,
    out: Mapping[str, torch.Tensor] | None = None,
    **params: Any,
) -> dict[str, torch.Tensor]:
    """Aggregate models (full state dicts, like Flower's ``aggregate``) with a stateless rule.

    ``rule``: ``fedavg`` (weighted by the example counts; ``weighting="uniform"`` for a plain
    mean), ``median``, ``trimmed_mean`` (``beta``), ``krum`` (``f``), ``multi_krum`` (``f``,
    ``m``: the m best by Krum score, averaged with example-count weights) or ``bulyan``
    (``f``). ``updates``: ``(state_dict, num_examples)`` pairs, all with the same names,
    shapes and dtypes. Returns a new state dict of the same dtypes.

    ``out``: a previous result (or any tensors) to overwrite instead of allocating new ones,
    like ``run_round(reuse=...)``: a tensor is reused when its name, shape and dtype match
    and it is contiguous. It must not share memory with the updates (``ValueError``);
    after an error its contents are unspecified.

    Accumulates in float32 (float64 for float64 inputs); fedavg over float32/float64 models
    is one blocked pass, the rest run a round's kernels (``docs/aggregation.md``).
    Raises ``ValueError`` for mismatched models, non-positive example counts or non-finite
    values, and :class:`~aggregation.NotEnoughUpdates` when the rule needs more updates
    (e.g. Krum needs n > 2f + 2).
    """
    if rule not in FUNCTIONAL_RULES:
        raise ValueError(f"unknown rule {rule!r}; known: {', '.join(FUNCTIONAL_RULES)}")
    if any(k.startswith("clip") or k == "noise_multiplier" for k in params):
        raise ValueError(
            "aggregate() takes no clipping or noise parameters; use build_strategy().run_round()"
        )
    strategy_params = normalize_without_clients(rule, params)
    if not updates:
        raise NotEnoughUpdates(f"{rule} needs at least 1 update, got 0")
    first = updates[0][0]
    model = _model_of(first)
    entries = _entries(updates, first)
    reason = shortfall(rule, strategy_params, len(updates))
    if reason:
        raise NotEnoughUpdates(reason)
    reuse = _reusable(out or {}, first, updates)
    if rule == "fedavg" and all(t.dtype in _FAST_DTYPES for t in first.values()):
        shares = example_shares([c for _, c in updates], strategy_params.get("weighting", "examples"))
        fast = _weighted_sum([sd for sd, _ in updates], shares, reuse)
        if fast is not None:
            return fast
    # distances and norms are taken relative to the first model (translation invariant)
    plan = new_plan(rule, strategy_params, model, entries)
    previous = RoundResult(params=reuse, state={}, report={}) if reuse else None
    result = run_plan(plan, memory=MemoryModels(first, [sd for sd, _ in updates]), reuse=previous)
    bad = [f"updates[{k}]: {u.reason}" for k, u in enumerate(plan.updates) if not u.accepted]
    if bad:
        raise ValueError("; ".join(bad))
    assert result.params is not None
    return result.params


_FAST_DTYPES = (torch.float32, torch.float64)


def _model_of(first: Mapping[str, torch.Tensor]) -> dict[str, TensorMeta]:
    """Names, shapes and dtypes of the first model (CPU tensors of a safetensors dtype)."""
    if not first:
        raise ValueError("updates[0] has no tensors")
    model: dict[str, TensorMeta] = {}
    for name, t in first.items():
        if t.dtype not in SAFETENSORS_DTYPES:
            raise ValueError(f"tensor {name!r} has unsupported dtype {t.dtype}")
        if t.device.type != "cpu":
            raise ValueError(f"tensor {name!r} is not on the CPU")
        model[name] = TensorMeta(SAFETENSORS_DTYPES[t.dtype], tuple(t.shape), 0, 0)
    return model


def _entries(updates: Updates, first: Mapping[str, torch.Tensor]) -> list[UpdateEntry]:
    """One accepted entry per update; ``ValueError`` when one does not match the first
    model or its example count is not a positive integer."""
    entries: list[UpdateEntry] = []
    for k, (sd, count) in enumerate(updates):
        if set(sd) != set(first):
            raise ValueError(f"updates[{k}] has different tensor names than updates[0]")
        for name, t in sd.items():
            if t.dtype != first[name].dtype or t.shape != first[name].shape:
                raise ValueError(
                    f"updates[{k}][{name!r}] is {t.dtype}{list(t.shape)}, "
                    f"expected {first[name].dtype}{list(first[name].shape)}"
                )
        if isinstance(count, bool) or not isinstance(count, int) or count <= 0:
            raise ValueError(f"updates[{k}]: num_examples must be a positive integer, got {count!r}")
        entries.append(UpdateEntry(str(k), None, count, count, count))
    return entries


def _reusable(
    out: Mapping[str, torch.Tensor],
    first: Mapping[str, torch.Tensor],
    updates: Updates,
) -> dict[str, torch.Tensor]:
    """The tensors of ``out`` that can hold the result (matching name, shape, dtype;
    contiguous, on the CPU); ``ValueError`` when one shares memory with an update."""
    keep = {
        name: t
        for name, t in out.items()
        if name in first
        and t.shape == first[name].shape
        and t.dtype == first[name].dtype
        and t.device.type == "cpu"
        and t.is_contiguous()
    }
    if keep:
        storages = {t.untyped_storage().data_ptr() for t in keep.values()}
        for k, (sd, _) in enumerate(updates):
            for name, t in sd.items():
                if t.untyped_storage().data_ptr() in storages:
                    raise ValueError(f"out shares memory with updates[{k}][{name!r}]")
    return keep


def _weighted_sum(
    models: Sequence[Mapping[str, torch.Tensor]],
    coefs: Sequence[float],
    reuse: Mapping[str, torch.Tensor],
) -> dict[str, torch.Tensor] | None:
    """``sum_k coefs[k] * models[k]`` per tensor, window by window (MEAN_WINDOW elements):
    the window of the result stays in cache while every update's window streams through it
    once. None when a result is not finite (a NaN/Inf input, or an overflow). A
    non-contiguous input is copied whole first (state dicts are contiguous in practice)."""
    out: dict[str, torch.Tensor] = {}
    for name, t0 in models[0].items():
        flats = [m[name].reshape(-1) for m in models]
        dst = reuse[name] if name in reuse else torch.empty(t0.shape, dtype=t0.dtype)
        flat_dst = dst.view(-1)
        for a in range(0, flat_dst.numel(), MEAN_WINDOW):
            b = a + MEAN_WINDOW
            acc = flat_dst[a:b]
            torch.mul(flats[0][a:b], coefs[0], out=acc)
            for x, c in zip(flats[1:], coefs[1:], strict=True):
                acc.add_(x[a:b], alpha=c)
        if not bool(torch.isfinite(flat_dst.sum())):
            return None
        out[name] = dst
    return out

"""``aggregate(rule, updates, **params)``: the stateless rules over in-memory models."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ._sources import SAFETENSORS_DTYPES
from .errors import NotEnoughUpdates
from .rounds import DEFAULT_CHUNK_BYTES, DEFAULT_MAX_SLICE_BYTES, _Memory, _new_plan, _run
from .slicing import plan_slices
from .spec import FUNCTIONAL_RULES, normalize_without_clients, shortfall


def aggregate(
    rule: str,
    updates: Sequence[tuple[Mapping[str, torch.Tensor], int]],
    **params: Any,
) -> dict[str, torch.Tensor]:
    """Aggregate models (full state dicts, like Flower's ``aggregate``) with a stateless rule.

    ``rule``: ``fedavg`` (weighted by the example counts; ``weighting="uniform"`` for a plain
    mean), ``median``, ``trimmed_mean`` (``beta``), ``krum`` (``f``), ``multi_krum`` (``f``,
    ``m``: the m best by Krum score, averaged with example-count weights) or ``bulyan``
    (``f``). ``updates``: ``(state_dict, num_examples)`` pairs, all with the same names,
    shapes and dtypes. Returns a new state dict of the same dtypes.

    Runs the same kernels, in the same order, as a round of the same rule without clipping.
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
    sparams = normalize_without_clients(rule, params)
    if not updates:
        raise NotEnoughUpdates(f"{rule} needs at least 1 update, got 0")
    first = updates[0][0]
    if not first:
        raise ValueError("updates[0] has no tensors")
    model: dict[str, Any] = {}
    for name, t in first.items():
        if t.dtype not in SAFETENSORS_DTYPES:
            raise ValueError(f"tensor {name!r} has unsupported dtype {t.dtype}")
        if t.device.type != "cpu":
            raise ValueError(f"tensor {name!r} is not on the CPU")
        model[name] = {"dtype": SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape)}
    entries: list[dict[str, Any]] = []
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
        entries.append(
            {
                "key": str(k),
                "path": None,
                "num_examples": count,
                "max_examples": count,
                "examples": count,
                "accepted": True,
                "reason": None,
            }
        )
    reason = shortfall(rule, sparams, len(updates))
    if reason:
        raise NotEnoughUpdates(reason)
    plan = _new_plan(
        rule,
        sparams,
        model,
        entries,
        global_path=None,
        state_path=None,
        state_present=[],
        clip_norm_state=None,
        round_seed=0,
        slices=[s.to_json() for s in plan_slices(model, DEFAULT_MAX_SLICE_BYTES)],
        chunk_bytes=DEFAULT_CHUNK_BYTES,
    )
    # distances and norms are taken relative to the first model (translation invariant)
    result = _run(plan, _Memory(first, [sd for sd, _ in updates]), None)
    bad = [f"updates[{k}]: {u['reason']}" for k, u in enumerate(result.plan["updates"]) if not u["accepted"]]
    if bad:
        raise ValueError("; ".join(bad))
    assert result.params is not None
    return result.params

"""What a round's plan holds, and planning a round from its inputs' headers.

On the wire a plan is JSON (the sliced path keeps it in a job file between Celery jobs);
inside this package it is a :class:`Plan`. :meth:`Plan.from_json` and :meth:`Plan.to_json`
convert at that boundary, key for key, so the JSON is what it always was.
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, TypedDict, Unpack

import torch

from .._sources import FileSource
from ..errors import AggregationError
from ..meta import FileMeta, TensorMeta, describe_mismatch, read_meta
from ..slicing import Piece, plan_slices
from ..spec import DISTANCE_RULES, SERVER_OPTIMIZERS, normalize_without_clients, shortfall
from .decide import Decisions, decide_round
from .report import build_report

PLAN_VERSION = 1
#: Default slice threshold: models up to 1 GiB are one slice. The single-worker path and a
#: sliced (chord) path must use the same value to be bit-identical.
DEFAULT_MAX_SLICE_BYTES = 1 << 30
#: Default working-set budget of the order-statistic and stats windows ([n, c] buffers).
DEFAULT_CHUNK_BYTES = 64 << 20


@dataclass(frozen=True)
class UpdateFile:
    """One client upload of a round.

    ``path``: safetensors file with the client's full trained state dict (not a delta).
    ``num_examples``: the example count the client claimed. ``max_examples``: the size of
    the shard the server assigned (the claim is clamped to it). ``key``: an opaque id
    (e.g. the assignment id) the report is keyed by.
    """

    path: str | os.PathLike[str]
    num_examples: int
    max_examples: int
    key: str


class OptionKeywords(TypedDict, total=False):
    """:class:`RoundOptions` as keyword arguments (``run_round(..., round_seed=7)``)."""

    round_seed: int
    max_slice_bytes: int
    chunk_bytes: int


@dataclass(frozen=True)
class RoundOptions:
    """How a round runs, whatever the strategy.

    ``round_seed`` seeds the DP noise (with ``strategy_params.seed``); it must be secret from
    clients for a privacy guarantee. ``max_slice_bytes``: the slice threshold (a sliced and a
    single-worker run must use the same value to be bit-identical). ``chunk_bytes``: the
    working-set budget of the order-statistic and stats windows.
    """

    round_seed: int = 0
    max_slice_bytes: int = DEFAULT_MAX_SLICE_BYTES
    chunk_bytes: int = DEFAULT_CHUNK_BYTES

    def check(self) -> None:
        """Raise :class:`AggregationError` for a bad seed or chunk size (the slice planner
        checks ``max_slice_bytes``)."""
        if not _is_int(self.round_seed) or not 0 <= self.round_seed < 2**63:
            raise AggregationError("round_seed must be an integer in 0 .. 2**63 - 1")
        if not _is_int(self.chunk_bytes) or self.chunk_bytes < 1:
            raise AggregationError("chunk_bytes must be a positive integer")


@dataclass
class UpdateEntry:
    """One update as the plan tracks it: ``examples`` is the claim clamped to
    ``[0, max_examples]``; a refused update has ``accepted`` False and a ``reason``. The
    field order is the JSON key order."""

    key: str
    path: str | None  # None for in-memory models
    num_examples: int
    max_examples: int
    examples: int
    accepted: bool = True
    reason: str | None = None

    def refuse(self, reason: str) -> None:
        self.accepted = False
        self.reason = reason

    def to_json(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> UpdateEntry:
        return cls(**data)


@dataclass(kw_only=True)
class Plan:
    """A round in progress: its inputs, the phase it is in, and what was found so far.

    ``phase`` is ``"stats"`` or ``"apply"`` (work to do on every slice), ``"done"`` or
    ``"failed"``. ``norms`` maps update indices to delta norms; ``decisions`` is set from the
    apply phase on; ``report`` once the round is done or failed. The field order is the JSON
    key order.
    """

    version: int = PLAN_VERSION
    strategy: str
    params: dict[str, Any]  # normalized strategy_params
    round_seed: int
    global_path: str | None  # None for in-memory models
    model: dict[str, TensorMeta]  # names, shapes and dtypes (no offsets)
    state_path: str | None
    state_present: list[str]  # state kinds ("m", "v") the state file holds
    clip_norm_state: float | None  # the adaptive clip norm from the state file
    updates: list[UpdateEntry]
    slices: list[list[Piece]]
    chunk_bytes: int
    needs_stats: bool
    phase: str = "stats"
    attempt: int = 1
    stats_members: list[int] | None = None
    norms: dict[int, float] = field(default_factory=dict)
    decisions: Decisions | None = None
    reason: str | None = None
    report: dict[str, Any] | None = None

    def accepted(self) -> list[int]:
        """Indices of the updates still accepted."""
        return [i for i, u in enumerate(self.updates) if u.accepted]

    def decided(self) -> Decisions:
        """The decisions (phases apply and done)."""
        if self.decisions is None:
            raise AggregationError(f"the plan has no decisions (phase {self.phase!r})")
        return self.decisions

    def refuse(self, index: int, reason: str) -> None:
        self.updates[index].refuse(reason)
        self.norms.pop(index, None)

    def fail(self, reason: str) -> None:
        """End the round without a model: too few valid updates remain."""
        self.phase = "failed"
        self.reason = f"not enough valid updates: {reason}"
        self.decisions = None
        self.report = build_report(self)

    def decide(self, gram: list[list[float]] | None) -> None:
        """Decide everything global and move to phase apply, or fail when too few remain."""
        reason = shortfall(self.strategy, self.params, len(self.accepted()))
        if reason:
            self.fail(reason)
            return
        self.decisions = decide_round(self, gram)
        self.phase = "apply"

    def to_json(self) -> dict[str, Any]:
        return {
            **{f.name: getattr(self, f.name) for f in fields(self)},
            "model": {name: meta.to_json() for name, meta in self.model.items()},
            "updates": [u.to_json() for u in self.updates],
            "slices": [[[p.name, p.start, p.stop] for p in pieces] for pieces in self.slices],
            "norms": {str(i): norm for i, norm in self.norms.items()},
            "decisions": self.decisions.to_json() if self.decisions is not None else None,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Plan:
        """A plan from its JSON form (copied: the input is never modified)."""
        data = copy.deepcopy(dict(data))
        decisions = data["decisions"]
        return cls(
            **{
                **data,
                "model": {
                    n: TensorMeta(e["dtype"], tuple(e["shape"]), 0, 0) for n, e in data["model"].items()
                },
                "updates": [UpdateEntry.from_json(u) for u in data["updates"]],
                "slices": [
                    [Piece(name, start, stop) for name, start, stop in pieces] for pieces in data["slices"]
                ],
                "norms": {int(i): norm for i, norm in data["norms"].items()},
                "decisions": Decisions.from_json(decisions) if decisions is not None else None,
            }
        )


def state_kinds(strategy: str) -> tuple[str, ...]:
    """The optimizer state a strategy keeps per float tensor: momentum ``m``, second moment ``v``."""
    if strategy == "fedavgm":
        return ("m",)
    if strategy in SERVER_OPTIMIZERS:
        return ("m", "v")
    return ()


def model_of(tensors: Mapping[str, TensorMeta]) -> dict[str, TensorMeta]:
    """Names, shapes and dtypes of a model, without file offsets."""
    return {name: TensorMeta(t.dtype, t.shape, 0, 0) for name, t in tensors.items()}


def plan_round(
    strategy: str,
    params: Mapping[str, Any] | None,
    global_path: str | os.PathLike[str],
    updates: Sequence[UpdateFile | Mapping[str, Any]],
    state_path: str | os.PathLike[str] | None = None,
    **options: Unpack[OptionKeywords],
) -> dict[str, Any]:
    """Check every input's header and plan the round; returns the JSON-able plan.

    Reads only headers (and the adaptive clip norm from the state file). Updates whose
    headers do not match the global model, or whose example count is not positive, are
    refused here with a reason. Raises :class:`AggregationError` for problems of the
    caller's own inputs (unreadable global model or state file, duplicate keys, bad
    arguments).
    """
    plan = plan_files(strategy, params, global_path, updates, state_path, RoundOptions(**options))
    return plan.to_json()


def plan_files(
    strategy: str,
    params: Mapping[str, Any] | None,
    global_path: str | os.PathLike[str],
    updates: Sequence[UpdateFile | Mapping[str, Any]],
    state_path: str | os.PathLike[str] | None,
    options: RoundOptions,
) -> Plan:
    """:func:`plan_round`, returning the typed :class:`Plan`."""
    strategy_params = normalize_without_clients(strategy, params or {})
    options.check()
    global_file = os.fspath(global_path)
    global_meta = read_meta(global_file)
    if not global_meta.tensors:
        raise AggregationError(f"global model {os.path.basename(global_file)} has no tensors")
    state_file = os.fspath(state_path) if state_path is not None else None
    present: list[str] = []
    clip_norm: float | None = None
    if state_file is not None:
        present, clip_norm = check_state(
            read_meta(state_file), global_meta, state_kinds(strategy), strategy_params
        )
    return new_plan(
        strategy,
        strategy_params,
        model_of(global_meta.tensors),
        _entries(updates, global_meta),
        options,
        global_path=global_file,
        state_path=state_file,
        state_present=present,
        clip_norm_state=clip_norm,
    )


def new_plan(
    strategy: str,
    params: dict[str, Any],
    model: dict[str, TensorMeta],
    updates: list[UpdateEntry],
    options: RoundOptions | None = None,
    *,
    global_path: str | None = None,
    state_path: str | None = None,
    state_present: Sequence[str] = (),
    clip_norm_state: float | None = None,
) -> Plan:
    """A plan in its first phase: ``stats`` when clipping or distances need one, else
    ``apply`` (decided now), or ``failed`` when too few updates are accepted.
    ``params`` must be normalized; the paths are None for in-memory models."""
    options = options or RoundOptions()
    plan = Plan(
        strategy=strategy,
        params=params,
        round_seed=options.round_seed,
        global_path=global_path,
        model=model,
        state_path=state_path,
        state_present=list(state_present),
        clip_norm_state=clip_norm_state,
        updates=updates,
        slices=[list(s.pieces) for s in plan_slices(model, options.max_slice_bytes)],
        chunk_bytes=options.chunk_bytes,
        needs_stats=params["clip_mode"] != "none" or strategy in DISTANCE_RULES,
    )
    if not plan.needs_stats:
        plan.decide(None)
        return plan
    reason = shortfall(strategy, params, len(plan.accepted()))
    if reason:
        plan.fail(reason)
    return plan


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _entries(updates: Sequence[UpdateFile | Mapping[str, Any]], global_meta: FileMeta) -> list[UpdateEntry]:
    entries: list[UpdateEntry] = []
    seen: set[str] = set()
    for update in updates:
        if isinstance(update, UpdateFile):
            path, key = os.fspath(update.path), str(update.key)
            claimed, cap = update.num_examples, update.max_examples
        else:
            path, key = os.fspath(update["path"]), str(update["key"])
            claimed, cap = update["num_examples"], update["max_examples"]
        if key in seen:
            raise AggregationError(f"duplicate update key {key!r}")
        seen.add(key)
        entries.append(_entry(path, key, claimed, cap, global_meta))
    return entries


def _entry(path: str, key: str, claimed: Any, cap: Any, global_meta: FileMeta) -> UpdateEntry:
    """One update, refused when its count is not positive or its header does not match."""
    if not _is_int(claimed):
        raise AggregationError(f"update {key!r}: num_examples must be an integer, got {claimed!r}")
    if not _is_int(cap) or cap < 1:
        raise AggregationError(f"update {key!r}: max_examples must be a positive integer, got {cap!r}")
    entry = UpdateEntry(key, path, claimed, cap, max(0, min(claimed, cap)))
    if claimed <= 0:
        entry.refuse(f"non-positive example count {claimed}")
        return entry
    try:
        why = describe_mismatch(global_meta.tensors, read_meta(path).tensors)
    except AggregationError as exc:
        why = f"unreadable safetensors file ({exc})"
    if why:
        entry.refuse(why)
    return entry


def check_state(
    state_meta: FileMeta, global_meta: FileMeta, kinds: tuple[str, ...], params: Mapping[str, Any]
) -> tuple[list[str], float | None]:
    """The state kinds a state file holds for the model, and its adaptive clip norm (None
    when absent or not used). A kind missing entirely starts fresh; a partial or mismatched
    one raises :class:`AggregationError`."""
    name = os.path.basename(state_meta.path)
    present: list[str] = []
    floats = {n: t for n, t in global_meta.tensors.items() if t.is_float}
    for kind in kinds:
        keys = {f"{kind}/{n}" for n in floats}
        have = keys & set(state_meta.tensors)
        if not have:
            continue
        if have != keys:
            missing = sorted(keys - have)[:3]
            raise AggregationError(f"state file {name} is incomplete: missing {', '.join(missing)}")
        for tensor_name, t in floats.items():
            stored = state_meta.tensors[f"{kind}/{tensor_name}"]
            want = "F64" if t.dtype == "F64" else "F32"
            if stored.shape != t.shape or stored.dtype != want:
                raise AggregationError(
                    f"state file {name} does not match the model: {kind}/{tensor_name} is "
                    f"{stored.dtype}{list(stored.shape)}, expected {want}{list(t.shape)}"
                )
        present.append(kind)
    if params["clip_mode"] == "adaptive" and "clip_norm" in state_meta.tensors:
        return present, _stored_clip_norm(state_meta)
    return present, None


def _stored_clip_norm(state_meta: FileMeta) -> float:
    name = os.path.basename(state_meta.path)
    meta = state_meta.tensors["clip_norm"]
    if meta.dtype != "F64" or meta.shape != ():
        raise AggregationError(f"state file {name}: clip_norm must be a float64 scalar")
    source = FileSource(state_meta.path, state_meta)
    try:
        clip = float(source.read("clip_norm", 0, 1, torch.empty(1, dtype=torch.float64))[0])
    finally:
        source.close()
    if not (math.isfinite(clip) and clip > 0):
        raise AggregationError(f"state file {name}: clip_norm {clip} is not a positive number")
    return clip

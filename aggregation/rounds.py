"""Rounds: validate updates, then aggregate slice by slice in phases (stats, apply).

A round is a small state machine over a JSON-able *plan*::

    plan = plan_round(...)                        # headers checked, slices planned
    while plan["phase"] in ("stats", "apply"):
        parts = [run_slice(plan, k, path_k) for k in range(len(plan["slices"]))]  # parallel
        plan = advance_round(plan, parts)         # reduce, in slice order
    result = finish_round(plan, [path_k ...])     # assemble the slice files

``stats`` computes, per slice, each update's partial squared delta norm, whether it is
finite, and (Krum/Bulyan) the partial Gram matrix of the deltas; ``advance_round`` sums
them in slice order and decides everything global (refusals, clip factors, selection,
noise scale, the next adaptive clip norm). ``apply`` then produces the new parameters (and
optimizer state) of each slice. Rules that need nothing global (fedavg family and
median/trimmed mean without clipping) skip ``stats``: their ``apply`` reports norms and
non-finite values itself, and if an update turns out non-finite it is refused and
``apply`` runs again without it (the plan says ``phase == "apply"`` again).

:meth:`Strategy.run_round` runs exactly these functions in sequence over the same slices,
so a sliced (parallel) round equals the single-worker round bit for bit.
"""

from __future__ import annotations

import copy
import functools
import math
import os
import random
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from . import _kernels as K
from ._sources import TORCH_DTYPES, FileSource, MemorySource, Source, SourcePool, scratch
from .errors import AggregationError
from .meta import FLOAT_DTYPES, FileMeta, TensorMeta, describe_mismatch, read_meta
from .selection import bulyan_select, krum_select
from .slicing import BLOCK, plan_slices
from .spec import (
    DISTANCE_RULES,
    MEAN_STRATEGIES,
    SERVER_OPTIMIZERS,
    normalize_without_clients,
    shortfall,
    trim_count,
)

PLAN_VERSION = 1
#: Default slice threshold: models up to 1 GiB are one slice. The single-worker path and a
#: sliced (chord) path must use the same value to be bit-identical.
DEFAULT_MAX_SLICE_BYTES = 1 << 30
#: Default working-set budget of the order-statistic and stats windows ([n, c] buffers).
DEFAULT_CHUNK_BYTES = 64 << 20
#: Elements per window of the streaming mean (the accumulator window stays in cache).
MEAN_WINDOW = 1 << 20
#: Target bytes of one [n, c] window of the order-statistic rules (cache-sized).
COORD_WINDOW_BYTES = 16 << 20
#: Target bytes of one [n, c] window of the stats pass.
STATS_WINDOW_BYTES = 16 << 20
#: Most update files kept open at once.
MAX_OPEN_FILES = 256
OUTLIER_MAD_SCALE = 1.4826


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


@dataclass
class RoundResult:
    """What a round produced.

    ``params``: the new global model (the global model's names, shapes and dtypes), or
    None when too few valid updates remained; ``reason`` then says why. ``state``: the
    strategy state to persist (e.g. with :func:`aggregation.save_state`) and pass back
    next round; unchanged from the input when the round failed; may be empty.
    ``report``: JSON-able, see ``docs/aggregation.md``.
    """

    params: dict[str, torch.Tensor] | None
    state: dict[str, torch.Tensor]
    report: dict[str, Any]
    reason: str | None = None
    plan: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def ok(self) -> bool:
        return self.params is not None


# --------------------------------------------------------------------------------------
# planning


def _acc_dtype(code: str) -> torch.dtype:
    return torch.float64 if code == "F64" else torch.float32


def _state_kinds(strategy: str) -> tuple[str, ...]:
    if strategy == "fedavgm":
        return ("m",)
    if strategy in SERVER_OPTIMIZERS:
        return ("m", "v")
    return ()


def _model_meta(plan: Mapping[str, Any]) -> dict[str, TensorMeta]:
    return {n: TensorMeta(e["dtype"], tuple(e["shape"]), 0, 0) for n, e in plan["model"].items()}


def _coerce_update(u: UpdateFile | Mapping[str, Any]) -> tuple[str, str, Any, Any]:
    if isinstance(u, UpdateFile):
        return os.fspath(u.path), str(u.key), u.num_examples, u.max_examples
    return os.fspath(u["path"]), str(u["key"]), u["num_examples"], u["max_examples"]


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def plan_round(
    strategy: str,
    params: Mapping[str, Any] | None,
    global_path: str | os.PathLike[str],
    updates: Sequence[UpdateFile | Mapping[str, Any]],
    state_path: str | os.PathLike[str] | None = None,
    *,
    round_seed: int = 0,
    max_slice_bytes: int = DEFAULT_MAX_SLICE_BYTES,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> dict[str, Any]:
    """Check every input's header and plan the round; returns the JSON-able plan.

    Reads only headers (and the adaptive clip norm from the state file). Updates whose
    headers do not match the global model, or whose example count is not positive, are
    refused here with a reason. Raises :class:`AggregationError` for problems of the
    caller's own inputs (unreadable global model or state file, duplicate keys, bad
    arguments).
    """
    sparams = normalize_without_clients(strategy, params or {})
    if not _is_int(round_seed) or not 0 <= round_seed < 2**63:
        raise AggregationError("round_seed must be an integer in 0 .. 2**63 - 1")
    if not _is_int(chunk_bytes) or chunk_bytes < 1:
        raise AggregationError("chunk_bytes must be a positive integer")
    gpath = os.fspath(global_path)
    gmeta = read_meta(gpath)
    if not gmeta.tensors:
        raise AggregationError(f"global model {os.path.basename(gpath)} has no tensors")
    model = gmeta.to_json()

    kinds = _state_kinds(strategy)
    spath = os.fspath(state_path) if state_path is not None else None
    present: list[str] = []
    clip_state: float | None = None
    if spath is not None:
        smeta = read_meta(spath)
        present, clip_state = _check_state(smeta, gmeta, kinds, sparams)

    entries: list[dict[str, Any]] = []
    seen: set[str] = set()
    for u in updates:
        path, key, claimed, cap = _coerce_update(u)
        if key in seen:
            raise AggregationError(f"duplicate update key {key!r}")
        seen.add(key)
        if not _is_int(claimed):
            raise AggregationError(f"update {key!r}: num_examples must be an integer, got {claimed!r}")
        if not _is_int(cap) or cap < 1:
            raise AggregationError(f"update {key!r}: max_examples must be a positive integer, got {cap!r}")
        entry: dict[str, Any] = {
            "key": key,
            "path": path,
            "num_examples": claimed,
            "max_examples": cap,
            "examples": max(0, min(claimed, cap)),
            "accepted": True,
            "reason": None,
        }
        if claimed <= 0:
            entry.update(accepted=False, reason=f"non-positive example count {claimed}")
        else:
            try:
                why = describe_mismatch(gmeta.tensors, read_meta(path).tensors)
            except AggregationError as exc:
                why = f"unreadable safetensors file ({exc})"
            if why:
                entry.update(accepted=False, reason=why)
        entries.append(entry)

    return _new_plan(
        strategy,
        sparams,
        model,
        entries,
        global_path=gpath,
        state_path=spath,
        state_present=present,
        clip_norm_state=clip_state,
        round_seed=round_seed,
        slices=[s.to_json() for s in plan_slices(gmeta.tensors, max_slice_bytes)],
        chunk_bytes=chunk_bytes,
    )


def _new_plan(
    strategy: str,
    sparams: dict[str, Any],
    model: dict[str, Any],
    entries: list[dict[str, Any]],
    *,
    global_path: str | None,
    state_path: str | None,
    state_present: list[str],
    clip_norm_state: float | None,
    round_seed: int,
    slices: list[list[list[Any]]],
    chunk_bytes: int,
) -> dict[str, Any]:
    needs_stats = sparams["clip_mode"] != "none" or strategy in DISTANCE_RULES
    plan: dict[str, Any] = {
        "version": PLAN_VERSION,
        "strategy": strategy,
        "params": sparams,
        "round_seed": round_seed,
        "global_path": global_path,
        "model": model,
        "state_path": state_path,
        "state_present": state_present,
        "clip_norm_state": clip_norm_state,
        "updates": entries,
        "slices": slices,
        "chunk_bytes": chunk_bytes,
        "needs_stats": needs_stats,
        "phase": "stats",
        "attempt": 1,
        "stats_members": None,
        "norms": {},
        "decisions": None,
        "reason": None,
        "report": None,
    }
    if needs_stats:
        reason = shortfall(strategy, sparams, len(_accepted(plan)))
        if reason:
            _fail(plan, reason)
    else:
        _decide(plan, None)
    return plan


def _check_state(
    smeta: FileMeta, gmeta: FileMeta, kinds: tuple[str, ...], params: Mapping[str, Any]
) -> tuple[list[str], float | None]:
    name = os.path.basename(smeta.path)
    present: list[str] = []
    floats = {n: t for n, t in gmeta.tensors.items() if t.is_float}
    for kind in kinds:
        keys = {f"{kind}/{n}" for n in floats}
        have = keys & set(smeta.tensors)
        if not have:
            continue
        if have != keys:
            missing = sorted(keys - have)[:3]
            raise AggregationError(f"state file {name} is incomplete: missing {', '.join(missing)}")
        for pname, t in floats.items():
            st = smeta.tensors[f"{kind}/{pname}"]
            want = "F64" if t.dtype == "F64" else "F32"
            if st.shape != t.shape or st.dtype != want:
                raise AggregationError(
                    f"state file {name} does not match the model: {kind}/{pname} is "
                    f"{st.dtype}{list(st.shape)}, expected {want}{list(t.shape)}"
                )
        present.append(kind)
    clip: float | None = None
    if params["clip_mode"] == "adaptive" and "clip_norm" in smeta.tensors:
        t = smeta.tensors["clip_norm"]
        if t.dtype != "F64" or t.shape != ():
            raise AggregationError(f"state file {name}: clip_norm must be a float64 scalar")
        src = FileSource(smeta.path, smeta)
        try:
            clip = float(src.read("clip_norm", 0, 1, torch.empty(1, dtype=torch.float64))[0])
        finally:
            src.close()
        if not (math.isfinite(clip) and clip > 0):
            raise AggregationError(f"state file {name}: clip_norm {clip} is not a positive number")
    return present, clip


def _accepted(plan: Mapping[str, Any]) -> list[int]:
    return [i for i, u in enumerate(plan["updates"]) if u["accepted"]]


def _fail(plan: dict[str, Any], reason: str) -> None:
    plan["phase"] = "failed"
    plan["reason"] = f"not enough valid updates: {reason}"
    plan["decisions"] = None
    plan["report"] = _report(plan)


def _refuse(plan: dict[str, Any], i: int, reason: str) -> None:
    plan["updates"][i].update(accepted=False, reason=reason)
    plan["norms"].pop(str(i), None)


# --------------------------------------------------------------------------------------
# decisions (everything global, computed once per round from the reduced stats)


def example_shares(examples: Sequence[int], weighting: str) -> list[float]:
    """Each update's share of a mean: by its (clamped) example count, or equal shares when
    ``weighting`` is ``"uniform"``; the shares sum to 1."""
    raw = [1.0] * len(examples) if weighting == "uniform" else [float(e) for e in examples]
    total = math.fsum(raw)
    return [w / total for w in raw]


def _decide(plan: dict[str, Any], gram: list[list[float]] | None) -> None:
    """Fill ``plan["decisions"]`` (phase apply) or fail the plan."""
    strategy: str = plan["strategy"]
    p: Mapping[str, Any] = plan["params"]
    ok = _accepted(plan)
    reason = shortfall(strategy, p, len(ok))
    if reason:
        _fail(plan, reason)
        return
    norms = {i: plan["norms"].get(str(i)) for i in ok}

    # clipping
    mode = p["clip_mode"]
    clip: float | None = None
    clip_next: float | None = None
    z = float(p["noise_multiplier"])
    z_eff = z
    if mode == "fixed":
        clip = float(p["clip_norm"])
    elif mode == "adaptive":
        clip = plan["clip_norm_state"] if plan["clip_norm_state"] is not None else float(p["clip_norm"])
        sigma_b = float(p["clip_count_stddev"])
        below = sum(1 for i in ok if (norms[i] or 0.0) <= clip)
        rng = random.Random(K.noise_seed(int(p["seed"]), int(plan["round_seed"]), "\x00clip_count", 0))
        noisy = below + (rng.gauss(0.0, sigma_b) if sigma_b > 0 else 0.0)
        frac = noisy / len(ok)
        clip_next = clip * math.exp(-float(p["clip_lr"]) * (frac - float(p["clip_quantile"])))
        if z > 0:
            z_eff = (z**-2 - (2 * sigma_b) ** -2) ** -0.5
    scale: dict[int, float] = {}
    for i in ok:
        nrm = norms[i]
        scale[i] = 1.0 if clip is None or nrm is None or nrm <= clip else clip / nrm

    dec: dict[str, Any] = {
        "kind": "mean",
        "used": ok,
        "coefs": None,
        "coef_sum": None,
        "shares": None,
        "scales": None,
        "rule": strategy,
        "trim_k": 0,
        "bulyan_beta": 0,
        "selected": None,
        "clip_norm": clip,
        "clip_norm_next": clip_next,
        "clip_factors": {str(i): scale[i] for i in ok},
        "noise_multiplier": z_eff if clip is not None else 0.0,
        "noise_std": 0.0,
        "optimizer": strategy if strategy in SERVER_OPTIMIZERS else None,
        "track_norms": not plan["needs_stats"],
    }
    if strategy in ("krum", "multi_krum", "bulyan"):
        assert gram is not None
        dist = _distances(gram, [scale[i] for i in ok])
        f = int(p["f"])
        local = list(range(len(ok)))
        if strategy == "bulyan":
            chosen = [ok[j] for j in bulyan_select(dist, local, f)]
            dec["selected"] = chosen
        else:
            m = 1 if strategy == "krum" else (p["m"] if p.get("m") is not None else len(ok) - f)
            chosen = sorted(ok[j] for j in krum_select(dist, local, f, int(m)))
            dec["selected"] = chosen
        dec["used"] = chosen
    used: list[int] = dec["used"]
    if strategy in MEAN_STRATEGIES or strategy in ("krum", "multi_krum"):
        examples = [plan["updates"][i]["examples"] for i in used]
        shares = example_shares(examples, p.get("weighting", "examples"))
        dec["shares"] = shares
        dec["coefs"] = [a * scale[i] for a, i in zip(shares, used, strict=True)]
        dec["coef_sum"] = math.fsum(dec["coefs"])
        sensitivity = max(shares)
    else:
        dec["kind"] = "coord"
        dec["scales"] = [scale[i] for i in used] if clip is not None else None
        if strategy == "trimmed_mean":
            dec["trim_k"] = trim_count(float(p["beta"]), len(used))
        if strategy == "bulyan":
            dec["bulyan_beta"] = len(used) - 2 * int(p["f"])
        sensitivity = 1.0 / len(used)
    if clip is not None and z_eff > 0:
        dec["noise_std"] = z_eff * clip * sensitivity
    plan["decisions"] = dec
    plan["phase"] = "apply"


def _distances(gram: list[list[float]], scales: list[float]) -> list[list[float]]:
    """Squared distances between the clipped deltas ``s_a d_a`` from their Gram matrix
    (upper triangle only, so the matrix is exactly symmetric)."""
    n = len(scales)

    def d(a: int, b: int) -> float:
        if a == b:
            return 0.0
        lo, hi = min(a, b), max(a, b)
        sa, sb = scales[lo], scales[hi]
        return max(0.0, sa * sa * gram[lo][lo] + sb * sb * gram[hi][hi] - 2 * sa * sb * gram[lo][hi])

    return [[d(a, b) for b in range(n)] for a in range(n)]


# --------------------------------------------------------------------------------------
# per-slice work


class _Inputs:
    """The sources a slice job reads: global model, updates (lazily, LRU), state."""

    def __init__(self, plan: Mapping[str, Any], memory: _Memory | None = None) -> None:
        self.model = _model_meta(plan)
        self.updates_json: list[dict[str, Any]] = plan["updates"]
        self.state: Source | None = None
        if memory is not None:
            self.global_src: Source = memory.global_src
            self.pool = SourcePool([_const(s) for s in memory.updates], max_open=len(memory.updates) + 1)
            self._owned = False
            return
        self._owned = True
        gpath = plan["global_path"]
        gmeta = read_meta(gpath)
        if describe_mismatch(self.model, gmeta.tensors):
            raise AggregationError(
                f"global model {os.path.basename(gpath)} changed since the round was planned"
            )
        self.global_src = FileSource(gpath, gmeta)
        if plan["state_path"] is not None and plan["state_present"]:
            self.state = FileSource(plan["state_path"])
        openers = [functools.partial(self._open_update, u) for u in self.updates_json]
        self.pool = SourcePool(openers, max_open=MAX_OPEN_FILES)

    def _open_update(self, u: Mapping[str, Any]) -> Source:
        meta = read_meta(u["path"])
        if describe_mismatch(self.model, meta.tensors):
            raise AggregationError(f"update {u['key']!r} changed since the round was planned")
        return FileSource(u["path"], meta)

    def update(self, i: int) -> Source:
        return self.pool.get(i)

    def close(self) -> None:
        if self._owned:
            self.pool.close()
            self.global_src.close()
            if self.state is not None:
                self.state.close()


def _const(src: Source) -> Callable[[], Source]:
    return lambda: src


class _Memory:
    def __init__(
        self, global_sd: Mapping[str, torch.Tensor], updates: Sequence[Mapping[str, torch.Tensor]]
    ) -> None:
        self.global_src = MemorySource(global_sd)
        self.updates: list[Source] = [MemorySource(u) for u in updates]


def _windows(start: int, stop: int, size: int) -> list[tuple[int, int]]:
    return [(a, min(stop, a + size)) for a in range(start, stop, size)]


def _coord_window(n: int, itemsize: int, target: int, budget: int) -> int:
    per = max(1, n * itemsize)
    c = min(target, budget) // per
    return max(BLOCK, c // BLOCK * BLOCK)


class _RowNorms:
    """Squared delta norms of ``n`` updates over one slice's float pieces.

    Per window, the norm of each :data:`~aggregation._kernels.ROW`-element row (rows aligned
    to the tensor start, each reduced by one thread) goes into a small buffer, which is
    reduced at the end of the window in fixed groups; the per-window sums are added with
    ``math.fsum`` at the end. So the result does not depend on the thread count, and the
    buffer is one window, whatever the number of updates or the model size.
    """

    def __init__(self, n: int) -> None:
        self.n = n
        self.parts: list[list[float]] = [[] for _ in range(n)]
        self.bad_piece: list[int | None] = [None] * n
        self.rows = torch.empty(0)

    def begin(self, c: int) -> None:
        self.rows = scratch("row_norms", self.n * -(-c // K.ROW), torch.float64).view(self.n, -1)

    def put(self, k: int, x: torch.Tensor) -> None:
        """Row norms of update ``k``'s delta window ``x`` (1-D)."""
        K.row_norms_into(x, self.rows[k])

    def put_all(self, x: torch.Tensor) -> None:
        """Row norms of all updates' delta windows ``x`` ([n, c])."""
        K.row_norms_into(x, self.rows)

    def end(self, j: int) -> None:
        """Close the window (of piece ``j``)."""
        for k, s in enumerate(K.sum_squares_of_rows(self.rows)):
            self.parts[k].append(s)
            if not math.isfinite(s) and self.bad_piece[k] is None:
                self.bad_piece[k] = j

    def totals(self) -> list[float]:
        return [K.fsum(p) for p in self.parts]


def _why_bad(src: Source, g: Source, name: str, start: int, stop: int, tm: TensorMeta) -> str:
    """Why the delta of ``src`` on tensor ``name`` has a non-finite norm (rare path)."""
    dtype = TORCH_DTYPES[tm.dtype]
    for a, b in _windows(start, stop, MEAN_WINDOW):
        if not bool(torch.isfinite(src.read(name, a, b, scratch("why", b - a, dtype))).all()):
            return f"non-finite values (NaN or Inf) in tensor {name!r}"
    for a, b in _windows(start, stop, MEAN_WINDOW):
        if not bool(torch.isfinite(g.read(name, a, b, scratch("why", b - a, dtype))).all()):
            raise AggregationError(f"the global model has non-finite values in tensor {name!r}")
    return f"values too large: the norm of the change to tensor {name!r} overflows {tm.dtype}"


def _bad_reasons(
    norms: _RowNorms,
    totals: list[float],
    who: Sequence[int],
    inputs: _Inputs,
    pieces: Sequence[Sequence[Any]],
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
        name, start, stop = pieces[j]
        out.append(_why_bad(inputs.update(who[k]), inputs.global_src, name, start, stop, inputs.model[name]))
    return out


def stats_slice(plan: Mapping[str, Any], index: int) -> dict[str, Any]:
    """Stats phase of one slice: JSON-able partial results for :func:`advance_round`."""
    if plan["phase"] != "stats":
        raise AggregationError(f"the plan is in phase {plan['phase']!r}, not 'stats'")
    inputs = _Inputs(plan)
    try:
        return _stats(plan, index, inputs)
    finally:
        inputs.close()


def _stats(plan: Mapping[str, Any], index: int, inputs: _Inputs) -> dict[str, Any]:
    members = _accepted(plan)
    n = len(members)
    pieces = plan["slices"][index]
    want_gram = plan["strategy"] in DISTANCE_RULES
    norms = _RowNorms(n)
    gram = torch.zeros(n, n, dtype=torch.float64) if want_gram else None
    for j, (name, start, stop) in enumerate(pieces):
        tm = inputs.model[name]
        if tm.dtype not in FLOAT_DTYPES or stop <= start:
            continue
        acc = _acc_dtype(tm.dtype)
        per_elem = acc.itemsize + (8 if want_gram and acc != torch.float64 else 0)
        width = _coord_window(n, per_elem, STATS_WINDOW_BYTES, int(plan["chunk_bytes"]))
        for a, b in _windows(start, stop, width):
            c = b - a
            x = scratch("stats_x", n * c, acc).view(n, c)
            g = inputs.global_src.read(name, a, b, scratch("g", c, acc))
            for k, i in enumerate(members):
                inputs.update(i).read(name, a, b, x[k])
            x.sub_(g)
            norms.begin(c)
            norms.put_all(x)
            norms.end(j)
            if gram is not None:
                x64 = x
                if acc != torch.float64:
                    x64 = scratch("stats_x64", n * c, torch.float64).view(n, c).copy_(x)
                _add_gram(gram, x64)
    totals = norms.totals()
    return {
        "members": members,
        "sumsq": _finite_or_none(totals),
        "bad": _bad_reasons(norms, totals, members, inputs, pieces),
        "gram": [_finite_or_none(row) for row in gram.tolist()] if gram is not None else None,
    }


def _add_gram(gram: torch.Tensor, x: torch.Tensor) -> None:
    """``gram += x @ x.T`` in float64. For few updates the product is a very skinny GEMM
    ([n, c] x [c, n]) that BLAS runs slowly; batching it over BLOCK-column blocks is about
    twice as fast with the same float64 precision."""
    n, c = x.shape
    main = c - c % BLOCK
    if n <= 32 and main >= 2 * BLOCK:
        blocks = x[:, :main].view(n, main // BLOCK, BLOCK).transpose(0, 1)
        gram.add_(torch.bmm(blocks, blocks.transpose(1, 2)).sum(0))
        if main < c:
            gram.addmm_(x[:, main:], x[:, main:].t())
    else:
        gram.addmm_(x, x.t())


def _finite_or_none(values: list[float]) -> list[float | None]:
    """Slice results are strict JSON: a non-finite value (its update is refused) is null."""
    return [v if math.isfinite(v) else None for v in values]


class _Sink(Protocol):
    def param(self, j: int, name: str, start: int, stop: int) -> torch.Tensor: ...

    def state(self, j: int, kind: str, name: str, start: int, stop: int) -> torch.Tensor: ...


class _MemorySink:
    """Writes straight into full-size output tensors (single-worker path)."""

    def __init__(self, params: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor]) -> None:
        self.params = params
        self.state_out = state

    def param(self, j: int, name: str, start: int, stop: int) -> torch.Tensor:
        return self.params[name].view(-1)[start:stop]

    def state(self, j: int, kind: str, name: str, start: int, stop: int) -> torch.Tensor:
        return self.state_out[f"{kind}/{name}"].view(-1)[start:stop]


class _PieceSink:
    """Collects one slice's pieces as flat tensors, for a slice file."""

    def __init__(self, model: Mapping[str, TensorMeta]) -> None:
        self.model = model
        self.tensors: dict[str, torch.Tensor] = {}

    def param(self, j: int, name: str, start: int, stop: int) -> torch.Tensor:
        t = torch.empty(stop - start, dtype=TORCH_DTYPES[self.model[name].dtype])
        self.tensors[f"p{j}"] = t
        return t

    def state(self, j: int, kind: str, name: str, start: int, stop: int) -> torch.Tensor:
        t = torch.empty(stop - start, dtype=_acc_dtype(self.model[name].dtype))
        self.tensors[f"{kind}{j}"] = t
        return t


def apply_slice(plan: Mapping[str, Any], index: int, out_path: str | os.PathLike[str]) -> dict[str, Any]:
    """Apply phase of one slice: writes the slice's new parameters (``p<j>`` for piece j,
    flat) and optimizer state (``m<j>``, ``v<j>``) to ``out_path`` (safetensors) and returns
    the JSON-able partial results for :func:`advance_round`."""
    if plan["phase"] != "apply":
        raise AggregationError(f"the plan is in phase {plan['phase']!r}, not 'apply'")
    inputs = _Inputs(plan)
    try:
        sink = _PieceSink(inputs.model)
        info = _apply(plan, index, sink, inputs)
    finally:
        inputs.close()
    save_file(sink.tensors, os.fspath(out_path))
    return info


def run_slice(plan: Mapping[str, Any], index: int, out_path: str | os.PathLike[str]) -> dict[str, Any]:
    """The one task body of a chord: runs the phase the plan is in on slice ``index``.

    ``out_path`` receives the slice's tensors in the apply phase (unused in stats).
    Returns JSON-able partial results; pass the list, in slice order, to
    :func:`advance_round`.
    """
    if plan["phase"] == "stats":
        return stats_slice(plan, index)
    return apply_slice(plan, index, out_path)


def _apply(plan: Mapping[str, Any], index: int, sink: _Sink, inputs: _Inputs) -> dict[str, Any]:
    dec = plan["decisions"]
    used: list[int] = dec["used"]
    pieces = plan["slices"][index]
    track = bool(dec["track_norms"])
    norms = _RowNorms(len(used)) if track else None
    for j, (name, start, stop) in enumerate(pieces):
        tm = inputs.model[name]
        dst = sink.param(j, name, start, stop)
        state_dst = {kind: sink.state(j, kind, name, start, stop) for kind in _piece_state_kinds(plan, tm)}
        if stop <= start:
            continue
        if tm.dtype not in FLOAT_DTYPES:
            _int_median(plan, name, start, stop, dst, inputs)
        elif dec["kind"] == "mean":
            _mean_piece(plan, j, name, start, stop, dst, state_dst, inputs, norms)
        else:
            _coord_piece(plan, j, name, start, stop, dst, inputs, norms)
    if norms is None:
        return {"sumsq": None, "bad": None}
    totals = norms.totals()
    return {"sumsq": _finite_or_none(totals), "bad": _bad_reasons(norms, totals, used, inputs, pieces)}


def _piece_state_kinds(plan: Mapping[str, Any], tm: TensorMeta) -> tuple[str, ...]:
    return _state_kinds(plan["strategy"]) if tm.dtype in FLOAT_DTYPES else ()


def _int_median(
    plan: Mapping[str, Any], name: str, start: int, stop: int, dst: torch.Tensor, inputs: _Inputs
) -> None:
    """Integer and bool tensors (counters, masks): the lower coordinate-wise median of the
    updates the rule uses (exact, and robust to a minority of attackers)."""
    used: list[int] = plan["decisions"]["used"]
    n = len(used)
    width = _coord_window(n + 1, 8, COORD_WINDOW_BYTES, int(plan["chunk_bytes"]))
    for a, b in _windows(start, stop, width):
        c = b - a
        x = scratch("int_x", (n + 1) * c, torch.int64).view(n + 1, c)
        for k, i in enumerate(used):
            inputs.update(i).read(name, a, b, x[k])
        rows = K.sort_columns(x, n, ((n - 1) // 2,))
        dst[a - start : b - start].copy_(x[rows[(n - 1) // 2]])


def _mean_piece(
    plan: Mapping[str, Any],
    j: int,
    name: str,
    start: int,
    stop: int,
    dst: torch.Tensor,
    state_dst: Mapping[str, torch.Tensor],
    inputs: _Inputs,
    norms: _RowNorms | None,
) -> None:
    """new = g + noise + sum_k c_k (u_k - g) (or a server-optimizer step on that delta),
    streaming: one window of one update at a time (the window accumulator stays in cache)."""
    dec = plan["decisions"]
    used: list[int] = dec["used"]
    coefs: list[float] = dec["coefs"]
    opt: str | None = dec["optimizer"]
    std = float(dec["noise_std"])
    p = plan["params"]
    tm = inputs.model[name]
    acc_t = _acc_dtype(tm.dtype)
    exact_copy = len(used) == 1 and coefs[0] == 1.0 and std == 0 and opt is None and norms is None
    windows = _windows(start, stop, MEAN_WINDOW)
    if exact_copy:  # Krum without clipping: the selected model itself, bit for bit
        for a, b in windows:
            inputs.update(used[0]).read(name, a, b, dst[a - start : b - start])
        return

    for a, b in windows:
        c = b - a
        out = dst[a - start : b - start]
        g = inputs.global_src.read(name, a, b, scratch("g", c, acc_t))
        acc = out if (out.dtype == acc_t and opt is None) else scratch("acc", c, acc_t)
        if norms is not None:
            norms.begin(c)
        for k, i in enumerate(used):
            u = inputs.update(i).read_delta(name, a, b, g, scratch("u", c, acc_t))
            if k == 0:
                torch.mul(u, coefs[0], out=acc)
            else:
                acc.add_(u, alpha=coefs[k])
            if norms is not None:
                norms.put(k, u)
        if norms is not None:
            norms.end(j)
        K.add_noise_(acc, name, a, tm.numel, std, int(p["seed"]), int(plan["round_seed"]))
        if opt is None:
            if acc is out:
                out.add_(g)
            else:
                out.copy_(acc.add_(g))
            continue
        old = {}
        if inputs.state is not None:
            for kind in plan["state_present"]:
                old[kind] = inputs.state.read(f"{kind}/{name}", a, b, scratch(f"old_{kind}", c, acc_t))
        _server_step(
            opt,
            p,
            acc,
            g,
            out,
            old.get("m"),
            old.get("v"),
            {kind: t[a - start : b - start] for kind, t in state_dst.items()},
        )


def _server_step(
    opt: str,
    p: Mapping[str, Any],
    delta: torch.Tensor,
    g: torch.Tensor,
    out: torch.Tensor,
    m_old: torch.Tensor | None,
    v_old: torch.Tensor | None,
    new: Mapping[str, torch.Tensor],
) -> None:
    """Reddi et al., "Adaptive Federated Optimization" (ICLR 2021), Algorithm 2, with the
    aggregated delta as the negative gradient; FedAvgM as in Hsu et al. 2019."""
    c = delta.numel()
    dt = delta.dtype
    lr = float(p["server_lr"])
    m = new["m"]
    res = out if out.dtype == dt else scratch("res", c, dt)
    if opt == "fedavgm":
        if m_old is None:
            m.copy_(delta)
        else:
            torch.mul(m_old, float(p["momentum"]), out=m)
            m.add_(delta)
        torch.add(g, m, alpha=lr, out=res)
    else:
        b1 = float(p["beta1"])
        tau = float(p["tau"])
        if m_old is None:
            torch.mul(delta, 1.0 - b1, out=m)
        else:
            torch.mul(m_old, b1, out=m)
            m.add_(delta, alpha=1.0 - b1)
        d2 = scratch("d2", c, dt)
        torch.mul(delta, delta, out=d2)
        v = new["v"]
        v_prev = scratch("v0", c, dt).fill_(tau * tau) if v_old is None else v_old
        if opt == "fedadam":
            b2 = float(p["beta2"])
            torch.mul(v_prev, b2, out=v)
            v.add_(d2, alpha=1.0 - b2)
        elif opt == "fedyogi":
            b2 = float(p["beta2"])
            sign = scratch("sign", c, dt)
            torch.sub(v_prev, d2, out=sign)
            sign.sign_().mul_(d2)
            torch.sub(v_prev, sign, alpha=1.0 - b2, out=v)
        else:  # fedadagrad
            torch.add(v_prev, d2, out=v)
        step = scratch("step", c, dt)
        torch.sqrt(v, out=step)
        step.add_(tau)
        torch.div(m, step, out=step)
        torch.add(g, step, alpha=lr, out=res)
    if res is not out:
        out.copy_(res)


def _coord_piece(
    plan: Mapping[str, Any],
    j: int,
    name: str,
    start: int,
    stop: int,
    dst: torch.Tensor,
    inputs: _Inputs,
    norms: _RowNorms | None,
) -> None:
    """Order-statistic rules, coordinate-wise over windows of ``c`` elements of all used
    updates ([n, c] buffer: ``chunk_bytes`` bounds the memory, not the model size). Without
    clipping they work on the models; with clipping on the clipped deltas (then + g)."""
    dec = plan["decisions"]
    used: list[int] = dec["used"]
    scales: list[float] | None = dec["scales"]
    rule: str = dec["rule"]
    std = float(dec["noise_std"])
    p = plan["params"]
    n = len(used)
    tm = inputs.model[name]
    acc_t = _acc_dtype(tm.dtype)
    width = _coord_window(n + 1, acc_t.itemsize, COORD_WINDOW_BYTES, int(plan["chunk_bytes"]))
    for a, b in _windows(start, stop, width):
        c = b - a
        out = dst[a - start : b - start]
        x = scratch("coord_x", (n + 1) * c, acc_t).view(n + 1, c)
        for k, i in enumerate(used):
            inputs.update(i).read(name, a, b, x[k])
        g: torch.Tensor | None = None
        if norms is not None or scales is not None:
            g = inputs.global_src.read(name, a, b, scratch("g", c, acc_t))
        if norms is not None:
            assert g is not None
            d = scratch("d", n * c, acc_t).view(n, c)
            torch.sub(x[:n], g, out=d)
            norms.begin(c)
            norms.put_all(d)
            norms.end(j)
        if scales is not None:
            assert g is not None
            x[:n].sub_(g)
            for k, s in enumerate(scales):
                if s != 1.0:
                    x[k].mul_(s)
        res = out if out.dtype == acc_t else scratch("res", c, acc_t)
        if rule == "median":
            K.median_of(x, K.sort_columns(x, n, K.median_outputs(n)), n, res)
        elif rule == "trimmed_mean":
            k = int(dec["trim_k"])
            K.trimmed_mean_of(x, K.sort_columns(x, n, K.trimmed_outputs(n, k)), n, k, res)
        else:
            K.bulyan_of(x, K.sort_columns(x, n), n, int(dec["bulyan_beta"]), res)
        if scales is not None:
            assert g is not None
            res.add_(g)
        K.add_noise_(res, name, a, tm.numel, std, int(p["seed"]), int(plan["round_seed"]))
        if res is not out:
            out.copy_(res)


# --------------------------------------------------------------------------------------
# reduce


def advance_round(plan: Mapping[str, Any], parts: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Reduce the slice results of the current phase (in slice order) and return the next
    plan: phase ``apply`` (again, if an update was found non-finite during a stats-less
    apply), ``done`` or ``failed``. Pure: the input plan is not modified."""
    new: dict[str, Any] = copy.deepcopy(dict(plan))
    if len(parts) != len(new["slices"]):
        raise AggregationError(f"expected {len(new['slices'])} slice results, got {len(parts)}")
    phase = new["phase"]
    if phase == "stats":
        members: list[int] = _accepted(new)
        for part in parts:
            if list(part["members"]) != members:
                raise AggregationError("slice results were computed for a different plan")
        good: list[int] = []
        for k, i in enumerate(members):
            why = next((part["bad"][k] for part in parts if part["bad"][k]), None)
            if why:
                _refuse(new, i, why)
                continue
            total = K.fsum([float(part["sumsq"][k]) for part in parts])
            new["norms"][str(i)] = math.sqrt(total)
            good.append(k)
        gram: list[list[float]] | None = None
        if new["strategy"] in DISTANCE_RULES:
            gram = [[K.fsum([float(part["gram"][a][b]) for part in parts]) for b in good] for a in good]
        new["stats_members"] = members
        _decide(new, gram)
    elif phase == "apply":
        dec = new["decisions"]
        if dec["track_norms"]:
            used: list[int] = dec["used"]
            refused = False
            for k, i in enumerate(used):
                why = next((part["bad"][k] for part in parts if part["bad"][k]), None)
                if why:
                    _refuse(new, i, why)
                    refused = True
                else:
                    new["norms"][str(i)] = math.sqrt(K.fsum([float(part["sumsq"][k]) for part in parts]))
            if refused:
                new["attempt"] += 1
                _decide(new, None)
                return new
        new["phase"] = "done"
        new["report"] = _report(new)
    else:
        raise AggregationError(f"nothing to advance: the plan is {phase!r}")
    return new


def _report(plan: Mapping[str, Any]) -> dict[str, Any]:
    dec = plan["decisions"] or {}
    used = set(dec.get("used") or []) if plan["phase"] == "done" else set()
    shares = dict(zip(dec.get("used") or [], dec.get("shares") or [], strict=False))
    factors = dec.get("clip_factors") or {}
    norms = {int(k): v for k, v in plan["norms"].items()}
    finite = [v for i, v in norms.items() if plan["updates"][i]["accepted"]]
    med = statistics.median(finite) if finite else 0.0
    mad = statistics.median([abs(v - med) for v in finite]) if finite else 0.0
    selected = dec.get("selected")
    per: dict[str, Any] = {}
    for i, u in enumerate(plan["updates"]):
        nrm = norms.get(i)
        score: float | None = None
        if nrm is not None and u["accepted"]:
            if mad > 0:
                score = (nrm - med) / (OUTLIER_MAD_SCALE * mad)
            elif nrm == med:
                score = 0.0
        factor = factors.get(str(i))
        per[u["key"]] = {
            "accepted": bool(u["accepted"]),
            "used": i in used,
            "reason": u["reason"],
            "num_examples": u["num_examples"],
            "examples_counted": u["examples"],
            "norm": nrm,
            "outlier_score": score,
            "weight": (shares.get(i, 0.0) if dec.get("shares") is not None else None)
            if u["accepted"]
            else None,
            "clip_factor": factor,
            "clipped": bool(factor is not None and factor < 1.0),
            "selected": (i in selected) if selected is not None and u["accepted"] else None,
        }
    return {
        "strategy": plan["strategy"],
        "aggregated": plan["phase"] == "done",
        "reason": plan["reason"],
        "used": len(used),
        "refused": sum(1 for u in plan["updates"] if not u["accepted"]),
        "clip_mode": plan["params"]["clip_mode"],
        "clip_norm": dec.get("clip_norm"),
        "clip_norm_next": dec.get("clip_norm_next"),
        "noise_multiplier": dec.get("noise_multiplier", 0.0),
        "noise_std": dec.get("noise_std", 0.0),
        "norm_median": med if finite else None,
        "norm_mad": mad if finite else None,
        "num_slices": len(plan["slices"]),
        "attempts": plan["attempt"],
        "updates": per,
    }


# --------------------------------------------------------------------------------------
# results


def _previous_state(plan: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    if plan["state_path"] is None:
        return {}
    out: dict[str, torch.Tensor] = {}
    with safe_open(plan["state_path"], framework="pt") as fh:
        for key in fh.keys():  # noqa: SIM118 - safe_open is not a mapping
            out[key] = fh.get_tensor(key)
    return out


def _allocate(
    plan: Mapping[str, Any], reuse: RoundResult | None
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    model = _model_meta(plan)
    old_p = (reuse.params or {}) if reuse is not None else {}
    old_s = reuse.state if reuse is not None else {}

    def get(
        old: Mapping[str, torch.Tensor], key: str, shape: tuple[int, ...], dtype: torch.dtype
    ) -> torch.Tensor:
        t = old.get(key)
        if t is not None and tuple(t.shape) == shape and t.dtype == dtype and t.is_contiguous():
            return t
        return torch.empty(shape, dtype=dtype)

    params = {n: get(old_p, n, tm.shape, TORCH_DTYPES[tm.dtype]) for n, tm in model.items()}
    state: dict[str, torch.Tensor] = {}
    for kind in _state_kinds(plan["strategy"]):
        for n, tm in model.items():
            if tm.dtype in FLOAT_DTYPES:
                state[f"{kind}/{n}"] = get(old_s, f"{kind}/{n}", tm.shape, _acc_dtype(tm.dtype))
    return params, state


def _result(
    plan: dict[str, Any], params: dict[str, torch.Tensor], state: dict[str, torch.Tensor]
) -> RoundResult:
    if plan["phase"] != "done":
        return RoundResult(None, _previous_state(plan), plan["report"], plan["reason"], plan)
    nxt = plan["decisions"]["clip_norm_next"]
    if nxt is not None:
        state["clip_norm"] = torch.tensor(nxt, dtype=torch.float64)
    return RoundResult(params, state, plan["report"], None, plan)


def finish_round(plan: Mapping[str, Any], slice_paths: Sequence[str | os.PathLike[str]]) -> RoundResult:
    """Assemble the slice files of the last apply phase into the round's result."""
    mine: dict[str, Any] = copy.deepcopy(dict(plan))
    if mine["phase"] == "failed":
        return _result(mine, {}, {})
    if plan["phase"] != "done":
        raise AggregationError(f"the round is not finished (phase {plan['phase']!r})")
    if len(slice_paths) != len(plan["slices"]):
        raise AggregationError(f"expected {len(plan['slices'])} slice files, got {len(slice_paths)}")
    params, state = _allocate(plan, None)
    kinds = _state_kinds(plan["strategy"])
    model = _model_meta(plan)
    for pieces, path in zip(plan["slices"], slice_paths, strict=True):
        with safe_open(os.fspath(path), framework="pt") as fh:
            for j, (name, start, stop) in enumerate(pieces):
                params[name].view(-1)[start:stop].copy_(fh.get_tensor(f"p{j}"))
                if model[name].dtype in FLOAT_DTYPES:
                    for kind in kinds:
                        state[f"{kind}/{name}"].view(-1)[start:stop].copy_(fh.get_tensor(f"{kind}{j}"))
    return _result(mine, params, state)


def _run(plan: dict[str, Any], memory: _Memory | None, reuse: RoundResult | None) -> RoundResult:
    params, state = _allocate(plan, reuse) if plan["phase"] != "failed" else ({}, {})
    sink = _MemorySink(params, state)
    while plan["phase"] in ("stats", "apply"):
        inputs = _Inputs(plan, memory)
        try:
            if plan["phase"] == "stats":
                parts = [_stats(plan, k, inputs) for k in range(len(plan["slices"]))]
            else:
                parts = [_apply(plan, k, sink, inputs) for k in range(len(plan["slices"]))]
        finally:
            inputs.close()
        plan = advance_round(plan, parts)
    return _result(plan, params, state)


class Strategy:
    """A configured aggregation strategy. Build with :func:`build_strategy`."""

    def __init__(self, name: str, params: Mapping[str, Any] | None = None) -> None:
        self.name = name
        self.params = normalize_without_clients(name, params or {})

    def __repr__(self) -> str:
        return f"Strategy({self.name!r}, {self.params!r})"

    def plan_round(
        self,
        global_path: str | os.PathLike[str],
        updates: Sequence[UpdateFile | Mapping[str, Any]],
        state_path: str | os.PathLike[str] | None = None,
        *,
        round_seed: int = 0,
        max_slice_bytes: int = DEFAULT_MAX_SLICE_BYTES,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    ) -> dict[str, Any]:
        """The JSON-able plan for driving the round slice by slice (see the module doc)."""
        return plan_round(
            self.name,
            self.params,
            global_path,
            updates,
            state_path,
            round_seed=round_seed,
            max_slice_bytes=max_slice_bytes,
            chunk_bytes=chunk_bytes,
        )

    def run_round(
        self,
        global_path: str | os.PathLike[str],
        updates: Sequence[UpdateFile | Mapping[str, Any]],
        state_path: str | os.PathLike[str] | None = None,
        *,
        round_seed: int = 0,
        max_slice_bytes: int = DEFAULT_MAX_SLICE_BYTES,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        reuse: RoundResult | None = None,
    ) -> RoundResult:
        """Aggregate one round in this process.

        Streams the update files (windows read with ``preadv``; never all loaded), so extra memory is about
        one model for the mean rules (the output) plus ``chunk_bytes``-bounded windows for
        the order-statistic rules. Float32 models accumulate in float32, float64 in float64;
        float16/bfloat16 inputs are upcast to float32 window by window before any
        arithmetic, and the result is rounded once to the global dtype.

        ``round_seed`` seeds the DP noise (with ``strategy_params.seed``); for a privacy
        guarantee it must be secret from clients. ``max_slice_bytes`` must equal the value
        a sliced run would use for the results to be bit-identical. ``reuse``: a previous
        result whose tensors may be overwritten as output buffers (saves page faults).
        """
        plan = self.plan_round(
            global_path,
            updates,
            state_path,
            round_seed=round_seed,
            max_slice_bytes=max_slice_bytes,
            chunk_bytes=chunk_bytes,
        )
        return _run(plan, None, reuse)


def build_strategy(name: str, params: Mapping[str, Any] | None = None) -> Strategy:
    """A :class:`Strategy` from ``config["strategy"]`` and ``config["strategy_params"]``.

    Raises ``ValueError`` like :func:`aggregation.spec.normalize_strategy` (without the
    checks that need the number of clients; a round with too few valid updates reports
    that in its result instead).
    """
    return Strategy(name, params)

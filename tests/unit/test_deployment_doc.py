"""docs/deployment.md's federated config reference is the code's: every key of a
``federated_training`` config and every strategy parameter is listed, with the default the
server fills in, and each range's ends are what ``training/spec.py`` accepts and refuses.

A key added to the spec without a row here, or a limit changed without the doc, fails this.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

import pytest

from aggregation import spec as agg
from launch import ROOT
from training import spec

DOC = ROOT / "docs" / "deployment.md"
EPOCHS, BATCH = 10, 32  # the DEFAULT_EPOCHS and DEFAULT_BATCH_SIZE the doc shows
CODE = re.compile(r"`([^`]*)`")


def table(heading_row: str) -> list[list[str]]:
    """The rows (cells) of the doc's table whose header row starts with ``heading_row``."""
    lines = DOC.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(heading_row))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split(" | ")])
    return rows


def config_rows() -> dict[str, list[str]]:
    return {CODE.findall(row[0])[0]: row for row in table("| key | default | range |")}


def param_rows() -> dict[str, list[str]]:
    return {CODE.findall(row[0])[0]: row for row in table("| parameter | strategies | default | range |")}


def normalize(raw: dict[str, Any]) -> dict[str, Any]:
    return spec.normalize_federated_config(raw, default_batch_size=BATCH, default_epochs=EPOCHS)


def refused(raw: dict[str, Any]) -> bool:
    try:
        normalize(raw)
    except spec.SpecError:
        return True
    return False


def test_every_config_key_is_listed() -> None:
    assert sorted(config_rows()) == sorted(spec.KNOWN_KEYS)


def test_the_listed_defaults_are_the_servers() -> None:
    filled = normalize({})
    for key, row in config_rows().items():
        shown = json.loads(CODE.findall(row[1])[-1])  # `DEFAULT_EPOCHS` (`10`): the value is last
        if key == "strategy_params":  # `{}`, filled with the strategy's own defaults (the next table)
            assert filled[key] == agg.normalize_strategy(filled["strategy"], shown, 1)
            continue
        assert shown == filled[key], key


def probes(cell: str) -> tuple[list[Any], list[Any]]:
    """Values a range cell says are accepted, and values just outside it."""
    text = CODE.findall(cell)[0]
    if text.startswith("one of "):
        return text.removeprefix("one of ").split(", "), ["no-such-name"]
    if text == "object":
        return [{}], [[]]
    optional = text.startswith("null or ")
    text = text.removeprefix("null or ")
    ints = re.fullmatch(r"(-?\d+)\.\.(-?\d+)", text)
    if ints:
        lo, hi = int(ints[1]), int(ints[2])
        good, bad = [lo, hi], [lo - 1, hi + 1]
    else:
        found = re.fullmatch(r"([\[(])([\d.e-]+), ([\d.e]+|inf)([\])])", text)
        assert found, f"unreadable range {cell!r}"
        lo, hi = float(found[2]), float(found[3])
        good = [hi if found[4] == "]" else math.nextafter(hi, lo)] if hi != math.inf else [1e300]
        good.append(lo if found[1] == "[" else math.nextafter(lo, hi))
        bad = [lo] if found[1] == "(" else [math.nextafter(lo, -math.inf)]
        if hi != math.inf:
            bad.append(hi if found[4] == ")" else hi + max(abs(hi) * 1e-6, 1e-9))
    return ([None, *good] if optional else good), bad


# Keys whose ends need another key set: min_fit_clients <= num_shards; krum and bulyan need
# more than a few updates a round.
CONTEXT = {"min_fit_clients": {"num_shards": 1000}, "strategy": {"num_shards": 1000}}


@pytest.mark.parametrize("key", sorted(spec.KNOWN_KEYS))
def test_each_range_is_what_the_server_accepts(key: str) -> None:
    good, bad = probes(config_rows()[key][2])
    base = CONTEXT.get(key, {})
    for value in good:
        assert not refused({**base, key: value}), (key, value)
    for value in bad:
        assert refused({**base, key: value}), (key, value)


def own_parameters() -> dict[str, set[str]]:
    """strategy -> every parameter it may take (with any clip mode)."""
    common = {*agg._COMMON, *agg._CLIP_FIXED, *agg._CLIP_ADAPTIVE}
    return {name: common | set(agg._OWN[name]) for name in agg.STRATEGIES}


def listed_strategies(cell: str) -> set[str]:
    if cell.startswith("all"):
        return set(agg.STRATEGIES)
    return set(cell.split(", "))


def test_every_strategy_parameter_is_listed_with_its_strategies() -> None:
    rows = param_rows()
    for name, params in own_parameters().items():
        assert {p for p in rows if name in listed_strategies(rows[p][1])} == params, name


def shown_default(cell: str, strategy: str) -> Any:
    """The default a cell shows for ``strategy`` (``fedavgm `1.0`, fedadam `0.01``: per strategy)."""
    per_strategy = dict(re.findall(r"(\w+) `([^`]*)`", cell))
    return json.loads(per_strategy.get(strategy) or CODE.findall(cell)[0])


# Parameters whose default the table gives in words: clip_norm (required, or 0.1 when adaptive),
# clip_quantile/clip_lr/clip_count_stddev (only with adaptive clipping; checked there).
ADAPTIVE = ("clip_norm", "clip_quantile", "clip_lr")


def test_the_listed_strategy_defaults_are_the_servers() -> None:
    rows = param_rows()
    for name in agg.STRATEGIES:
        filled = agg.normalize_strategy(name, {}, 100)
        for param, value in filled.items():
            assert shown_default(rows[param][2], name) == value, (name, param)
        adaptive = agg.normalize_strategy(name, {"clip_mode": "adaptive"}, 100)
        for param in ADAPTIVE:
            assert shown_default(rows[param][2].split("adaptive:")[-1], name) == adaptive[param], param
        assert adaptive["clip_count_stddev"] == 0  # "n/20 with noise, else 0"
    noisy = agg.normalize_strategy("fedavg", {"clip_mode": "adaptive", "noise_multiplier": 1.0}, 100)
    assert noisy["clip_count_stddev"] == 100 / 20


# What a parameter needs beside it to be taken at all, and which strategy takes it.
PARAM_CONTEXT: dict[str, tuple[str, dict[str, Any]]] = {
    "clip_norm": ("fedavg", {"clip_mode": "fixed"}),
    "clip_quantile": ("fedavg", {"clip_mode": "adaptive"}),
    "clip_lr": ("fedavg", {"clip_mode": "adaptive"}),
    "clip_count_stddev": ("fedavg", {"clip_mode": "adaptive"}),
    "noise_multiplier": ("fedavg", {"clip_norm": 1.0}),
}
NOT_PROBED = {
    "f",
    "m",
}  # their upper ends depend on n; the shortfall rules are tested in test_aggregation_spec


@pytest.mark.parametrize(
    "param", sorted(set(agg._COMMON) | set(agg._CLIP_ADAPTIVE) | set().union(*agg._OWN.values()))
)
def test_each_strategy_parameter_range_is_what_the_server_accepts(param: str) -> None:
    row = param_rows()[param]
    if param in NOT_PROBED:
        return
    strategy = next(iter(sorted(listed_strategies(row[1]))))
    strategy, base = PARAM_CONTEXT.get(param, (strategy, {}))
    good, bad = probes(row[3])
    n = 101  # odd: trimmed_mean's beta 0.5 keeps one update
    for value in good:
        needs = {"clip_norm": 1.0} if (param, value) == ("clip_mode", "fixed") else {}
        agg.normalize_strategy(strategy, {**base, **needs, param: value}, n)
    for value in bad:
        with pytest.raises(ValueError):
            agg.normalize_strategy(strategy, {**base, param: value}, n)

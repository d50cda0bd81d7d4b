"""Safetensors headers (aggregation.meta), the slice planner, and state files."""

from __future__ import annotations

import itertools
import json
import math
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from aggregation import BLOCK, InvalidFile, load_state, plan_slices, read_meta, save_state
from aggregation.meta import describe_mismatch


def raw_file(path: Path, header: dict[str, object], data: bytes) -> Path:
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)
    return path


def test_read_meta_matches_what_safetensors_wrote(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    save_file({"w": torch.zeros(3, 2), "b": torch.zeros(2, dtype=torch.float64), "n": torch.tensor(3)}, path)
    meta = read_meta(path)
    assert set(meta.tensors) == {"w", "b", "n"}
    assert meta.tensors["w"].shape == (3, 2) and meta.tensors["w"].dtype == "F32"
    assert meta.tensors["b"].dtype == "F64" and meta.tensors["n"].shape == ()
    assert meta.tensors["w"].nbytes == 24
    assert meta.to_json()["w"] == {"dtype": "F32", "shape": [3, 2]}
    raw = path.read_bytes()
    t = meta.tensors["w"]
    assert raw[t.begin : t.end] == bytes(24)


@pytest.mark.parametrize(
    ("header", "data", "fragment"),
    [
        ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4, "outside the file"),
        ({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8, "8 bytes for shape [3]"),
        ({"w": {"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}}, b"\0" * 8, "unsupported dtype"),
        ({"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 0]}}, b"", "invalid shape"),
        ({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0]}}, b"\0" * 4, "invalid data_offsets"),
        (
            {
                "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
            },
            b"\0" * 12,
            "overlap",
        ),
        ({"__metadata__": {"k": 1}}, b"", "__metadata__"),
        ({"w": [1, 2]}, b"", "is not an object"),
    ],
)
def test_read_meta_refuses_broken_headers(
    tmp_path: Path, header: dict[str, object], data: bytes, fragment: str
) -> None:
    with pytest.raises(InvalidFile, match=r"m\.safetensors") as err:
        read_meta(raw_file(tmp_path / "m.safetensors", header, data))
    assert fragment in str(err.value)


def test_read_meta_refuses_non_safetensors(tmp_path: Path) -> None:
    short = tmp_path / "short"
    short.write_bytes(b"abc")
    with pytest.raises(InvalidFile, match="shorter than 8 bytes"):
        read_meta(short)
    huge = tmp_path / "huge"
    huge.write_bytes(struct.pack("<Q", 10**9) + b"{}")
    with pytest.raises(InvalidFile, match="header length"):
        read_meta(huge)
    garbage = tmp_path / "garbage"
    garbage.write_bytes(struct.pack("<Q", 4) + b"\xff\xfe{x")
    with pytest.raises(InvalidFile, match="not JSON"):
        read_meta(garbage)
    with pytest.raises(InvalidFile, match="cannot read"):
        read_meta(tmp_path / "missing")


def test_a_rewritten_file_is_not_served_from_the_header_cache(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    save_file({"w": torch.zeros(3)}, path)
    assert set(read_meta(path).tensors) == {"w"}
    save_file({"v": torch.ones(3)}, path)  # same size, same path, maybe the same mtime
    assert set(read_meta(path).tensors) == {"v"}
    assert read_meta(path) is read_meta(path)


def test_describe_mismatch(tmp_path: Path) -> None:
    save_file({"w": torch.zeros(3, 2), "b": torch.zeros(2)}, tmp_path / "g")
    save_file({"w": torch.zeros(3, 2)}, tmp_path / "missing")
    save_file({"w": torch.zeros(3, 2), "b": torch.zeros(2), "x": torch.zeros(1)}, tmp_path / "extra")
    save_file({"w": torch.zeros(2, 3), "b": torch.zeros(2)}, tmp_path / "shape")
    save_file({"w": torch.zeros(3, 2, dtype=torch.float16), "b": torch.zeros(2)}, tmp_path / "dtype")
    g = read_meta(tmp_path / "g").tensors
    assert describe_mismatch(g, g) is None
    assert describe_mismatch(g, read_meta(tmp_path / "missing").tensors) == "missing tensors: b"
    assert describe_mismatch(g, read_meta(tmp_path / "extra").tensors) == "unexpected tensors: x"
    assert "shape [2, 3], expected [3, 2]" in str(describe_mismatch(g, read_meta(tmp_path / "shape").tensors))
    assert "dtype F16, expected F32" in str(describe_mismatch(g, read_meta(tmp_path / "dtype").tensors))


MODEL = {
    "a.weight": {"shape": [300, 100], "dtype": "F32"},  # 120_000 bytes
    "a.bias": {"shape": [300], "dtype": "F32"},
    "big": {"shape": [50_000], "dtype": "float32"},  # 200_000 bytes
    "count": {"shape": [], "dtype": "I64"},
    "empty": {"shape": [0, 4], "dtype": "F32"},
    "half": {"shape": [1000], "dtype": "BF16"},
}


def covered(slices: list, meta: dict) -> dict[str, list[tuple[int, int]]]:  # type: ignore[type-arg]
    seen: dict[str, list[tuple[int, int]]] = {}
    for s in slices:
        for p in s.pieces:
            seen.setdefault(p.name, []).append((p.start, p.stop))
    return seen


@pytest.mark.parametrize("limit", [1, 5_000, 64_000, 130_000, 10**9])
def test_plan_covers_every_element_once_in_name_order(limit: int) -> None:
    slices = plan_slices(MODEL, limit)
    seen = covered(slices, MODEL)
    assert sorted(seen) == sorted(MODEL)
    for name, ranges in seen.items():
        numel = math.prod(MODEL[name]["shape"])  # type: ignore[arg-type]
        assert ranges[0][0] == 0 and ranges[-1][1] == numel
        for (_, stop), (start, _) in itertools.pairwise(ranges):
            assert stop == start and start % BLOCK == 0
    order = [p.name for s in slices for p in s.pieces]
    assert order == sorted(order)
    assert [s.index for s in slices] == list(range(len(slices)))


def test_plan_respects_the_threshold_and_splits_big_tensors() -> None:
    slices = plan_slices(MODEL, 64_000)
    for s in slices:
        assert s.nbytes <= 64_000 + BLOCK * 4
    assert len(covered(slices, MODEL)["big"]) == 4  # 200 kB in 4 pieces of 50 kB
    assert len(covered(slices, MODEL)["a.weight"]) == 2
    one = plan_slices(MODEL, 10**9)
    assert len(one) == 1 and one[0].nbytes == 120_000 + 1200 + 200_000 + 8 + 0 + 2000


def test_plan_is_json_round_trippable_and_takes_file_meta(tmp_path: Path) -> None:
    save_file({"w": torch.zeros(10_000), "b": torch.zeros(3)}, tmp_path / "m")
    meta = read_meta(tmp_path / "m")
    a = plan_slices(meta, 16_000)
    b = plan_slices(meta.to_json(), 16_000)
    c = plan_slices({k: (v.shape, v.dtype) for k, v in meta.tensors.items()}, 16_000)
    assert [s.to_json() for s in a] == [s.to_json() for s in b] == [s.to_json() for s in c]
    assert json.loads(json.dumps([s.to_json() for s in a])) == [s.to_json() for s in a]


def test_plan_refuses_bad_arguments() -> None:
    with pytest.raises(ValueError, match="max_slice_bytes"):
        plan_slices(MODEL, 0)
    with pytest.raises(ValueError, match="unsupported dtype"):
        plan_slices({"x": {"shape": [1], "dtype": "complex64"}}, 100)


def test_state_round_trips_through_safetensors(tmp_path: Path) -> None:
    state = {
        "m/w": torch.randn(3, 4),
        "v/w": torch.rand(3, 4),
        "clip_norm": torch.tensor(0.25, dtype=torch.float64),
    }
    path = tmp_path / "state.safetensors"
    save_state(path, state, strategy="fedadam")
    back = load_state(path)
    assert set(back) == set(state)
    for k in state:
        assert torch.equal(back[k], state[k]) and back[k].dtype == state[k].dtype
    assert read_meta(path).metadata == {"aggregation.strategy": "fedadam"}
    assert not list(tmp_path.glob("*.tmp*"))

"""Declarations of what clients and admins may send, and one way of saying what is wrong.

The WebSocket messages (app/protocol.py) and the REST bodies and queries (app/validation.py) are
pydantic models on :class:`Declared`. A field's ``description`` says what it must be ("an integer
in 1..10000"); it is the text of the published JSON Schema and of the error a caller gets
(:func:`explain`: "priority must be an integer in -1000..1000"), so the two cannot drift apart.

House rules for a declaration:

- strict types (no ``true`` for a number, no ``"7"`` for a count), except that an integral number
  such as ``3.0`` is an integer, as JSON Schema says (:data:`Whole`);
- in ``Annotated``, a ``Field`` comes before a ``BeforeValidator``, so that its bounds reach the
  JSON Schema;
- optional but not nullable: ``X | SkipJsonSchema[None] = None`` and a before-validator that
  refuses an explicit null, where null must not be taken for absent.
"""

from __future__ import annotations

import functools
import math
from typing import Any

from pydantic import BaseModel, BeforeValidator, ConfigDict
from pydantic_core import ErrorDetails


class Declared(BaseModel):
    """Strict, finite, immutable."""

    model_config = ConfigDict(strict=True, allow_inf_nan=False, frozen=True)


def finite_float(text: str) -> float:
    """``json.loads``'s ``parse_float``: 1e999 is no number JSON can carry back (it would be inf)."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text[:32]} is too large for a number")
    return value


def refuse_constant(name: str) -> Any:
    """``json.loads``'s ``parse_constant``: NaN and Infinity are not JSON."""
    raise ValueError(f"{name} is not valid JSON")


def nested_within(value: Any, limit: int) -> bool:
    """True when ``value`` nests objects and lists at most ``limit`` levels deep."""
    if isinstance(value, dict):
        return limit > 0 and all(nested_within(v, limit - 1) for v in value.values())
    if isinstance(value, list):
        return limit > 0 and all(nested_within(v, limit - 1) for v in value)
    return True


def _whole(value: Any) -> Any:
    """As JSON Schema says, 36.0 is the integer 36."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


Whole = BeforeValidator(_whole)


def explain(schema: dict[str, Any], where: str, errors: list[ErrorDetails]) -> tuple[str, str]:
    """One sentence for the first problem, and the path of the field it names.

    ``schema`` is the JSON Schema of what was validated (:func:`schema_of` for a model);
    ``where`` prefixes every path (a WebSocket message's type; empty for a REST body)."""
    first = errors[0]
    loc = field_loc(schema, first["loc"])
    path = _path(where, loc)
    kind = first["type"]
    if kind == "missing":
        return f"{path} is required", path
    if kind == "value_error":  # a validator's own words: a whole sentence, "must ...", or "<field>..."
        text = str((first.get("ctx") or {}).get("error", first["msg"]))
        if (where and text.startswith(f"{where}.")) or not loc:
            return text, path
        if text.startswith("must"):
            return f"{path} {text}", path
        return _join(_path(where, loc[:-1]), text), path
    if kind == "extra_forbidden":  # the last part of loc is the unknown key itself
        parent = field_loc(schema, first["loc"][:-1])
        unknown = sorted(
            str(e["loc"][-1])[:32]
            for e in errors
            if e["type"] == kind and field_loc(schema, e["loc"][:-1]) == parent
        )
        known = ", ".join(schema_at(schema, parent).get("properties", {}))
        where_parent = _path(where, parent)
        if not where_parent:
            return f"unknown field(s): {', '.join(unknown[:5])}; known: {known}", unknown[0]
        return (
            f"{where_parent} has unknown keys {', '.join(unknown[:5])}; expected some of {known}",
            where_parent,
        )
    description = schema_at(schema, loc).get("description")
    if description is None:
        return f"{path} is not valid: {first['msg']}", path
    return f"{path} must be {description}", path


def _join(parent: str, text: str) -> str:
    return f"{parent}.{text}" if parent else text


def _path(where: str, loc: tuple[int | str, ...]) -> str:
    path = where
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path


@functools.cache
def schema_of(model: type[BaseModel]) -> dict[str, Any]:
    return model.model_json_schema()


def _resolve(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """Follow ``$ref`` and a nullable ``anyOf`` to the schema that says what a value must be."""
    while True:
        if "$ref" in node:
            target = defs[node["$ref"].rsplit("/", 1)[-1]]
            node = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
            continue
        branches = [b for b in node.get("anyOf", []) if b.get("type") != "null"]
        if len(branches) == 1:
            node = {**_resolve(branches[0], defs), **{k: v for k, v in node.items() if k != "anyOf"}}
            continue
        return node


def _child(node: dict[str, Any], part: int | str) -> dict[str, Any] | None:
    if isinstance(part, int):
        items = node.get("items")
        return items if isinstance(items, dict) else None
    found = node.get("properties", {}).get(part)
    if found is not None:
        return dict(found)
    extra = node.get("additionalProperties")
    return extra if isinstance(extra, dict) else None


def field_loc(root: dict[str, Any], loc: tuple[int | str, ...]) -> tuple[int | str, ...]:
    """The path of a field in pydantic's ``loc``, without the names pydantic gives union members
    ('float', 'list[GpuUse]', 'function-before[...]'): a part that names no field or key at its
    place in the schema is such a name."""
    defs = root.get("$defs", {})
    node: dict[str, Any] | None = _resolve(root, defs)
    out: list[int | str] = []
    for part in loc:
        child = _child(node, part) if node is not None else None
        if child is None and isinstance(part, str) and node is not None:
            continue  # a union member's name
        out.append(part)
        node = _resolve(child, defs) if child is not None else None
    return tuple(out)


def schema_at(root: dict[str, Any], loc: tuple[int | str, ...]) -> dict[str, Any]:
    """The JSON Schema of the field at ``loc`` (its description says what it must be)."""
    defs = root.get("$defs", {})
    node = _resolve(root, defs)
    for part in loc:
        child = _child(node, part)
        if child is None:
            break
        node = _resolve(child, defs)
    return node

"""The published JSON Schemas of a federated config (training.spec.federated_config_schema) and
of each strategy's parameters (aggregation.spec.strategy_params_schema) are the validators'
own declarations: whatever a schema allows, the validator accepts, and what it stores is
allowed by the schema again. Each refusal names its field in the description's words."""

from __future__ import annotations

import json
import math
import re
from typing import Any

import jsonschema
import pytest
import schemathesis
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from aggregation import spec as agg
from training import spec

EPOCHS, BATCH = 10, 32
# Enough updates for any f and m the parameters' schemas allow (odd: trimmed_mean's beta 0.5
# keeps the middle one), and n/20 > noise_multiplier/2 for the largest noise allowed.
MANY = 10**7 + 1


def drawn(schemas: dict[str, dict[str, Any]], name: str) -> st.SearchStrategy[Any]:
    """Bodies drawn from ``schemas[name]`` by schemathesis's generator (fed a document with one
    operation per schema; ``$defs`` references point to its components)."""
    defs: dict[str, Any] = {}
    paths = {}
    for key, schema in schemas.items():
        schema = dict(schema)
        defs.update(schema.pop("$defs", {}))
        defs[f"Body_{key}"] = schema
        paths[f"/{key}"] = {
            "post": {
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": {"$ref": f"#/$defs/Body_{key}"}}},
                },
                "responses": {"200": {"description": "accepted"}},
            }
        }
    document = {"openapi": "3.1.0", "info": {"title": "spec", "version": "1"}, "paths": paths}
    document["components"] = {"schemas": defs}
    text = json.dumps(document).replace("#/$defs/", "#/components/schemas/")
    operation = schemathesis.openapi.from_dict(json.loads(text))[f"/{name}"]["POST"]
    return operation.as_strategy().map(lambda case: case.body)


def config_without_strategy_params() -> dict[str, Any]:
    """The config's schema, less ``strategy_params`` (each strategy's are drawn on their own)."""
    schema = spec.federated_config_schema()
    del schema["properties"]["strategy_params"]
    schema["allOf"] = [rule for rule in schema["allOf"] if "strategy_params" not in json.dumps(rule)]
    schema["$defs"] = {}
    return schema


SCHEMAS: dict[str, dict[str, Any]] = {
    "config": config_without_strategy_params(),
    **{name: agg.strategy_params_schema(name) for name in agg.STRATEGIES},
}


def test_the_schemas_are_plain_json_with_their_references_inside() -> None:
    full = spec.federated_config_schema()
    assert json.loads(json.dumps(full)) == full
    assert full["additionalProperties"] is False
    assert set(full["properties"]) == spec.KNOWN_KEYS
    text = json.dumps(full)
    for ref in re.findall(r'"\$ref": "#/\$defs/([^"]+)"', text):
        assert ref in full["$defs"], ref
    for name in agg.STRATEGIES:
        one = agg.strategy_params_schema(name)
        assert len(one["oneOf"]) == 3
        for ref in re.findall(r'"\$ref": "#/\$defs/([^"]+)"', json.dumps(one)):
            assert ref in one["$defs"], ref
    jsonschema.Draft202012Validator.check_schema(full)


def test_an_openapi_document_can_take_the_definitions_into_its_components() -> None:
    template = "#/components/schemas/{model}"
    full = spec.federated_config_schema(template)
    text = json.dumps(full)
    assert "#/$defs/" not in text
    for ref in re.findall(r'"\$ref": "#/components/schemas/([^"]+)"', text):
        assert ref in full["$defs"], ref
    assert "#/$defs/" not in json.dumps(agg.strategy_params_schema("krum", template))


def every_field() -> list[tuple[str, str, dict[str, Any]]]:
    """(where, field, its JSON Schema) for every field of the config and of every parameter model."""
    out = []
    full = spec.federated_config_schema()
    for key, prop in full["properties"].items():
        out.append(("config", key, prop))
    for name, definition in full["$defs"].items():
        for key, prop in definition.get("properties", {}).items():
            out.append((name, key, prop))
    return out


@pytest.mark.parametrize(("where", "field", "schema"), every_field(), ids=lambda v: str(v)[:40])
def test_each_description_says_the_bounds_of_its_schema(
    where: str, field: str, schema: dict[str, Any]
) -> None:
    """The messages quote the range a description gives: it must be the schema's own."""
    node = next((b for b in schema.get("anyOf", []) if b.get("type") != "null"), schema)
    description = schema.get("description", "")
    found = re.search(r"in ([\[(])(-?[\d.e+]+), ([\d.e+]+|inf)([\])])", description)
    ints = re.search(r"in (-?\d+)\.\.(-?\d+)", description)
    if node.get("type") == "integer":
        assert ints, (where, field, description)
        assert (int(ints[1]), int(ints[2])) == (node["minimum"], node["maximum"])
    elif node.get("type") == "number" and "maximum" in node and node["maximum"] == 0:
        assert description.startswith("0:"), (where, field)  # no noise without clipping
    elif node.get("type") == "number":
        assert found, (where, field, description)
        lo_key = "minimum" if found[1] == "[" else "exclusiveMinimum"
        assert float(found[2]) == node[lo_key], (where, field)
        if found[3] == "inf":
            assert "maximum" not in node and "exclusiveMaximum" not in node
        else:
            hi_key = "maximum" if found[4] == "]" else "exclusiveMaximum"
            assert float(found[3]) == node[hi_key], (where, field)
    elif "enum" in node:
        assert description == f"one of {', '.join(node['enum'])}", (where, field)


def shortfall_free(config: dict[str, Any]) -> bool:
    """The rules JSON Schema cannot say: min_fit_clients <= num_shards, and the strategy (with
    its default parameters) works with num_shards updates and with the quorum."""
    shards = config.get("num_shards", 1)
    if config.get("min_fit_clients", 1) > shards:
        return False
    name = config.get("strategy", "fedavg")
    params = agg.normalize_without_clients(name, {})
    return all(agg.shortfall(name, params, n) is None for n in {shards, spec.quorum(config)})


def test_whatever_the_config_schema_allows_the_server_accepts() -> None:
    validator = jsonschema.Draft202012Validator(spec.federated_config_schema())

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(drawn(SCHEMAS, "config"))
    def accepted(config: dict[str, Any]) -> None:
        assume(shortfall_free(config))
        stored = spec.normalize_federated_config(config, default_batch_size=BATCH, default_epochs=EPOCHS)
        assert list(stored) == list(spec.STORED_ORDER)
        validator.validate(stored)  # the stored config is a valid config
        again = spec.normalize_federated_config(stored, default_batch_size=BATCH, default_epochs=EPOCHS)
        assert json.dumps(again) == json.dumps(stored)

    accepted()


def count_noise_ok(params: dict[str, Any]) -> bool:
    """The rule JSON Schema cannot say: adaptive clipping with noise needs clip_count_stddev
    above noise_multiplier / 2 (by default MANY / 20 is)."""
    if params.get("clip_mode") != "adaptive" or "clip_count_stddev" not in params:
        return True
    z = params.get("noise_multiplier", 0.0)
    return z == 0 or 2 * params["clip_count_stddev"] > z


@pytest.mark.parametrize("name", agg.STRATEGIES)
def test_whatever_a_strategys_schema_allows_the_server_accepts(name: str) -> None:
    validator = jsonschema.Draft202012Validator(agg.strategy_params_schema(name))

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(drawn(SCHEMAS, name))
    def accepted(params: dict[str, Any]) -> None:
        assume(count_noise_ok(params))
        out = agg.normalize_strategy(name, params, MANY)
        validator.validate(out)  # what is stored is valid parameters
        assert agg.normalize_strategy(name, out, MANY) == out
        assert all(not isinstance(v, float) or math.isfinite(v) for v in out.values())

    accepted()


def test_the_config_schema_says_each_strategys_parameters() -> None:
    validator = jsonschema.Draft202012Validator(spec.federated_config_schema())
    assert validator.is_valid({"strategy": "krum", "strategy_params": {"f": 2}})
    assert not validator.is_valid({"strategy": "krum", "strategy_params": {"beta": 0.2}})
    assert not validator.is_valid({"strategy_params": {"f": 2}})  # fedavg takes no f
    assert not validator.is_valid({"strategy_params": {"noise_multiplier": 1.0}})  # noise needs clipping
    assert validator.is_valid({"strategy_params": {"noise_multiplier": 1.0, "clip_norm": 1}})
    assert not validator.is_valid({"strategy_params": {"clip_mode": "fixed"}})  # fixed needs clip_norm
    assert not validator.is_valid({"dataset": "synthetic", "num_shards": 401})
    assert validator.is_valid({"dataset": "digits", "num_shards": 401})


@pytest.mark.parametrize(
    ("config", "message", "field"),
    [
        ({"rounds": 0}, "config.rounds must be in 1..10000, got 0", "config.rounds"),
        ({"rounds": "7"}, "config.rounds must be an integer in 1..10000, got '7'", "config.rounds"),
        ({"rounds": True}, "config.rounds must be an integer in 1..10000, got True", "config.rounds"),
        (
            {"local_epochs": None},
            "config.local_epochs must be an integer in 1..1000, got None",
            "config.local_epochs",
        ),
        ({"lr": 0}, "config.lr must be in (0.0, 10.0], got 0.0", "config.lr"),
        ({"lr": float("nan")}, "config.lr must be in (0.0, 10.0], got nan", "config.lr"),
        ({"model": "resnet"}, "config.model must be one of mlp, cnn; got 'resnet'", "config.model"),
        ({"strategy": "nope"}, "config.strategy must be one of fedavg, fedprox, ", "config.strategy"),
        ({"strategy_params": []}, "config.strategy_params must be an object", "config.strategy_params"),
        (
            {"deadline_s": "soon"},
            "config.deadline_s must be a number in (0.0, 2592000.0], or null",
            "config.deadline_s",
        ),
        ({"rounds": 0, "zz": 1, "aa": 2}, "unknown config field(s): aa, zz", "config"),
        (
            {"strategy": "krum", "strategy_params": {"m": 2}},
            "strategy 'krum' does not take parameter(s) m",
            "config.strategy_params",
        ),
        (
            {"dataset": "synthetic", "num_shards": 401},
            "config.num_shards must be at most 400",
            "config.num_shards",
        ),
        (
            {"strategy_params": {"clip_norm": 0}},
            "strategy_params.clip_norm must be in (0, inf), got 0",
            "config.strategy_params.clip_norm",
        ),
        (
            {"num_shards": 2, "min_fit_clients": 3},
            "config.min_fit_clients=3 is more than num_shards=2",
            "config.min_fit_clients",
        ),
        (
            {"strategy": "krum", "num_shards": 8, "min_fit_fraction": 0.5, "round_timeout_s": 60},
            "with a quorum of 4 of 8 updates, krum with f=1 needs more than 2f + 2 = 4 updates",
            None,
        ),
    ],
)
def test_a_refusal_names_the_field_in_the_descriptions_words(
    config: dict[str, Any], message: str, field: str | None
) -> None:
    with pytest.raises(spec.SpecError) as refused:
        spec.normalize_federated_config(config, default_batch_size=BATCH, default_epochs=EPOCHS)
    assert message in str(refused.value)
    assert refused.value.field == field


def test_a_parameter_refusal_names_its_field() -> None:
    with pytest.raises(ValueError) as refused:
        agg.normalize_strategy("fedprox", {"mu": -1}, 3)
    assert str(refused.value) == "strategy_params.mu must be in [0, 1e+06], got -1"
    assert isinstance(refused.value, agg.SpecField) and refused.value.field == "strategy_params.mu"


def test_the_training_codes_defaults_are_the_specs() -> None:
    """training/task_config.py fills partial configs (tests, benchmarks) without importing the
    spec (the client does not install pydantic): its defaults must be the spec's."""
    from training.task_config import DEFAULTS

    stored = spec.normalize_federated_config({}, default_batch_size=BATCH, default_epochs=EPOCHS)
    server_settings = {"local_epochs", "batch_size", "strategy_params"}  # the server's, or filled in
    assert {k: v for k, v in DEFAULTS.items() if k not in server_settings} == {
        k: stored[k] for k in DEFAULTS if k not in server_settings
    }

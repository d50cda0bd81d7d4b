"""Names and parameters of the aggregation strategies, checked without importing torch.

The web tier validates a task's ``config.strategy`` and ``config.strategy_params`` here at
submit time, so a strategy that cannot work is a 400, not an exception in a worker.

Every strategy accepts the common parameters (clipping, DP noise, seed); each strategy
adds its own. The parameters are declared once, as pydantic models: one per strategy and
clip mode (``none``, ``fixed``, ``adaptive``), made from the tables below. A field's
``description`` is what it must be ("a number in (0, inf)"): it is the published JSON Schema
(:func:`strategy_params_schema`) and the words of the error ("strategy_params.clip_norm must be
in (0, inf), got 0"). :func:`normalize_strategy` returns only the parameters that apply, with
defaults filled in, and is idempotent: normalizing its own output returns the same dict.
See ``docs/aggregation.md`` for what each parameter means.
"""

from __future__ import annotations

import copy
import functools
import math
import re
import typing
from collections.abc import Callable, Mapping
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    create_model,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic.json_schema import SkipJsonSchema
from pydantic_core import ErrorDetails, PydanticCustomError

StrategyName = Literal[
    "fedavg",
    "fedprox",
    "fedavgm",
    "fedadam",
    "fedyogi",
    "fedadagrad",
    "median",
    "trimmed_mean",
    "krum",
    "multi_krum",
    "bulyan",
]
STRATEGIES: tuple[str, ...] = typing.get_args(StrategyName)
#: Strategies that average the (clipped) deltas with example-count weights.
MEAN_STRATEGIES = frozenset({"fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi", "fedadagrad"})
#: Mean strategies with a server optimizer whose state persists across rounds.
SERVER_OPTIMIZERS = frozenset({"fedavgm", "fedadam", "fedyogi", "fedadagrad"})
#: Rules that need pairwise distances between updates (a stats pass before aggregating).
DISTANCE_RULES = frozenset({"krum", "multi_krum", "bulyan"})
#: Rules the functional :func:`aggregation.aggregate` accepts.
FUNCTIONAL_RULES: tuple[str, ...] = ("fedavg", "median", "trimmed_mean", "krum", "multi_krum", "bulyan")
CLIP_MODES: tuple[str, ...] = ("none", "fixed", "adaptive")
Weighting = Literal["examples", "uniform"]
WEIGHTINGS: tuple[str, ...] = typing.get_args(Weighting)

MAX_SEED = 2**63 - 1
MAX_F = 10**6

# --- the shared machinery of this module and training/spec.py ------------------------------------


class SpecField(ValueError):
    """A refused value: the message names the field and says what it must be; ``field`` is its
    path (``strategy_params.clip_norm``), or None when the rule spans several fields."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


def whole(value: Any) -> Any:
    """As JSON Schema says, 3.0 is the integer 3 (one beyond 64 bits stays a float: refused as
    one, it is shown as written, 1e+300, not with its 300 digits)."""
    if isinstance(value, float) and value.is_integer() and abs(value) <= 2.0**64:
        return int(value)
    return value


Whole = BeforeValidator(whole)


def integer_field(lo: int, hi: int) -> FieldInfo:
    """An integer in lo..hi (put it before :data:`Whole` in ``Annotated``, so the bounds reach
    the JSON Schema)."""
    return Field(ge=lo, le=hi, description=f"an integer in {lo}..{hi}")


def number_field(
    lo: float, hi: float, *, lo_open: bool, hi_open: bool, text: Callable[[float], str]
) -> FieldInfo:
    """A finite number between lo and hi; ``text`` writes the ends as the messages show them."""
    top = None if hi == math.inf else hi
    left, right = "(" if lo_open else "[", ")" if hi_open else "]"
    hi_text = "inf" if top is None else text(hi)
    return Field(
        gt=lo if lo_open else None,
        ge=None if lo_open else lo,
        lt=top if hi_open else None,
        le=None if hi_open else top,
        description=f"a number in {left}{text(lo)}, {hi_text}{right}",
    )


def choice_field(allowed: tuple[str, ...]) -> FieldInfo:
    return Field(description=f"one of {', '.join(allowed)}")


def no_default(schema: dict[str, Any]) -> None:
    """For a field whose default is not a value it may be given (null where null is refused):
    the schema shows no default."""
    schema.pop("default", None)


def not_null(value: Any) -> Any:
    """For an optional key that may not be null: absent is the default, null is refused."""
    if value is None:
        raise PydanticCustomError("null", "must not be null")
    return value


def describe(field: FieldInfo) -> str:
    """What a field must be: its description, or its (optional) type's."""
    if field.description:
        return field.description
    for member in typing.get_args(field.annotation):
        for meta in getattr(member, "__metadata__", ()):
            if isinstance(meta, FieldInfo) and meta.description:
                return meta.description
    return "valid"


_SPAN = re.compile(r" in ([\[(][^\])]*[\])]|-?\d+\.\.-?\d+)")
_RANGE = {"greater_than", "greater_than_equal", "less_than", "less_than_equal"}


def shown(value: Any, limit: int = 64) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def explain(
    model: type[BaseModel],
    where: str,
    errors: list[ErrorDetails],
    *,
    got: Callable[[Any, bool], str],
    unknown: Callable[[list[str]], str],
    extra_before: str | None,
    finite: bool,
) -> SpecField:
    """One sentence for the first problem, in the order the fields are declared (unknown keys
    just before the field ``extra_before``, or first when it is None).

    A field's problem is said in its description's words: "<where>.<field> must be <description>,
    got <value>" for a wrong type; "must be in <range>, got <value>" for a value out of range;
    "must be one of <names>; got <value>" for a name not among them. A validator's own message
    is a whole sentence. ``got`` shows a value (``True`` when the field is a number);
    ``unknown`` words the unknown keys; ``finite`` says "must be finite" for NaN and infinities
    (otherwise they are out of range).
    """
    names = list(model.model_fields)
    extra_rank = names.index(extra_before) if extra_before in names else -1

    def rank(error: ErrorDetails) -> tuple[int, int]:
        loc = error["loc"]
        if error["type"] == "extra_forbidden":
            return (extra_rank, 0)
        if loc and loc[0] in model.model_fields:
            return (names.index(str(loc[0])), 1)
        return (len(names), 1)

    first = min(errors, key=rank)  # min keeps the first of equals: pydantic's order
    kind = first["type"]
    if kind == "extra_forbidden":
        return SpecField(unknown(sorted(str(e["loc"][0]) for e in errors if e["type"] == kind)), where)
    loc = first["loc"]
    raised = (first.get("ctx") or {}).get("error")
    # A validator that raises SpecField names the field at fault, relative to ``where``.
    blamed = f"{where}.{raised.field}" if isinstance(raised, SpecField) and raised.field else None
    if not loc:
        if kind in ("model_type", "dict_type", "model_attributes_type"):
            return SpecField(f"{where} must be an object", where)
        return SpecField(str(raised or first["msg"]), blamed)
    name = str(loc[0])
    path = f"{where}.{name}"
    if kind == "value_error":  # a validator's own words: a whole sentence
        text = str(raised or first["msg"])
        return SpecField(f"{path} {text}" if text.startswith("must") else text, blamed or path)
    if kind == "missing":
        return SpecField(f"{path} is required", path)
    description = describe(model.model_fields[name])
    value = first["input"]
    number = "a number" in description
    if kind in _RANGE or (kind == "finite_number" and not finite):
        span = _SPAN.search(description)
        return SpecField(
            f"{path} must be in {span[1] if span else description}, got {got(value, number)}", path
        )
    if kind == "finite_number":
        return SpecField(f"{path} must be finite", path)
    if kind == "literal_error":
        return SpecField(f"{path} must be {description}; got {shown(value)}", path)
    return SpecField(f"{path} must be {description}, got {shown(value)}", path)


# --- the parameters ---------------------------------------------------------------------------------


def _g(value: float) -> str:
    return f"{value:g}"


def _between(lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False) -> FieldInfo:
    return number_field(lo, hi, lo_open=lo_open, hi_open=hi_open, text=_g)


def _no_noise_without_clipping(z: float) -> float:
    if z > 0:
        raise ValueError(
            "noise_multiplier > 0 needs clipping: set clip_norm (and clip_mode 'fixed' or 'adaptive')"
        )
    return z


def _at_most_zero(schema: dict[str, Any]) -> None:
    schema["maximum"] = 0
    schema["description"] = "0: noise needs clipping (clip_norm, with clip_mode 'fixed' or 'adaptive')"


ClipNorm = Annotated[float, _between(0, math.inf, lo_open=True, hi_open=True)]
ClipQuantile = Annotated[float, _between(0, 1, lo_open=True, hi_open=True)]
ClipLr = Annotated[float, _between(0, 10, lo_open=True)]
ClipCountStddev = Annotated[float, _between(0, math.inf, hi_open=True)]
Noise = Annotated[float, _between(0, 1e6)]
NoNoise = Annotated[
    float,
    _between(0, 1e6),
    Field(json_schema_extra=_at_most_zero),
    AfterValidator(_no_noise_without_clipping),
]
Seed = Annotated[int, integer_field(0, MAX_SEED), Whole]

#: Each parameter's type: its description and bounds.
PARAMETERS: dict[str, Any] = {
    "noise_multiplier": Noise,
    "seed": Seed,
    "weighting": Annotated[Weighting, choice_field(WEIGHTINGS)],
    "mu": Annotated[float, _between(0, 1e6)],
    "server_lr": Annotated[float, _between(0, 1e3, lo_open=True)],
    "momentum": Annotated[float, _between(0, 1, hi_open=True)],
    "beta1": Annotated[float, _between(0, 1, hi_open=True)],
    "beta2": Annotated[float, _between(0, 1, hi_open=True)],
    "tau": Annotated[float, _between(0, 1e3, lo_open=True)],
    "beta": Annotated[float, _between(0, 0.5)],
    "f": Annotated[int, integer_field(0, MAX_F), Whole],
    "m": Annotated[
        Annotated[int, integer_field(1, MAX_F), Whole] | None,
        Field(description=f"an integer in 1..{MAX_F}, or null (n - f)"),
    ],
}

_COMMON = ("clip_mode", "noise_multiplier", "seed")
_CLIP_FIXED = ("clip_norm",)
_CLIP_ADAPTIVE = ("clip_norm", "clip_quantile", "clip_lr", "clip_count_stddev")

#: Each strategy's own parameters and their defaults, in the order they are stored.
_OWN: dict[str, dict[str, Any]] = {
    "fedavg": {"weighting": "examples"},
    "fedprox": {"weighting": "examples", "mu": 0.01},
    "fedavgm": {"weighting": "examples", "server_lr": 1.0, "momentum": 0.9},
    "fedadam": {"weighting": "examples", "server_lr": 0.01, "beta1": 0.9, "beta2": 0.99, "tau": 1e-3},
    "fedyogi": {"weighting": "examples", "server_lr": 0.01, "beta1": 0.9, "beta2": 0.99, "tau": 1e-3},
    "fedadagrad": {"weighting": "examples", "server_lr": 0.1, "beta1": 0.9, "tau": 1e-3},
    "median": {},
    "trimmed_mean": {"beta": 0.1},
    "krum": {"f": 1},
    "multi_krum": {"f": 1, "m": None},
    "bulyan": {"f": 1},
}


class StrategyParams(BaseModel):
    """The parameters of one strategy with one clip mode. Unknown keys are refused; the
    number of updates a round aggregates (``num_clients``, or None when unknown) comes in
    the validation context."""

    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="forbid")
    STRATEGY: ClassVar[str] = ""

    def num_clients(self, info: ValidationInfo) -> int | None:
        return (info.context or {}).get("num_clients")


class NoClipping(StrategyParams):
    """``clip_mode`` none (the default without ``clip_norm``): no clipping, so no noise."""

    clip_mode: Literal["none"] = Field("none", description="'none' (the default without clip_norm)")
    noise_multiplier: NoNoise = 0.0


class FixedClipping(StrategyParams):
    """``clip_mode`` fixed (the default with ``clip_norm``): every update's delta is clipped
    to ``clip_norm``."""

    clip_mode: Literal["fixed"] = Field("fixed", description="'fixed' (the default with clip_norm)")
    clip_norm: ClipNorm
    noise_multiplier: Noise = 0.0


class AdaptiveClipping(StrategyParams):
    """``clip_mode`` adaptive: ``clip_norm`` follows the ``clip_quantile`` of the update norms."""

    clip_mode: Literal["adaptive"] = Field(description="'adaptive'")
    clip_norm: ClipNorm = 0.1
    clip_quantile: ClipQuantile = 0.5
    clip_lr: ClipLr = 0.2
    noise_multiplier: Noise = 0.0
    # Absent: num_clients / 20 with noise (Andrew et al.), else 0; null is refused.
    clip_count_stddev: ClipCountStddev | SkipJsonSchema[None] = Field(None, json_schema_extra=no_default)

    @field_validator("clip_count_stddev", mode="before")
    @classmethod
    def _given(cls, value: Any) -> Any:
        return not_null(value)

    @model_validator(mode="after")
    def _count_noise(self, info: ValidationInfo) -> AdaptiveClipping:
        z = self.noise_multiplier
        n = self.num_clients(info)
        if self.clip_count_stddev is not None:
            sigma_b = self.clip_count_stddev
        elif z == 0:
            sigma_b = 0.0
        elif n is None:
            raise ValueError(
                "strategy_params.clip_count_stddev must be given when the number of clients is unknown"
            )
        else:
            sigma_b = n / 20.0
        if z > 0 and not 2 * sigma_b > z:
            raise ValueError(
                f"adaptive clipping with noise_multiplier {z:g} needs clip_count_stddev > {z / 2:g} "
                f"(got {sigma_b:g}): the clipped-count noise takes part of the privacy budget "
                "(Andrew et al.); raise clip_count_stddev or lower noise_multiplier"
            )
        self.clip_count_stddev = sigma_b
        return self


_MODE_BASES: dict[str, type[StrategyParams]] = {
    "none": NoClipping,
    "fixed": FixedClipping,
    "adaptive": AdaptiveClipping,
}


def _enough_updates(self: StrategyParams, info: ValidationInfo) -> StrategyParams:
    n = self.num_clients(info)
    if n is not None:
        reason = shortfall(self.STRATEGY, self.model_dump(), n)
        if reason:
            raise ValueError(f"{reason} (num_shards is {n})")
    return self


def _title(name: str) -> str:
    return "".join(part.capitalize() for part in name.split("_"))


def _make(name: str, mode: str) -> type[StrategyParams]:
    fields: dict[str, Any] = {
        "seed": (Seed, 0),
        **{key: (PARAMETERS[key], default) for key, default in _OWN[name].items()},
    }
    model = create_model(
        f"{_title(name)}{_title(mode)}Clipping",
        __base__=_MODE_BASES[mode],
        __doc__=f"{name} with clip_mode {mode}",
        __validators__={"_enough_updates": model_validator(mode="after")(_enough_updates)},  # type: ignore[dict-item]
        **fields,
    )
    model.STRATEGY = name
    return model


#: strategy -> clip mode -> the model of its parameters.
PARAMS: dict[str, dict[str, type[StrategyParams]]] = {
    name: {mode: _make(name, mode) for mode in CLIP_MODES} for name in STRATEGIES
}


def _unknown(name: str, model: type[StrategyParams]) -> Callable[[list[str]], str]:
    def words(unknown: list[str]) -> str:
        hint = ""
        if set(unknown) & set(_CLIP_ADAPTIVE):
            hint = (
                " (clip_quantile, clip_lr and clip_count_stddev need clip_mode 'adaptive'; "
                "clip_norm needs 'fixed' or 'adaptive')"
            )
        return (
            f"strategy {name!r} does not take parameter(s) {', '.join(unknown)}{hint}; "
            f"it takes: {', '.join(sorted(model.model_fields))}"
        )

    return words


def _got(value: Any, number: bool) -> str:
    return f"{float(value):g}" if number and isinstance(value, (int, float)) else shown(value)


def _normalize(name: Any, params: Any, num_clients: int | None) -> dict[str, Any]:
    if not isinstance(name, str) or name not in STRATEGIES:
        raise SpecField(f"unknown strategy {name!r}; known: {', '.join(STRATEGIES)}", "strategy")
    if not isinstance(params, Mapping):
        raise SpecField("strategy_params must be an object", "strategy_params")
    if num_clients is not None and (
        isinstance(num_clients, bool) or not isinstance(num_clients, int) or num_clients < 1
    ):
        raise ValueError(f"num_clients must be a positive integer, got {num_clients!r}")
    mode = params.get("clip_mode", "fixed" if params.get("clip_norm") is not None else "none")
    if mode not in CLIP_MODES:
        raise SpecField(
            f"strategy_params.clip_mode must be {CLIP_MODE_DESCRIPTION}; got {shown(mode)}",
            "strategy_params.clip_mode",
        )
    if mode == "fixed" and params.get("clip_norm") is None:
        raise SpecField(
            "clip_mode 'fixed' needs strategy_params.clip_norm (a number > 0)", "strategy_params.clip_norm"
        )
    model = PARAMS[name][mode]
    try:
        valid = model.model_validate(dict(params), context={"num_clients": num_clients})
    except ValidationError as refused:
        raise explain(
            model,
            "strategy_params",
            refused.errors(),
            got=_got,
            unknown=_unknown(name, model),
            extra_before="noise_multiplier",
            finite=True,
        ) from None
    return valid.model_dump()


CLIP_MODE_DESCRIPTION = f"one of {', '.join(CLIP_MODES)}"


def normalize_strategy(name: str, params: Mapping[str, Any], num_clients: int) -> dict[str, Any]:
    """Return the strategy's parameters with defaults filled in.

    ``num_clients`` is the number of updates each round aggregates (the task's ``num_shards``).
    Raises ``ValueError`` (a :class:`SpecField`, with the field's path) with a reason a user can
    act on: unknown strategy or parameter, wrong type or range, or a combination that cannot
    work with ``num_clients`` updates (trimming away every update, Krum with n <= 2f + 2,
    Multi-Krum m > n - f, Bulyan n < 4f + 3, noise without clipping, ...).
    """
    return _normalize(name, params, num_clients)


def normalize_without_clients(name: str, params: Mapping[str, Any]) -> dict[str, Any]:
    """Like :func:`normalize_strategy` when the number of clients is not known (a worker
    re-checking a stored config): the checks that need it are skipped."""
    return _normalize(name, params, None)


#: Where a schema's references point: its own ``$defs`` (an OpenAPI document may pass
#: ``"#/components/schemas/{model}"`` and move the ``$defs`` there).
REF_TEMPLATE = "#/$defs/{model}"


@functools.cache
def _schemas(ref_template: str) -> dict[str, Any]:
    from pydantic.json_schema import models_json_schema

    models: list[tuple[type[BaseModel], Literal["validation"]]] = [
        (PARAMS[name][mode], "validation") for name in STRATEGIES for mode in CLIP_MODES
    ]
    _, top = models_json_schema(models, ref_template=ref_template)
    defs: dict[str, Any] = top["$defs"]
    for name in STRATEGIES:
        defs[strategy_params_ref(name)] = {
            "title": f"{name} parameters",
            "description": (
                f"The parameters of strategy {name!r}, by clip_mode: 'none' (the default without "
                "clip_norm), 'fixed' (the default with clip_norm) or 'adaptive'. Beyond this schema: "
                "adaptive clipping with noise needs clip_count_stddev > noise_multiplier/2, and the "
                "strategy needs enough updates a round."
            ),
            # The clip modes exclude each other: oneOf, not pydantic's anyOf.
            "oneOf": [{"$ref": ref_template.format(model=model.__name__)} for model in PARAMS[name].values()],
        }
    return defs


def strategy_params_defs(ref_template: str = REF_TEMPLATE) -> dict[str, Any]:
    """The JSON Schemas of every strategy's parameters, by name: ``<Strategy>Params`` (e.g.
    ``MultiKrumParams``) is a ``oneOf`` of its three clip modes (``MultiKrumNoneClipping``, ...);
    references are written with ``ref_template``."""
    return copy.deepcopy(_schemas(ref_template))


def strategy_params_ref(name: str) -> str:
    """The name, in :func:`strategy_params_defs`, of ``name``'s parameters."""
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; known: {', '.join(STRATEGIES)}")
    return f"{_title(name)}Params"


def strategy_params_schema(name: str, ref_template: str = REF_TEMPLATE) -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of ``strategy_params`` for strategy ``name``, with the
    three clip modes it refers to under ``$defs``. What it cannot say: adaptive clipping with
    noise needs ``clip_count_stddev`` > ``noise_multiplier``/2, and the strategy needs enough
    updates (:func:`shortfall`)."""
    defs = _schemas(ref_template)
    top = defs[strategy_params_ref(name)]  # refuses an unknown name
    own = sorted(model.__name__ for model in PARAMS[name].values())
    return copy.deepcopy({**top, "$defs": {key: defs[key] for key in own}})


def trim_count(beta: float, n: int) -> int:
    """Updates trimmed from each end by ``trimmed_mean`` with ``n`` updates."""
    return math.floor(beta * n + 1e-9)


def shortfall(name: str, params: Mapping[str, Any], n: int) -> str | None:
    """Why ``n`` valid updates are not enough for the strategy, or None when they are."""
    if n < 1:
        return f"{name} needs at least 1 update, got 0"
    if name == "trimmed_mean":
        k = trim_count(float(params["beta"]), n)
        if n - 2 * k < 1:
            return f"trimmed_mean with beta={params['beta']:g} trims away all {n} updates ({k} from each end)"
    if name in ("krum", "multi_krum"):
        f = int(params["f"])
        if n <= 2 * f + 2:
            return f"{name} with f={f} needs more than 2f + 2 = {2 * f + 2} updates, got {n}"
        m = params.get("m")
        if name == "multi_krum" and m is not None and int(m) > n - f:
            return f"multi_krum with f={f} keeps at most n - f = {n - f} updates, but m={m}"
    if name == "bulyan":
        f = int(params["f"])
        if n < 4 * f + 3:
            return f"bulyan with f={f} needs at least 4f + 3 = {4 * f + 3} updates, got {n}"
    return None

"""quick_validate (the checker's schema-free parameter validation) against pydantic itself.

``quick_validate`` may only *accept*: what it accepts, pydantic must accept with the same
values (same types too: an int given to a float parameter becomes a float); anything else it
leaves to pydantic, whose errors give the diagnostics. Compared here on every registered stage
model and config block, over values at and around each field's bounds, of every scalar type,
lists, literals, unknown keys and missing required ones.
"""

from __future__ import annotations

import itertools
import math
from typing import Literal, get_args, get_origin

import pytest
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from shapeflow.config import CONFIG_BLOCKS
from shapeflow.stdlib.params import quick_instance, quick_validate
from shapeflow.stdlib.registry import default_registry

SCALARS = [None, True, False, 0, 1, -1, 2, 3, 7, 100, 2**60, 2**70, 0.0, -0.0, 0.5, 1.0, -1.0, 1e-9, 1e30,
           math.inf, -math.inf, math.nan, "", "x", "none", "token-mean", [], [0.5], [1, 2], [0.9, 0.999],
           ["a"], ["a=1", "b=2"], [True, 1.0], (0.9, 0.999), {"a": 1}]


def _models() -> list[type[BaseModel]]:
    reg = default_registry()
    models = {st.params for st in reg.stages.values()} | set(CONFIG_BLOCKS.values())
    return sorted(models, key=lambda m: f"{m.__module__}.{m.__qualname__}")


def _field_values(info) -> list:
    """Values worth trying for one field: generic ones, its default, literal options, values
    at and next to each bound, and the same as ints and floats."""
    values = list(SCALARS)
    if not info.is_required():
        values.append(info.default)
    ann = info.annotation
    for a in (ann, *get_args(ann)):
        if get_origin(a) is Literal:
            values.extend(get_args(a))
            values.extend(o.upper() for o in get_args(a) if isinstance(o, str))
    for meta in info.metadata:
        for attr in ("ge", "gt", "le", "lt", "min_length", "max_length"):
            b = getattr(meta, attr, None)
            if b is None:
                continue
            if attr in ("min_length", "max_length"):
                values.extend(["y" * n for n in (b - 1, b, b + 1) if n >= 0])
                values.extend([[0.5] * n for n in (b - 1, b, b + 1) if n >= 0])
                values.extend([["k=v"] * n for n in (b - 1, b, b + 1) if n >= 0])
            else:
                for v in (b - 1, b - 0.5, b - 1e-9, b, b + 1e-9, b + 0.5, b + 1):
                    values.extend([v, float(v)] + ([int(v)] if float(v).is_integer() else []))
    return values


def _pydantic(model, values):
    try:
        return True, model.model_validate(values).model_dump()
    except ValidationError:
        return False, None


def _same(a, b) -> bool:
    """Equal with equal types, recursively (1 == 1.0 is not enough; nan equals nan)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, float) and math.isnan(a):
        return math.isnan(b)
    return a == b


def _inputs(model):
    fields = model.model_fields
    required = {n: None for n, f in fields.items() if f.is_required()}
    yield {}
    yield {"not_a_parameter": 1}
    per_field = {n: _field_values(f) for n, f in fields.items()}
    for name, values in per_field.items():
        for v in values:
            yield {name: v}
            if required:  # the required ones filled with something the field accepts
                yield {**_filled(model, required), name: v}
    for (a, va), (b, vb) in itertools.combinations(per_field.items(), 2):  # cross-field rules
        for x, y in itertools.islice(itertools.product(va[::3], vb[::3]), 300):
            yield {a: x, b: y}


def _filled(model, required):
    out = {}
    for name in required:
        for v in _field_values(model.model_fields[name]):
            ok, _ = _pydantic(model, {**out, name: v})
            ok_alone, _ = _pydantic(model, {name: v})
            if ok or ok_alone:
                out[name] = v
                break
    return out


@pytest.mark.parametrize("model", _models(), ids=lambda m: m.__qualname__)
def test_quick_validate_accepts_only_what_pydantic_accepts(model):
    accepted = 0
    for values in _inputs(model):
        quick = quick_validate(model, dict(values))
        if quick is None:
            continue
        accepted += 1
        ok, dumped = _pydantic(model, dict(values))
        assert ok, f"{model.__qualname__}: quick accepted {values!r}, pydantic rejects it"
        assert _same(quick, dumped), f"{model.__qualname__}({values!r}): quick {quick!r} != pydantic {dumped!r}"
        instance = quick_instance(model, dict(values))
        assert instance == model.model_validate(dict(values))
        assert instance.model_fields_set == model.model_validate(dict(values)).model_fields_set
    if all(not f.is_required() for f in model.model_fields.values()) and _pydantic(model, {})[0]:
        assert accepted, f"{model.__qualname__}: the quick path accepted nothing (a supported model?)"


def test_every_registered_model_has_a_quick_path():
    from shapeflow.stdlib import params

    for model in _models():
        quick_instance(model, {})
    unsupported = sorted(m.__qualname__ for m, plan in params._PLANS.items() if plan is None)
    assert unsupported == []


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, defer_build=True)


def test_validators_run_and_their_refusals_go_to_pydantic():
    calls = []

    class M(_Strict):
        a: float = Field(0.5, ge=0)
        b: str | None = None

        @field_validator("b", mode="before")
        @classmethod
        def _upper(cls, v):
            calls.append(("before", v))
            return v.upper() if isinstance(v, str) else v

        @field_validator("a")
        @classmethod
        def _half(cls, v):
            return v / 2

        @model_validator(mode="after")
        def _rule(self):
            if self.b == "BAD":
                raise ValueError("bad b")
            return self

    for values in ({"a": 3, "b": "x"}, {"b": None}, {}, {"a": 1.0}):
        assert _same(quick_validate(M, dict(values)), M.model_validate(dict(values)).model_dump())
    assert quick_validate(M, {"b": "bad"}) is None  # pydantic raises: the checker reports it
    assert quick_validate(M, {"a": -1}) is None
    assert ("before", "x") in calls


def test_unsupported_models_always_go_to_pydantic():
    class Wrap(_Strict):
        a: int = 1

        @field_validator("a", mode="wrap")
        @classmethod
        def _w(cls, v, handler):
            return handler(v)

    class Info(_Strict):
        a: int = 1

        @model_validator(mode="after")
        def _i(self, info):
            return self

    class Lax(BaseModel):
        model_config = ConfigDict(extra="forbid", defer_build=True)
        a: int = 1

    class Union(_Strict):
        a: int | float = 1

    class Changed(_Strict):
        a: int = 1

        @model_validator(mode="after")
        def _copy(self):
            return self.model_copy()

    for model in (Wrap, Info, Lax, Union):
        assert quick_validate(model, {"a": 1}) is None
    assert quick_validate(Changed, {"a": 1}) is None

"""Shared parameter types and their descriptions (bounds in words, for docs and diagnostics)."""

from __future__ import annotations

import math
from types import UnionType
from typing import Literal, Union, get_args, get_origin

from pydantic.fields import FieldInfo

Aggregation = Literal["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]

_OPS = (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"))


def bounds(info: FieldInfo) -> str:
    """``">= 0 and < 1"`` from a field's constraints; empty when unbounded."""
    parts = []
    for meta in info.metadata:
        for attr, sym in _OPS:
            value = getattr(meta, attr, None)
            if value is not None:
                parts.append(f"{sym} {value}")
    return " and ".join(parts)


def type_words(info: FieldInfo) -> str:
    """The field's type as a user would say it: "number", "one of 'a', 'b'", "number or none"."""
    return _words(info.annotation)


def _words(ann) -> str:
    origin, args = get_origin(ann), get_args(ann)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (Union, UnionType):
        return " or ".join(_words(a) for a in args)
    if origin is list:
        return f"list of {_words(args[0])}" if args else "list"
    if ann is type(None):
        return "none"
    return {float: "number", int: "integer", str: "string", bool: "boolean"}.get(ann, getattr(ann, "__name__", str(ann)))


def describe_field(name: str, info: FieldInfo) -> str:
    """``eps_low: number = 0.2  (>= 0 and < 1)`` for doc pages."""
    default = "required" if info.is_required() else repr(info.default)
    default = {"True": "true", "False": "false", "None": "none"}.get(default, default)
    b = bounds(info)
    return f"{name}: {type_words(info)} = {default}" + (f"  ({b})" if b else "")


# --- validation without pydantic's schema ---------------------------------------------------
#
# Building a model's pydantic-core schema costs ~0.7 ms (plus a scan of the installed
# distributions for pydantic plug-ins the first time), and `shapeflow check` would pay it for
# every stage a spec uses. Stage parameters and config blocks use a small part of pydantic:
# strict scalars, Literal strings, optional values, lists of scalars, numeric bounds, lengths,
# and a few validators. ``quick_validate`` handles exactly that part, and only to *accept*:
# whatever it is not sure of (an unsupported type or option, a value that fails any rule, a
# validator that raises or returns something new) gives ``None``, and the caller asks pydantic,
# which then builds its schema and produces the errors and their text as before. What it
# accepts, pydantic accepts with the same values (tests/test_quick_params.py compares the two
# on every registered model). Validators are called as pydantic calls them (no-``info`` ones
# only), so a value that fails may run a validator twice: once here, once in pydantic.

_MISSING = object()
_INT_LIMIT = 2**63 - 1  # pydantic-core's fast integer range; larger ones are left to pydantic
_FLOAT_EXACT = 2**53  # ints that convert to float exactly
_PLANS: dict[type, object] = {}
_CONFIG_KEYS = {"extra", "strict", "frozen", "defer_build", "title"}


class _Unsupported(Exception):
    """The model uses something ``quick_validate`` does not reproduce: always ask pydantic."""


def _scalar(ann):
    """A checker ``value -> value | _MISSING`` for one strict scalar annotation."""
    if ann is float:
        def check(v):
            t = type(v)
            if t is float:
                return v if math.isfinite(v) else _MISSING
            if t is int and -_FLOAT_EXACT <= v <= _FLOAT_EXACT:
                return float(v)
            return _MISSING
        return check, "number"
    if ann is int:
        return (lambda v: v if type(v) is int and -_INT_LIMIT <= v <= _INT_LIMIT else _MISSING), "integer"
    if ann is bool:
        return (lambda v: v if type(v) is bool else _MISSING), None
    if ann is str:
        return (lambda v: v if type(v) is str else _MISSING), "sized"
    if ann is type(None):
        return (lambda v: v if v is None else _MISSING), None
    if get_origin(ann) is Literal:
        options = get_args(ann)
        if not options or not all(type(o) is str for o in options):
            raise _Unsupported(ann)
        allowed = frozenset(options)
        return (lambda v: v if type(v) is str and v in allowed else _MISSING), None
    raise _Unsupported(ann)


def _constraints(metadata, kind):
    """``value -> bool`` for the field's bounds and lengths."""
    checks = []
    for meta in metadata:
        name = type(meta).__name__
        if name in ("Ge", "Gt", "Le", "Lt") and kind in ("number", "integer"):
            bound = getattr(meta, name.lower())
            allowed = (int,) if kind == "integer" else (int, float)
            if type(bound) not in allowed or (type(bound) is float and not math.isfinite(bound)):
                raise _Unsupported(meta)
            checks.append({"Ge": lambda v, b=bound: v >= b, "Gt": lambda v, b=bound: v > b,
                           "Le": lambda v, b=bound: v <= b, "Lt": lambda v, b=bound: v < b}[name])
        elif name in ("MinLen", "MaxLen") and kind in ("sized", "list"):
            bound = meta.min_length if name == "MinLen" else meta.max_length
            if type(bound) is not int:
                raise _Unsupported(meta)
            checks.append((lambda v, b=bound: len(v) >= b) if name == "MinLen" else (lambda v, b=bound: len(v) <= b))
        else:
            raise _Unsupported(meta)
    return checks


def _field_checker(info: FieldInfo):
    ann = info.annotation
    origin, args = get_origin(ann), get_args(ann)
    nullable = False
    if origin in (Union, UnionType):
        rest = [a for a in args if a is not type(None)]
        if len(rest) != 1 or len(args) != 2:
            raise _Unsupported(ann)
        nullable, ann = True, rest[0]
        origin, args = get_origin(ann), get_args(ann)
    if origin is list:
        if len(args) != 1:
            raise _Unsupported(ann)
        item, _ = _scalar(args[0])
        kind = "list"

        def base(v):
            if type(v) is not list:
                return _MISSING
            out = []
            for x in v:
                x = item(x)
                if x is _MISSING:
                    return _MISSING
                out.append(x)
            return out
    else:
        base, kind = _scalar(ann)
    checks = _constraints(info.metadata, kind)

    def check(v):
        if nullable and v is None:
            return None
        v = base(v)
        if v is _MISSING:
            return _MISSING
        for c in checks:
            if not c(v):
                return _MISSING
        return v

    return check


def _validator(dec, mode: str, kind: str):
    from pydantic._internal._decorators import inspect_validator

    if dec.info.mode != mode or inspect_validator(dec.func, mode=mode, type=kind):
        raise _Unsupported(dec)  # wrap/plain validators and those taking `info` stay with pydantic
    return dec.func


def _plain_default(info: FieldInfo) -> bool:
    """Required, or a default that needs no deep copy beyond ``list(...)``: pydantic hands out a
    copy of a mutable default, the quick path a shallow one."""
    if info.is_required():
        return True
    d = info.default
    return type(d) in _PLAIN or (type(d) is list and all(type(x) in _PLAIN for x in d))


_PLAIN = (type(None), bool, int, float, str)


def _plan(model):
    config = model.model_config
    if (set(config) - _CONFIG_KEYS or config.get("extra") != "forbid" or config.get("strict") is not True
            or model.__pydantic_root_model__ or model.__pydantic_post_init__ is not None
            or not getattr(model, "__pydantic_fields_complete__", True)):
        raise _Unsupported(model)
    decorators = model.__pydantic_decorators__
    if (decorators.validators or decorators.root_validators or decorators.field_serializers
            or decorators.model_serializers or decorators.computed_fields):
        raise _Unsupported(model)
    before = [d for d in decorators.model_validators.values() if d.info.mode == "before"]
    if len(before) > 1:
        raise _Unsupported(model)
    model_before = _validator(before[0], "before", "model") if before else None
    model_after = [_validator(d, "after", "model") for d in decorators.model_validators.values()
                   if d.info.mode != "before"]
    fields = {}
    for name, info in model.__pydantic_fields__.items():
        if (info.alias is not None or info.validation_alias is not None or info.default_factory is not None
                or info.validate_default or info.exclude or info.discriminator is not None
                or info.frozen is not None or info.deprecated is not None or not _plain_default(info)):
            raise _Unsupported(name)
        mine = [d for d in decorators.field_validators.values() if name in d.info.fields]
        if any("*" in d.info.fields for d in decorators.field_validators.values()):
            raise _Unsupported(name)
        pre = [d for d in mine if d.info.mode == "before"]
        post = [d for d in mine if d.info.mode != "before"]
        if len(pre) > 1 or len(post) > 1:
            raise _Unsupported(name)
        fields[name] = (
            _field_checker(info),
            _validator(pre[0], "before", "field") if pre else None,
            _validator(post[0], "after", "field") if post else None,
        )
    return model_before, fields, model_after


def _accepted(model, values: dict):
    """The plan and the validated given values, or None when pydantic must decide."""
    plan = _PLANS.get(model, _MISSING)
    if plan is _MISSING:
        try:
            plan = _plan(model)
        except Exception:  # _Unsupported, or anything unexpected in pydantic's internals
            plan = None
        _PLANS[model] = plan
    if plan is None or type(values) is not dict:
        return None
    model_before, fields, _ = plan
    try:
        if model_before is not None:
            values = model_before(values)
            if type(values) is not dict:
                return None
        if not values.keys() <= fields.keys():
            return None  # an unknown key: extra="forbid"
        given = {}
        for name, value in values.items():
            check, pre, post = fields[name]
            if pre is not None:
                value = pre(value)
            value = check(value)
            if value is _MISSING:
                return None
            if post is not None:
                value = post(value)
            given[name] = value
    except Exception:  # a validator said no (or broke): pydantic reports it
        return None
    for name, info in model.__pydantic_fields__.items():
        if name not in given and info.is_required():
            return None
    return plan, given


def _instance(model, plan, given: dict):
    instance = model.model_construct(_fields_set=set(given), **given)
    try:
        for after in plan[2]:
            if after(instance) is not instance:
                return None
    except Exception:  # a cross-field rule said no: pydantic reports it
        return None
    return instance


def quick_instance(model, values: dict):
    """``model.model_validate(values)`` for the inputs it surely accepts, else None (ask pydantic)."""
    accepted = _accepted(model, values)
    return _instance(model, *accepted) if accepted is not None else None


def quick_validate(model, values: dict) -> dict | None:
    """``model.model_validate(values).model_dump()`` for the inputs it surely accepts, else None."""
    accepted = _accepted(model, values)
    if accepted is None:
        return None
    plan, given = accepted
    if plan[2]:  # model validators take the instance
        instance = _instance(model, plan, given)
        if instance is None:
            return None
        return {k: list(v) if type(v) is list else v for k, v in instance.__dict__.items()}
    out = {}
    for name, info in model.__pydantic_fields__.items():
        value = given[name] if name in given else info.default
        out[name] = list(value) if type(value) is list else value
    return out

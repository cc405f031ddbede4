"""Shared parameter types and their descriptions (bounds in words, for docs and diagnostics)."""

from __future__ import annotations

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

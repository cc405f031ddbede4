"""Shared parameter types and their descriptions (bounds in words, for docs and diagnostics)."""

from __future__ import annotations

from typing import Literal

from pydantic.fields import FieldInfo

Aggregation = Literal["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]

_OPS = (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"))


def bounds(info: FieldInfo) -> str:
    """``">= 0, < 1"`` from a field's constraints; empty when unbounded."""
    parts = []
    for meta in info.metadata:
        for attr, sym in _OPS:
            value = getattr(meta, attr, None)
            if value is not None:
                parts.append(f"{sym} {value}")
    return ", ".join(parts)


def type_words(info: FieldInfo) -> str:
    ann = info.annotation
    text = getattr(ann, "__name__", None) or str(ann)
    text = str(ann) if text in ("Literal", "Optional", "Union") else text
    text = text.replace("typing.", "").replace("NoneType", "none")
    return {"float": "number", "int": "integer", "str": "string", "bool": "boolean"}.get(text, text)


def describe_field(name: str, info: FieldInfo) -> str:
    """``eps_low: number = 0.2  (>= 0, < 1)`` for doc pages."""
    default = "required" if info.is_required() else repr(info.default)
    default = {"True": "true", "False": "false", "None": "none"}.get(default, default)
    b = bounds(info)
    return f"{name}: {type_words(info)} = {default}" + (f"  ({b})" if b else "")

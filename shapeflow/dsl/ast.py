"""AST of a .shape file: small frozen data classes, each with its source span.

Expressions carry ``depth`` (1 for a leaf) so that later passes can refuse absurdly deep
trees up front instead of recursing into them.
"""

from __future__ import annotations

from typing import Union

from shapeflow._record import Record, record
from shapeflow.dsl.diagnostics import Span

BINDING_KINDS = ("model", "data", "rollout", "verify", "reward", "advantage", "objective")
CONFIG_BLOCKS = ("train", "track")
HEADER_KEYS = ("title", "cite", "extends")


# --- expressions -------------------------------------------------------------------------


@record(slots=True)
class Number(Record):
    value: int | float
    span: Span
    depth: int = 1


@record(slots=True)
class String(Record):
    value: str
    span: Span
    depth: int = 1


@record(slots=True)
class Bool(Record):
    value: bool
    span: Span
    depth: int = 1


@record(slots=True)
class NoneLit(Record):
    span: Span
    depth: int = 1

    @property
    def value(self) -> None:
        return None


@record(slots=True)
class ListLit(Record):
    items: tuple["Expr", ...]
    span: Span
    depth: int = 1


@record(slots=True)
class Name(Record):
    """A reference to a binding or a param; dotted only by mistake (``a.b`` is not a value)."""

    id: str
    span: Span
    depth: int = 1


@record(slots=True)
class Kwarg(Record):
    name: str
    value: "Expr"
    span: Span
    name_span: Span


@record(slots=True)
class Call(Record):
    """``stage.name(args..., key = value...)``; ``a |> f(x)`` is parsed as ``f(a, x)``."""

    func: str
    args: tuple["Expr", ...]
    kwargs: tuple[Kwarg, ...]
    span: Span
    func_span: Span
    depth: int = 1
    piped: bool = False  # the first positional argument came from ``|>``


@record(slots=True)
class BinOp(Record):
    op: str  # one of + - * /
    left: "Expr"
    right: "Expr"
    span: Span
    op_span: Span
    depth: int = 1


@record(slots=True)
class Neg(Record):
    operand: "Expr"
    span: Span
    depth: int = 1


@record(slots=True)
class Invalid(Record):
    """Stands in for an expression already reported (for example one nested too deeply),
    so that later passes neither recurse into it nor report it again."""

    span: Span
    depth: int = 1


Literal = Union[Number, String, Bool, NoneLit, ListLit]
Expr = Union[Number, String, Bool, NoneLit, ListLit, Name, Call, BinOp, Neg, Invalid]


# --- statements --------------------------------------------------------------------------


@record(slots=True)
class HeaderEntry(Record):
    key: str
    value: Expr
    span: Span
    key_span: Span


@record(slots=True)
class Header(Record):
    name: str
    entries: tuple[HeaderEntry, ...]
    span: Span
    name_span: Span


@record(slots=True)
class Param(Record):
    name: str
    value: Expr
    span: Span
    name_span: Span


@record(slots=True)
class Binding(Record):
    kind: str
    name: str
    value: Expr
    span: Span
    name_span: Span
    kind_span: Span


@record(slots=True)
class ConfigEntry(Record):
    key: str
    value: Expr
    span: Span
    key_span: Span


@record(slots=True)
class Config(Record):
    block: str  # "train" or "track"
    entries: tuple[ConfigEntry, ...]
    span: Span


Statement = Union[Param, Binding, Config]


@record(slots=True)
class Spec(Record):
    file: str
    header: Header | None
    statements: tuple[Statement, ...]


def children(expr: Expr) -> tuple[Expr, ...]:
    """The sub-expressions of ``expr`` in source order."""
    if isinstance(expr, Call):
        return expr.args + tuple(k.value for k in expr.kwargs)
    if isinstance(expr, BinOp):
        return (expr.left, expr.right)
    if isinstance(expr, Neg):
        return (expr.operand,)
    if isinstance(expr, ListLit):
        return expr.items
    return ()


def walk(expr: Expr):
    """Every node of ``expr``, pre-order, without recursion."""
    stack = [expr]
    while stack:
        node = stack.pop()
        yield node
        stack.extend(reversed(children(node)))


def to_data(node) -> object:
    """A JSON-ready view of an AST node (``--emit ast``)."""
    if isinstance(node, tuple):
        return [to_data(n) for n in node]
    if isinstance(node, Span):
        return f"{node.line}:{node.column}-{node.end_line}:{node.end_column}"
    if hasattr(node, "__dataclass_fields__"):
        out: dict[str, object] = {"node": type(node).__name__}
        for name in node.__dataclass_fields__:
            if name in ("depth",) or name.endswith("_span"):
                continue
            value = getattr(node, name)
            if name == "piped" and not value:
                continue
            out[name] = to_data(value)
        return out
    return node


def show_value(value: object) -> str:
    """A constant written as it would be in a spec: none, true, "text", [1, 2]."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(show_value(v) for v in value) + "]"
    return repr(value)

"""The lark half of the parser: the grammar's LALR parser and the transformer that builds AST
nodes with spans while it reduces.

Kept apart from :mod:`shapeflow.dsl.parser` so that importing the parser does not import lark
(~40 ms): a `shapeflow check` whose specs are all in the parse cache never needs it.
"""

from __future__ import annotations

import threading
from functools import lru_cache

from lark import Lark, Token, Transformer

from shapeflow.dsl import ast
from shapeflow.dsl.diagnostics import Span
from shapeflow.dsl.parser import GRAMMAR


class _Error(Exception):
    """A semantic problem noticed while building the AST (bad escape, huge number)."""

    def __init__(self, span: Span, code: str, message: str, hint: str | None = None):
        super().__init__(message)
        self.span, self.code, self.message, self.hint = span, code, message, hint


_ESCAPES = {'"': '"', "\\": "\\", "n": "\n", "t": "\t", "r": "\r", "0": "\0"}


class _Builder(Transformer):
    """Builds AST nodes bottom-up while the parser reduces (``transformer=`` on Lark)."""

    def __init__(self, file: str):
        super().__init__()
        self.file = file

    # --- helpers
    def _span(self, tok: Token) -> Span:
        return Span(self.file, tok.line, tok.column, tok.end_line, tok.end_column)

    # --- literals and names
    def number(self, children):
        (tok,) = children
        text = str(tok)
        span = self._span(tok)
        if any(c in text for c in ".eE"):
            value = float(text)
            if value in (float("inf"), float("-inf")):
                raise _Error(span, "E104", f"number {text} is too large for a float")
            return ast.Number(value, span)
        if len(text) > 300:  # beyond any float; Python refuses to parse > 4300 digits anyway
            raise _Error(span, "E104", f"number with {len(text)} digits is too large")
        return ast.Number(int(text), span)

    def string(self, children):
        (tok,) = children
        return ast.String(self._decode(tok), self._span(tok))

    def _decode(self, tok: Token) -> str:
        raw = str(tok)[1:-1]
        if "\\" not in raw:
            return raw
        out, i = [], 0
        while i < len(raw):
            ch = raw[i]
            if ch != "\\":
                out.append(ch)
                i += 1
                continue
            esc = raw[i + 1]
            col = tok.column + 1 + i
            if esc in _ESCAPES:
                out.append(_ESCAPES[esc])
                i += 2
            elif esc == "u" and len(raw) >= i + 6 and all(c in "0123456789abcdefABCDEF" for c in raw[i + 2 : i + 6]):
                code = int(raw[i + 2 : i + 6], 16)
                if 0xD800 <= code <= 0xDFFF:
                    span = Span(self.file, tok.line, col, tok.line, col + 6)
                    raise _Error(span, "E102", f"'\\u{raw[i + 2 : i + 6]}' is a surrogate, not a character")
                out.append(chr(code))
                i += 6
            elif esc == "u":
                span = Span(self.file, tok.line, col, tok.line, col + 2)
                raise _Error(span, "E102", "'\\u' needs four hex digits, e.g. \\u00e9")
            else:
                span = Span(self.file, tok.line, col, tok.line, col + 2)
                raise _Error(
                    span,
                    "E102",
                    f"unknown escape '\\{esc}' in string",
                    'escapes are \\" \\\\ \\n \\t \\r \\0 and \\uXXXX',
                )
        return "".join(out)

    def true(self, children):
        return ast.Bool(True, self._span(children[0]))

    def false(self, children):
        return ast.Bool(False, self._span(children[0]))

    def none(self, children):
        return ast.NoneLit(self._span(children[0]))

    def dotted_name(self, children):
        first, last = children[0], children[-1]
        return ".".join(str(t) for t in children), Span(
            self.file, first.line, first.column, last.end_line, last.end_column
        )

    def name(self, children):
        ((text, span),) = children
        return ast.Name(text, span)

    def list(self, children):
        lsqb, *items, rsqb = children
        items = tuple(i for i in items if i is not None)
        depth = 1 + max((i.depth for i in items), default=0)
        return ast.ListLit(items, self._span(lsqb).to(self._span(rsqb)), depth)

    def paren(self, children):
        _, inner, _ = children
        return inner

    # --- calls and operators
    def kwarg(self, children):
        name, value = children
        name_span = self._span(name)
        return ast.Kwarg(str(name), value, name_span.to(value.span), name_span)

    def call(self, children):
        (func, func_span), _lpar, *arguments, rpar = children
        arguments = [a for a in arguments if a is not None]
        args = tuple(a for a in arguments if not isinstance(a, ast.Kwarg))
        kwargs = tuple(a for a in arguments if isinstance(a, ast.Kwarg))
        seen_kw = False
        for a in arguments:
            seen_kw = seen_kw or isinstance(a, ast.Kwarg)
            if seen_kw and not isinstance(a, ast.Kwarg):
                raise _Error(a.span, "E100", "positional argument after a keyword argument",
                             "put positional arguments first: f(a, b, key = value)")
        depth = 1 + max([a.depth for a in args] + [k.value.depth for k in kwargs], default=0)
        return ast.Call(func, args, kwargs, func_span.to(self._span(rpar)), func_span, depth)

    def pipe(self, children):
        left, _op, call = children
        return ast.Call(
            call.func,
            (left,) + call.args,
            call.kwargs,
            left.span.to(call.span),
            call.func_span,
            1 + max(left.depth, call.depth),
            piped=True,
        )

    def binop(self, children):
        left, op, right = children
        return ast.BinOp(
            str(op), left, right, left.span.to(right.span), self._span(op), 1 + max(left.depth, right.depth)
        )

    def neg(self, children):
        op, operand = children
        return ast.Neg(operand, self._span(op).to(operand.span), 1 + operand.depth)

    # --- statements
    def kind(self, children):
        return children[0]  # the keyword token itself

    block_name = kind

    def param(self, children):
        name, value = children
        return ast.Param(str(name), value, self._span(name).to(value.span), self._span(name))

    def binding(self, children):
        kind, name, value = children
        return ast.Binding(
            str(kind), str(name), value, self._span(kind).to(value.span), self._span(name), self._span(kind)
        )

    def config_entry(self, children):
        key, value = children[0], children[1]
        return ast.ConfigEntry(str(key), value, self._span(key).to(value.span), self._span(key))

    header_entry = config_entry

    def config(self, children):
        block, _lbrace, *entries, rbrace = children
        return ast.Config(str(block), tuple(entries), self._span(block).to(self._span(rbrace)))

    def header(self, children):
        name, _lbrace, *entries, rbrace = children
        entries = tuple(ast.HeaderEntry(e.key, e.value, e.span, e.key_span) for e in entries)
        span = self._span(name).to(self._span(rbrace))
        return ast.Header(str(name), entries, span, self._span(name))

    def start(self, children):
        header = children[0] if children and isinstance(children[0], ast.Header) else None
        statements = tuple(c for c in children if not isinstance(c, ast.Header))
        return header, statements


BUILDER = _Builder("<spec>")
LOCK = threading.Lock()


@lru_cache(maxsize=1)
def parser() -> Lark:
    return Lark(
        GRAMMAR.read_text(encoding="utf-8"),
        parser="lalr",
        lexer="contextual",
        maybe_placeholders=False,
        transformer=BUILDER,  # build the AST during reduction: no recursion over a tree
        cache=_lark_cache_file(),  # the LALR tables (lark checks grammar, options and version)
    )


def _lark_cache_file() -> str | bool:
    """Where lark keeps the grammar's LALR tables: the shapeflow cache folder, else lark's default
    (the temp dir) when that folder cannot be created."""
    import hashlib
    import sys

    import lark

    from shapeflow._cache import cache_root

    key = f"{GRAMMAR.read_text(encoding='utf-8')}{lark.__version__}{sys.version_info[:2]}"
    path = cache_root() / "lark" / f"shape-{hashlib.sha256(key.encode()).hexdigest()[:24]}.lark"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError:
        return True
    return str(path)

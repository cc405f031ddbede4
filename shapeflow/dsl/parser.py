"""Text → AST. The grammar lives in ``shape.lark``; this module only builds nodes with spans.

The AST is built by an inline transformer while the LALR parser reduces, so no pass recurses
over the parse tree and a deeply nested expression cannot overflow the Python stack. Syntax
errors become diagnostics in plain words; nothing here evaluates the text.
"""

from __future__ import annotations

import difflib
import threading
from functools import lru_cache
from pathlib import Path

from lark import Lark, Token, Transformer
from lark.exceptions import UnexpectedCharacters, UnexpectedInput, UnexpectedToken, VisitError

from shapeflow.dsl import ast
from shapeflow.dsl.diagnostics import Diagnostics, Span

GRAMMAR = Path(__file__).with_name("shape.lark")
MAX_DEPTH = 200  # deepest expression accepted; deeper ones are reported, not recursed into
MAX_BYTES = 4 * 1024 * 1024

STATEMENT_STARTS = ("param",) + ast.BINDING_KINDS + ast.CONFIG_BLOCKS

# Terminal names as a user would say them.
_TOKEN_WORDS = {
    "NAME": "a name",
    "NUMBER": "a number",
    "STRING": "a string",
    "$END": "end of file",
    "LPAR": "'('",
    "RPAR": "')'",
    "LSQB": "'['",
    "RSQB": "']'",
    "LBRACE": "'{'",
    "RBRACE": "'}'",
    "EQUAL": "'='",
    "COMMA": "','",
    "DOT": "'.'",
    "PIPE": "'|>'",
    "ADD": "'+'",
    "SUB": "'-'",
    "MUL": "'*'",
    "DIV": "'/'",
}


def _word(terminal: str) -> str:
    if terminal in _TOKEN_WORDS:
        return _TOKEN_WORDS[terminal]
    return f"'{terminal.lower()}'"  # anonymous keywords: SPEC, PARAM, MODEL, TRUE, ...




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


@lru_cache(maxsize=1)
def parser_fingerprint() -> bytes:
    """Bytes that change whenever parsing could give another result: lark's version, the
    grammar and the source of the modules that build the AST (keys the on-disk parse cache)."""
    import hashlib

    import lark

    from shapeflow.dsl import ast as ast_module
    from shapeflow.dsl import diagnostics

    h = hashlib.sha256(lark.__version__.encode())
    for source in (GRAMMAR, Path(__file__), Path(ast_module.__file__), Path(diagnostics.__file__)):
        h.update(source.read_bytes())
    return h.digest()


_BUILDER = _Builder("<spec>")
_LOCK = threading.Lock()


@lru_cache(maxsize=1)
def _parser() -> Lark:
    return Lark(
        GRAMMAR.read_text(encoding="utf-8"),
        parser="lalr",
        lexer="contextual",
        maybe_placeholders=False,
        transformer=_BUILDER,  # build the AST during reduction: no recursion over a tree
        cache=True,  # the LALR tables, keyed by grammar + lark version, in the temp dir
    )


def _syntax_error(exc: UnexpectedInput, file: str, text: str, diags: Diagnostics) -> None:
    line, col = exc.line if exc.line > 0 else 1, exc.column if exc.column > 0 else 1
    if isinstance(exc, UnexpectedCharacters):
        char = text[exc.pos_in_stream] if 0 <= exc.pos_in_stream < len(text) else ""
        span = Span(file, line, col, line, col + 1)
        if char == '"':
            diags.error(span, "E101", "unterminated string", 'close the string with " on the same line')
        else:
            diags.error(span, "E103", f"unexpected character {char!r}",
                        "names are letters, digits and '_'; strings are in double quotes")
        return
    assert isinstance(exc, UnexpectedToken)
    tok = exc.token
    words = {_word(t) for t in exc.expected if not t.startswith("__")}
    if "a name" in words:  # keywords accepted as keys are spelled like names: say it once
        words -= {f"'{k}'" for k in ast.BINDING_KINDS + ast.CONFIG_BLOCKS}
    expected = sorted(words, key=lambda w: (w[0] != "'", w))
    if tok.type == "$END":
        span = Span(file, line, col, line, col + 1)
        found = "end of file"
    else:
        span = Span(file, tok.line, tok.column, tok.end_line, tok.end_column)
        found = f"{_word(tok.type).removeprefix('a ').removeprefix('an ')} {str(tok)!r}" if tok.type in (
            "NAME", "NUMBER", "STRING") else _word(tok.type)
    hint = None
    statement_start = {f"'{k}'" for k in STATEMENT_STARTS} <= set(expected)
    if statement_start:
        listed = "'param', a binding kind (" + ", ".join(ast.BINDING_KINDS) + ") or a config block (train, track)"
        message = f"unexpected {found}; a statement starts with {listed}"
        if tok.type == "NAME":
            close = difflib.get_close_matches(str(tok), STATEMENT_STARTS, n=1, cutoff=0.6)
            if str(tok) == "spec":
                hint = "the header `spec NAME { ... }` must come before every other statement"
            elif close:
                hint = f"did you mean '{close[0]}'?"
            else:
                hint = f"write a binding as KIND NAME = EXPR, e.g. 'reward {tok} = ...'"
    else:
        if len(expected) > 8:
            shown = ", ".join(expected[:8]) + ", ..."
        else:
            shown = " or ".join(expected) if len(expected) <= 2 else ", ".join(expected[:-1]) + " or " + expected[-1]
        message = f"unexpected {found}; expected {shown}"
        if tok.type == "LBRACE":
            hint = "is a '}' missing before this block?"
        elif tok.type == "$END" and "')'" in expected:
            hint = "a '(' is not closed"
        elif tok.type == "$END" and "'}'" in expected:
            hint = "a '{' is not closed"
    diags.error(span, "E100", message, hint)


def parse(text: str, file: str, diags: Diagnostics) -> ast.Spec | None:
    """Parse ``text``; on a syntax error add a diagnostic and return ``None``."""
    if len(text) > MAX_BYTES:
        diags.error(Span.whole_file(file), "E107", f"spec is {len(text):,} characters; the limit is {MAX_BYTES:,}")
        return None
    if not text.strip() or all(not line.split("#", 1)[0].strip() for line in text.splitlines()):
        diags.error(Span.whole_file(file), "E108", "spec is empty",
                    "a spec needs at least a rollout and an objective; see docs/language.md")
        return None
    try:
        with _LOCK:
            _BUILDER.file = file
            header, statements = _parser().parse(text)
    except _Error as exc:
        diags.error(exc.span, exc.code, exc.message, exc.hint)
        return None
    except UnexpectedInput as exc:
        _syntax_error(exc, file, text, diags)
        return None
    except VisitError as exc:
        orig = exc.orig_exc
        if isinstance(orig, _Error):
            diags.error(orig.span, orig.code, orig.message, orig.hint)
            return None
        raise
    return _limit_depth(ast.Spec(file, header, statements), diags)


def _limit_depth(spec: ast.Spec, diags: Diagnostics) -> ast.Spec:
    """Replace expressions deeper than MAX_DEPTH by ``Invalid`` (reported once, here)."""

    def cap(value: ast.Expr) -> ast.Expr:
        if value.depth <= MAX_DEPTH:
            return value
        diags.error(value.span, "E106", f"expression is nested {value.depth} levels deep; the limit is {MAX_DEPTH}",
                    "split it into several bindings or params")
        return ast.Invalid(value.span)

    kept = []
    for stmt in spec.statements:
        if isinstance(stmt, ast.Config):
            entries = tuple(ast.ConfigEntry(e.key, cap(e.value), e.span, e.key_span) for e in stmt.entries)
            kept.append(ast.Config(stmt.block, entries, stmt.span))
        elif isinstance(stmt, ast.Param):
            kept.append(ast.Param(stmt.name, cap(stmt.value), stmt.span, stmt.name_span))
        else:
            kept.append(ast.Binding(stmt.kind, stmt.name, cap(stmt.value), stmt.span, stmt.name_span, stmt.kind_span))
    return ast.Spec(spec.file, spec.header, tuple(kept))


def decode_source(data: bytes, file: str, diags: Diagnostics) -> str | None:
    """UTF-8 bytes → text; invalid UTF-8 is a diagnostic at the first bad byte."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        before = data[: exc.start].decode("utf-8", errors="replace")
        line = before.count("\n") + 1
        col = len(before) - (before.rfind("\n") + 1) + 1
        diags.error(Span(file, line, col, line, col + 1), "E105",
                    f"spec is not valid UTF-8 (byte 0x{data[exc.start]:02x} at offset {exc.start})",
                    "save the file as UTF-8")
        return None
    return text.removeprefix("\ufeff")


def parse_file(path: Path, display: str, diags: Diagnostics) -> tuple[ast.Spec | None, str]:
    """Read and parse one file; returns the AST (or None) and the text for rendering."""
    try:
        size = path.stat().st_size
        if size > MAX_BYTES:
            diags.error(Span.whole_file(display), "E107", f"spec is {size:,} bytes; the limit is {MAX_BYTES:,}")
            return None, ""
        data = path.read_bytes()
    except OSError as exc:
        diags.error(Span.whole_file(display), "E600", f"cannot read spec: {exc.strerror or exc}")
        return None, ""
    text = decode_source(data, display, diags)
    if text is None:
        return None, data.decode("utf-8", errors="replace")
    return parse(text, display, diags), text

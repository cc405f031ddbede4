"""Text → AST. The grammar lives in ``shape.lark``; the lark parser and the transformer that
builds nodes with spans live in :mod:`shapeflow.dsl.builder` (imported on the first parse).

The AST is built by an inline transformer while the LALR parser reduces, so no pass recurses
over the parse tree and a deeply nested expression cannot overflow the Python stack. Syntax
errors become diagnostics in plain words; nothing here evaluates the text.
"""

from __future__ import annotations

import difflib
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

from shapeflow.dsl import ast
from shapeflow.dsl.diagnostics import Diagnostics, Span

if TYPE_CHECKING:  # lark itself is imported on the first parse (shapeflow.dsl.builder)
    from lark.exceptions import UnexpectedInput

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


@lru_cache(maxsize=1)
def parser_fingerprint() -> bytes:
    """Bytes that change whenever parsing could give another result: lark's version, the
    grammar and the source of the modules that build the AST (keys the on-disk parse cache).

    lark's version is read from its ``__init__.py`` (which sets ``__version__``) without importing
    lark, so a check answered from the parse cache never imports it."""
    import hashlib
    import importlib.util

    from shapeflow.dsl import ast as ast_module
    from shapeflow.dsl import diagnostics

    lark_spec = importlib.util.find_spec("lark")
    h = hashlib.sha256(Path(lark_spec.origin).read_bytes() if lark_spec and lark_spec.origin else b"no lark")
    for source in (GRAMMAR, Path(__file__), Path(__file__).with_name("builder.py"), Path(ast_module.__file__),
                   Path(diagnostics.__file__)):
        h.update(source.read_bytes())
    return h.digest()


def _syntax_error(exc: UnexpectedInput, file: str, text: str, diags: Diagnostics) -> None:
    from lark.exceptions import UnexpectedCharacters, UnexpectedToken

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
    from lark.exceptions import UnexpectedInput, VisitError

    from shapeflow.dsl.builder import BUILDER, LOCK, _Error, parser

    try:
        with LOCK:
            BUILDER.file = file
            header, statements = parser().parse(text)
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

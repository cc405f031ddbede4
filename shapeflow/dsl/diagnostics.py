"""Diagnostics are data: collected by every phase, sorted by position, rendered at the end.

Three renderings share one record:
  human   ``path:line:col: error[E201]: message`` + source line + caret + ``help: ...``
  json    an array of objects with keys file line column end_line end_column severity code message hint
  github  ``::error file=PATH,line=L,col=C,title=CODE::MESSAGE`` workflow commands

Columns are 1-based and count characters; ``end_column`` is exclusive.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Iterable, Literal

from shapeflow._record import Record, record

Severity = Literal["error", "warning"]

MAX_SHOWN = 50  # per file in the human format; the rest are counted ("... and N more")


@record(slots=True)
class Span(Record):
    """A source range: 1-based line and column, end column exclusive."""

    file: str
    line: int
    column: int
    end_line: int
    end_column: int

    @staticmethod
    def whole_file(file: str) -> "Span":
        """A diagnostic about the file as a whole: line 1, column 1, zero width (no caret)."""
        return Span(file, 1, 1, 1, 1)

    @property
    def is_whole_file(self) -> bool:
        return self.line == 1 and self.column == 1 and self.end_line == 1 and self.end_column == 1

    def to(self, other: "Span") -> "Span":
        """The span from the start of ``self`` to the end of ``other``."""
        return Span(self.file, self.line, self.column, other.end_line, other.end_column)


@record(slots=True)
class Diagnostic(Record):
    span: Span
    severity: Severity
    code: str
    message: str
    hint: str | None = None

    def sort_key(self) -> tuple:
        s = self.span
        return (s.file, s.line, s.column, 0 if self.severity == "error" else 1, self.code, self.message)

    def as_json(self) -> dict:
        s = self.span
        return {
            "file": s.file,
            "line": s.line,
            "column": s.column,
            "end_line": s.end_line,
            "end_column": s.end_column,
            "severity": self.severity,
            "code": self.code,
            "message": self.message,
            "hint": self.hint,
        }


@dataclass
class Diagnostics:
    """An append-only collection; phases add to it and carry on where they can."""

    items: list[Diagnostic] = field(default_factory=list)

    def error(self, span: Span, code: str, message: str, hint: str | None = None) -> None:
        self.items.append(Diagnostic(span, "error", code, message, hint))

    def warning(self, span: Span, code: str, message: str, hint: str | None = None) -> None:
        self.items.append(Diagnostic(span, "warning", code, message, hint))

    def extend(self, other: Iterable[Diagnostic]) -> None:
        self.items.extend(other)

    @property
    def errors(self) -> list[Diagnostic]:
        return [d for d in self.items if d.severity == "error"]

    @property
    def has_errors(self) -> bool:
        return any(d.severity == "error" for d in self.items)

    def sorted(self) -> list[Diagnostic]:
        # One mistake can be found by two routes; show it once.
        unique = {(d.span, d.severity, d.code, d.message): d for d in self.items}
        return sorted(unique.values(), key=Diagnostic.sort_key)

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self):
        return iter(self.items)


class DiagnosticError(Exception):
    """Raised by code paths that cannot continue (for example `run` on a spec with errors)."""

    def __init__(self, diagnostics: list[Diagnostic]):
        super().__init__("\n".join(f"{d.code}: {d.message}" for d in diagnostics))
        self.diagnostics = diagnostics


def summary(diagnostics: list[Diagnostic]) -> str:
    """``"3 errors, 1 warning"``; empty string when there is nothing to report."""
    n_err = sum(d.severity == "error" for d in diagnostics)
    n_warn = len(diagnostics) - n_err
    parts = []
    if n_err:
        parts.append(f"{n_err} error{'s' if n_err != 1 else ''}")
    if n_warn:
        parts.append(f"{n_warn} warning{'s' if n_warn != 1 else ''}")
    return ", ".join(parts)


def _caret_line(source_line: str, span: Span) -> str:
    """Spaces up to the span (tabs copied so the caret lines up), then ^~~~ under it."""
    start = max(span.column - 1, 0)
    prefix = "".join(ch if ch == "\t" else " " for ch in source_line[:start])
    end = span.end_column - 1 if span.end_line == span.line else len(source_line)
    width = max(1, min(end, len(source_line)) - start)
    return prefix + "^" + "~" * (width - 1)


def render_human(diagnostics: list[Diagnostic], sources: dict[str, str]) -> str:
    out: list[str] = []
    shown: dict[str, int] = {}
    hidden: dict[str, int] = {}
    for d in diagnostics:
        s = d.span
        if shown.get(s.file, 0) >= MAX_SHOWN:
            hidden[s.file] = hidden.get(s.file, 0) + 1
            continue
        shown[s.file] = shown.get(s.file, 0) + 1
        out.append(f"{s.file}:{s.line}:{s.column}: {d.severity}[{d.code}]: {d.message}")
        lines = sources.get(s.file, "").split("\n")  # as the lexer counts lines
        if 1 <= s.line <= len(lines) and not s.is_whole_file:
            text = lines[s.line - 1].rstrip("\r")
            if len(text) <= 400:  # a minified 1 MB line is no use to show
                gutter = f"{s.line:>4} | "
                out.append(gutter + text)
                out.append(" " * (len(gutter) - 2) + "| " + _caret_line(text, s))
        if d.hint:
            out.append(f"  help: {d.hint}")
    for file, n in hidden.items():
        out.append(f"{file}: ... and {n} more")
    return "\n".join(out)


def render_json(diagnostics: list[Diagnostic]) -> str:
    return json.dumps([d.as_json() for d in diagnostics], indent=2)


def _gh_escape(text: str, *, prop: bool) -> str:
    text = text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")
    if prop:
        text = text.replace(":", "%3A").replace(",", "%2C")
    return text


def render_github(diagnostics: list[Diagnostic]) -> str:
    """GitHub Actions workflow commands: each becomes an annotation on the pull request."""
    lines = []
    for d in diagnostics:
        s = d.span
        message = d.message + (f" (help: {d.hint})" if d.hint else "")
        props = f"file={_gh_escape(s.file, prop=True)},line={s.line},col={s.column},title={d.code}"
        lines.append(f"::{d.severity} {props}::{_gh_escape(message, prop=False)}")
    return "\n".join(lines)


__all__ = [
    "Diagnostic",
    "DiagnosticError",
    "Diagnostics",
    "Span",
    "render_github",
    "render_human",
    "render_json",
    "summary",
]

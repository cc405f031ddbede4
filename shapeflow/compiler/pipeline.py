"""The compiler as a visible sequence of passes: parse+resolve → check → lower → plan.

``compile_spec`` runs the first two (all that ``shapeflow check`` needs, and torch-free and
networkx-free); ``lower`` and ``plan`` are applied on demand by ``graph``, ``replay`` and ``run``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from shapeflow.compiler.check import Program, check
from shapeflow.compiler.resolve import Resolved, resolve
from shapeflow.dsl.diagnostics import Diagnostic, Diagnostics, Span
from shapeflow.stdlib.registry import Registry, default_registry


@dataclass
class Compiled:
    path: Path
    resolved: Resolved | None
    program: Program | None
    diagnostics: list[Diagnostic] = field(default_factory=list)
    sources: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.program is not None and not any(d.severity == "error" for d in self.diagnostics)


def compile_spec(
    path: Path,
    *,
    search: list[Path] = (),
    roots: list[Path] = (),
    sets: list[str] = (),
    registry: Registry | None = None,
) -> Compiled:
    registry = registry or default_registry()
    diags = Diagnostics()
    resolved = resolve(Path(path), diags, search=list(search), roots=list(roots), sets=list(sets))
    program = None
    if resolved is not None and not resolved.incomplete and (resolved.bindings or resolved.params or not diags.has_errors):
        program = check(resolved, registry, diags)
    sources = resolved.sources if resolved else {}
    return Compiled(Path(path), resolved, program, diags.sorted(), sources)


def plugin_diagnostics(registry: Registry) -> list[Diagnostic]:
    """Plug-ins that failed to load, as warnings (reported once per command, not per spec)."""
    return [Diagnostic(Span.whole_file("<plug-ins>"), "warning", "W200", m) for m in registry.plugin_errors]


def build_plan(program: Program):
    """Lower and plan a checked program (imports networkx)."""
    from shapeflow.compiler.lower import lower
    from shapeflow.compiler.plan import plan

    graph = lower(program)
    return graph, plan(graph)

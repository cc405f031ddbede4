"""Resolve: follow `extends`, merge parent and child, apply `--set` overrides.

The child's bindings, params and config keys override the parent's by name (config blocks
merge key by key). `extends` paths are relative to the spec's folder or to a search path; the
resolved file must lie under one of the allowed roots (the top spec's folder, a folder given
on the command line, a `--path`) and be a `.shape` file, so a spec can never make the
checker read an arbitrary file.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from shapeflow.dsl import ast
from shapeflow.dsl.diagnostics import Diagnostics, Span
from shapeflow.dsl.parser import parse_file

COMMAND_LINE = "<command line>"
_NUMBER = re.compile(r"[+-]?(\d+\.\d*|\.\d+|\d+)([eE][+-]?\d+)?")


@dataclass
class Resolved:
    file: str  # display path of the top spec
    name: str
    header: dict[str, ast.HeaderEntry] = field(default_factory=dict)  # title, cite (child wins)
    params: dict[str, ast.Param] = field(default_factory=dict)
    bindings: dict[str, ast.Binding] = field(default_factory=dict)
    configs: dict[str, dict[str, ast.ConfigEntry]] = field(default_factory=lambda: {b: {} for b in ast.CONFIG_BLOCKS})
    chain: list[str] = field(default_factory=list)  # the top spec, then its ancestors
    sources: dict[str, str] = field(default_factory=dict)  # display path -> text, for rendering
    set_params: frozenset[str] = frozenset()  # params overridden from the command line
    poisoned: set[str] = field(default_factory=set)  # names whose definition was already reported
    mentioned: set[str] = field(default_factory=set)  # names used by definitions dropped as duplicates
    incomplete: bool = False  # an `extends` failed: whole-program rules would only echo that


def display_path(path: Path) -> str:
    try:
        rel = os.path.relpath(path)
    except ValueError:
        return str(path)
    return str(path) if rel.startswith("..") else rel


def _inside(path: Path, roots: list[Path]) -> bool:
    return any(path == r or r in path.parents for r in roots)


class _Loader:
    def __init__(self, diags: Diagnostics, roots: list[Path], search: list[Path]):
        self.diags, self.roots, self.search = diags, roots, search
        self.sources: dict[str, str] = {}
        self.cache: dict[Path, ast.Spec | None] = {}

    def load(self, path: Path) -> ast.Spec | None:
        if path not in self.cache:
            spec, text, found = _parse_cached(path)
            self.diags.extend(found)
            self.sources[display_path(path)] = text
            self.cache[path] = spec
        return self.cache[path]

    def find_parent(self, entry: ast.HeaderEntry, child: Path) -> Path | None:
        value = entry.value
        if not isinstance(value, ast.String):
            self.diags.error(value.span, "E309", "extends must be a string naming a .shape file",
                             'e.g. extends = "grpo.shape"')
            return None
        target = value.value
        if not target.endswith(".shape"):
            self.diags.error(value.span, "E603", f"extends names '{target}', which is not a .shape file",
                             "a spec can only extend another spec")
            return None
        bases = [child.parent] + self.search
        candidates = [Path(target)] if os.path.isabs(target) else [b / target for b in bases]
        try:
            found = next((c.resolve() for c in candidates if c.is_file()), None)
        except (OSError, ValueError) as exc:  # a name too long for the filesystem, a NUL byte
            self.diags.error(value.span, "E600", f"cannot use '{target[:80]}' as a path: {exc}")
            return None
        if found is None:
            looked = ", ".join(display_path(b) or "." for b in bases)
            self.diags.error(value.span, "E600", f"cannot find '{target}' (looked in: {looked})",
                             "give the path relative to this spec's folder, or add a folder with --path")
            return None
        if not _inside(found, self.roots):
            allowed = ", ".join(display_path(r) or "." for r in self.roots)
            self.diags.error(value.span, "E602", f"'{target}' resolves to {display_path(found)}, outside the "
                             f"allowed folders ({allowed})", "add its folder with --path if you trust it")
            return None
        return found


_PARSED: dict[tuple, tuple] = {}  # (path, mtime, size, display) -> (spec, text, diagnostics)


def _parse_cached(path: Path) -> tuple[ast.Spec | None, str, list]:
    """Parse each file once per process (`check specs/` reads grpo.shape for every child), and
    keep the result on disk keyed by the file's bytes and the parser's own source, so a
    repeated `shapeflow check` (pre-commit, CI) skips parsing unchanged specs."""
    display = display_path(path)
    try:
        st = path.stat()
        key = (path, st.st_mtime_ns, st.st_size, display)
    except OSError:
        key = None
    if key is not None and key in _PARSED:
        return _PARSED[key]
    result = _disk_cache_lookup(path, display, key)
    if result is None:
        found = Diagnostics()
        spec, text = parse_file(path, display, found)
        result = (spec, text, list(found))
        _disk_cache_store(path, display, key, result)
    if key is not None:
        _PARSED[key] = result
    return result


PARSE_CACHE_LIMIT = 2000  # files; the oldest go first


def _disk_key(path: Path, display: str) -> Path | None:
    import hashlib
    import os

    if os.environ.get("SHAPEFLOW_PARSE_CACHE", "on") == "off":
        return None

    from shapeflow._cache import cache_root
    from shapeflow.dsl.parser import MAX_BYTES, parser_fingerprint

    try:
        if path.stat().st_size > MAX_BYTES:
            return None
        data = path.read_bytes()
    except OSError:
        return None
    digest = hashlib.sha256(parser_fingerprint() + display.encode() + b"\0" + data).hexdigest()
    return cache_root() / "parsed" / digest[:2] / f"{digest}.pickle"


def _disk_cache_lookup(path: Path, display: str, key) -> tuple | None:
    import pickle

    if key is None:
        return None
    target = _disk_key(path, display)
    try:
        return pickle.loads(target.read_bytes()) if target is not None else None
    except Exception:  # absent, unreadable or from another version: parse again
        return None


def _disk_cache_store(path: Path, display: str, key, result: tuple) -> None:
    import pickle
    import sys

    from shapeflow._cache import write_atomic

    target = _disk_key(path, display) if key is not None else None
    if target is None:
        return
    limit = sys.getrecursionlimit()
    try:
        sys.setrecursionlimit(max(limit, 20_000))  # AST depth is capped by the parser (MAX_DEPTH)
        write_atomic(target, pickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL))
    except (RecursionError, pickle.PicklingError):
        pass
    finally:
        sys.setrecursionlimit(limit)
    if hash(target.name) % 50 == 0:  # now and then, keep the cache bounded
        _prune(target.parent.parent)


def _prune(root: Path) -> None:
    try:
        files = sorted(root.glob("*/*.pickle"), key=lambda p: p.stat().st_mtime)
        for old in files[: max(0, len(files) - PARSE_CACHE_LIMIT)]:
            old.unlink(missing_ok=True)
    except OSError:
        pass


def resolve(
    path: Path,
    diags: Diagnostics,
    *,
    search: list[Path] = (),
    roots: list[Path] = (),
    sets: list[str] = (),
) -> Resolved | None:
    """Load ``path`` and its `extends` ancestors and merge them; None if the top file fails to parse."""
    path = path.resolve()
    search = [Path(s).resolve() for s in search]
    allowed = [path.parent] + [Path(r).resolve() for r in roots] + search
    loader = _Loader(diags, allowed, search)
    top = loader.load(path)
    if top is None:
        return Resolved(display_path(path), path.stem, sources=loader.sources)

    # Walk up the chain: child first.
    chain: list[tuple[Path, ast.Spec]] = [(path, top)]
    incomplete = False
    while True:
        current_path, current = chain[-1]
        entry = _header_entries(current, diags).get("extends")
        if entry is None:
            break
        parent_path = loader.find_parent(entry, current_path)
        if parent_path is None:
            incomplete = True
            break
        if parent_path in [p for p, _ in chain]:
            cycle = " → ".join(display_path(p) for p, _ in chain) + f" → {display_path(parent_path)}"
            diags.error(entry.value.span, "E601", f"extends cycle: {cycle}", "remove one of the extends")
            incomplete = True
            break
        parent = loader.load(parent_path)
        if parent is None:
            diags.error(entry.value.span, "E600", f"cannot use '{entry.value.value}': it has errors")
            incomplete = True
            break
        chain.append((parent_path, parent))

    name = top.header.name if top.header else path.stem
    out = Resolved(display_path(path), name, chain=[display_path(p) for p, _ in chain], incomplete=incomplete)
    for _, spec in reversed(chain):  # root ancestor first, so children override
        _merge(out, spec, diags)
    _apply_sets(out, sets, diags)
    out.sources.update(loader.sources)
    return out


def _header_entries(spec: ast.Spec, diags: Diagnostics) -> dict[str, ast.HeaderEntry]:
    entries: dict[str, ast.HeaderEntry] = {}
    if spec.header is None:
        return entries
    for e in spec.header.entries:
        if e.key not in ast.HEADER_KEYS:
            close = difflib.get_close_matches(e.key, ast.HEADER_KEYS, n=1)
            diags.error(e.key_span, "E206", f"unknown header key '{e.key}'",
                        f"did you mean '{close[0]}'?" if close else f"header keys are {', '.join(ast.HEADER_KEYS)}")
        elif e.key in entries:
            diags.error(e.key_span, "E205", f"header key '{e.key}' is given twice")
        else:
            entries[e.key] = e
    return entries


def _merge(out: Resolved, spec: ast.Spec, diags: Diagnostics) -> None:
    for key, entry in _header_entries(spec, diags).items():
        if key == "extends":
            continue
        if not isinstance(entry.value, ast.String):
            diags.error(entry.value.span, "E309", f"header key '{key}' must be a string", f'e.g. {key} = "..."')
            continue
        out.header[key] = entry
    seen_here: dict[str, ast.Param | ast.Binding] = {}
    config_keys: dict[str, ast.ConfigEntry] = {}
    for stmt in spec.statements:
        if isinstance(stmt, ast.Config):
            for e in stmt.entries:
                full = f"{stmt.block}.{e.key}"
                if full in config_keys:
                    diags.error(e.key_span, "E205", f"'{full}' is set twice in this spec (first at line "
                                f"{config_keys[full].key_span.line})")
                    continue
                config_keys[full] = e
                out.configs[stmt.block][e.key] = e
            continue
        if stmt.name in ("true", "false", "none"):
            diags.error(stmt.name_span, "E208", f"'{stmt.name}' is a literal and cannot name a "
                        f"{'param' if isinstance(stmt, ast.Param) else 'binding'}", "choose another name")
            continue
        prev = seen_here.get(stmt.name)
        if prev is not None:
            out.mentioned.update(n.id for n in ast.walk(stmt.value) if isinstance(n, ast.Name))
            if type(prev) is not type(stmt):
                diags.error(stmt.name_span, "E204", f"'{stmt.name}' names both a param (line "
                            f"{(prev if isinstance(prev, ast.Param) else stmt).span.line}) and a binding (line "
                            f"{(prev if isinstance(prev, ast.Binding) else stmt).span.line})", "rename one of them")
                out.poisoned.add(stmt.name)
            else:
                what = "param" if isinstance(stmt, ast.Param) else "binding"
                diags.error(stmt.name_span, "E202" if what == "binding" else "E203",
                            f"'{stmt.name}' is defined twice in this spec (first at line {prev.name_span.line})",
                            "rename one; to override a parent's definition, use extends")
            continue
        seen_here[stmt.name] = stmt
        if isinstance(stmt, ast.Param):
            out.bindings.pop(stmt.name, None)  # a child may turn a parent's binding into a param
            out.params[stmt.name] = stmt
        else:
            out.params.pop(stmt.name, None)
            out.bindings[stmt.name] = stmt


# --- --set NAME=VALUE ----------------------------------------------------------------------


def _literal(value: object, span: Span) -> ast.Expr:
    if value is None:
        return ast.NoneLit(span)
    if isinstance(value, bool):
        return ast.Bool(value, span)
    if isinstance(value, (int, float)):
        return ast.Number(value, span)
    if isinstance(value, str):
        return ast.String(value, span)
    if isinstance(value, list):
        items = tuple(_literal(v, span) for v in value)
        return ast.ListLit(items, span, 1 + max((i.depth for i in items), default=0))
    raise ValueError(f"unsupported value {value!r}")


def parse_set_value(text: str) -> object:
    """A --set value: JSON-like literals (numbers, "strings", true/false/none, [lists]) or a bare word."""
    stripped = text.strip()
    if stripped == "none":
        return None
    if _NUMBER.fullmatch(stripped):  # the spec's own number syntax: 1, 1.5, .5, 5., 1e-4
        if len(stripped) > 300:
            raise ValueError(f"number with {len(stripped)} digits is too large")
        number = float(stripped) if any(c in stripped for c in ".eE") else int(stripped)
        if not math.isfinite(number):
            raise ValueError(f"{text!r} is not a finite number")
        return number
    if stripped.startswith("["):  # `none` inside a list, outside strings, is JSON's null
        stripped = re.sub(r'("(?:[^"\\]|\\.)*")|\bnone\b', lambda m: m.group(1) or "null", stripped)
    try:
        value = json.loads(stripped)
    except RecursionError:
        raise ValueError("value is nested too deeply") from None
    except ValueError:
        if stripped and all(c.isalnum() or c in "._-:/+@" for c in stripped):
            return stripped  # a bare word is a string: --set track.backend=jsonl
        raise ValueError(f"cannot read {text!r} as a value (use a number, true/false/none, \"text\", a bare "
                         "word, or a list such as [1, 2] or [\"a\", \"b\"])")
    if isinstance(value, dict):
        raise ValueError("objects are not values in a spec")
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("the value holds a lone surrogate, which is not a character") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{text!r} is not a finite number")
    return value


def _apply_sets(out: Resolved, sets: list[str], diags: Diagnostics) -> None:
    out.sources[COMMAND_LINE] = "\n".join(f"--set {s}" for s in sets)
    set_params = set()
    for i, item in enumerate(sets, start=1):
        offset = len("--set ")
        whole = Span(COMMAND_LINE, i, offset + 1, i, offset + len(item) + 1)
        name, eq, raw = item.partition("=")
        name = name.strip()
        if not eq or not name:
            diags.error(whole, "E801", f"--set needs NAME=VALUE, got {item!r}", "e.g. --set train.lr=1e-4")
            continue
        vspan = Span(COMMAND_LINE, i, offset + len(name) + 2, i, offset + len(item) + 1)
        nspan = Span(COMMAND_LINE, i, offset + 1, i, offset + len(name) + 1)
        try:
            value = _literal(parse_set_value(raw), vspan)
        except ValueError as exc:
            diags.error(vspan, "E801", str(exc))
            continue
        head, dot, key = name.partition(".")
        if not dot and head in out.params:
            out.params[head] = ast.Param(head, value, whole, nspan)
            set_params.add(head)
        elif dot and head in ast.CONFIG_BLOCKS:
            out.configs[head][key] = ast.ConfigEntry(key, value, whole, nspan)
        elif dot and head in out.bindings and isinstance(out.bindings[head].value, ast.Call):
            binding = out.bindings[head]
            call = binding.value
            kwargs = tuple(k for k in call.kwargs if k.name != key) + (ast.Kwarg(key, value, whole, nspan),)
            out.bindings[head] = replace(binding, value=replace(call, kwargs=kwargs))
        elif dot and head in out.bindings:
            diags.error(nspan, "E800", f"--set {name}: the value of '{head}' is an expression, not a single "
                        "stage call, so it has no arguments to set", "set a param that the expression uses instead")
        else:
            targets = list(out.params) + [f"{b}.KEY" for b in ast.CONFIG_BLOCKS] + [
                f"{b}.KEY" for b, v in out.bindings.items() if isinstance(v.value, ast.Call)
            ]
            from shapeflow.config import CONFIG_BLOCKS

            options = list(out.params) + [f"{b}.{k}" for b, m in CONFIG_BLOCKS.items() for k in m.model_fields]
            bare = [o for o in options if o.split(".")[-1] == name]  # `lr` for `train.lr`
            close = bare or [c for c in difflib.get_close_matches(name, options, n=1) if c != name]
            hint = f"did you mean '{close[0]}'?" if close else "settable: " + ", ".join(targets)
            diags.error(nspan, "E800", f"--set {name}: no param, config key or stage call named '{name}'", hint)
    out.set_params = frozenset(set_params)

"""What `shapeflow check` found for a spec file, remembered on disk until anything it read changes.

`check` runs in pre-commit hooks and CI jobs on the same files over and over. A result is
stored per (spec file, --set/--path options, working folder) with the content hash of every
file the compile read (the spec and each file it extends) and a fingerprint of shapeflow
itself (the size and modification time of each of its source files, the Python version, and
the folders on sys.path with their modification times, which change when a package is
installed). It is reused only when all of these still match, so an edit anywhere — the spec,
a parent, the checker, a stage's parameter bounds — means a fresh check. Specs checked while
a plug-in is installed are not cached (a plug-in's stages can change outside shapeflow's
sources). ``SHAPEFLOW_CHECK_CACHE=off`` turns the cache off; it lives under the user cache
(``shapeflow/checked``), bounded to MAX_ENTRIES files.

The hit path imports neither pydantic nor the stage library: it hashes a few files and prints.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

from shapeflow._cache import cache_root, write_atomic
from shapeflow.dsl.diagnostics import Diagnostic, Span

MAX_ENTRIES = 2000
_fingerprint: str | None = None


def enabled() -> bool:
    return os.environ.get("SHAPEFLOW_CHECK_CACHE", "on").lower() not in ("off", "0", "false", "no")


def fingerprint() -> str:
    """shapeflow's sources, the interpreter and the installed packages, as one hash."""
    global _fingerprint
    if _fingerprint is None:
        h = hashlib.sha256(sys.version.encode())
        package = Path(__file__).resolve().parents[1]
        for root, dirs, files in os.walk(package):
            dirs[:] = sorted(d for d in dirs if d != "__pycache__")
            for name in sorted(files):
                if name.endswith((".py", ".lark")):
                    st = os.stat(os.path.join(root, name))
                    h.update(f"{os.path.relpath(os.path.join(root, name), package)}:{st.st_size}:{st.st_mtime_ns}\n"
                             .encode())
        for base in sys.path:
            try:
                h.update(f"{base}:{os.stat(base or '.').st_mtime_ns}\n".encode())
            except OSError:
                h.update(f"{base}:-\n".encode())
        _fingerprint = h.hexdigest()
    return _fingerprint


def _entry(path: Path, options: dict[str, Any]) -> Path:
    key = json.dumps({"fingerprint": fingerprint(), "cwd": os.getcwd(), "file": str(path.resolve()), **options},
                     sort_keys=True)
    return cache_root() / "checked" / (hashlib.sha256(key.encode()).hexdigest()[:40] + ".json")


def _digest(file: str) -> str | None:
    try:
        return hashlib.sha256(Path(file).read_bytes()).hexdigest()
    except OSError:
        return None


def lookup(path: Path, options: dict[str, Any]) -> tuple[list[Diagnostic], dict[str, str]] | None:
    """The stored diagnostics and the texts of the files they point into, if nothing changed."""
    if not enabled():
        return None
    try:
        saved = json.loads(_entry(path, options).read_text(encoding="utf-8"))
        files: dict[str, str] = saved["files"]
        if any(_digest(f) != digest for f, digest in files.items()):
            return None
        diagnostics = [_from_json(d) for d in saved["diagnostics"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    sources = {}
    for f in files:
        try:
            sources[f] = Path(f).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            return None
    return diagnostics, sources


def store(path: Path, options: dict[str, Any], diagnostics: list[Diagnostic], sources: dict[str, str],
          plugins: bool) -> None:
    """Remember a fresh result (not when plug-ins are installed, nor for files that vanished)."""
    if not enabled() or plugins:
        return
    files = {}
    for f in sources:
        if f.startswith("<"):  # "<command line>": part of the options already
            continue
        digest = _digest(f)
        if digest is None:
            return
        files[f] = digest
    data = {"files": files, "diagnostics": [d.as_json() for d in diagnostics]}
    entry = _entry(path, options)
    write_atomic(entry, json.dumps(data).encode())
    _prune(entry.parent)


def _prune(folder: Path) -> None:
    try:
        entries = list(os.scandir(folder))
        if len(entries) <= MAX_ENTRIES:
            return
        entries.sort(key=lambda e: e.stat().st_mtime_ns)
        for e in entries[: len(entries) - MAX_ENTRIES]:
            os.unlink(e.path)
    except OSError:
        pass


def _from_json(d: dict[str, Any]) -> Diagnostic:
    span = Span(d["file"], d["line"], d["column"], d["end_line"], d["end_column"])
    return Diagnostic(span, d["severity"], d["code"], d["message"], d["hint"])

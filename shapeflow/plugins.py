"""Stage plug-ins: the ``shapeflow.stages`` entry points of the installed distributions.

Kept apart from the registry (and from ``importlib.metadata``, whose import alone costs ~15 ms)
so that `shapeflow check` can tell whether any plug-in is installed without loading anything.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from typing import Any

from shapeflow._cache import cache_root, write_atomic
from shapeflow._record import Record, record

ENTRY_POINT_GROUP = "shapeflow.stages"


@record
class EntryPoint(Record):
    """``name = module:attr`` from an ``entry_points.txt`` (what importlib's EntryPoint loads)."""

    name: str
    value: str
    group: str = ENTRY_POINT_GROUP

    def load(self) -> Any:
        module, _, attrs = self.value.partition(":")
        obj = importlib.import_module(module.strip())
        for attr in filter(None, attrs.strip().split(".")):
            obj = getattr(obj, attr)
        return obj


def plugin_entry_points() -> list[EntryPoint]:
    """The ``shapeflow.stages`` entry points of the installed distributions.

    ``importlib.metadata.entry_points()`` builds a Distribution for every installed package
    (30+ ms in a full environment); this reads only the ``entry_points.txt`` files that mention
    the group, and remembers the answer in the user cache keyed by the sys.path folders and
    their modification times (installing or removing a package changes them), which keeps
    `shapeflow check` quick to start. First distribution on sys.path wins, as importlib does."""

    key = []
    for base in sys.path:
        try:
            key.append([base, os.stat(base or ".").st_mtime_ns])
        except OSError:
            key.append([base, None])
    cache = cache_root() / "plugins.json"
    try:
        saved = json.loads(cache.read_text(encoding="utf-8"))
        if saved.get("key") == key:
            return [EntryPoint(n, v) for n, v in saved["entry_points"]]
    except (OSError, ValueError, AttributeError):
        pass
    found = _scan_entry_points()
    write_atomic(cache, json.dumps({"key": key, "entry_points": [[e.name, e.value] for e in found]}).encode())
    return found


def _scan_entry_points() -> list[EntryPoint]:
    import configparser

    found: dict[str, EntryPoint] = {}
    seen_dists: set[str] = set()
    for base in sys.path:
        try:
            entries = os.scandir(base or ".")
        except OSError:
            continue
        with entries:
            for entry in entries:
                if not entry.name.endswith((".dist-info", ".egg-info")):
                    continue
                dist = entry.name.rsplit("-", 1)[0].lower().replace("_", "-")
                if dist in seen_dists:
                    continue
                seen_dists.add(dist)
                path = os.path.join(entry.path, "entry_points.txt")
                try:
                    with open(path, encoding="utf-8") as handle:
                        text = handle.read()
                except OSError:
                    continue
                if ENTRY_POINT_GROUP not in text:
                    continue
                parser = configparser.ConfigParser(delimiters=("=",), interpolation=None)
                parser.optionxform = str  # entry-point names are case-sensitive
                try:
                    parser.read_string(text)
                except configparser.Error:
                    continue
                if parser.has_section(ENTRY_POINT_GROUP):
                    for name, value in parser.items(ENTRY_POINT_GROUP):
                        found.setdefault(name, EntryPoint(name, value.strip()))
    return sorted(found.values(), key=lambda e: e.name)

"""Where shapeflow keeps what it can rebuild: builtin models, parsed specs, the plug-in index."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """``$SHAPEFLOW_CACHE``, else ``$XDG_CACHE_HOME/shapeflow``, else ``~/.cache/shapeflow``."""
    if os.environ.get("SHAPEFLOW_CACHE"):
        return Path(os.environ["SHAPEFLOW_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "shapeflow"


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file; a failure (read-only home) is ignored."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError:
        pass

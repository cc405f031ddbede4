"""Experiment tracking for `shapeflow run`: MLflow, a JSON Lines file, or nothing.

One interface, three implementations (:class:`MlflowTracker`, :class:`JsonlTracker`,
:class:`NullTracker`), chosen by :func:`make_tracker` from the spec's ``track`` block::

    tracker = make_tracker(cfg.backend, cfg.uri)
    run_id = tracker.start(run_dir=out / name, experiment=cfg.experiment, run_name=name,
                           params=flatten_params(resolved), tags={...}, resume_id=saved_id)
    tracker.log_metrics({"reward/correct/mean": 0.4}, step=1)
    tracker.log_artifact(out / name / "spec.shape")   # a file: "spec.shape"
    tracker.log_artifact(out / name / "plots", "plots")  # a folder's files: "plots/*.png"
    tracker.finish("FINISHED")

Where MLflow stores a run
-------------------------
With no URI, the tracker uses an embedded store (no server): the SQLite database
``<out>/mlflow.db`` and the artifact folder ``<out>/mlartifacts``, where ``<out>`` is the
parent of the run folder (``run_dir = <out>/<run_name>``). Every run written under the same
``--out`` folder therefore lands in one store, and one ``mlflow ui`` shows them side by side;
:func:`ui_command` gives that command line. With a URI (``http://host:5000`` for a running
``mlflow server``, ``sqlite:///path.db``, ``databricks``, ...) the tracker logs there.

Failures never stop training
----------------------------
Every call to MLflow is guarded: the first failure prints one warning to standard error and
training goes on; after three failures in a row (or a failed ``start``) the tracker stops
sending for the rest of the run. The run's own ``metrics.jsonl`` is unaffected. For an HTTP
URI, ``start`` first checks ``<uri>/health`` with a short timeout, so a server that is not
there costs seconds, not MLflow's default minutes of retries; and, unless the user has set
them, MLflow's HTTP retries are shortened (``MLFLOW_HTTP_REQUEST_MAX_RETRIES=3``,
``MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR=1``, ``MLFLOW_HTTP_REQUEST_TIMEOUT=30``).

Metric, parameter and tag names are passed through :func:`sanitize_key` (MLflow accepts
only letters, digits, ``_ - . /`` and spaces): ``pass@k`` becomes ``pass_at_k``, ``loss#1``
becomes ``loss_1``. Non-finite metric values are logged as they are (MLflow keeps NaN; a
SQLite store clamps infinities to +-1.797e308).

``mlflow`` is imported only when an :class:`MlflowTracker` starts.
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Mapping

__all__ = [
    "Tracker",
    "MlflowTracker",
    "JsonlTracker",
    "NullTracker",
    "make_tracker",
    "flatten_params",
    "sanitize_key",
    "ui_command",
    "embedded_store",
    "MAX_PARAM_VALUE_LENGTH",
]

BACKENDS = ("mlflow", "jsonl", "none")
STATUSES = ("FINISHED", "FAILED", "KILLED")

# MLflow's limits (mlflow.utils.validation), repeated here so that importing this module
# does not import mlflow.
MAX_PARAM_VALUE_LENGTH = 6000
MAX_TAG_VALUE_LENGTH = 8000
MAX_KEY_LENGTH = 250
MAX_PARAMS_TAGS_PER_BATCH = 100
SEND_EVERY_S = 2.0  # metrics are batched this long before one write to MLflow
MAX_METRICS_PER_BATCH = 1000

_TRUNCATED = "...(truncated)"
_STORE_DB = "mlflow.db"
_STORE_ARTIFACTS = "mlartifacts"
_HEALTH_TIMEOUT_S = 5.0
_MAX_CONSECUTIVE_FAILURES = 3
_HTTP_ENV_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}


# ----------------------------------------------------------------------------- helpers

_BAD_KEY_CHARS = re.compile(r"[^\w.\- /]")


def sanitize_key(key: str) -> str:
    """A metric/param/tag name MLflow accepts, the same on every platform.

    ``@`` becomes ``_at_``; any other character besides letters, digits, ``_ - . /`` and
    space becomes ``_``; empty, ``.`` and ``..`` path segments (which MLflow refuses because
    names may be used as file paths) are dropped or replaced; the result is cut to 250
    characters. ``"eval/pass@k"`` -> ``"eval/pass_at_k"``, ``"loss#1"`` -> ``"loss_1"``.
    """
    s = str(key).replace("@", "_at_")
    s = _BAD_KEY_CHARS.sub("_", s)
    parts = []
    for seg in s.split("/"):
        if seg == "":
            continue
        if seg in (".", ".."):
            seg = "_" * len(seg)
        parts.append(seg)
    s = "/".join(parts) or "_"
    return s[:MAX_KEY_LENGTH]


def _truncate(value: str, limit: int) -> str:
    if len(value) <= limit:
        return value
    return value[: limit - len(_TRUNCATED)] + _TRUNCATED


def _param_str(value: Any) -> str:
    if isinstance(value, str):
        return value
    return str(value)


def flatten_params(nested: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Flatten nested mappings into dotted keys with string values.

    ``{"train": {"lr": 1e-4, "betas": [0.9, 0.999]}, "x": None}`` ->
    ``{"train.lr": "0.0001", "train.betas": "[0.9, 0.999]", "x": "None"}``.
    Values are ``str()``-ed (strings stay as they are); an empty mapping gives ``"{}"``;
    values longer than MLflow's limit (6000 characters) are cut and end in
    ``"...(truncated)"``. Keys are not sanitized here (see :func:`sanitize_key`).
    """
    out: dict[str, str] = {}
    for key, value in nested.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            if value:
                out.update(flatten_params(value, prefix=f"{name}."))
            else:
                out[name] = "{}"
        else:
            out[name] = _truncate(_param_str(value), MAX_PARAM_VALUE_LENGTH)
    return out


def _as_float(value: Any) -> float | None:
    """A metric value as a float; None for anything that is not a real number."""
    if isinstance(value, bool):
        return float(value)
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _folder_name(name: str) -> str:
    """A file-system-friendly folder name for an experiment's artifacts."""
    s = re.sub(r"[^\w.\-]", "_", name).strip(".")
    return s[:100] or "_"


def _warn(message: str) -> None:
    print(f"shapeflow: warning: {message}", file=sys.stderr, flush=True)


def embedded_store(run_dir: Path) -> tuple[str, Path]:
    """The embedded MLflow store shared by every run under ``run_dir``'s parent folder.

    Returns ``(tracking_uri, artifact_root)``: ``sqlite:///<out>/mlflow.db`` and
    ``<out>/mlartifacts`` with ``<out> = run_dir.parent``, both absolute.
    """
    out = Path(run_dir).resolve().parent
    return f"sqlite:///{(out / _STORE_DB).as_posix()}", out / _STORE_ARTIFACTS


def ui_command(run_dir: Path) -> str:
    """The shell command that opens the MLflow UI on the embedded store of ``run_dir``."""
    uri, artifacts = embedded_store(run_dir)
    return (
        f"mlflow ui --backend-store-uri {shlex.quote(uri)} "
        f"--default-artifact-root {shlex.quote(artifacts.as_posix())}"
    )


# ----------------------------------------------------------------------------- interface


class Tracker:
    """Where a run's parameters, metrics and artifacts go. Every method is safe to call
    in any order: logging before ``start`` or after ``finish`` does nothing, and ``finish``
    may be called twice."""

    #: the backend name, as written in ``track { backend = ... }``
    backend = "none"

    def start(
        self,
        *,
        run_dir: Path,
        experiment: str,
        run_name: str,
        params: Mapping[str, Any],
        tags: Mapping[str, str],
        resume_id: str | None = None,
    ) -> str | None:
        """Open (or with ``resume_id`` reopen) a run; return the id to store for ``--resume``."""
        raise NotImplementedError

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        raise NotImplementedError

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """Log a file as ``<artifact_path>/<file name>``, or the contents of a folder under
        ``<artifact_path>/`` (MLflow's ``log_artifact``/``log_artifacts`` conventions);
        ``artifact_path`` none: at the top of the run's artifacts."""
        raise NotImplementedError

    def finish(self, status: str = "FINISHED") -> None:
        raise NotImplementedError

    def ui_hint(self) -> str | None:
        """A line telling the user where to look at the run, or None."""
        return None


class NullTracker(Tracker):
    """Tracks nothing (``backend = "none"``)."""

    backend = "none"

    def start(self, *, run_dir, experiment, run_name, params, tags, resume_id=None):
        return None

    def log_metrics(self, metrics, step):
        return None

    def log_artifact(self, path, artifact_path=None):
        return None

    def finish(self, status="FINISHED"):
        return None


def _check_status(status: str) -> str:
    if status not in STATUSES:
        raise ValueError(f"tracker status must be one of {', '.join(STATUSES)}, not {status!r}")
    return status


# ----------------------------------------------------------------------------- JSON Lines


def _json_number(value: float) -> float | str:
    """Strict JSON has no NaN/Infinity: those are written as the strings
    "NaN", "Infinity", "-Infinity"."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "Infinity" if value > 0 else "-Infinity"
    return value


class JsonlTracker(Tracker):
    """Appends one JSON object per event to a file.

    The file is ``<run_dir>/tracking.jsonl`` with no URI; a URI ending in ``.jsonl`` or
    ``.json`` names the file; any other URI names a folder that gets ``tracking.jsonl``
    (``file://`` prefixes are accepted). Events, each with ``"event"``, ``"run_id"`` and
    ``"time"`` (Unix seconds)::

        {"event": "start", "run_id": ..., "time": ..., "experiment": ..., "run_name": ...,
         "tags": {...}, "resumed": false}
        {"event": "params", "run_id": ..., "time": ..., "params": {flat string values}}
        {"event": "metrics", "run_id": ..., "time": ..., "step": 3, "metrics": {...}}
        {"event": "artifact", "run_id": ..., "time": ..., "path": "...", "artifact_path": null,
         "kind": "file" | "dir"}
        {"event": "finish", "run_id": ..., "time": ..., "status": "FINISHED"}

    Metric values that are not finite are written as "NaN", "Infinity", "-Infinity"; values
    that are not numbers are skipped. The file is flushed after every event; a write that
    fails (a full disk) prints one warning and training goes on.
    """

    backend = "jsonl"

    def __init__(self, uri: str | None = None, *, clock: Callable[[], float] = time.time):
        self.uri = uri
        self._clock = clock
        self.path: Path | None = None
        self.run_id: str | None = None
        self._fh = None
        self._finished = False
        self._warned = False

    def _resolve_path(self, run_dir: Path) -> Path:
        if self.uri is None:
            return Path(run_dir) / "tracking.jsonl"
        raw = self.uri[len("file://"):] if self.uri.startswith("file://") else self.uri
        p = Path(raw).expanduser()
        if p.suffix.lower() in (".jsonl", ".json"):
            return p
        return p / "tracking.jsonl"

    def _write(self, event: str, **fields: Any) -> None:
        if self._fh is None:
            return
        record = {"event": event, "run_id": self.run_id, "time": self._clock(), **fields}
        try:
            self._fh.write(json.dumps(record, ensure_ascii=False, default=str) + "\n")
            self._fh.flush()
        except OSError as exc:  # a full disk must not stop training
            if not self._warned:
                self._warned = True
                _warn(f"cannot write tracking events to {self.path}: {exc}")

    def start(self, *, run_dir, experiment, run_name, params, tags, resume_id=None):
        if self._fh is not None:
            self._fh.close()
        self.path = self._resolve_path(Path(run_dir))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "a", encoding="utf-8")
        self._finished = False
        self.run_id = resume_id or uuid.uuid4().hex
        self._write(
            "start",
            experiment=experiment,
            run_name=run_name,
            tags={str(k): str(v) for k, v in tags.items()},
            resumed=resume_id is not None,
        )
        self._write("params", params=flatten_params(params))
        return self.run_id

    def log_metrics(self, metrics, step):
        clean: dict[str, float | str] = {}
        for key, value in metrics.items():
            v = _as_float(value)
            if v is not None:
                clean[str(key)] = _json_number(v)
        self._write("metrics", step=int(step), metrics=clean)

    def log_artifact(self, path, artifact_path=None):
        p = Path(path)
        self._write("artifact", path=str(p), artifact_path=artifact_path,
                    kind="dir" if p.is_dir() else "file")

    def finish(self, status="FINISHED"):
        _check_status(status)
        if self._fh is None or self._finished:
            return
        self._write("finish", status=status)
        self._finished = True
        try:
            self._fh.close()
        except OSError:
            pass
        self._fh = None

    def ui_hint(self):
        return f"tracking events: {self.path}" if self.path is not None else None


# ----------------------------------------------------------------------------- MLflow


class MlflowTracker(Tracker):
    """Logs to MLflow through an ``MlflowClient`` of its own (no fluent global state, so
    two trackers in one process do not interfere).

    ``uri`` none: the embedded store of :func:`embedded_store` (SQLite + local artifacts in
    the ``--out`` folder, shared by the runs there). Any other URI is passed to MLflow.
    """

    backend = "mlflow"

    def __init__(self, uri: str | None = None):
        self.uri = uri
        self.tracking_uri: str | None = None
        self.artifact_root: Path | None = None  # where new experiments put artifacts
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self.run_dir: Path | None = None
        self._client = None
        self._disabled = False
        self._warned = False
        self._failures = 0
        self._finished = False
        self._sender = None  # one background thread sends metrics, so a step never waits on MLflow
        self._pending: list = []  # metrics not handed to the sender yet (one send per ~2 s, not per step)
        self._pending_since = 0.0
        self._key_cache: dict[str, str] = {}
        self._collision_warned = False
        self._skip_warned = False

    # -- failure handling ---------------------------------------------------------------

    @property
    def active(self) -> bool:
        """True while the tracker has a run and is still sending to MLflow."""
        return self.run_id is not None and not self._disabled and not self._finished

    def _where(self) -> str:
        return self.uri or self.tracking_uri or "the embedded MLflow store"

    def _fail(self, what: str, exc: BaseException, *, fatal: bool = False) -> None:
        self._failures += 1
        turn_off = fatal or self._failures >= _MAX_CONSECUTIVE_FAILURES
        if not self._warned:
            self._warned = True
            text = str(exc).strip()
            msg = text.splitlines()[0] if text else ""
            msg = msg if len(msg) <= 300 else msg[:300] + "..."
            then = ("MLflow tracking is off for this run" if turn_off
                    else "it is turned off after 3 failures in a row")
            _warn(
                f"MLflow tracking failed while {what} ({self._where()}): "
                f"{type(exc).__name__}{': ' + msg if msg else ''}. Training goes on ({then}); "
                f"metrics are still written to the run folder."
            )
        elif turn_off and not self._disabled:
            _warn(f"MLflow tracking turned off for the rest of this run after "
                  f"{self._failures} failures in a row.")
        if turn_off:
            self._disabled = True

    def _ok(self) -> None:
        self._failures = 0

    def _key(self, key: str) -> str:
        k = self._key_cache.get(key)
        if k is None:
            k = self._key_cache[key] = sanitize_key(key)
        return k

    # -- start --------------------------------------------------------------------------

    def _resolve_uri(self, run_dir: Path) -> None:
        if self.uri is None:
            self.tracking_uri, self.artifact_root = embedded_store(run_dir)
            self.artifact_root.parent.mkdir(parents=True, exist_ok=True)
        else:
            self.tracking_uri = self.uri
            self.artifact_root = None
            if self.uri.startswith("sqlite:///"):
                db = Path(self.uri[len("sqlite:///"):])
                if db.name and db.as_posix() != ":memory:":
                    db.parent.mkdir(parents=True, exist_ok=True)
                    self.artifact_root = db.resolve().parent / _STORE_ARTIFACTS

    def _is_http(self) -> bool:
        return bool(self.tracking_uri) and self.tracking_uri.startswith(("http://", "https://"))

    def _check_server(self) -> None:
        """Raise if an HTTP tracking server does not answer /health quickly."""
        import urllib.request

        for key, value in _HTTP_ENV_DEFAULTS.items():
            os.environ.setdefault(key, value)
        url = self.tracking_uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(url, timeout=_HEALTH_TIMEOUT_S) as resp:
                resp.read()
        except Exception as exc:  # noqa: BLE001 - decide below what it means
            import ssl
            import urllib.error

            # An answer of any kind (401, 404 behind a proxy, ...) or a TLS setting that only
            # MLflow's own client knows (MLFLOW_TRACKING_INSECURE_TLS, ...): let MLflow try.
            if isinstance(exc, urllib.error.HTTPError):
                return
            if isinstance(exc, urllib.error.URLError) and isinstance(exc.reason, ssl.SSLError):
                return
            raise ConnectionError(f"no MLflow server answers at {self.tracking_uri} ({exc})") from exc

    def _experiment_id(self, name: str) -> str:
        from mlflow.exceptions import MlflowException

        client = self._client
        exp = client.get_experiment_by_name(name)
        if exp is None:
            location = None
            if self.artifact_root is not None:
                location = (self.artifact_root / _folder_name(name)).as_posix()
            try:
                return client.create_experiment(name, artifact_location=location)
            except MlflowException:
                exp = client.get_experiment_by_name(name)  # created meanwhile by another run
                if exp is None:
                    raise
        if exp.lifecycle_stage == "deleted":
            _warn(f"MLflow experiment {name!r} was deleted; restoring it to log this run.")
            client.restore_experiment(exp.experiment_id)
        return exp.experiment_id

    def start(self, *, run_dir, experiment, run_name, params, tags, resume_id=None):
        self.run_dir = Path(run_dir)
        self._finished = False
        self._disabled = False
        self._failures = 0
        self.run_id = None
        try:
            self._resolve_uri(self.run_dir)
            if self._is_http():
                self._check_server()
            self._quiet_mlflow_logs()
            from mlflow import MlflowClient

            self._client = MlflowClient(tracking_uri=self.tracking_uri)
            attempts = 1 if self._is_http() else 3  # concurrent first use of one SQLite file
            for attempt in range(attempts):
                try:
                    self.experiment_id = self._experiment_id(experiment)
                    break
                except Exception:  # noqa: BLE001
                    if attempt == attempts - 1:
                        raise
                    time.sleep(0.5 * (attempt + 1))
            flat = flatten_params(params)
            if resume_id is not None and self._resume(resume_id, flat, tags):
                return self.run_id
            run = self._client.create_run(self.experiment_id, run_name=run_name)
            self.run_id = run.info.run_id
            self._log_params_tags(flat, tags)
            self._ok()
            return self.run_id
        except Exception as exc:  # noqa: BLE001 - tracking must never stop training
            self._fail("starting the run", exc, fatal=True)
            return self.run_id if self.run_id is not None else None

    def _resume(self, resume_id: str, flat: dict[str, str], tags) -> bool:
        """Reopen ``resume_id``; False (with a warning) when the store does not have it."""
        from mlflow.exceptions import MlflowException

        try:
            run = self._client.get_run(resume_id)
        except MlflowException as exc:
            _warn(f"cannot resume MLflow run {resume_id} ({self._where()}): "
                  f"{str(exc).splitlines()[0] if str(exc) else exc!r}; starting a new run.")
            return False
        self.run_id = run.info.run_id
        self.experiment_id = run.info.experiment_id
        self._client.update_run(self.run_id, status="RUNNING")
        # MLflow params cannot change: log only the new ones, and say which ones differ.
        old = run.data.params
        new_params = {}
        changed = []
        for key, value in flat.items():
            k = self._key(key)
            if k not in old:
                new_params[key] = value
            elif old[k] != value:
                changed.append(k)
        if changed:
            _warn(f"resumed MLflow run {self.run_id} keeps its original value of "
                  f"{len(changed)} changed parameter(s): {', '.join(sorted(changed)[:10])}"
                  + (" ..." if len(changed) > 10 else ""))
        self._log_params_tags(new_params, tags)
        self._ok()
        return True

    def _log_params_tags(self, flat: Mapping[str, str], tags: Mapping[str, str]) -> None:
        from mlflow.entities import Param, RunTag

        params = {}
        for key, value in flat.items():
            params[self._key(key)] = _truncate(str(value), MAX_PARAM_VALUE_LENGTH)
        run_tags = {}
        for key, value in tags.items():
            k = str(key)
            # "mlflow.*" system tags (mlflow.note.content, ...) keep their exact names
            run_tags[k if k.startswith("mlflow.") else self._key(k)] = _truncate(str(value), MAX_TAG_VALUE_LENGTH)
        p_items = [Param(k, v) for k, v in params.items()]
        t_items = [RunTag(k, v) for k, v in run_tags.items()]
        n = MAX_PARAMS_TAGS_PER_BATCH
        for i in range(0, len(p_items), n):
            self._client.log_batch(self.run_id, params=p_items[i:i + n])
        for i in range(0, len(t_items), n):
            self._client.log_batch(self.run_id, tags=t_items[i:i + n])

    @staticmethod
    def _quiet_mlflow_logs() -> None:
        import logging

        for name in ("mlflow.store.db.utils", "alembic", "alembic.runtime.migration"):
            logging.getLogger(name).setLevel(logging.WARNING)

    # -- logging ------------------------------------------------------------------------

    def log_metrics(self, metrics, step):
        if not self.active:
            return
        try:
            from mlflow.entities import Metric

            ts = int(time.time() * 1000)
            step = int(step)
            batch: dict[str, float] = {}
            origin: dict[str, str] = {}
            for key, value in metrics.items():
                v = _as_float(value)
                if v is None:
                    if not self._skip_warned:
                        self._skip_warned = True
                        _warn(f"metric {key!r} has a value that is not a number ({value!r}); "
                              f"such values are not sent to MLflow.")
                    continue
                k = self._key(str(key))
                if k in origin and origin[k] != key and not self._collision_warned:
                    self._collision_warned = True
                    _warn(f"metrics {origin[k]!r} and {key!r} have the same MLflow name {k!r}; "
                          f"the last one logged wins.")
                origin[k] = key
                batch[k] = v
            items = [Metric(k, v, ts, step) for k, v in batch.items()]
        except Exception as exc:  # noqa: BLE001
            self._fail(f"logging metrics of step {step}", exc)
            return
        if not self._pending:
            self._pending_since, self._pending_first = time.monotonic(), step
        self._pending.extend(items)
        self._pending_last = step
        if len(self._pending) >= MAX_METRICS_PER_BATCH or time.monotonic() - self._pending_since > SEND_EVERY_S:
            self._hand_over()

    def _hand_over(self) -> None:
        items, self._pending = self._pending, []
        if not items:
            return
        first, last = self._pending_first, self._pending_last
        step = first if first == last else f"{first}-{last}"
        if self._sender is None:
            from concurrent.futures import ThreadPoolExecutor

            self._sender = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shapeflow-mlflow")
        self._sender.submit(self._send_metrics, items, step)

    def _send_metrics(self, items, step) -> None:
        if not self.active:
            return
        try:
            for i in range(0, len(items), MAX_METRICS_PER_BATCH):
                self._client.log_batch(self.run_id, metrics=items[i:i + MAX_METRICS_PER_BATCH])
            self._ok()
        except Exception as exc:  # noqa: BLE001
            self._fail(f"logging metrics of step {step}", exc)

    def flush(self) -> None:
        """Send what is pending and wait until it has been sent (or given up on)."""
        self._hand_over()
        if self._sender is not None:
            self._sender.shutdown(wait=True)
            self._sender = None

    def log_artifact(self, path, artifact_path=None):
        if not self.active:
            return
        p = Path(path)
        try:
            if p.is_dir():
                self._client.log_artifacts(self.run_id, str(p), artifact_path)
            elif p.is_file():
                self._client.log_artifact(self.run_id, str(p), artifact_path)
            else:
                raise FileNotFoundError(f"no such file or folder: {p}")
            self._ok()
        except Exception as exc:  # noqa: BLE001
            self._fail(f"logging artifact {p.name}", exc)

    def finish(self, status="FINISHED"):
        _check_status(status)
        self.flush()
        if self._finished or self.run_id is None or self._client is None:
            self._finished = True
            return
        self._finished = True
        if self._disabled:
            return
        try:
            self._client.set_terminated(self.run_id, status=status)
        except Exception as exc:  # noqa: BLE001
            self._fail("finishing the run", exc)

    # -- where to look ------------------------------------------------------------------

    def run_url(self) -> str | None:
        """The run's page on an HTTP tracking server; None for other stores."""
        if self.run_id is None or not self._is_http():
            return None
        return f"{self.tracking_uri.rstrip('/')}/#/experiments/{self.experiment_id}/runs/{self.run_id}"

    def ui_hint(self):
        if self.run_id is None:
            return None
        url = self.run_url()
        if url is not None:
            return f"MLflow run: {url}"
        if self.uri is None and self.run_dir is not None:
            return f"MLflow UI: {ui_command(self.run_dir)}"
        return f"MLflow run {self.run_id} in {self.tracking_uri}"


# ----------------------------------------------------------------------------- factory


def make_tracker(backend: str, uri: str | None = None) -> Tracker:
    """The tracker of ``track { backend = ... uri = ... }`` (not started yet)."""
    if backend == "mlflow":
        return MlflowTracker(uri)
    if backend == "jsonl":
        return JsonlTracker(uri)
    if backend == "none":
        return NullTracker()
    raise ValueError(f"unknown tracking backend {backend!r}; expected one of {', '.join(BACKENDS)}")

"""Trackers of `shapeflow run`: the JSONL and null trackers exactly, MLflow through its
embedded SQLite store (read back with MlflowClient), resume, key sanitizing, failures that
must not stop training, and (slow) a real `mlflow server` and the printed `mlflow ui` line."""

from __future__ import annotations

import itertools
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from shapeflow.runtime.tracking import (
    MAX_PARAM_VALUE_LENGTH,
    JsonlTracker,
    MlflowTracker,
    NullTracker,
    Tracker,
    embedded_store,
    flatten_params,
    make_tracker,
    sanitize_key,
    ui_command,
)

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy is deprecated")

HTTP_ENV = ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "MLFLOW_HTTP_REQUEST_TIMEOUT")


def start_kwargs(run_dir: Path, **over):
    kw = dict(
        run_dir=run_dir,
        experiment="grpo demo",
        run_name="r1",
        params={"train": {"lr": 1e-4, "betas": [0.9, 0.999], "max_grad_norm": None}, "params": {}},
        tags={"spec": "grpo", "cite": "arXiv:2402.03300"},
    )
    kw.update(over)
    return kw


# ----------------------------------------------------------------------------- helpers


def test_flatten_params():
    nested = {
        "train": {"lr": 1e-4, "steps": 200, "betas": [0.9, 0.999], "max_grad_norm": None, "fp": True},
        "params": {},
        "name": "grpo",
        "deep": {"a": {"b": {"c": 1.5}}},
        "tuple": (1, "x"),
    }
    assert flatten_params(nested) == {
        "train.lr": "0.0001",
        "train.steps": "200",
        "train.betas": "[0.9, 0.999]",
        "train.max_grad_norm": "None",
        "train.fp": "True",
        "params": "{}",
        "name": "grpo",
        "deep.a.b.c": "1.5",
        "tuple": "(1, 'x')",
    }
    assert flatten_params({"lr": 2e-5}, prefix="train.") == {"train.lr": "2e-05"}


def test_flatten_params_cuts_values_to_mlflows_limit():
    flat = flatten_params({"spec": "x" * 10_000, "ok": "y" * MAX_PARAM_VALUE_LENGTH})
    assert len(flat["spec"]) == MAX_PARAM_VALUE_LENGTH == 6000
    assert flat["spec"] == "x" * (6000 - len("...(truncated)")) + "...(truncated)"
    assert flat["ok"] == "y" * 6000


@pytest.mark.parametrize(
    "key, expected",
    [
        ("reward/correct/mean", "reward/correct/mean"),
        ("eval/pass@k", "eval/pass_at_k"),
        ("eval/pass@4", "eval/pass_at_4"),
        ("loss#1", "loss_1"),
        ("a:b", "a_b"),
        ("weird key (x)+y", "weird key _x__y"),
        ("/lead//double/trail/", "lead/double/trail"),
        ("a/./b/../c", "a/_/b/__/c"),
        ("", "_"),
        ("ünïcode/ok", "ünïcode/ok"),
        ("k" * 300, "k" * 250),
    ],
)
def test_sanitize_key(key, expected):
    assert sanitize_key(key) == expected


def test_make_tracker():
    assert type(make_tracker("mlflow", None)) is MlflowTracker
    assert make_tracker("mlflow", "http://127.0.0.1:5000").uri == "http://127.0.0.1:5000"
    assert type(make_tracker("jsonl", None)) is JsonlTracker
    assert type(make_tracker("none", None)) is NullTracker
    assert all(isinstance(make_tracker(b, None), Tracker) for b in ("mlflow", "jsonl", "none"))
    with pytest.raises(ValueError, match="unknown tracking backend 'wandb'"):
        make_tracker("wandb", None)


def test_embedded_store_and_ui_command(tmp_path):
    run_dir = tmp_path / "runs" / "grpo-1"
    out = (tmp_path / "runs").resolve()
    assert embedded_store(run_dir) == (f"sqlite:///{out.as_posix()}/mlflow.db", out / "mlartifacts")
    assert ui_command(run_dir) == (
        f"mlflow ui --backend-store-uri {shlex.quote(f'sqlite:///{out.as_posix()}/mlflow.db')} "
        f"--default-artifact-root {shlex.quote(f'{out.as_posix()}/mlartifacts')}"
    )
    spaced = tmp_path / "my runs" / "r"
    assert shlex.split(ui_command(spaced)) == [
        "mlflow", "ui",
        "--backend-store-uri", f"sqlite:///{(tmp_path / 'my runs').resolve().as_posix()}/mlflow.db",
        "--default-artifact-root", f"{(tmp_path / 'my runs').resolve().as_posix()}/mlartifacts",
    ]


# ----------------------------------------------------------------------------- null / jsonl


def test_null_tracker_does_nothing(tmp_path):
    t = NullTracker()
    assert t.start(**start_kwargs(tmp_path / "r")) is None
    t.log_metrics({"a": 1.0}, 0)
    t.log_artifact(tmp_path)
    t.finish()
    t.finish("FAILED")
    assert t.ui_hint() is None
    assert list(tmp_path.iterdir()) == []


def read_events(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_jsonl_tracker_writes_every_event_exactly(tmp_path):
    run_dir = tmp_path / "r"
    (run_dir / "plots").mkdir(parents=True)
    (run_dir / "spec.shape").write_text("x")
    t = JsonlTracker(clock=itertools.count(100).__next__)
    t.log_metrics({"early": 1.0}, 0)  # before start: ignored
    run_id = t.start(**start_kwargs(run_dir))
    assert isinstance(run_id, str) and len(run_id) == 32
    t.log_metrics({"reward/c/mean": 0.5, "eval/pass@k": 1, "ok": True, "nan": float("nan"),
                   "inf": float("inf"), "ninf": float("-inf"), "text": "skip me", "none": None}, 0)
    t.log_metrics({"reward/c/mean": 0.75}, 1)
    t.log_artifact(run_dir / "spec.shape")
    t.log_artifact(run_dir / "plots", "plots")
    t.finish()
    t.finish()  # twice: nothing more
    t.log_metrics({"late": 1.0}, 2)  # after finish: ignored
    assert t.path == run_dir / "tracking.jsonl"
    assert t.ui_hint() == f"tracking events: {run_dir / 'tracking.jsonl'}"
    assert read_events(run_dir / "tracking.jsonl") == [
        {"event": "start", "run_id": run_id, "time": 100, "experiment": "grpo demo", "run_name": "r1",
         "tags": {"spec": "grpo", "cite": "arXiv:2402.03300"}, "resumed": False},
        {"event": "params", "run_id": run_id, "time": 101,
         "params": {"train.lr": "0.0001", "train.betas": "[0.9, 0.999]", "train.max_grad_norm": "None",
                    "params": "{}"}},
        {"event": "metrics", "run_id": run_id, "time": 102, "step": 0,
         "metrics": {"reward/c/mean": 0.5, "eval/pass@k": 1.0, "ok": 1.0, "nan": "NaN", "inf": "Infinity",
                     "ninf": "-Infinity"}},
        {"event": "metrics", "run_id": run_id, "time": 103, "step": 1, "metrics": {"reward/c/mean": 0.75}},
        {"event": "artifact", "run_id": run_id, "time": 104, "path": str(run_dir / "spec.shape"),
         "artifact_path": None, "kind": "file"},
        {"event": "artifact", "run_id": run_id, "time": 105, "path": str(run_dir / "plots"),
         "artifact_path": "plots", "kind": "dir"},
        {"event": "finish", "run_id": run_id, "time": 106, "status": "FINISHED"},
    ]


def test_jsonl_tracker_resume_appends_to_the_same_run(tmp_path):
    clock = itertools.count(0).__next__
    t = JsonlTracker(clock=clock)
    rid = t.start(**start_kwargs(tmp_path, params={}, tags={}))
    t.finish("FAILED")
    t2 = JsonlTracker(clock=clock)
    assert t2.start(**start_kwargs(tmp_path, params={}, tags={}), resume_id=rid) == rid
    t2.log_metrics({"a": 2.0}, 5)
    t2.finish("KILLED")
    events = read_events(tmp_path / "tracking.jsonl")
    assert [(e["event"], e["run_id"], e["time"]) for e in events] == [
        ("start", rid, 0), ("params", rid, 1), ("finish", rid, 2),
        ("start", rid, 3), ("params", rid, 4), ("metrics", rid, 5), ("finish", rid, 6),
    ]
    assert [e.get("resumed") for e in events if e["event"] == "start"] == [False, True]
    assert [e["status"] for e in events if e["event"] == "finish"] == ["FAILED", "KILLED"]


def test_jsonl_tracker_uri_names_a_file_or_a_folder(tmp_path):
    f = JsonlTracker(str(tmp_path / "logs" / "all.jsonl"))
    f.start(**start_kwargs(tmp_path / "r"))
    f.finish()
    assert f.path == tmp_path / "logs" / "all.jsonl" and f.path.is_file()
    d = JsonlTracker(f"file://{tmp_path / 'folder'}")
    d.start(**start_kwargs(tmp_path / "r"))
    d.finish()
    assert d.path == tmp_path / "folder" / "tracking.jsonl" and d.path.is_file()
    assert not (tmp_path / "r").exists()


class FullDisk:
    def write(self, text):
        raise OSError(28, "No space left on device")

    def flush(self):
        pass

    def close(self):
        raise OSError(28, "No space left on device")


def test_jsonl_write_errors_warn_once_and_do_not_raise(tmp_path, capsys):
    t = JsonlTracker()
    t.start(**start_kwargs(tmp_path))
    t._fh.close()
    t._fh = FullDisk()
    t.log_metrics({"a": 1.0}, 0)
    t.log_metrics({"a": 1.0}, 1)
    t.finish()
    assert capsys.readouterr().err == (
        f"shapeflow: warning: cannot write tracking events to {tmp_path / 'tracking.jsonl'}: "
        "[Errno 28] No space left on device\n"
    )
    assert [e["event"] for e in read_events(tmp_path / "tracking.jsonl")] == ["start", "params"]


def test_finish_refuses_an_unknown_status(tmp_path):
    for t in (JsonlTracker(), MlflowTracker()):
        with pytest.raises(ValueError, match="FINISHED, FAILED, KILLED"):
            t.finish("DONE")


def test_importing_tracking_does_not_import_mlflow():
    code = "import sys, shapeflow.runtime.tracking; print('mlflow' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "False"


# ----------------------------------------------------------------------------- MLflow, embedded

mlflow_needed = pytest.mark.skipif(
    __import__("importlib").util.find_spec("mlflow") is None, reason="mlflow is not installed"
)


@pytest.fixture(scope="session")
def store_template(tmp_path_factory) -> Path:
    """An empty, initialised MLflow SQLite store. Creating one runs MLflow's schema
    migrations (2.5 s on an idle machine); tests copy this file into their --out folder
    instead. The slow `mlflow ui` test creates its store from nothing."""
    from mlflow import MlflowClient

    db = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{db.as_posix()}").search_experiments()
    return db


def seed_store(template: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(template, out / "mlflow.db")


def history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


def artifact_tree(client, run_id: str, path: str | None = None) -> list[str]:
    out = []
    for f in client.list_artifacts(run_id, path):
        out.extend(artifact_tree(client, run_id, f.path) if f.is_dir else [f.path])
    return sorted(out)


@mlflow_needed
def test_mlflow_embedded_store_round_trip_and_resume(tmp_path, capsys, store_template):
    from mlflow import MlflowClient

    out = tmp_path / "runs"
    seed_store(store_template, out)
    run_dir = out / "r1"
    (run_dir / "plots" / "sub").mkdir(parents=True)
    (run_dir / "spec.shape").write_text("spec")
    (run_dir / "plots" / "reward.png").write_bytes(b"png")
    (run_dir / "plots" / "sub" / "x.txt").write_text("x")

    t = MlflowTracker()
    rid = t.start(**start_kwargs(run_dir))
    assert isinstance(rid, str) and t.active
    steps = {0: 0.25, 1: 0.5, 2: 0.75}
    for step, v in steps.items():
        t.log_metrics({"reward/correct/mean": v, "eval/pass@k": 2 * v, "loss#1": -v, "count": step}, step)
    t.log_metrics({"nan": float("nan"), "text": "no"}, 3)
    t.log_artifact(run_dir / "spec.shape")
    t.log_artifact(run_dir / "spec.shape", "spec")
    t.log_artifact(run_dir / "plots", "plots")
    t.log_artifact(run_dir / "plots")
    t.finish()
    t.finish("FAILED")  # second call: nothing happens
    assert not t.active
    assert t.ui_hint() == f"MLflow UI: {ui_command(run_dir)}"
    assert capsys.readouterr().err == (
        "shapeflow: warning: metric 'text' has a value that is not a number ('no'); "
        "such values are not sent to MLflow.\n"
    )

    db = f"sqlite:///{out.resolve().as_posix()}/mlflow.db"
    assert t.tracking_uri == db
    client = MlflowClient(tracking_uri=db)
    exp = client.get_experiment_by_name("grpo demo")
    assert exp.artifact_location == f"{out.resolve().as_posix()}/mlartifacts/grpo_demo"
    run = client.get_run(rid)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "r1"
    assert run.info.experiment_id == exp.experiment_id
    assert run.data.params == {"train.lr": "0.0001", "train.betas": "[0.9, 0.999]",
                               "train.max_grad_norm": "None", "params": "{}"}
    assert {k: v for k, v in run.data.tags.items() if not k.startswith("mlflow.")} == {
        "spec": "grpo", "cite": "arXiv:2402.03300"}
    assert history(client, rid, "reward/correct/mean") == [(0, 0.25), (1, 0.5), (2, 0.75)]
    assert history(client, rid, "eval/pass_at_k") == [(0, 0.5), (1, 1.0), (2, 1.5)]
    assert history(client, rid, "loss_1") == [(0, -0.25), (1, -0.5), (2, -0.75)]
    assert history(client, rid, "count") == [(0, 0.0), (1, 1.0), (2, 2.0)]
    nan = history(client, rid, "nan")
    assert len(nan) == 1 and nan[0][0] == 3 and nan[0][1] != nan[0][1]
    assert set(run.data.metrics) == {"reward/correct/mean", "eval/pass_at_k", "loss_1", "count", "nan"}
    assert artifact_tree(client, rid) == [
        "plots/reward.png", "plots/sub/x.txt", "reward.png", "spec.shape", "spec/spec.shape", "sub/x.txt"]

    # --resume: the same run again, RUNNING; only new params are added (MLflow params are fixed).
    t2 = MlflowTracker()
    params = {"train": {"lr": 2e-4, "betas": [0.9, 0.999], "max_grad_norm": None}, "params": {}, "new": 1}
    assert t2.start(**start_kwargs(run_dir, params=params), resume_id=rid) == rid
    assert client.get_run(rid).info.status == "RUNNING"
    assert capsys.readouterr().err == (
        f"shapeflow: warning: resumed MLflow run {rid} keeps its original value of 1 changed "
        "parameter(s): train.lr\n"
    )
    t2.log_metrics({"reward/correct/mean": 1.0}, 3)
    t2.finish("KILLED")
    run = client.get_run(rid)
    assert run.info.status == "KILLED"
    assert run.data.params["train.lr"] == "0.0001" and run.data.params["new"] == "1"
    assert history(client, rid, "reward/correct/mean") == [(0, 0.25), (1, 0.5), (2, 0.75), (3, 1.0)]

    # Another run under the same --out lands in the same store and experiment.
    t3 = MlflowTracker()
    rid3 = t3.start(**start_kwargs(out / "r2", run_name="r2"))
    t3.finish()
    runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])
    assert [r.info.run_id for r in runs] == [rid, rid3]
    assert sorted(p.name for p in out.iterdir()) == ["mlartifacts", "mlflow.db", "r1"]  # r2: nothing written
    assert capsys.readouterr().err == ""


@mlflow_needed
def test_two_mlflow_trackers_in_one_process_do_not_interfere(tmp_path, capsys, store_template):
    from mlflow import MlflowClient

    seed_store(store_template, tmp_path / "A")
    seed_store(store_template, tmp_path / "B")
    a, b = MlflowTracker(), MlflowTracker()
    rid_a = a.start(**start_kwargs(tmp_path / "A" / "run", experiment="ea", params={"x": 1}, tags={}))
    # An id this store has never seen: a warning, then a new run.
    rid_b = b.start(**start_kwargs(tmp_path / "B" / "run", experiment="eb", params={"x": 2}, tags={}),
                    resume_id="0" * 32)
    assert rid_b != "0" * 32
    err = capsys.readouterr().err
    assert err.startswith(f"shapeflow: warning: cannot resume MLflow run {'0' * 32} (")
    assert err.endswith("; starting a new run.\n") and err.count("\n") == 1
    for step in range(3):
        a.log_metrics({"m": float(step)}, step)
        b.log_metrics({"m": 10.0 + step}, step)
    a.finish()
    b.finish("FAILED")
    ca = MlflowClient(tracking_uri=a.tracking_uri)
    cb = MlflowClient(tracking_uri=b.tracking_uri)
    assert a.tracking_uri != b.tracking_uri
    assert [r.info.run_id for r in ca.search_runs([a.experiment_id])] == [rid_a]
    assert [r.info.run_id for r in cb.search_runs([b.experiment_id])] == [rid_b]
    assert ca.get_experiment_by_name("eb") is None and cb.get_experiment_by_name("ea") is None
    assert history(ca, rid_a, "m") == [(0, 0.0), (1, 1.0), (2, 2.0)]
    assert history(cb, rid_b, "m") == [(0, 10.0), (1, 11.0), (2, 12.0)]
    assert (ca.get_run(rid_a).info.status, cb.get_run(rid_b).info.status) == ("FINISHED", "FAILED")
    assert ca.get_run(rid_a).data.params == {"x": "1"} and cb.get_run(rid_b).data.params == {"x": "2"}


# ----------------------------------------------------------------------------- failures


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def http_env(monkeypatch):
    """The tracker sets MLflow's HTTP retry variables when unset; undo that after the test."""
    for name in HTTP_ENV:
        monkeypatch.delenv(name, raising=False)


@mlflow_needed
def test_dead_server_warns_once_and_training_goes_on(tmp_path, capsys, http_env):
    url = f"http://127.0.0.1:{free_port()}"
    t = MlflowTracker(url)
    t0 = time.perf_counter()
    assert t.start(**start_kwargs(tmp_path / "r")) is None
    t.log_metrics({"a": 1.0}, 0)
    t.log_artifact(tmp_path)
    t.finish()
    t.finish()
    assert time.perf_counter() - t0 < 10
    assert not t.active and t.ui_hint() is None
    err = capsys.readouterr().err
    assert err.count("shapeflow: warning:") == 1 and err.count("\n") == 1
    assert err.startswith(f"shapeflow: warning: MLflow tracking failed while starting the run ({url}): "
                          f"ConnectionError: no MLflow server answers at {url}")
    assert err.endswith("Training goes on (MLflow tracking is off for this run); "
                        "metrics are still written to the run folder.\n")
    assert [os.environ[k] for k in HTTP_ENV] == ["3", "1", "30"]


@mlflow_needed
def test_a_server_without_health_endpoint_is_still_tried(tmp_path, capsys, http_env):
    """/health answering 404 (a proxy in front of MLflow) does not count as 'no server':
    MLflow's own request decides (here it fails too, and the warning says why)."""
    import http.server
    import threading

    class NotFound(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_error(404)

        do_POST = do_GET

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotFound)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}"
        t = MlflowTracker(url)
        assert t.start(**start_kwargs(tmp_path / "r")) is None
        t.finish()
    finally:
        httpd.shutdown()
        httpd.server_close()
    err = capsys.readouterr().err
    assert err.startswith(f"shapeflow: warning: MLflow tracking failed while starting the run ({url}): ")
    assert "no MLflow server answers" not in err and err.count("\n") == 1


class FlakyClient:
    """Stands in for MlflowClient: log_batch fails while ``fail`` is true."""

    def __init__(self):
        self.fail = True
        self.calls: list[str] = []

    def log_batch(self, run_id, metrics=(), params=(), tags=()):
        self.calls.append(f"batch:{len(metrics)}")
        if self.fail:
            raise RuntimeError("503 Service Unavailable\nmore detail")

    def set_terminated(self, run_id, status=None):
        self.calls.append(f"end:{status}")


@mlflow_needed
def test_failures_mid_run_warn_once_and_three_in_a_row_turn_tracking_off(capsys):
    t = MlflowTracker("http://tracking.invalid")
    t.run_id, t.tracking_uri, t._client = "rid", "http://tracking.invalid", FlakyClient()

    def log(metrics, step):  # metrics are sent by a background thread: wait for each here
        t.log_metrics(metrics, step)
        t.flush()

    log({"a": 1.0}, 0)  # failure 1: the warning
    log({"a": 1.0}, 1)  # failure 2: silent
    t._client.fail = False
    log({"a": 1.0, "b": 2.0}, 2)  # a success resets the count
    t._client.fail = True
    for step in (3, 4, 5):  # three in a row: off
        log({"a": 1.0}, step)
    log({"a": 1.0}, 6)  # not sent
    t.finish()  # not sent either
    t.finish()
    assert t._client.calls == ["batch:1", "batch:1", "batch:2", "batch:1", "batch:1", "batch:1"]
    assert capsys.readouterr().err == (
        "shapeflow: warning: MLflow tracking failed while logging metrics of step 0 "
        "(http://tracking.invalid): RuntimeError: 503 Service Unavailable. Training goes on "
        "(it is turned off after 3 failures in a row); metrics are still written to the run folder.\n"
        "shapeflow: warning: MLflow tracking turned off for the rest of this run after 3 failures in a row.\n"
    )


@mlflow_needed
def test_a_missing_artifact_is_a_failure_not_an_exception(capsys):
    t = MlflowTracker()
    t.run_id, t.tracking_uri, t._client = "rid", "sqlite:///x.db", FlakyClient()
    t.log_artifact(Path("does/not/exist.png"))
    t.finish("FAILED")
    assert t._client.calls == ["end:FAILED"]
    assert capsys.readouterr().err.startswith(
        "shapeflow: warning: MLflow tracking failed while logging artifact exist.png (sqlite:///x.db): "
        "FileNotFoundError: no such file or folder: does/not/exist.png.")


# ----------------------------------------------------------------------------- real servers (slow)


class Server:
    """An `mlflow server`/`mlflow ui` subprocess in its own process group, stopped on exit."""

    def __init__(self, args: list[str], log: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self._fh = open(log, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", *args, "--host", "127.0.0.1", "--port", str(self.port)],
            stdout=self._fh, stderr=subprocess.STDOUT, start_new_session=True,
        )

    def wait_healthy(self, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"mlflow exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        pytest.fail(f"mlflow did not answer /health within {timeout} s:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=15)
        self._fh.close()


@pytest.fixture
def servers():
    started: list[Server] = []
    yield lambda args, log: started.append(Server(args, log)) or started[-1]
    for s in started:
        s.stop()


@pytest.mark.slow
@mlflow_needed
def test_real_mlflow_server(tmp_path, servers, http_env, capsys):
    from mlflow import MlflowClient

    server = servers(["server", "--backend-store-uri", f"sqlite:///{tmp_path / 'db.sqlite'}",
                      "--artifacts-destination", str(tmp_path / "art"), "--workers", "1"],
                     tmp_path / "server.log")
    server.wait_healthy()
    run_dir = tmp_path / "runs" / "r1"
    (run_dir / "plots").mkdir(parents=True)
    (run_dir / "spec.shape").write_text("spec")
    (run_dir / "plots" / "reward.png").write_bytes(b"png")

    t = MlflowTracker(server.url)
    rid = t.start(**start_kwargs(run_dir))
    assert rid is not None
    for step in range(5):
        t.log_metrics({"reward/c/mean": step / 4, "eval/pass@k": 1.0 - step / 4}, step)
    t.log_metrics({"nan": float("nan")}, 5)
    t.log_artifact(run_dir / "spec.shape")
    t.log_artifact(run_dir / "plots", "plots")
    t.finish()
    assert t.ui_hint() == f"MLflow run: {server.url}/#/experiments/{t.experiment_id}/runs/{rid}"

    client = MlflowClient(tracking_uri=server.url)
    run = client.get_run(rid)
    assert run.info.status == "FINISHED" and run.info.run_name == "r1"
    assert run.data.params["train.lr"] == "0.0001"
    assert history(client, rid, "reward/c/mean") == [(s, s / 4) for s in range(5)]
    assert history(client, rid, "eval/pass_at_k") == [(s, 1.0 - s / 4) for s in range(5)]
    nan = history(client, rid, "nan")
    assert len(nan) == 1 and nan[0][1] != nan[0][1]
    assert artifact_tree(client, rid) == ["plots/reward.png", "spec.shape"]
    assert sorted(p.relative_to(tmp_path / "art").as_posix() for p in (tmp_path / "art").rglob("*")
                  if p.is_file()) == [f"{t.experiment_id}/{rid}/artifacts/plots/reward.png",
                                      f"{t.experiment_id}/{rid}/artifacts/spec.shape"]

    # Resume against the server, then the server goes away mid-run: a warning, no exception.
    t2 = MlflowTracker(server.url)
    assert t2.start(**start_kwargs(run_dir), resume_id=rid) == rid
    assert client.get_run(rid).info.status == "RUNNING"
    capsys.readouterr()
    server.stop()
    t0 = time.perf_counter()
    t2.log_metrics({"reward/c/mean": 2.0}, 5)
    t2.finish("FAILED")
    assert time.perf_counter() - t0 < 60
    err = capsys.readouterr().err
    assert err.startswith(f"shapeflow: warning: MLflow tracking failed while logging metrics of step 5 "
                          f"({server.url}): ")
    assert err.count("shapeflow: warning:") == 1


@pytest.mark.slow
@mlflow_needed
def test_ui_command_serves_the_embedded_store(tmp_path, servers):
    """The printed `mlflow ui ...` line opens the runs of an --out folder, artifacts included."""
    from mlflow import MlflowClient

    run_dir = tmp_path / "out" / "r1"
    run_dir.mkdir(parents=True)
    (run_dir / "spec.shape").write_text("spec")
    t = MlflowTracker()
    rid = t.start(**start_kwargs(run_dir))
    t.log_metrics({"eval/accuracy": 0.5}, 7)
    t.log_artifact(run_dir / "spec.shape")
    t.finish()

    argv = shlex.split(ui_command(run_dir))
    assert argv[:2] == ["mlflow", "ui"]
    server = servers(argv[1:], tmp_path / "ui.log")
    server.wait_healthy()
    client = MlflowClient(tracking_uri=server.url)
    assert client.get_run(rid).info.status == "FINISHED"
    assert history(client, rid, "eval/accuracy") == [(7, 0.5)]
    with urllib.request.urlopen(f"{server.url}/api/2.0/mlflow/artifacts/list?run_id={rid}", timeout=10) as r:
        listing = json.load(r)
    assert [f["path"] for f in listing["files"]] == ["spec.shape"]
    with urllib.request.urlopen(f"{server.url}/get-artifact?path=spec.shape&run_uuid={rid}", timeout=10) as r:
        assert r.read() == b"spec"

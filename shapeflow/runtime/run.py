"""`shapeflow run`: a run folder, a tracker, checkpoints, and the training loop around them.

    <out>/
      spec.shape, resolved.json, graph.json   what ran
      metrics.jsonl                           one line per step, flat namespaced keys
      checkpoints/step-000050/state.pt        model, optimizer, scheduler, RNG, samplers, step
      plots/*.png, summary.json               written at the end (and on a crash)

A crash keeps the last checkpoint and every metrics line written so far; `--resume`
continues from the last checkpoint and rewrites nothing before it.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shapeflow.compiler.check import Program

CHECKPOINTS_KEPT = 2


@dataclass
class RunOptions:
    steps: int | None = None
    out: Path | None = None
    seed: int | None = None
    device: str = "auto"
    tracking: str | None = None
    tracking_uri: str | None = None
    resume: bool = False
    record: Path | None = None
    eval_size: int | None = None
    progress: bool = True
    extra_tags: dict[str, str] = field(default_factory=dict)


# --- checkpoints ------------------------------------------------------------------------------


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.name.startswith("step-") and (p / "state.pt").is_file())


def save_checkpoint(run_dir: Path, step: int, state: dict[str, Any]) -> Path:
    """Write atomically (a folder renamed into place) and keep the newest few."""
    import torch

    root = run_dir / "checkpoints"
    final = root / f"step-{step:06d}"
    staging = root / f".step-{step:06d}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    torch.save(state, staging / "state.pt")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(staging, final)
    for old in checkpoint_dirs(run_dir)[:-CHECKPOINTS_KEPT]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def find_checkpoint(path: Path) -> Path:
    """A checkpoint folder as given, or a run folder's newest checkpoint."""
    from shapeflow.runtime.trainer import RunError

    if (path / "state.pt").is_file():
        return path
    found = checkpoint_dirs(path)
    if not found:
        raise RunError(f"{path} is neither a checkpoint nor a run folder with checkpoints")
    return found[-1]


def load_checkpoint(path: Path) -> dict[str, Any]:
    import torch

    return torch.load(path / "state.pt", weights_only=False, map_location="cpu")


# --- metrics file ----------------------------------------------------------------------------


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a line cut by a crash: everything after it is lost anyway
    return rows


def truncate_metrics(path: Path, last_step: int) -> None:
    """Keep the lines of steps before ``last_step`` (a resume rewrites what follows)."""
    rows = [r for r in read_metrics(path) if r.get("step", -1) < last_step]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def _json_safe(metrics: dict[str, float]) -> dict[str, Any]:
    out = {}
    for k, v in metrics.items():
        out[k] = v if isinstance(v, (int, str)) or (isinstance(v, float) and v == v and abs(v) != float("inf")) else None
    return out


# --- the run ---------------------------------------------------------------------------------


def default_run_dir(name: str) -> Path:
    return Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"


def latest_run_dir(name: str) -> Path | None:
    runs = sorted(Path("runs").glob(f"{name}-*")) if Path("runs").is_dir() else []
    return runs[-1] if runs else None


class Progress:
    """One line on stderr: step, reward, accuracy, tokens/s, time left."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.enabled = total, enabled and sys.stderr.isatty()
        self.start = time.perf_counter()
        self.first_step: int | None = None

    def update(self, step: int, metrics: dict[str, float]) -> None:
        if self.first_step is None:
            self.first_step = step
        done = step + 1 - self.first_step
        elapsed = time.perf_counter() - self.start
        left = elapsed / max(done, 1) * (self.total - step - 1)
        reward = next((v for k, v in metrics.items() if k.startswith("reward/") and k.endswith("/mean")), None)
        acc = next((v for k, v in metrics.items() if k.startswith("verify/") and k.endswith("/mean")), None)
        parts = [f"step {step + 1}/{self.total}"]
        if reward is not None:
            parts.append(f"reward {reward:.3f}")
        if acc is not None:
            parts.append(f"acc {acc:.3f}")
        parts.append(f"{metrics.get('perf/tokens_per_second', 0):.0f} tok/s")
        parts.append(f"{int(left // 60)}:{int(left % 60):02d} left")
        line = "  ".join(parts)
        if self.enabled:
            print("\r" + line.ljust(100), end="", file=sys.stderr, flush=True)
        elif step == self.total - 1 or (step + 1) % max(1, self.total // 10) == 0:
            print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.enabled:
            print(file=sys.stderr)


def run(program: Program, spec_text: str, options: RunOptions) -> dict[str, Any]:
    """Train; return the summary. Raises RunError for problems the user can fix."""
    import torch

    from shapeflow.compiler.pipeline import build_plan
    from shapeflow.compiler.render import to_json
    from shapeflow.config import TrainConfig
    from shapeflow.runtime.trainer import RunError, Trainer
    from shapeflow.stdlib.registry import default_registry

    torch.set_num_threads(max(1, torch.get_num_threads()))
    # Under `accelerate launch` every process trains; only the first one writes the run folder,
    # tracks, evaluates and saves checkpoints.
    main = int(os.environ.get("RANK", "0")) == 0
    graph, plan = build_plan(program)
    config: TrainConfig = program.config["train"]
    if options.steps is not None:
        config = config.model_copy(update={"steps": options.steps})
    track = program.config["track"]
    if options.resume and options.out is None:
        options.out = latest_run_dir(program.name)
        if options.out is None:
            raise RunError(f"--resume: no earlier run of '{program.name}' under runs/; name it with --out")
    run_dir = options.out or default_run_dir(program.name)
    if main and run_dir.exists() and not options.resume and any(run_dir.iterdir()):
        raise RunError(f"{run_dir} already holds a run; continue it with --resume or choose another --out")
    metrics_path = run_dir / "metrics.jsonl"
    resolved = {
        "name": program.name, "header": program.header, "chain": program.chain, "params": program.params,
        "config": {k: v.model_dump() for k, v in program.config.items()}, "needs": sorted(program.needs),
    }
    resolved["config"]["train"] = config.model_dump()
    if main:
        _write_run_files(run_dir, spec_text, to_json(graph, plan), resolved)

    registry = default_registry()
    trainer = Trainer(program, plan, registry, config, device=options.device, seed=options.seed)
    trainer.setup()
    if not main:
        return _follow(trainer, run_dir, config, options)
    return _lead(trainer, program, run_dir, metrics_path, config, track, resolved, options)


def _announce_init(binding: str, prompts: int, samples: int) -> None:
    print(f"initialisation pass of '{binding}': the initial policy answers {prompts} training prompts "
          f"{samples} time{'s' if samples != 1 else ''} each", file=sys.stderr, flush=True)


def _write_run_files(run_dir: Path, spec_text: str, graph_json: str, resolved: dict[str, Any]) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "spec.shape").write_text(spec_text, encoding="utf-8")
    (run_dir / "graph.json").write_text(graph_json, encoding="utf-8")
    (run_dir / "resolved.json").write_text(json.dumps(resolved, indent=2, default=str), encoding="utf-8")


def _follow(trainer, run_dir: Path, config, options: RunOptions) -> dict[str, Any]:
    """A process other than the first: the same steps (its share of each batch), nothing written."""
    start_step = 0
    if options.resume:
        ckpts = checkpoint_dirs(run_dir)
        if ckpts:
            state = load_checkpoint(ckpts[-1])
            trainer.load_state_dict(state)
            start_step = state["step"]
    if start_step == 0:
        trainer.initialise_states()  # every process takes part (its share of the prompts)
    for step in range(start_step, config.steps):
        trainer.train_step(step)
        if trainer.fsdp is not None and ((step + 1) % config.checkpoint_every == 0 or step + 1 == config.steps):
            trainer.state_dict()  # under FSDP the first process's checkpoint gathers the shards from every process
    return {"run_dir": str(run_dir), "rank": trainer.rank, "last_step": trainer.step_index}


def _lead(trainer, program: Program, run_dir: Path, metrics_path: Path, config, track, resolved,
          options: RunOptions) -> dict[str, Any]:
    from shapeflow.runtime.plots import write_plots
    from shapeflow.runtime.tracking import flatten_params, make_tracker

    state_file = run_dir / "run.json"
    run_state = json.loads(state_file.read_text()) if state_file.is_file() else {}
    start_step = 0
    if options.resume:
        ckpts = checkpoint_dirs(run_dir)
        if ckpts:
            state = load_checkpoint(ckpts[-1])
            trainer.load_state_dict(state)
            start_step = state["step"]
        truncate_metrics(metrics_path, start_step)
    backend = options.tracking or track.backend
    tracker = make_tracker(backend, options.tracking_uri or track.uri)
    run_state["tracker_id"] = tracker.start(
        run_dir=run_dir,
        experiment=track.experiment,
        run_name=track.run_name or run_dir.name,
        params=flatten_params({"params": program.params, **resolved["config"]}),
        tags={"spec": program.name, **({"cite": program.header["cite"]} if "cite" in program.header else {}),
              **options.extra_tags},
        resume_id=run_state.get("tracker_id") if options.resume else None,
    )
    state_file.write_text(json.dumps(run_state))
    for name in ("spec.shape", "graph.json", "resolved.json"):
        tracker.log_artifact(run_dir / name)

    eval_size = options.eval_size or config.eval_size
    summary: dict[str, Any] = {"spec": program.name, "run_dir": str(run_dir), "steps": config.steps}
    status = "FAILED"
    progress = Progress(config.steps, options.progress)
    recorder = _Recorder(options.record, program, start_step) if options.record else None
    try:
        if start_step == 0:
            before = trainer.evaluate(size=eval_size)
            summary["eval_before"] = before
            init = trainer.initialise_states(announce=_announce_init)
            if init:
                summary["init"] = init
                seconds = sum(v for k, v in init.items() if k.endswith("/seconds"))
                print(f"initialisation pass done in {seconds:.1f} s", file=sys.stderr, flush=True)
            _append(metrics_path, {"step": -1, **before, **init})
        for step in range(start_step, config.steps):
            metrics = trainer.train_step(step)
            if recorder is not None:
                recorder.write(step, trainer.last_batch)
            if config.eval_every and (step + 1) % config.eval_every == 0 and step + 1 < config.steps:
                metrics.update(trainer.evaluate(size=eval_size))
            row = {"step": step, "time": time.time(), **_json_safe(metrics)}
            checkpoint = (step + 1) % config.checkpoint_every == 0 or step + 1 == config.steps
            _append(metrics_path, row, durable=checkpoint)
            if (step + 1) % track.log_every == 0:
                tracker.log_metrics({k: v for k, v in metrics.items() if isinstance(v, float)}, step)
            if checkpoint:
                save_checkpoint(run_dir, step + 1, trainer.state_dict())
            progress.update(step, metrics)
        after = trainer.evaluate(size=eval_size, k=4)
        summary["eval_after"] = after
        _append(metrics_path, {"step": config.steps, **after}, durable=True)
        tracker.log_metrics(after, config.steps)
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        progress.close()
        if recorder is not None:
            recorder.close()
        summary["status"] = status
        summary["last_step"] = trainer.step_index
        rows = [r for r in read_metrics(metrics_path) if r.get("step", -1) >= 0]
        summary["final_metrics"] = rows[-1] if rows else {}
        try:
            plots = write_plots(metrics_path, run_dir / "plots")
        except Exception as exc:  # plots are a convenience: never lose the run for them
            plots = []
            print(f"warning: could not draw plots: {exc}", file=sys.stderr)
        summary["plots"] = [str(p) for p in plots]
        summary["tracking"] = tracker.ui_hint()
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str), encoding="utf-8")
        for path in [run_dir / "summary.json", run_dir / "metrics.jsonl"]:
            tracker.log_artifact(path)
        if plots:
            tracker.log_artifact(run_dir / "plots", "plots")
        tracker.finish(status)
    return summary


def _append(path: Path, row: dict[str, Any], *, durable: bool = False) -> None:
    """One metrics line. Made durable (fsync) only with a checkpoint: lines after the last
    checkpoint are dropped by --resume anyway, and an fsync per step costs seconds on a busy disk."""
    with path.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(row) + "\n")
        handle.flush()
        if durable:
            os.fsync(handle.fileno())


class _Recorder:
    """`--record FILE`: each step's responses in the replay format, every computed need included."""

    def __init__(self, path: Path, program: Program, start_step: int):
        self.handle = path.open("a" if start_step else "w", encoding="utf-8")

    def write(self, step: int, batch) -> None:
        from shapeflow.runtime.replay import batch_records

        for rec in batch_records(batch, step):
            self.handle.write(json.dumps(rec) + "\n")
        self.handle.flush()

    def close(self) -> None:
        self.handle.close()

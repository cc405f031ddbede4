#!/usr/bin/env python3
"""Whole-process cost of `shapeflow check specs/` against importing its three dependencies.

    baseline:    python -c "import lark, networkx, pydantic"
    check:       shapeflow check specs/                               (unchanged specs: stored results)
    check cold:  SHAPEFLOW_CHECK_CACHE=off shapeflow check specs/     (every spec compiled and checked)

Both run as fresh processes with this interpreter (the project's virtual environment) and
the `shapeflow` console script installed next to it. After warm-up runs of each, the two
commands alternate (A B, B A, A B, ...) so drift on a shared machine hits both alike; each
run is timed with time.perf_counter around subprocess.run. The figure of merit is the ratio
of the medians; the target is <= 1.3. Both ratios are printed: `check` is what a pre-commit
hook or a CI job pays for specs it has seen (shapeflow/compiler/check_cache.py), `check cold`
what the first check of a changed spec costs.

    python bench/check_startup.py                 # 15 runs each, 2 warm-ups
    python bench/check_startup.py -n 31 --json    # more runs, machine-readable result
    python bench/check_startup.py --max-ratio 1.3 # exit 1 when the ratio is above the target

See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGET = 1.3


def shapeflow_command() -> list[str]:
    """The console script beside this interpreter, else `python -m shapeflow.cli`."""
    bindir = Path(sys.executable).parent
    for name in ("shapeflow", "shapeflow.exe"):
        script = bindir / name
        if script.is_file() and os.access(script, os.X_OK):
            return [str(script)]
    return [sys.executable, "-m", "shapeflow.cli"]


def time_once(cmd: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    elapsed = time.perf_counter() - start
    if proc.returncode not in (0,):
        sys.exit(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout.decode()}{proc.stderr.decode()}")
    return elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", "--runs", type=int, default=15, help="timed runs of each command (default 15)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs of each command first (default 2)")
    parser.add_argument("--specs", default="specs", help="what `shapeflow check` is given (default specs/)")
    parser.add_argument("--max-ratio", type=float, default=None,
                        help=f"exit 1 when median(check) / median(baseline) exceeds this (the target is {TARGET})")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args(argv)

    env = dict(os.environ)
    env.pop("PYTHONPROFILEIMPORTTIME", None)
    # The warm-ups must leave .pyc files behind: with PYTHONDONTWRITEBYTECODE=1 inherited (some
    # sandboxes and CI images set it), every module edited since its .pyc was written is compiled
    # from source in every timed run (tens of ms on `check` after an edit).
    env["PYTHONDONTWRITEBYTECODE"] = "0"
    cold = {**env, "SHAPEFLOW_CHECK_CACHE": "off"}
    commands = {
        "baseline": ([sys.executable, "-c", "import lark, networkx, pydantic"], env),
        "check": (shapeflow_command() + ["check", args.specs], env),
        "check_cold": (shapeflow_command() + ["check", args.specs], cold),
    }
    for _ in range(args.warmup):
        for cmd, cmd_env in commands.values():
            time_once(cmd, cmd_env)
    times: dict[str, list[float]] = {k: [] for k in commands}
    order = list(commands)
    for i in range(args.runs):
        for key in order if i % 2 == 0 else reversed(order):
            times[key].append(time_once(*commands[key]))

    stats = {
        k: {"median_ms": statistics.median(v) * 1000, "min_ms": min(v) * 1000, "max_ms": max(v) * 1000,
            "runs": len(v)}
        for k, v in times.items()
    }
    ratio = stats["check"]["median_ms"] / stats["baseline"]["median_ms"]
    ratio_cold = stats["check_cold"]["median_ms"] / stats["baseline"]["median_ms"]
    result = {
        "commands": {k: ("SHAPEFLOW_CHECK_CACHE=off " if k == "check_cold" else "") + " ".join(v[0])
                     for k, v in commands.items()},
        "stats": stats,
        "ratio": ratio,
        "ratio_cold": ratio_cold,
        "target": TARGET,
        "python": platform.python_version(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"python {result['python']} on {result['machine']}; {args.runs} runs each after {args.warmup} warm-ups")
        labels = {"baseline": "python -c \"import lark, networkx, pydantic\"", "check": f"shapeflow check {args.specs}",
                  "check_cold": "  ... with SHAPEFLOW_CHECK_CACHE=off"}
        for key in commands:
            s = stats[key]
            print(f"  {labels[key]:<45} median {s['median_ms']:7.1f} ms   min {s['min_ms']:7.1f}   max {s['max_ms']:7.1f}")
        for name, value in (("check", ratio), ("check cold", ratio_cold)):
            verdict = "meets" if value <= TARGET else "misses"
            print(f"  ratio {name} / baseline: {value:.2f}  ({verdict} the target <= {TARGET})")
    if args.max_ratio is not None and ratio > args.max_ratio:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Stages that reach past their micro-batch keep their meaning under several processes: PAR's
reference responses (rollouts.resample: each process samples a share of the groups, then all
gather) and STEER's minibatch statistics (the collecting pass combined over processes) give a
2-process run the rewards and gradients of a 1-process run on the same global batch."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parents[1]

SPEC = """\
spec par_steer_mini {
  title   = "PAR reference rewards + STEER weights over the minibatch (2-process check)"
  cite    = "test"
  extends = "par.shape"
}

objective loss = losses.steer(adv, groups, stats_scope = "mini", eps_low = 0.2, eps_high = 0.28)
"""


def _rows(run: Path) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["step"] >= 0
            and "reward/r/mean" in r]


@pytest.mark.slow
def test_resample_and_minibatch_statistics_match_one_process(tmp_path):
    for name in ("grpo.shape", "par.shape"):
        shutil.copy(ROOT / "specs" / name, tmp_path / name)
    spec = tmp_path / "par_steer_mini.shape"
    spec.write_text(SPEC)
    args = ["run", str(spec), "--steps", "2", "--device", "cpu", "--tracking", "jsonl", "--eval-size", "8",
            "--set", "train.prompts_per_step=4", "--set", "train.checkpoint_every=1"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    exe = Path(sys.executable).with_name("shapeflow")
    one = subprocess.run([str(exe), *args, "--out", str(tmp_path / "one"), "--set", "train.grad_accum=1"],
                         env=env, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    launcher = [str(Path(sys.executable).with_name("accelerate")), "launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    two = subprocess.run([*launcher, str(exe), *args, "--out", str(tmp_path / "two")], env=env, capture_output=True,
                         text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = _rows(tmp_path / "one"), _rows(tmp_path / "two")
    assert [r["step"] for r in b] == [0, 1]
    for x, y in zip(a, b):
        # the reference responses are the same: sampled per group with the same seeds
        assert x["verify/ref_correct/mean"] == y["verify/ref_correct/mean"]
        assert x["reward/r/mean"] == pytest.approx(y["reward/r/mean"], abs=1e-7)
    # ω's range over the whole minibatch: one process holding it in one micro-batch, two processes
    # holding half each (a per-process range would change the weights and the gradient)
    x, y = a[0], b[0]
    assert x["optim/grad_norm"] == pytest.approx(y["optim/grad_norm"], rel=1e-5)
    assert x["objective/loss"] == pytest.approx(y["objective/loss"], abs=1e-7)
    # after one Adam step the weights differ by up to ~2·lr where a gradient is ~0 (its sign is
    # noise), so the second step's gradient agrees less closely
    assert a[1]["optim/grad_norm"] == pytest.approx(b[1]["optim/grad_norm"], rel=1e-3)

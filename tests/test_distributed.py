"""Two processes (`accelerate launch`, gloo on the CPU) train exactly as one process does on
the same global batch: prompts are sharded, sampling is seeded per prompt, every process sees
the whole batch for rewards and advantages, and each micro-batch's loss is its share of the
minibatch's aggregate (global token and response counts)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["run", str(ROOT / "specs" / "grpo.shape"), "--steps", "2", "--device", "cpu", "--tracking", "jsonl",
        "--set", "train.prompts_per_step=4", "--set", "train.checkpoint_every=1", "--eval-size", "8"]


def _rows(run: Path) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["step"] >= 0
            and "reward/r/mean" in r]


ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
EXE = Path(sys.executable).with_name("shapeflow")
LAUNCH = [str(Path(sys.executable).with_name("accelerate")), "launch", "--num_processes", "2", "--num_machines", "1",
          "--mixed_precision", "no", "--dynamo_backend", "no"]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> Path:
    """The reference: one process, two micro-batches per minibatch (what two processes do together)."""
    out = tmp_path_factory.mktemp("one") / "run"
    one = subprocess.run([str(EXE), *ARGS, "--out", str(out), "--set", "train.grad_accum=2"],
                         env=ENV, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr
    return out


def _two_processes(launch: list[str], *args: str) -> subprocess.CompletedProcess:
    two = subprocess.run([*LAUNCH, *launch, str(EXE), *ARGS, *args], env=ENV, capture_output=True, text=True,
                         timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("run: ") == 1  # only the first process reports
    return two


def _same_training(one: Path, two: Path) -> None:
    a, b = _rows(one), _rows(two)
    assert [r["step"] for r in b] == [0, 1]  # one row per step: only the first process writes
    for x, y in zip(a, b):
        assert x["reward/r/mean"] == y["reward/r/mean"]  # the same responses (per-prompt sampling seeds)
        assert x["rollout/responses"] == y["rollout/responses"] == 32.0  # the whole batch, gathered
        assert x["advantage/adv/std"] == pytest.approx(y["advantage/adv/std"], rel=1e-6)
        # the gradient of the global token-mean: one process with 2 micro-batches, two with 1 each
        assert x["optim/grad_norm"] == pytest.approx(y["optim/grad_norm"], rel=1e-5)
        assert x["objective/loss"] == pytest.approx(y["objective/loss"], abs=1e-6)
    sa = torch.load(one / "checkpoints" / "step-000002" / "state.pt", weights_only=False)
    sb = torch.load(two / "checkpoints" / "step-000002" / "state.pt", weights_only=False)
    wa, wb = sa["model"], sb["model"]
    assert sorted(wa) == sorted(wb)
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 1e-4  # Adam amplifies ~1e-7 gradient noise
    oa, ob = sa["optimizer"], sb["optimizer"]  # the one-process format, whatever the launch
    assert [g["params"] for g in oa["param_groups"]] == [g["params"] for g in ob["param_groups"]]
    assert sorted(oa["state"]) == sorted(ob["state"])
    for i, s in oa["state"].items():
        assert float(s["step"]) == float(ob["state"][i]["step"]) == 2.0
        assert float((s["exp_avg"] - ob["state"][i]["exp_avg"]).abs().max()) < 1e-6


@pytest.mark.slow
def test_two_processes_match_one_process_on_the_same_global_batch(one_process, tmp_path):
    _two_processes(["--multi_gpu"], "--out", str(tmp_path / "two"))  # accelerate needs --multi_gpu for 2 CPU processes
    _same_training(one_process, tmp_path / "two")


@pytest.mark.slow
def test_fsdp_two_processes_match_one_process_and_resume(one_process, tmp_path):
    """FSDP2 on the CPU (the trainer shards the model: accelerate runs CPU processes as DDP):
    sampling and the behaviour pass use a full copy refreshed after every step, and a
    checkpoint gathers the shards. The run stops after one step and resumes for the second,
    so the gathered checkpoint is also loaded back into the shards."""
    fsdp = ["--use_fsdp", "--fsdp_version", "2"]
    _two_processes(fsdp, "--out", str(tmp_path / "two"), "--steps", "1")
    _two_processes(fsdp, "--out", str(tmp_path / "two"), "--steps", "2", "--resume")
    _same_training(one_process, tmp_path / "two")


def test_micro_batch_shares_add_up_to_the_minibatch_loss():
    """Inside aggregation_scope each micro-batch's aggregate is its share of the whole batch's."""
    from shapeflow.stdlib.functional import aggregate, aggregation_scope

    g = torch.Generator().manual_seed(0)
    loss = torch.randn(6, 5, generator=g)
    mask = (torch.rand(6, 5, generator=g) > 0.3).float()
    mask[2] = 0  # an empty response
    lengths = mask.sum(-1)
    scope = (float(lengths.sum()), float((lengths > 0).sum()), 6.0)
    for mode in ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"):
        whole = aggregate(loss, mask, mode)
        with aggregation_scope(*scope):
            parts = sum(aggregate(loss[r], mask[r], mode) for r in (slice(0, 1), slice(1, 4), slice(4, 6)))
        assert float(parts) == pytest.approx(float(whole), rel=1e-6), mode

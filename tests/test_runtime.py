"""The runtime on the builtin model: exact first ratio, record → replay, resume after SIGKILL, the CLI."""

from __future__ import annotations

import io
import math
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shapeflow.compiler.pipeline import build_plan, compile_spec
from shapeflow.runtime.replay import batch_records, replay
from shapeflow.runtime.trainer import Trainer
from shapeflow.stdlib.registry import default_registry

ROOT = Path(__file__).resolve().parents[1]
GRPO = ROOT / "specs" / "grpo.shape"
SMALL = ["train.prompts_per_step=4", "group_size=4", "train.checkpoint_every=2", "train.eval_size=16"]


def trainer_for(*sets: str) -> Trainer:
    result = compile_spec(GRPO, sets=[*SMALL, *sets])
    assert result.ok, result.diagnostics
    _, plan = build_plan(result.program)
    trainer = Trainer(result.program, plan, default_registry(), result.program.config["train"], device="cpu")
    trainer.setup()
    return trainer


def test_first_minibatch_ratio_is_exactly_one_and_later_ones_move():
    trainer = trainer_for("train.minibatches=2", "train.grad_accum=2", "train.ppo_epochs=2", "train.lr=1e-3")
    metrics = trainer.train_step(0)
    assert metrics["policy/first_ratio_deviation"] == 0.0
    assert metrics["policy/approx_kl"] > 0.0  # the second minibatch sees updated weights
    for key in ("verify/correct/mean", "reward/r/mean", "advantage/adv/std", "objective/loss", "node/loss#1",
                "policy/kl_ref/mean", "optim/lr", "optim/grad_norm", "rollout/response_length/mean",
                "policy/entropy/mean"):
        assert key in metrics, key


def test_record_then_replay_reproduces_the_runs_advantages(tmp_path):
    trainer = trainer_for()
    records = []
    for step in range(2):
        trainer.train_step(step)
        records.append((trainer.last_values, batch_records(trainer.last_batch, step)))
    path = tmp_path / "rollouts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for _, recs in records for r in recs))
    out = io.StringIO()
    replay(trainer.program, path, out)
    lines = [json.loads(x) for x in out.getvalue().splitlines()]
    expected = [(v["adv"][i].item(), v["correct"][i].item()) for v, recs in records for i in range(len(recs))]
    assert [(line["signals"]["adv"], line["signals"]["correct"]) for line in lines] == expected
    lengths = [r["length"] for _, recs in records for r in recs]
    assert [len(line["advantages"]) for line in lines] == lengths


def test_nonfinite_signals_are_zeroed_and_counted():
    trainer = trainer_for()
    import torch

    node = trainer.program.nodes["correct"]
    fixed = trainer._finite_signals(node, torch.tensor([1.0, float("nan"), float("inf"), 0.0]))
    assert fixed.tolist() == [1.0, 0.0, 0.0, 0.0]
    assert trainer.nonfinite == {"correct": 2}


def shapeflow(*argv: str, cwd: Path, **kw) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "shapeflow.cli", *argv], cwd=cwd, env=env, capture_output=True,
                          text=True, **kw)


def _run_args(out: Path, steps: int) -> list[str]:
    args = ["run", str(GRPO), "--steps", str(steps), "--out", str(out), "--tracking", "none", "--device", "cpu"]
    for s in SMALL:
        args += ["--set", s]
    return args


def _weights(run_dir: Path):
    import torch

    final = sorted((run_dir / "checkpoints").iterdir())[-1]
    return torch.load(final / "state.pt", weights_only=False)["model"]


@pytest.mark.slow
def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path):
    steps = 6
    straight = tmp_path / "straight"
    done = shapeflow(*_run_args(straight, steps), cwd=tmp_path)
    assert done.returncode == 0, done.stderr

    killed = tmp_path / "killed"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.Popen([sys.executable, "-m", "shapeflow.cli", *_run_args(killed, steps)], cwd=tmp_path,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    metrics = killed / "metrics.jsonl"
    while time.time() < deadline:  # wait until step 3 is written (checkpoint at 2 exists), then kill
        if metrics.is_file() and sum(1 for line in metrics.read_text().splitlines()
                                     if json.loads(line)["step"] >= 0) >= 4:
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (killed / "checkpoints").is_dir()
    resumed = shapeflow(*_run_args(killed, steps), "--resume", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr

    a, b = _weights(straight), _weights(killed)
    assert a.keys() == b.keys()
    assert all((a[k] == b[k]).all() for k in a), "weights differ after resume"
    steps_seen = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert [s for s in steps_seen if 0 <= s < steps] == list(range(steps))  # no duplicate, no gap
    straight_rows = [json.loads(x) for x in (straight / "metrics.jsonl").read_text().splitlines()]
    killed_rows = [json.loads(x) for x in metrics.read_text().splitlines()]
    key = "objective/loss"
    assert [r.get(key) for r in straight_rows if r["step"] >= 0] == [r.get(key) for r in killed_rows if r["step"] >= 0]


@pytest.mark.slow
def test_run_folder_eval_and_bad_model_path(tmp_path):
    out = tmp_path / "run"
    done = shapeflow(*_run_args(out, 3), "--record", str(tmp_path / "rec.jsonl"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    for name in ("spec.shape", "graph.json", "resolved.json", "metrics.jsonl", "summary.json"):
        assert (out / name).is_file(), name
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [-1, 0, 1, 2, 3]
    assert "eval/accuracy" in rows[0] and "eval/pass@4" in rows[-1]
    assert {p.name for p in (out / "plots").iterdir()} >= {"reward.png", "accuracy.png", "kl.png", "entropy.png",
                                                          "response_length.png", "advantages.png"}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "FINISHED" and summary["last_step"] == 3
    assert "held-out greedy accuracy:" in done.stdout
    recorded = [json.loads(x) for x in (tmp_path / "rec.jsonl").read_text().splitlines()]
    assert len(recorded) == 3 * 16 and {r["step"] for r in recorded} == {0, 1, 2}
    assert set(recorded[0]) >= {"prompt_id", "response", "answer", "logprobs", "ref_logprobs", "length"}

    evaluated = shapeflow("eval", str(GRPO), "--checkpoint", str(out), "--k", "2", "--size", "16", cwd=tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr
    result = json.loads(evaluated.stdout)
    assert set(result) == {"checkpoint", "eval/accuracy", "eval/pass@2"}

    bad = tmp_path / "bad.shape"
    bad.write_text(GRPO.read_text().replace('"builtin:arith-tiny"', '"no/such/model"'))
    failed = shapeflow("run", str(bad), "--steps", "1", "--out", str(tmp_path / "bad"), "--tracking", "none",
                       cwd=tmp_path)
    assert failed.returncode == 1
    assert "bad.shape:11:21: 'models.causal_lm' (binding 'policy') failed: model path 'no/such/model' is not " \
           "a folder" in failed.stderr
    assert "Traceback" not in failed.stderr


@pytest.mark.slow
def test_a_training_step_on_smollm2_through_the_runtime():
    """The real pretrained builtin, chat-formatted prompts, one GRPO step with a reference model."""
    result = compile_spec(ROOT / "specs" / "smollm2_arith.shape",
                          sets=["train.prompts_per_step=2", "group_size=2", "groups.max_new_tokens=8"])
    assert result.ok, result.diagnostics
    _, plan = build_plan(result.program)
    trainer = Trainer(result.program, plan, default_registry(), result.program.config["train"], device="cpu")
    trainer.setup()
    before = {k: v.detach().clone() for k, v in trainer.policy.model.named_parameters() if "layers.0.mlp" in k}
    metrics = trainer.train_step(0)
    assert trainer.last_batch.size == 4
    assert trainer.last_batch.prompts[0].endswith("=")  # the task prompt; the chat template wraps it
    assert metrics["policy/first_ratio_deviation"] == 0.0
    assert all(math.isfinite(v) for v in metrics.values())
    after = dict(trainer.policy.model.named_parameters())
    changed = [k for k in before if not (before[k] == after[k].detach()).all()]
    # with all-equal rewards the advantage is 0 and only the KL term moves the weights (it is 0 on step 0)
    if metrics["advantage/adv/frac_zero"] < 1.0:
        assert changed


def test_reusing_the_update_forward_as_the_behaviour_pass_changes_nothing():
    """On-policy single-update runs skip the separate behaviour forward; the weights after two
    steps are bit-identical to the run that computes it separately."""
    fast, slow = trainer_for(), trainer_for()
    assert fast.behaviour_from_update
    slow.behaviour_from_update = False
    for step in range(2):
        a, b = fast.train_step(step), slow.train_step(step)
        assert a["objective/loss"] == b["objective/loss"]
        assert (fast.last_batch.logprobs == slow.last_batch.logprobs).all()
    wa, wb = fast.policy.model.state_dict(), slow.policy.model.state_dict()
    assert all((wa[k] == wb[k]).all() for k in wa)


def test_shared_prompt_forward_equals_a_full_forward():
    """Each prompt runs once per group with its cache repeated; the log-probs, entropies and
    hidden states are those of running every prompt + response in full."""
    import torch

    from shapeflow.runtime.engine import token_logprobs

    trainer = trainer_for()
    trainer.train_step(0)
    b, model = trainer.last_batch, trainer.policy.model
    with torch.no_grad():
        shared = token_logprobs(model, b.prompt_tokens, b.prompt_mask, b.response_ids, b.mask,
                                temperature=0.7, entropy=True, hidden=True)
        ids = torch.cat([b.prompt_tokens, b.response_ids], 1)
        attention = torch.cat([b.prompt_mask, b.mask.long()], 1)
        out = model(input_ids=ids, attention_mask=attention, position_ids=(attention.cumsum(-1) - 1).clamp(min=0),
                    output_hidden_states=True)
        P = b.prompt_tokens.shape[1]
        logits = out.logits[:, P - 1 : -1].float() / 0.7
        full = (logits.gather(-1, b.response_ids[..., None]).squeeze(-1) - logits.logsumexp(-1)) * b.mask
        entropy = (logits.logsumexp(-1) - (logits.softmax(-1) * logits).sum(-1)) * b.mask
        hidden = out.hidden_states[-1][:, P:] * b.mask[..., None]
    assert torch.allclose(shared.logprobs, full, atol=1e-5, rtol=0)
    assert torch.allclose(shared.entropy, entropy, atol=1e-5, rtol=0)
    assert torch.allclose(shared.hidden, hidden, atol=1e-5, rtol=0)


def test_full_logit_reductions_equal_a_full_forward_and_are_computed_only_when_asked():
    """sampled_logit (raw), self_certainty (logsumexp − mean of z/τ, every position) and
    logprobs@T (log-probs at another temperature) from the behaviour pass."""
    import torch

    from shapeflow.runtime.engine import token_logprobs, token_needs

    assert token_needs({"logprobs", "entropy", "sampled_logit", "logprobs@1.2"}) == {"sampled_logit", "logprobs@1.2"}
    trainer = trainer_for()
    trainer.train_step(0)
    assert not trainer.token_extras and "sampled_logit" not in trainer.last_batch.extra  # not asked: not computed
    b, model = trainer.last_batch, trainer.policy.model
    with torch.no_grad():
        got = token_logprobs(model, b.prompt_tokens, b.prompt_mask, b.response_ids, b.mask, temperature=0.7,
                             extras=frozenset({"sampled_logit", "self_certainty", "logprobs@1.2", "sum_pi_squared"}))
        ids = torch.cat([b.prompt_tokens, b.response_ids], 1)
        attention = torch.cat([b.prompt_mask, b.mask.long()], 1)
        out = model(input_ids=ids, attention_mask=attention, position_ids=(attention.cumsum(-1) - 1).clamp(min=0))
        P = b.prompt_tokens.shape[1]
        raw = out.logits[:, P - 1 : -1].float()
        sampled = raw.gather(-1, b.response_ids[..., None]).squeeze(-1)
        certainty = (raw / 0.7).logsumexp(-1) - (raw / 0.7).mean(-1)
        at = (raw / 1.2).gather(-1, b.response_ids[..., None]).squeeze(-1) - (raw / 1.2).logsumexp(-1)
        pi2 = ((raw / 0.7).softmax(-1) ** 2).sum(-1)
    valid = b.mask > 0
    assert torch.allclose(got.extra["sum_pi_squared"], pi2 * b.mask, atol=1e-5, rtol=0)
    assert torch.allclose(got.extra["sampled_logit"], sampled * b.mask, atol=1e-5, rtol=0)
    assert torch.allclose(got.extra["logprobs@1.2"], at * b.mask, atol=1e-5, rtol=0)
    assert torch.allclose(got.extra["self_certainty"][valid], certainty[valid], atol=1e-4, rtol=0)
    assert (got.extra["self_certainty"][~valid] != 0).all()  # padding positions keep their values (UCAS's code)


@pytest.mark.parametrize("dtype", ["float64", "float32", "bfloat16"])
def test_chunked_sampled_logprob_matches_autograd_on_the_plain_expression(monkeypatch, dtype):
    """The log-probs (and their gradient) come from logits reduced a few rows at a time, the
    softmax recomputed in the backward: the same values and gradients as autograd on
    log_softmax(z/τ)[y], whatever the chunking."""
    import torch

    from shapeflow.runtime import engine

    dtype = getattr(torch, dtype)
    g = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(5, 4, 11, generator=g)).to(dtype)
    ids = torch.randint(0, 11, (5, 4), generator=g)
    weights = torch.randn(5, 4, generator=g)
    a = logits.clone().requires_grad_(True)
    z = a.float() / 0.7
    want = z.gather(-1, ids[..., None]).squeeze(-1) - z.logsumexp(-1)
    (want * weights).sum().backward()
    for elements in (1, 22, 44, 88, 10**6):  # one position, 2 positions of a row, 1 row of 4 x 11, 2 rows, all
        monkeypatch.setattr(engine, "CHUNK_ELEMENTS", elements)
        b = logits.clone().requires_grad_(True)
        got, logz = engine._SampledLogprob.apply(b, ids, 0.7)
        (got * weights).sum().backward()
        tol = 1e-12 if dtype == torch.float64 else 1e-5
        assert torch.allclose(got.double(), want.double(), atol=tol, rtol=0)
        assert torch.allclose(logz.double(), z.logsumexp(-1).double(), atol=tol, rtol=0)
        assert b.grad.dtype == dtype
        assert torch.allclose(b.grad.double(), a.grad.double(), atol=tol if dtype != torch.bfloat16 else 1e-2, rtol=0)
        assert not logz.requires_grad


def test_reductions_do_not_depend_on_the_chunking(monkeypatch):
    """Entropy and the full-logit needs are the same reduced row by row as all at once."""
    import torch

    from shapeflow.runtime import engine

    trainer = trainer_for()
    trainer.train_step(0)
    b, model = trainer.last_batch, trainer.policy.model
    extras = frozenset({"sampled_logit", "self_certainty", "logprobs@1.2", "sum_pi_squared"})

    def run():
        with torch.no_grad():
            return engine.token_logprobs(model, b.prompt_tokens, b.prompt_mask, b.response_ids, b.mask,
                                         temperature=0.7, entropy=True, extras=extras)

    whole = run()
    monkeypatch.setattr(engine, "CHUNK_ELEMENTS", 1)
    rows = run()
    assert torch.equal(rows.logprobs, whole.logprobs) and torch.equal(rows.entropy, whole.entropy)
    assert rows.extra.keys() == whole.extra.keys() == extras
    for name in extras:
        assert torch.equal(rows.extra[name], whole.extra[name]), name


@pytest.mark.slow
def test_the_demo_raises_held_out_accuracy_by_twenty_points(tmp_path):
    """`make demo`'s run: specs/grpo.shape as it stands, on the builtin model."""
    done = shapeflow("run", str(GRPO), "--out", str(tmp_path / "demo"), "--tracking", "none", cwd=tmp_path,
                     timeout=600)
    assert done.returncode == 0, done.stderr
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    before, after = summary["eval_before"]["eval/accuracy"], summary["eval_after"]["eval/accuracy"]
    assert after - before >= 0.20 or after >= 0.90, (before, after)


def test_an_entropy_bonus_gets_the_current_policys_entropy_with_its_gradient(tmp_path):
    spec = tmp_path / "ent.shape"
    spec.write_text('spec ent { cite = "verl entropy_coeff (catalog B17)"  extends = "grpo.shape" }\n'
                    "objective loss = losses.ppo_clip(adv, groups) - 0.01 * losses.entropy_bonus(groups)\n")
    result = compile_spec(spec, search=[ROOT / "specs"], sets=SMALL)
    assert result.ok, result.diagnostics
    assert "policy_entropy" in result.program.needs
    _, plan = build_plan(result.program)
    trainer = Trainer(result.program, plan, default_registry(), result.program.config["train"], device="cpu")
    trainer.setup()
    metrics = trainer.train_step(0)
    entropy_term = next(v for k, v in metrics.items() if k.startswith("node/loss#") and v > 0.1)
    assert entropy_term == pytest.approx(metrics["policy/entropy/mean"], rel=1e-5)


def test_remax_baseline_is_the_reward_of_a_greedy_response():
    result = compile_spec(ROOT / "specs" / "remax.shape", sets=SMALL)
    assert result.ok, result.diagnostics
    _, plan = build_plan(result.program)
    trainer = Trainer(result.program, plan, default_registry(), result.program.config["train"], device="cpu")
    trainer.setup()
    _, batch = trainer.rollout_phase(0)  # no update yet: the policy is the one that made the baseline
    baseline = batch.extra["greedy_baseline"]
    firsts = {}
    for i, e in enumerate(batch.examples):
        firsts.setdefault(e.id, (i, e))
    greedy = trainer.engine("generate", trainer.policy).generate(
        [e for _, e in firsts.values()], n=1, max_new_tokens=5, temperature=1.0, top_p=1.0, top_k=0, greedy=True)
    expected = [float(r.strip() == e.answer) for r, (_, e) in zip(greedy.responses, firsts.values())]
    assert [float(baseline[i]) for i, _ in firsts.values()] == expected
    for i, e in enumerate(batch.examples):  # every response of a prompt shares its prompt's baseline
        assert float(baseline[i]) == float(baseline[firsts[e.id][0]])

"""State kept across steps: the StageState contract, the adaptive KL controller, checkpoints,
resume, metrics and replay carrying it."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from conftest import call, make_batch  # noqa: E402

from shapeflow.cli import main  # noqa: E402
from shapeflow.compiler.pipeline import build_plan, compile_spec  # noqa: E402
from shapeflow.runtime.replay import ReplayError, replay  # noqa: E402
from shapeflow.runtime.run import checkpoint_dirs, load_checkpoint  # noqa: E402
from shapeflow.runtime.trainer import Trainer  # noqa: E402
from shapeflow.stdlib.registry import RegistrationError, Registry, StageParams, default_registry  # noqa: E402
from shapeflow.stdlib.state import StageState  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

ADAPTIVE_SPEC = """\
spec grpo_adaptive_kl {
  title   = "GRPO with an adaptive KL penalty in the reward"
  extends = "grpo.shape"
}

reward kl_pen = rewards.adaptive_kl_penalty(groups, init_coef = 0.2, target = 0.001, horizon = 1000)
reward r      = signals.at_last_token(correct, groups) - kl_pen
advantage adv = reinforce_pp(r, groups)
train { prompts_per_step = 4  checkpoint_every = 2  eval_size = 8 }
track { backend = "jsonl" }
"""


def write_spec(folder: Path) -> Path:
    (folder / "grpo.shape").write_text((ROOT / "specs" / "grpo.shape").read_text())
    spec = folder / "adaptive.shape"
    spec.write_text(ADAPTIVE_SPEC)
    return spec


# --------------------------------------------------------------------------------------------
# StageState
# --------------------------------------------------------------------------------------------


def test_state_keys_must_be_declared_and_copies_are_independent():
    st = StageState({"coef": "β", "tracker": "per-prompt values"}, step=3, owner="'x' (binding 'b')")
    st["coef"] = 0.5
    st.setdefault("tracker", torch.tensor([1.0, 2.0, 3.0]))
    with pytest.raises(KeyError, match="'x' \\(binding 'b'\\) keeps no state 'other' \\(declared: coef, tracker\\)"):
        st["other"] = 1
    clone = st.copy()
    clone["coef"] = 9.0
    clone["tracker"][0] = 100.0
    assert st["coef"] == 0.5 and st["tracker"].tolist() == [1.0, 2.0, 3.0] and clone.step == 3
    assert st.metrics() == {"coef": 0.5, "tracker/mean": 2.0, "tracker/size": 3.0}
    restored = StageState({"coef": "β", "tracker": "t"})
    restored.load_state_dict(st.state_dict())
    assert restored["coef"] == 0.5 and restored["tracker"].tolist() == [1.0, 2.0, 3.0]
    with pytest.raises(ValueError, match="holds keys it does not declare: old"):
        restored.load_state_dict({"data": {"old": 1}})


def test_registry_checks_the_state_declaration():
    class P(StageParams):
        k: float = 1.0

    reg = Registry()

    def undeclared(groups, *, k, state):
        return groups

    with pytest.raises(RegistrationError, match="keyword-only in the function but not declared: \\['state'\\]"):
        reg.stage("a.undeclared", kind="reward", inputs={"groups": "Rollouts"}, output="Rollouts",
                  params=P)(undeclared)

    def declared(groups, *, k, state):
        return groups

    reg.stage("a.declared", kind="reward", inputs={"groups": "Rollouts"}, output="Rollouts", params=P,
              state={"ema": "the running mean"})(declared)
    assert reg["a.declared"].stateful and dict(reg["a.declared"].state) == {"ema": "the running mean"}

    def bad_doc(groups, *, k, state):
        return groups

    with pytest.raises(RegistrationError, match="state must map identifier keys to a line of documentation"):
        reg.stage("a.bad", kind="reward", inputs={"groups": "Rollouts"}, output="Rollouts", params=P,
                  state={"not an identifier": "x"})(bad_doc)


def test_stage_page_lists_the_state(capsys):
    assert main(["stages", "rewards.adaptive_kl_penalty"]) == 0
    out = capsys.readouterr().out
    assert "State kept across steps (saved in checkpoints, logged as state/<binding>/<key>):\n  coef\n" \
           "      β for the next step (starts at init_coef)\n  kl\n" in out


# --------------------------------------------------------------------------------------------
# the adaptive KL controller (verl AdaptiveKLController, Ziegler et al.)
# --------------------------------------------------------------------------------------------


def kl_batch(delta_rows):
    """Two responses whose k1 KL per token is ``delta_rows`` (behaviour − reference)."""
    mask = [[1.0] * len(r) for r in delta_rows]
    logprobs = [[-1.0] * len(r) for r in delta_rows]
    ref = [[-1.0 - d for d in r] for r in delta_rows]
    return make_batch([0, 0], mask, logprobs=logprobs, ref_logprobs=ref)


def test_adaptive_kl_worked_example_over_two_steps():
    state = StageState({"coef": "", "kl": ""})
    params = dict(init_coef=0.2, target=1.0, horizon=100.0)
    first = call("rewards.adaptive_kl_penalty", kl_batch([[1.5, 1.5], [1.0, 2.0]]), state=state, **params)
    assert torch.allclose(first, torch.tensor([[0.3, 0.3], [0.2, 0.4]], dtype=first.dtype))  # β = 0.2
    assert state["kl"] == pytest.approx(1.5) and state["coef"] == pytest.approx(0.2008, rel=1e-12)
    second = call("rewards.adaptive_kl_penalty", kl_batch([[0.5, 0.5], [0.5, 0.5]]), state=state, **params)
    assert torch.allclose(second, torch.full((2, 2), 0.2008 * 0.5, dtype=second.dtype))
    assert state["coef"] == pytest.approx(0.1999968, rel=1e-12)
    # the error is clipped to ±0.2: a KL 100x the target moves β as much as 1.2x
    far = StageState({"coef": "", "kl": ""})
    call("rewards.adaptive_kl_penalty", kl_batch([[100.0], [100.0]]), state=far, **params)
    assert far["coef"] == pytest.approx(0.2008, rel=1e-12)


def test_adaptive_kl_averages_rows_as_verl_masked_mean():
    # row 0: tokens [1, 3] -> 2; row 1: an empty response counts as 0 (verl masked_mean with eps)
    batch = make_batch([0, 0], [[1.0, 1.0], [0.0, 0.0]], logprobs=[[-1.0, -1.0], [-1.0, -1.0]],
                       ref_logprobs=[[-2.0, -4.0], [-1.0, -1.0]])
    state = StageState({"coef": "", "kl": ""})
    out = call("rewards.adaptive_kl_penalty", batch, state=state, init_coef=0.5, target=1.0, horizon=2.0)
    assert out[1].abs().sum() == 0
    assert state["kl"] == pytest.approx(1.0, rel=1e-6)  # (2 + 0) / 2
    assert state["coef"] == pytest.approx(0.5, rel=1e-6)  # e = 0: unchanged


# --------------------------------------------------------------------------------------------
# the runtime: metrics, checkpoints, resume, replay
# --------------------------------------------------------------------------------------------


def _run(capsys, out: Path, steps: int, *extra: str) -> list[dict]:
    code = main(["run", str(out.parent / "adaptive.shape"), "--steps", str(steps), "--out", str(out),
                 "--device", "cpu", "--tracking", "jsonl", *extra])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_state_is_logged_checkpointed_and_resumed_exactly(tmp_path, capsys):
    write_spec(tmp_path)
    straight = _run(capsys, tmp_path / "straight", 4)
    coefs = [r["state/kl_pen/coef"] for r in straight if r["step"] >= 0 and "state/kl_pen/coef" in r]
    assert len(coefs) == 4 and len(set(coefs)) == 4
    # step 0: the policy is the reference, KL ≈ 0 is far under the target: e = −0.2, B = 4 x 8 responses
    assert coefs[0] == pytest.approx(0.2 * (1 - 0.2 * 32 / 1000), rel=1e-12)

    # a run stopped after 2 steps, then resumed to 4, ends with the same state and the same metrics
    _run(capsys, tmp_path / "resumed", 2)
    ckpt = checkpoint_dirs(tmp_path / "resumed")[-1]
    saved = load_checkpoint(ckpt)["stage_state"]
    assert saved["kl_pen"]["data"]["coef"] == coefs[1]
    resumed = _run(capsys, tmp_path / "resumed", 4, "--resume")
    again = [r["state/kl_pen/coef"] for r in resumed if r["step"] >= 0 and "state/kl_pen/coef" in r]
    assert again == coefs


def test_replay_carries_state_across_steps_and_starts_from_a_checkpoint(tmp_path, capsys):
    spec = write_spec(tmp_path)
    record = tmp_path / "rollouts.jsonl"
    rows = _run(capsys, tmp_path / "run", 4, "--record", str(record))
    coef = {r["step"]: r["state/kl_pen/coef"] for r in rows if "state/kl_pen/coef" in r}
    program = compile_spec(spec).program

    # from a fresh state, replaying all four steps ends where the run ended
    out = io.StringIO()
    replay(program, record, out)
    lines = [json.loads(x) for x in out.getvalue().splitlines()]
    recs = [json.loads(x) for x in record.read_text().splitlines()]
    by_step = {}
    for rec, line in zip(recs, lines):
        by_step.setdefault(rec["step"], []).append((rec, line))
    for step, pairs in by_step.items():
        beta = 0.2 if step == 0 else coef[step - 1]
        for rec, line in pairs:
            kl = [a - b for a, b in zip(rec["logprobs"], rec["ref_logprobs"])]
            assert line["signals"]["kl_pen"] == pytest.approx([beta * k for k in kl], rel=1e-5, abs=1e-7)

    # steps 2 and 3 alone, from the checkpoint written after step 2 (step-000002 holds coef[1])
    later = tmp_path / "later.jsonl"
    later.write_text("".join(json.dumps(r) + "\n" for r in recs if r["step"] >= 2))
    out2 = io.StringIO()
    replay(program, later, out2, state=tmp_path / "run" / "checkpoints" / "step-000002")
    tail = [json.loads(x) for x in out2.getvalue().splitlines()]
    assert [x["signals"]["kl_pen"] for x in tail] == [line["signals"]["kl_pen"] for rec, line in zip(recs, lines)
                                                      if rec["step"] >= 2]
    with pytest.raises(ReplayError, match="--state: .* is neither a checkpoint nor a run folder"):
        replay(program, later, io.StringIO(), state=tmp_path / "nowhere")


def test_the_greedy_baseline_and_evaluation_do_not_advance_the_state(tmp_path):
    spec = write_spec(tmp_path)
    result = compile_spec(spec)
    _, plan = build_plan(result.program)
    trainer = Trainer(result.program, plan, default_registry(), result.program.config["train"], device="cpu")
    trainer.setup()
    trainer.train_step(0)
    before = trainer.stage_states["kl_pen"].state_dict()
    trainer.evaluate(size=8)
    assert trainer.stage_states["kl_pen"].state_dict() == before


def test_the_readme_example_of_a_stateful_stage_registers_and_runs():
    import re

    text = (ROOT / "README.md").read_text()
    block = next(b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "acme.ema_baseline" in b)
    from pydantic import Field

    reg = Registry()

    class EmaParams(StageParams):
        decay: float = Field(0.9, ge=0, le=1)

    namespace = {"stage": reg.stage, "EmaParams": EmaParams, "Field": Field}
    exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102 - the project's own README
    st = reg["acme.ema_baseline"]
    state = StageState(dict(st.state))
    first = st.fn(torch.tensor([1.0, 0.0]), decay=0.5, state=state)
    second = st.fn(torch.tensor([1.0, 1.0]), decay=0.5, state=state)
    assert first.tolist() == [1.0, 0.0] and second.tolist() == [0.75, 0.75] and state["ema"] == 0.625


def test_adaptive_kl_is_finite_zero_on_padding_and_order_free():
    g = torch.Generator().manual_seed(3)
    for _ in range(20):
        B, T = int(torch.randint(1, 6, (1,), generator=g)), int(torch.randint(1, 5, (1,), generator=g))
        lengths = torch.randint(0, T + 1, (B,), generator=g)
        mask = (torch.arange(T)[None, :] < lengths[:, None]).float()
        lp, ref = torch.randn(B, T, generator=g), torch.randn(B, T, generator=g)
        lp = torch.where(mask > 0, lp, torch.full_like(lp, float("nan")))  # padding may hold anything
        perm = torch.randperm(B, generator=g)
        a, b = StageState({"coef": "", "kl": ""}), StageState({"coef": "", "kl": ""})
        out = call("rewards.adaptive_kl_penalty", make_batch(list(range(B)), mask, logprobs=lp, ref_logprobs=ref),
                   state=a, init_coef=0.1, target=0.5, horizon=10.0)
        permuted = call("rewards.adaptive_kl_penalty",
                        make_batch(list(range(B)), mask[perm], logprobs=lp[perm], ref_logprobs=ref[perm]),
                        state=b, init_coef=0.1, target=0.5, horizon=10.0)
        assert torch.isfinite(out).all() and (out[mask == 0] == 0).all()
        assert torch.allclose(permuted, out[perm]) and a["coef"] == pytest.approx(b["coef"], rel=1e-6)

"""`shapeflow replay` on recorded rollouts: exact advantages, signals, and clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from shapeflow.cli import main

ROOT = Path(__file__).resolve().parents[1]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def replay(capsys, *argv: str) -> tuple[int, list[dict], str]:
    code = main(["replay", *argv])
    out, err = capsys.readouterr()
    return code, [json.loads(line) for line in out.splitlines()], err


# catalog B1: g0 rewards [1, 0, 0, 1], g2 [0.2, 0.9, 0, 0.5]; interleaved on purpose.
CATALOG_ROWS = [
    {"prompt_id": "g0", "scores": {"acc": 1.0}, "length": 3},
    {"prompt_id": "g2", "scores": {"acc": 0.2}, "length": 1},
    {"prompt_id": "g0", "scores": {"acc": 0.0}, "length": 2},
    {"prompt_id": "g2", "scores": {"acc": 0.9}, "length": 2},
    {"prompt_id": "g0", "scores": {"acc": 0.0}, "length": 1},
    {"prompt_id": "g2", "scores": {"acc": 0.0}, "length": 1},
    {"prompt_id": "g0", "scores": {"acc": 1.0}, "length": 4},
    {"prompt_id": "g2", "scores": {"acc": 0.5}, "length": 1},
    {"prompt_id": "g1", "scores": {"acc": 1.0}, "length": 2},
    {"prompt_id": "g1", "scores": {"acc": 1.0}, "length": 2},
]

RECORDED_SPEC = """
model     policy  = models.causal_lm("builtin:arith-tiny")
data      prompts = tasks.arithmetic()
rollout   groups  = rollouts.sample(policy, prompts, n = 4)
reward    r       = rewards.recorded(groups, key = "acc")
advantage adv     = grpo(r, groups)
objective loss    = losses.ppo_clip(adv, groups)
"""


def test_replay_reproduces_catalog_grpo_example(capsys, tmp_path):
    spec = tmp_path / "s.shape"
    spec.write_text(RECORDED_SPEC)
    rollouts = write_jsonl(tmp_path / "r.jsonl", CATALOG_ROWS)
    code, lines, err = replay(capsys, str(spec), "--rollouts", str(rollouts))
    assert code == 0, err
    assert [line["prompt_id"] for line in lines] == [r["prompt_id"] for r in CATALOG_ROWS]
    adv = [line["signals"]["adv"] for line in lines]
    expected = [0.866, -0.511, -0.866, 1.277, -0.866, -1.022, 0.866, 0.255, 0.0, 0.0]
    assert adv == pytest.approx(expected, abs=5e-4)
    # one float per response token, the sequence advantage on each
    assert [len(line["advantages"]) for line in lines] == [r["length"] for r in CATALOG_ROWS]
    assert lines[0]["advantages"] == [adv[0]] * 3
    assert lines[1]["signals"]["r"] == pytest.approx(0.2)


def test_replay_out_file_and_verifier_on_text(capsys, tmp_path):
    rows = [
        {"prompt_id": 7, "answer": "65", "response": "65", "logprobs": [-0.5, -0.1]},
        {"prompt_id": 7, "answer": "65", "response": "56", "logprobs": [-0.7, -0.2, -0.3]},
    ]
    rollouts = write_jsonl(tmp_path / "r.jsonl", rows)
    out = tmp_path / "out.jsonl"
    code = main(["replay", str(ROOT / "specs/grpo.shape"), "--rollouts", str(rollouts), "--out", str(out)])
    assert code == 0
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    a = 0.5 / ((0.5**0.5) + 1e-6)  # rewards [1, 0]: mean 0.5, sample std sqrt(0.5)
    assert lines[0]["advantages"] == pytest.approx([a, a], rel=1e-6)
    assert lines[1]["advantages"] == pytest.approx([-a, -a, -a], rel=1e-6)
    assert lines[0]["signals"] == pytest.approx({"correct": 1.0, "r": 1.0, "adv": a}, rel=1e-6)


def test_replay_token_level_signal(capsys, tmp_path):
    spec = tmp_path / "s.shape"
    spec.write_text(
        RECORDED_SPEC.replace("objective loss    = losses.ppo_clip(adv, groups)",
                              "reward h = signals.entropy(groups)\n"
                              "advantage w = adv * (1 + h)\n"
                              "objective loss = losses.ppo_clip(w, groups)")
    )
    rows = [
        {"prompt_id": 0, "scores": {"acc": 1}, "entropy": [0.5, 1.0]},
        {"prompt_id": 0, "scores": {"acc": 0}, "entropy": [2.0]},
    ]
    code, lines, err = replay(capsys, str(spec), "--rollouts", str(write_jsonl(tmp_path / "r.jsonl", rows)))
    assert code == 0, err
    a = 0.5 / (0.5**0.5 + 1e-6)
    assert lines[0]["signals"]["h"] == [0.5, 1.0]
    assert lines[1]["signals"]["h"] == [2.0]  # padding is not reported
    assert lines[0]["advantages"] == pytest.approx([a * 1.5, a * 2.0], rel=1e-6)
    assert lines[1]["advantages"] == pytest.approx([-a * 3.0], rel=1e-6)


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"prompt_id": 1, "scores": {"acc": 1}, "length": 1}\n{"prompt_id": 1, "scores"\n',
         "line 2: not valid JSON"),
        ('[1, 2]\n', "line 1: each line must be a JSON object"),
        ('{"scores": {"acc": 1}, "length": 1}\n', "line 1: missing 'prompt_id'"),
        ('{"prompt_id": 1, "scores": {"acc": 1}, "logprobs": [0, 0], "entropy": [1]}\n',
         "line 1: per-token lists of unequal length: logprobs has 2, entropy has 1"),
        ('{"prompt_id": 1, "scores": {"acc": 1}}\n',
         "line 1: no token count: give 'length', 'response_ids' or a per-token list such as 'logprobs'"),
        ('{"prompt_id": 1, "length": 2}\n',
         "line 1: the spec needs 'scores' (scalar scores recorded with each response"),
        ('{"prompt_id": 1, "scores": {"acc": 1}, "length": 1}\n{"prompt_id": 1, "scores": {"b": 1}, "length": 1}\n',
         "line 2: no score 'acc', which other lines record"),
        ('{"prompt_id": 1, "scores": {"bcc": 1}, "length": 1}\n',
         "s.shape:5: 'rewards.recorded' failed on the recorded rollouts: no recorded score 'acc' (recorded scores: bcc)"),
        ('', "holds no rollouts"),
    ],
)
def test_replay_bad_input_is_a_clear_error(capsys, tmp_path, content, message):
    spec = tmp_path / "s.shape"
    spec.write_text(RECORDED_SPEC)
    rollouts = tmp_path / "r.jsonl"
    rollouts.write_text(content)
    code, lines, err = replay(capsys, str(spec), "--rollouts", str(rollouts))
    assert code == 1 and lines == []
    assert message in err
    assert "Traceback" not in err


def test_replay_missing_text_field_names_the_line(capsys, tmp_path):
    rows = [{"prompt_id": 1, "answer": "3", "response": "3", "length": 1}, {"prompt_id": 1, "answer": "3", "length": 1}]
    code, _, err = replay(capsys, str(ROOT / "specs/grpo.shape"), "--rollouts",
                          str(write_jsonl(tmp_path / "r.jsonl", rows)))
    assert code == 1
    assert err.strip() == "shapeflow replay: line 2: the spec needs 'response' (the decoded response text), " \
                          "which this line lacks"


def test_replay_spec_with_errors_exits_one(capsys, tmp_path):
    spec = tmp_path / "s.shape"
    spec.write_text(RECORDED_SPEC.replace("grpo(", "grop("))
    code, lines, err = replay(capsys, str(spec), "--rollouts", str(write_jsonl(tmp_path / "r.jsonl", CATALOG_ROWS)))
    assert code == 1 and "error[E201]" in err


OBJECTIVE_SPEC = """
model     policy  = models.causal_lm("builtin:arith-tiny")
data      prompts = tasks.arithmetic()
rollout   groups  = rollouts.sample(policy, prompts, n = 2)
reward    r       = rewards.recorded(groups, key = "acc")
advantage adv     = grpo(r, groups, norm_by_std = false)
objective loss    = losses.ppo_clip(adv, groups, eps_low = 0.2, eps_high = 0.2, clip_c = none)
                  + 0.5 * losses.kl(groups, estimator = "k1")
"""


def test_replay_objective_reports_terms_gradient_and_loss(capsys, tmp_path):
    """Two responses of one prompt; rewards 1 and 0 give advantages +0.5 and −0.5.

    Row 0 (A = +0.5): log-ratios 0 and log 1.5 → ρ = 1 and 1.5 (clipped at 1.2): terms −0.5, −0.6.
    Row 1 (A = −0.5): one token, log-ratio 0 → term 0.5.  token-mean PPO = (−0.5 − 0.6 + 0.5) / 3 = −0.2.
    KL k1 = policy − ref: (0.1, 0.2, −0.3) → token-mean 0, times 0.5 → objective −0.2.
    Gradient of the PPO part: −A·ρ/3 on unclipped tokens, 0 on the clipped one; KL adds 0.5/3.
    """
    import math

    rows = [
        {"prompt_id": "q", "scores": {"acc": 1}, "logprobs": [-1.0, -1.0], "ref_logprobs": [-1.1, -(1.0 - math.log(1.5)) - 0.2],
         "extra": {"policy_logprobs": [-1.0, -1.0 + math.log(1.5)]}},
        {"prompt_id": "q", "scores": {"acc": 0}, "logprobs": [-2.0], "ref_logprobs": [-1.7],
         "extra": {"policy_logprobs": [-2.0]}},
    ]
    spec = tmp_path / "s.shape"
    spec.write_text(OBJECTIVE_SPEC)
    rollouts = write_jsonl(tmp_path / "r.jsonl", rows)
    code = main(["replay", str(spec), "--rollouts", str(rollouts), "--objective"])
    out, err = capsys.readouterr()
    assert code == 0, err
    lines = [json.loads(x) for x in out.splitlines()]
    assert lines[0]["loss_terms"]["loss#1"] == pytest.approx([-0.5, -0.6], rel=1e-6)
    assert lines[1]["loss_terms"]["loss#1"] == pytest.approx([0.5], rel=1e-6)
    assert lines[0]["loss_terms"]["loss#2"] == pytest.approx([0.1, 0.2], rel=1e-5)
    assert lines[0]["grad_policy_logprobs"] == pytest.approx([-0.5 / 3 + 0.5 / 3, 0.0 + 0.5 / 3], rel=1e-5)
    assert lines[1]["grad_policy_logprobs"] == pytest.approx([0.5 / 3 + 0.5 / 3], rel=1e-5)
    assert err.startswith("objective (all lines, 2 responses): ")
    assert float(err.split(": ")[1]) == pytest.approx(-0.2, rel=1e-6)


def test_replay_objective_without_policy_logprobs_names_the_field(capsys, tmp_path):
    spec = tmp_path / "s.shape"
    spec.write_text(OBJECTIVE_SPEC)
    rows = [{"prompt_id": "q", "scores": {"acc": 1}, "logprobs": [-1.0], "ref_logprobs": [-1.0]}]
    code = main(["replay", str(spec), "--rollouts", str(write_jsonl(tmp_path / "r.jsonl", rows)), "--objective"])
    _, err = capsys.readouterr()
    assert code == 1
    assert "line 1: the spec needs 'extra.policy_logprobs' (current-policy log-probs (update phase))" in err

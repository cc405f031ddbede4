"""The command line as a user meets it: exit codes, output formats, graph, stages, replay."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from shapeflow.cli import main

ROOT = Path(__file__).resolve().parents[1]
SPECS = ROOT / "specs"


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_check_specs_folder_is_silent_and_clean(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    code, out, err = run(capsys, "check", "specs/")
    assert (code, out, err) == (0, "", "")


def test_check_reports_human_json_and_github(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("bad.shape").write_text(
        'model policy = models.causal_lm("builtin:arith-tiny")\n'
        "data prompts = tasks.arithmetic()\n"
        "rollout groups = rollouts.sample(policy, prompts)\n"
        "verify ok = verifiers.exact_answer(groups)\n"
        "advantage adv = grop(ok, groups)\n"
        "objective loss = losses.ppo_clip(adv, groups)\n"
    )
    code, out, _ = run(capsys, "check", "bad.shape")
    assert code == 1
    assert out == (
        "bad.shape:5:17: error[E201]: unknown stage 'grop'\n"
        "   5 | advantage adv = grop(ok, groups)\n"
        "     |                 ^~~~\n"
        "  help: did you mean 'grpo'?\n"
        "1 error\n"
    )
    code, out, _ = run(capsys, "check", "--format", "json", "bad.shape")
    assert code == 1
    assert json.loads(out) == [
        {
            "file": "bad.shape", "line": 5, "column": 17, "end_line": 5, "end_column": 21,
            "severity": "error", "code": "E201", "message": "unknown stage 'grop'",
            "hint": "did you mean 'grpo'?",
        }
    ]
    code, out, _ = run(capsys, "check", "--format", "github", "bad.shape")
    assert code == 1
    assert out == "::error file=bad.shape,line=5,col=17,title=E201::unknown stage 'grop' (help: did you mean 'grpo'?)\n"


def test_warnings_only_exit_zero(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    text = (SPECS / "grpo.shape").read_text() + "\nparam unused_alpha = 0.5\n"
    Path("w.shape").write_text(text)
    code, out, _ = run(capsys, "check", "w.shape")
    assert code == 0
    assert "warning[W101]: param 'unused_alpha' is never used" in out
    assert out.rstrip().endswith("1 warning")


def test_usage_errors_exit_two(capsys, tmp_path):
    assert run(capsys, "check", str(tmp_path / "nope.shape"))[0] == 2
    assert run(capsys, "frobnicate")[0] == 2
    assert run(capsys, "check")[0] == 2
    code, _, err = run(capsys, "check", str(tmp_path))
    assert code == 2 and "no .shape files" in err


def test_set_overrides_param_config_and_stage_argument(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    code, out, _ = run(capsys, "check", "specs/grpo.shape", "--set", "group_size=16", "--set", "train.lr=3e-4",
                       "--set", "groups.temperature=0.7", "--set", "track.backend=jsonl", "--emit", "program")
    assert code == 0
    prog = json.loads(out)
    assert prog["params"]["group_size"] == 16
    assert prog["config"]["train"]["lr"] == 3e-4
    assert prog["config"]["track"]["backend"] == "jsonl"
    groups = next(n for n in prog["nodes"] if n["id"] == "groups")
    assert groups["params"]["n"] == 16 and groups["params"]["temperature"] == 0.7


def test_set_overrides_an_argument_given_by_position(capsys, monkeypatch):
    # models.causal_lm("builtin:arith-tiny") gives `path` by position; --set policy.path replaces it
    monkeypatch.chdir(ROOT)
    code, out, _ = run(capsys, "check", "specs/grpo.shape", "--set", "policy.path=/models/qwen", "--emit", "program")
    assert code == 0
    policy = next(n for n in json.loads(out)["nodes"] if n["id"] == "policy")
    assert policy["params"]["path"] == "/models/qwen"


def test_set_errors_point_at_the_command_line(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    code, out, _ = run(capsys, "check", "specs/grpo.shape", "--set", "group_sise=4", "--set", "train.lr=-1")
    assert code == 1
    assert "<command line>:1:7: error[E800]: --set group_sise: no param, config key or stage call named " \
           "'group_sise'" in out
    assert "help: did you mean 'group_size'?" in out
    assert "<command line>:2:16: error[E401]: train.lr must be > 0 and <= 1, got -1" in out


def test_emit_ast_and_plan(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    code, out, _ = run(capsys, "check", "specs/grpo.shape", "--emit", "ast")
    assert code == 0
    tree = json.loads(out)
    assert tree["node"] == "Spec" and tree["header"]["name"] == "grpo"
    code, out, _ = run(capsys, "check", "specs/grpo.shape", "--emit", "plan")
    plan = json.loads(out)
    assert plan["phases"]["setup"] == ["policy", "prompts"]
    assert plan["phases"]["rollout"] == ["groups", "correct", "r", "adv"]
    assert plan["phases"]["update"][-1] == "loss" and plan["objective"] == "loss"
    assert plan["needs"] == ["answer", "logprobs", "policy_logprobs", "ref_logprobs", "response"]


@pytest.mark.parametrize("fmt", ["dot", "mermaid", "json"])
def test_graph_formats(capsys, fmt, monkeypatch):
    monkeypatch.chdir(ROOT)
    code, out, _ = run(capsys, "graph", "specs/grpo.shape", "--format", fmt)
    assert code == 0
    if fmt == "json":
        data = json.loads(out)
        assert {(e["from"], e["to"], e["arg"]) for e in data["edges"]} >= {
            ("groups", "correct", "groups"), ("r", "adv", "rewards"), ("adv", "loss#1", "advantages")}
        phases = {n["id"]: n["phase"] for n in data["nodes"]}
        assert phases["adv"] == "rollout" and phases["loss"] == "update" and phases["policy"] == "setup"
    elif fmt == "dot":
        assert out.startswith('digraph "grpo" {') and '"adv" -> "loss#1" [label="advantages"];' in out
    else:
        assert out.startswith("flowchart TD") and 'subgraph update["update phase"]' in out


def test_graph_image_without_graphviz_says_how_to_install(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr("shutil.which", lambda name: None)
    code, _, err = run(capsys, "graph", "specs/grpo.shape", "-o", str(tmp_path / "g.svg"))
    assert code == 1
    assert "needs graphviz's `dot`" in err and "apt install graphviz" in err


def test_graph_writes_text_file(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    target = tmp_path / "g.mmd"
    code, _, _ = run(capsys, "graph", "specs/grpo.shape", "--format", "mermaid", "-o", str(target))
    assert code == 0 and target.read_text().startswith("flowchart TD")


def test_stages_list_json_and_doc_page(capsys):
    code, out, _ = run(capsys, "stages")
    assert code == 0 and "grpo" in out and "losses.ppo_clip" in out
    code, out, _ = run(capsys, "stages", "--json")
    records = json.loads(out)
    assert all(list(r) == ["name", "kind", "inputs", "output", "params", "needs", "phase", "paper", "state", "doc"]
               for r in records)
    grpo = next(r for r in records if r["name"] == "grpo")
    assert grpo["inputs"] == {"rewards": "Signal[seq]", "groups": "Rollouts"}
    assert grpo["output"] == "Advantage[seq]" and grpo["phase"] == "rollout"
    assert grpo["params"]["properties"]["eps"] == {
        "default": 1e-06, "description": grpo["params"]["properties"]["eps"]["description"],
        "maximum": 1, "minimum": 0, "title": "Eps", "type": "number"}
    code, out, _ = run(capsys, "stages", "losses.ppo_clip")
    assert code == 0
    assert out.startswith("losses.ppo_clip(advantages: Advantage[tok], groups: Rollouts, ")
    assert "  eps_low: number = 0.2  (>= 0 and < 1)" in out
    assert "  clip_c: number or none = 3.0  (> 1)" in out
    assert "Paper: Schulman et al., PPO, arXiv:1707.06347" in out
    code, _, err = run(capsys, "stages", "grop")
    assert code == 1 and "did you mean 'grpo'?" in err


def test_toolchain_never_imports_heavy_modules():
    script = (
        "import sys\n"
        "from shapeflow.cli import main\n"
        "main(['check', 'specs']); main(['graph', 'specs/grpo.shape', '--format', 'json'])\n"
        "main(['stages']); main(['stages', '--json']); main(['stages', 'grpo'])\n"
        "print(sorted(m for m in ('torch', 'transformers', 'accelerate', 'mlflow') if m in sys.modules))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True)
    assert proc.stdout.strip().splitlines()[-1] == "[]"


def test_grammar_works_on_lark_1_2_2(tmp_path):
    """vLLM pins lark==1.2.2; the Makefile installs it beside the venv for this test."""
    lark122 = ROOT / ".venv" / "lark-1.2.2"
    assert lark122.is_dir(), "run `make install` (it installs lark 1.2.2 into .venv/lark-1.2.2)"
    script = (
        "import lark, sys\n"
        "assert lark.__version__ == '1.2.2', lark.__version__\n"
        "from shapeflow.cli import main\n"
        "sys.exit(main(['check', 'specs']))\n"
    )
    env_path = f"{lark122}"
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True,
                          env={"PYTHONPATH": env_path, "PATH": "", "HOME": str(tmp_path)})
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_parsed_specs_are_cached_on_disk_and_refreshed_when_edited(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("SHAPEFLOW_PARSE_CACHE", "on")
    monkeypatch.setenv("SHAPEFLOW_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    spec = Path("s.shape")
    spec.write_text((SPECS / "grpo.shape").read_text().replace("grpo(r, groups", "grop(r, groups"))
    from shapeflow.compiler import resolve

    first = run(capsys, "check", "s.shape")
    assert first[0] == 1 and "unknown stage 'grop'" in first[1]
    assert len(list((tmp_path / "cache" / "parsed").glob("*/*.pickle"))) == 1
    resolve._PARSED.clear()  # a new process: only the disk cache is left
    assert run(capsys, "check", "s.shape") == first
    spec.write_text(spec.read_text().replace("grop(r, groups", "grpo(r, groups") + "\n")
    resolve._PARSED.clear()
    assert run(capsys, "check", "s.shape") == (0, "", "")
    assert len(list((tmp_path / "cache" / "parsed").glob("*/*.pickle"))) == 2


def test_check_reuses_a_stored_result_until_a_file_it_read_changes(capsys, tmp_path, monkeypatch):
    import shapeflow.cli as cli

    monkeypatch.setenv("SHAPEFLOW_CHECK_CACHE", "on")
    monkeypatch.setenv("SHAPEFLOW_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    Path("parent.shape").write_text((SPECS / "grpo.shape").read_text())
    Path("child.shape").write_text('spec child { extends = "parent.shape" }\nparam unused_beta = 1\n')
    first = run(capsys, "check", "child.shape")
    assert first[0] == 0 and "warning[W101]: param 'unused_beta' is never used" in first[1]

    calls = []
    real = cli._compile_one
    monkeypatch.setattr(cli, "_compile_one", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    assert run(capsys, "check", "child.shape") == first  # same output, nothing compiled
    assert calls == []

    Path("parent.shape").write_text(Path("parent.shape").read_text().replace("grop", "grpo").replace(
        "advantage adv     = grpo(", "advantage adv     = grop("))
    code, out, _ = run(capsys, "check", "child.shape")  # a parent changed: checked again
    assert calls == [Path("child.shape")] and code == 1 and "error[E201]: unknown stage 'grop'" in out
    run(capsys, "check", "child.shape", "--set", "group_size=4")  # --set always compiles
    assert len(calls) == 2


def test_a_stored_check_loads_neither_pydantic_nor_the_stage_library(tmp_path):
    env = {**__import__("os").environ, "SHAPEFLOW_CHECK_CACHE": "on", "SHAPEFLOW_CACHE": str(tmp_path)}
    cmd = [sys.executable, "-X", "importtime", "-m", "shapeflow.cli", "check", "specs/grpo.shape"]
    first = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    second = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    assert first.returncode == second.returncode == 0
    assert "shapeflow.stdlib.registry" in first.stderr  # the first check compiles
    assert "shapeflow.stdlib.registry" not in second.stderr and " pydantic\n" not in second.stderr


def test_specs_named_together_may_extend_each_others_folders(capsys, monkeypatch):
    # what a pre-commit hook does: every changed spec named on one command line
    monkeypatch.chdir(ROOT)
    code, out, _ = run(capsys, "check", "specs/combos/par_grpo_n.shape")
    assert code == 1 and "error[E602]" in out  # alone, the parent's folder is not allowed
    assert run(capsys, "check", "specs/par.shape", "specs/combos/par_grpo_n.shape")[:2] == (0, "")

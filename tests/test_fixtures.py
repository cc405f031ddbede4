"""Golden fixtures: exactly what `shapeflow check` prints for good and bad specs.

Layout, under ``tests/fixtures/``:

    bad/NAME.shape          a spec with one deliberate mistake (or a few related ones)
    bad/NAME.expected       its golden: the first line is ``# exit: N`` (the exit code), the
                            rest is exactly what ``shapeflow check NAME.shape`` prints on
                            standard output in the human format
    bad/NAME.expected.json  (a few fixtures) the golden of ``--format json``
    bad/NAME.expected.github  (a few fixtures) the golden of ``--format github``
    bad/extends/            parents extended by the bad fixtures (not fixtures themselves)
    outside.shape           a spec outside ``bad/``, the target of the E602 fixture
    good/NAME.shape         specs that must check clean: exit 0, nothing printed
    good/parents/           parents extended by the good fixtures

Every fixture is checked in-process (``shapeflow.cli.main``) with the working directory set
to the fixture's folder and the spec named by its bare file name, so the printed paths are
relative and the goldens do not depend on where the checkout lives.

Directives: the leading comment lines of a fixture (those before its first line that does
not start with ``#``) may hold

    # args: ARGS    extra command-line arguments, split like a shell line and appended after
                    the spec (``# args: --set kl_coef=[0.1,``); each ``--set`` becomes a
                    line of the ``<command line>`` pseudo-file in diagnostics
    # cwd: DIR      run from DIR, relative to the fixture's folder, and name the spec by its
                    path relative to DIR (the E602 fixture runs from ``..`` so that its
                    out-of-bounds parent is printed as a relative path)
    # setup: NAME   prepare the stage registry first (undone after the test):
                    ``update_phase_stage`` registers ``testing.self_certainty``, a reward
                    that runs in the update phase (no standard stage can trigger E505);
                    ``broken_plugin`` records the failure of an installed plug-in whose
                    module does not exist (W200)

Regenerating after a deliberate message change: run

    SHAPEFLOW_UPDATE_GOLDEN=1 python -m pytest tests/test_fixtures.py

which rewrites every ``.expected*`` file from the current output instead of comparing
(tests still fail if a good fixture stops checking clean). Read the diff before committing:
a golden is a claim that the message is right.

Codes that no golden file shows are listed in COVERED_ELSEWHERE (with the test that covers
them) or NOT_COVERED (with the reason); ``test_every_code_has_a_golden`` keeps both honest.
"""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path

import pytest

from shapeflow.cli import main
from shapeflow.dsl.codes import CODES
from shapeflow.plugins import EntryPoint
from shapeflow.stdlib.registry import ENTRY_POINT_GROUP, Registry, default_registry

FIXTURES = Path(__file__).parent / "fixtures"
BAD = FIXTURES / "bad"
GOOD = FIXTURES / "good"
UPDATE = os.environ.get("SHAPEFLOW_UPDATE_GOLDEN") == "1"

BAD_SPECS = sorted(BAD.glob("*.shape"))
GOOD_SPECS = sorted(GOOD.glob("*.shape"))

# Codes shown by no golden file, and the test that covers each instead.
COVERED_ELSEWHERE = {
    "E107": "test_spec_too_large (a 4 MiB spec is generated, not committed)",
}
# Codes with no golden yet, and why.
NOT_COVERED: dict[str, str] = {}


# --- running a fixture ---------------------------------------------------------------------


def directives(spec: Path) -> dict[str, str]:
    """The ``# key: value`` lines at the top of a fixture."""
    found = {}
    for line in spec.read_bytes().decode("utf-8", errors="replace").splitlines():
        if not line.startswith("#"):
            break
        key, sep, value = line[1:].strip().partition(":")
        if sep and key in ("args", "cwd", "setup"):
            found[key] = value.strip()
    return found


def _setup_update_phase_stage(monkeypatch) -> None:
    scratch = Registry()

    @scratch.stage("testing.self_certainty", kind="reward", inputs={"groups": "Rollouts"}, output="Signal[seq]",
                   needs=("policy_logprobs",), phase="update", paper="registered only by tests/test_fixtures.py")
    def self_certainty(groups):
        """Mean current-policy log-prob of each response: a reward that needs the update phase."""
        raise NotImplementedError

    monkeypatch.setitem(default_registry().stages, "testing.self_certainty", scratch["testing.self_certainty"])


def _setup_broken_plugin(monkeypatch) -> None:
    ep = EntryPoint(name="broken_stages", value="shapeflow_fixture_no_such_module", group=ENTRY_POINT_GROUP)
    scratch = Registry()
    with monkeypatch.context() as m:
        m.setattr("shapeflow.stdlib.registry.plugin_entry_points", lambda: [ep])
        scratch.load_plugins()
    assert len(scratch.plugin_errors) == 1
    monkeypatch.setattr(default_registry(), "plugin_errors", scratch.plugin_errors)


SETUPS = {"update_phase_stage": _setup_update_phase_stage, "broken_plugin": _setup_broken_plugin}


def run_check(spec: Path, monkeypatch, capsys, *extra: str) -> tuple[int, str]:
    """``shapeflow check`` on one fixture, as its directives say; returns (exit code, stdout)."""
    d = directives(spec)
    # A plug-in that is broken on this machine must not leak W200 into every golden.
    monkeypatch.setattr(default_registry(), "plugin_errors", [])
    if "setup" in d:
        SETUPS[d["setup"]](monkeypatch)
    cwd = (spec.parent / d.get("cwd", ".")).resolve()
    monkeypatch.chdir(cwd)
    capsys.readouterr()
    rc = main(["check", os.path.relpath(spec, cwd), *shlex.split(d.get("args", "")), *extra])
    out, err = capsys.readouterr()
    assert err == ""
    return rc, out


def golden(path: Path, actual: str) -> None:
    """Compare with the golden file, or rewrite it in update mode."""
    if UPDATE:
        path.write_text(actual, encoding="utf-8", newline="\n")
        return
    assert path.is_file(), f"missing golden {path.name}; create it with SHAPEFLOW_UPDATE_GOLDEN=1"
    assert actual == path.read_text(encoding="utf-8")


# --- the fixtures --------------------------------------------------------------------------


@pytest.mark.parametrize("spec", BAD_SPECS, ids=lambda p: p.stem)
def test_bad_fixture(spec, monkeypatch, capsys):
    rc, out = run_check(spec, monkeypatch, capsys)
    assert out, "a bad fixture must produce diagnostics"
    golden(spec.with_suffix(".expected"), f"# exit: {rc}\n{out}")


@pytest.mark.parametrize("spec", GOOD_SPECS, ids=lambda p: p.stem)
def test_good_fixture(spec, monkeypatch, capsys):
    assert run_check(spec, monkeypatch, capsys) == (0, "")


@pytest.mark.parametrize(
    "name, fmt",
    [("e300_loss_times_loss", "json"), ("extends_error_in_parent", "json"),
     ("e302_signal_where_advantage", "github"), ("set_wrong_type", "github")],
)
def test_machine_formats(name, fmt, monkeypatch, capsys):
    rc, out = run_check(BAD / f"{name}.shape", monkeypatch, capsys, "--format", fmt)
    assert rc == 1
    if fmt == "json":
        json.loads(out)
    golden(BAD / f"{name}.expected.{fmt}", out)


def test_goldens_have_fixtures():
    """Every golden belongs to a fixture, and the fixtures are plentiful."""
    orphans = [p.name for p in BAD.glob("*.expected*") if not (BAD / (p.name.split(".")[0] + ".shape")).is_file()]
    assert orphans == []
    assert len(BAD_SPECS) >= 30 and len(GOOD_SPECS) >= 3


def test_every_code_has_a_golden():
    shown = set()
    for path in BAD.glob("*.expected"):
        text = path.read_text(encoding="utf-8")
        shown.update(code for code in CODES if f"[{code}]" in text)
    assert sorted(set(CODES) - shown - set(COVERED_ELSEWHERE) - set(NOT_COVERED)) == []
    # The exception lists must stay true: drop a code from them once a golden shows it.
    assert sorted(shown & (set(COVERED_ELSEWHERE) | set(NOT_COVERED))) == []
    assert set(COVERED_ELSEWHERE) | set(NOT_COVERED) <= set(CODES)


def test_spec_too_large(tmp_path, monkeypatch, capsys):
    limit = 4 * 1024 * 1024
    head = "# a generated spec, one byte over the limit\n"
    (tmp_path / "big.shape").write_text(head + "#" * (limit + 1 - len(head)), encoding="utf-8")
    rc, out = run_check(tmp_path / "big.shape", monkeypatch, capsys)
    assert (rc, out) == (1, (
        "big.shape:1:1: error[E107]: spec is 4,194,305 bytes; the limit is 4,194,304\n"
        "1 error\n"
    ))


# --- the good fixtures mean what they say ---------------------------------------------------


def _program(spec: Path, monkeypatch):
    from shapeflow.compiler.pipeline import compile_spec

    monkeypatch.chdir(spec.parent)
    args = shlex.split(directives(spec).get("args", ""))
    result = compile_spec(Path(spec.name), sets=[a for a in args if a != "--set"])
    assert result.ok
    return result.program


def test_syntax_tour_values(monkeypatch):
    prog = _program(GOOD / "syntax_tour.shape", monkeypatch)
    assert prog.params == {"group_size": 8, "kl_coef": 0.001, "bonus": 0.1}
    assert prog.header == {"title": 'syntax tour: "quoted" \u00e9', "cite": "none"}
    assert prog.nodes["rollout"].params["n"] == 8
    assert prog.nodes["data"].params["size"] == 900
    (fmt,) = [n for n in prog.nodes.values() if n.stage == "verifiers.format"]
    assert fmt.params["regex"] == "^[0-9]+\\n?$"  # the spec's "\\n" is a backslash and an n
    # `reward - 0.1 * reward |> grpo(...)`: the whole difference is grpo's first argument.
    adv = prog.nodes["advantage"]
    assert (adv.stage, adv.inputs[1]) == ("grpo", ("groups", "rollout"))
    assert prog.nodes[adv.inputs[0][1]].op == "sub"
    assert prog.nodes["objective"].op == "sub"  # (ppo + kl_coef * kl) - (-0.0 * kl)
    assert prog.config["train"].betas == [0.9, 0.95] and prog.config["train"].max_grad_norm is None


def test_extends_override_values(monkeypatch):
    prog = _program(GOOD / "extends_override.shape", monkeypatch)
    assert prog.chain == ["extends_override.shape", "parents/base.shape"]
    assert prog.params == {"group_size": 16, "kl_coef": 0.001, "format_bonus": 0.1}
    assert prog.nodes["groups"].params["n"] == 16
    assert prog.nodes["loss"].params["eps_high"] == 0.28 and prog.nodes["loss"].params["clip_c"] is None
    train = prog.config["train"]
    assert (train.lr, train.steps, train.prompts_per_step) == (3e-4, 1200, 16)


def test_set_override_values(monkeypatch):
    prog = _program(GOOD / "set_overrides.shape", monkeypatch)
    assert prog.params == {"group_size": 4, "kl_coef": 0.01}
    assert prog.nodes["groups"].params["n"] == 4 and prog.nodes["groups"].params["temperature"] == 0.7
    assert prog.nodes["adv"].params["std"] == "population"
    assert prog.config["train"].lr == 3e-4 and prog.config["train"].betas == [0.9, 0.95]
    assert prog.config["track"].backend == "jsonl"

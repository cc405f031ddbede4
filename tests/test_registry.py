"""Stage contracts are checked when a stage registers; plug-ins load from entry points."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from pydantic import Field

from shapeflow.stdlib.registry import RegistrationError, Registry, StageParams, default_registry


class AlphaParams(StageParams):
    alpha: float = Field(0.5, ge=0, le=1, description="Mixing weight.")


def register(reg: Registry, name="scale", **overrides):
    declaration = dict(kind="advantage", inputs={"adv": "Advantage[*]"}, output="Advantage[*]", params=AlphaParams)
    declaration.update(overrides)

    def fn(adv, *, alpha):
        return adv * alpha

    return reg.stage(name, **declaration)(overrides.pop("fn", fn))


def test_a_consistent_stage_registers():
    reg = Registry()
    register(reg)
    st = reg["scale"]
    assert st.input_names() == ("adv",) and st.param_names() == ("alpha",)
    assert str(st.output) == "Advantage[*]" and st.phase == "rollout"


def test_duplicate_name_is_refused():
    reg = Registry()
    register(reg)
    with pytest.raises(RegistrationError, match="stage 'scale' is registered twice"):
        register(reg)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"inputs": {"advantages": "Advantage[*]"}},
         r"positional parameters \['adv'\] do not match the declared inputs \['advantages'\]"),
        ({"params": StageParams}, r"keyword-only in the function but not declared: \['alpha'\]"),
        ({"inputs": {"adv": "Advantage"}}, "Advantage needs a level"),
        ({"output": "Number"}, "'output' has constant type Number; constants are parameters"),
        ({"needs": ("telepathy",)}, r"unknown needs \['telepathy'\]"),
        ({"kind": "magic"}, "kind 'magic' is not one of"),
        ({"phase": "later"}, "phase 'later' is not one of"),
        ({"output": "Advantage[*]", "inputs": {"adv": "Advantage[seq]"}}, "output level '\\*' needs an input"),
        ({"engine_param": "engine"}, "engine_param 'engine' is not a parameter"),
    ],
)
def test_inconsistent_declarations_are_refused(overrides, message):
    with pytest.raises(RegistrationError, match=message):
        register(Registry(), **overrides)


def test_variadic_functions_are_refused():
    reg = Registry()

    def fn(adv, *rest, alpha):
        return adv

    with pytest.raises(RegistrationError, match=r"\*args/\*\*kwargs are not allowed \(rest\)"):
        reg.stage("v", kind="advantage", inputs={"adv": "Advantage[seq]"}, output="Advantage[seq]",
                  params=AlphaParams)(fn)


def test_every_stdlib_stage_has_a_documented_contract():
    reg = default_registry()
    assert {"grpo", "losses.ppo_clip", "losses.kl", "verifiers.exact_answer", "verifiers.format",
            "rewards.recorded", "tasks.arithmetic", "models.causal_lm", "rollouts.sample"} <= set(reg.names())
    for st in reg.stages.values():
        assert st.doc, st.name
        for name, info in st.params.model_fields.items():
            assert info.description, f"{st.name}.{name} has no description"


PLUGIN = '''
from pydantic import Field
from shapeflow.stdlib.registry import StageParams, stage

class HalfParams(StageParams):
    factor: float = Field(0.5, gt=0, description="Scale.")

@stage("acme.half", kind="advantage", inputs={"adv": "Advantage[*]"}, output="Advantage[*]", params=HalfParams,
       paper="ACME 2026")
def half(adv, *, factor):
    """Scale an advantage: A' = factor * A."""
    return adv * factor
'''


def _install_plugin(site: Path, name: str, module_source: str, value: str) -> None:
    (site / f"{name}.py").write_text(textwrap.dedent(module_source))
    dist = site / f"{name}-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(f"[shapeflow.stages]\n{name} = {value}\n")


def _shapeflow(site: Path, cwd: Path, *argv: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(site))
    return subprocess.run([sys.executable, "-m", "shapeflow.cli", *argv], cwd=cwd, env=env, capture_output=True,
                          text=True)


def test_plugin_stages_load_from_entry_points(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    _install_plugin(site, "acme_stages", PLUGIN, "acme_stages")
    _install_plugin(site, "broken_stages", "raise ImportError('no module named acme_core')\n", "broken_stages")
    root = Path(__file__).resolve().parents[1]
    spec = tmp_path / "acme.shape"
    spec.write_text((root / "specs" / "grpo.shape").read_text().replace(
        "advantage adv     = grpo(r, groups, eps = 1e-6)",
        "advantage adv     = grpo(r, groups) |> acme.half(factor = 0.25)"))
    proc = _shapeflow(site, tmp_path, "check", "acme.shape")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "warning[W200]: plug-in 'broken_stages' (broken_stages) failed to load: no module named acme_core" \
        in proc.stdout
    proc = _shapeflow(site, tmp_path, "stages", "--json")
    half = next(r for r in json.loads(proc.stdout) if r["name"] == "acme.half")
    assert half["paper"] == "ACME 2026" and half["inputs"] == {"adv": "Advantage[*]"}
    assert "plug-in 'broken_stages' (broken_stages) failed to load" in proc.stderr
    proc = _shapeflow(site, tmp_path, "stages", "acme.half")
    assert "from plug-in: acme_stages" in proc.stdout and "factor: number = 0.5  (> 0)" in proc.stdout


def test_a_need_can_name_a_stage_parameter():
    """``logprobs@{t_high}``: the checker fills in the parameter (DCPO's log-probs at T)."""
    from shapeflow.stdlib.needs import need_info, resolve_needs
    from shapeflow.stdlib.registry import RegistrationError, Registry, StageParams

    class P(StageParams):
        t_high: float = 1.2

    reg = Registry()

    def tempered(groups, *, t_high):
        return groups

    reg.stage("x.tempered", kind="reward", inputs={"groups": "Rollouts"}, output="Rollouts", params=P,
              needs=("logprobs@{t_high}",))(tempered)
    assert resolve_needs(reg["x.tempered"].needs, {"t_high": 1.2}) == {"logprobs@1.2"}
    info = need_info("logprobs@1.2")
    assert (info.field, info.level, info.provider) == ("extra.logprobs@1.2", "tok", "trainer")
    assert info.doc.startswith("behaviour log-probs of the sampled tokens at another temperature T = 1.2")
    assert need_info("logprobs@") is None and need_info("nothing@1") is None

    def wrong(groups, *, t_high):
        return groups

    with pytest.raises(RegistrationError, match="need 'logprobs@\\{t_low\\}' names 't_low', which is not a parameter"):
        reg.stage("x.wrong", kind="reward", inputs={"groups": "Rollouts"}, output="Rollouts", params=P,
                  needs=("logprobs@{t_low}",))(wrong)


def test_every_estimator_and_loss_page_shows_formula_knobs_defaults_and_sources(capsys):
    """`shapeflow stages NAME` for each advantage and loss stage: the formula (docstring), every
    knob with its default and a description, and where its conventions come from."""
    import re

    from shapeflow.cli import main
    from shapeflow.stdlib.registry import doc_page

    reg = default_registry()
    checked = 0
    for name in reg.names():
        st = reg[name]
        if st.kind not in ("advantage", "loss") or st.source != "shapeflow":
            continue
        page = doc_page(st)
        assert st.paper and f"Paper: {st.paper}" in page, name
        assert re.search(r"=|←", st.doc), f"{name}: no formula in its doc"
        for field, info in st.params.model_fields.items():
            assert info.description, f"{name}: parameter '{field}' has no description"
            default = "required" if info.is_required() else None
            line = next((x for x in page.splitlines() if x.startswith(f"  {field}: ")), None)
            assert line is not None, f"{name}: '{field}' missing from the page"
            assert default == "required" or " = " in line, f"{name}: '{field}' shows no default: {line}"
        assert re.search(r"verl|TRL|OpenRLHF|NeMo|official|release|reconstructed|catalog", page), \
            f"{name}: the page names no trainer or code whose conventions it follows"
        checked += 1
    assert checked >= 35
    assert main(["stages", "gae"]) == 0
    assert "lam: number = 1.0  (>= 0 and <= 1)" in capsys.readouterr().out

"""docs/language.md stays true: its examples check as they claim, its diagnostics section
lists every code, and its train/track tables are those of shapeflow/config.py.

Conventions (stated in the doc's Diagnostics section):
  ```shape              a complete spec; must check with no diagnostics at all. All of them are
                        saved side by side as NAME.shape (NAME from the `spec NAME` header), so
                        one example can extend another.
  ```shape prelude      the prelude below, shown in the doc; also must check clean.
  ```shape-bad CODE     a fragment appended to PRELUDE (a leading `spec` header stays first);
                        CODE must be among the diagnostics.
  ```shape-bad CODE whole   a whole file, checked as it stands.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from shapeflow.compiler.pipeline import compile_spec
from shapeflow.config import CONFIG_BLOCKS
from shapeflow.dsl.codes import CODES
from shapeflow.stdlib.params import bounds, type_words

DOC = Path(__file__).resolve().parents[1] / "docs" / "language.md"
TEXT = DOC.read_text(encoding="utf-8")

PRELUDE = """\
model     policy  = models.causal_lm("builtin:arith-tiny")
data      prompts = tasks.arithmetic(digits = 2)
rollout   groups  = rollouts.sample(policy, prompts, n = 8)
verify    correct = verifiers.exact_answer(groups)
reward    r       = correct
advantage adv     = grpo(r, groups)
objective loss    = losses.ppo_clip(adv, groups)
"""

# Codes that cannot be shown as one file: invalid bytes, huge or generated input, a second
# file, a --set, a stage no standard library has, a broken plug-in.
PLAIN_ONLY = {"E105", "E106", "E107", "E505", "E601", "E602", "E800", "E801", "W200"}


def _blocks(text: str) -> list[tuple[int, str, str]]:
    """(line of the opening fence, info string, body) of every fenced block."""
    out, lines, i = [], text.splitlines(keepends=True), 0
    while i < len(lines):
        if lines[i].startswith("```"):
            info, start, body = lines[i][3:].strip(), i + 1, []
            i += 1
            while i < len(lines) and lines[i].rstrip() != "```":
                body.append(lines[i])
                i += 1
            assert i < len(lines), f"docs/language.md:{start}: fence never closed"
            out.append((start, info, "".join(body)))
        i += 1
    return out


BLOCKS = _blocks(TEXT)
CLEAN = [(line, body) for line, info, body in BLOCKS if info.split()[:1] == ["shape"]]
BAD = [(line, info.split()[1:], body) for line, info, body in BLOCKS if info.split()[:1] == ["shape-bad"]]
_HEADER = re.compile(r"(?:\s*#[^\n]*\n)*\s*spec\s+(\w+)\s*\{[^}]*\}[ \t]*\n?")  # comments, then a header


def _show(compiled) -> str:
    return "\n".join(f"{d.span.line}:{d.span.column} {d.code} {d.message}" for d in compiled.diagnostics) or "(none)"


def _section(title: str) -> str:
    """The text of the `## ...` section whose heading contains ``title``."""
    m = re.search(rf"^## [^\n]*{re.escape(title)}[^\n]*\n(.*?)(?=^## |\Z)", TEXT, re.M | re.S)
    assert m, f"docs/language.md has no section '{title}'"
    return m.group(1)


def _subsections(section: str) -> dict[str, str]:
    """``### heading`` -> its text, within one section."""
    parts = re.split(r"^### (.*)\n", section, flags=re.M)
    return {parts[i].strip(): parts[i + 1] for i in range(1, len(parts), 2)}


# --- the examples ---------------------------------------------------------------------------


def test_the_doc_has_examples():
    assert len(CLEAN) >= 3
    assert len(BAD) >= len(CODES) - len(PLAIN_ONLY)
    for line, args, _ in BAD:
        assert args and re.fullmatch(r"[EW]\d{3}", args[0]), f"docs/language.md:{line}: shape-bad needs a code"
        assert args[0] in CODES, f"docs/language.md:{line}: {args[0]} is not in CODES"
        assert args[1:] in ([], ["whole"]), f"docs/language.md:{line}: unknown flags {args[1:]}"


@pytest.mark.parametrize("line,body", CLEAN, ids=[f"line{line}" for line, _ in CLEAN])
def test_shape_block_checks_clean(tmp_path, line, body):
    # Every complete example sits beside the others, so `extends = "grpo_demo.shape"` works.
    for other_line, other in CLEAN:
        m = _HEADER.match(other)
        name = m.group(1) if m else f"example_{other_line}"
        (tmp_path / f"{name}.shape").write_text(other, encoding="utf-8")
        if other_line == line:
            target = tmp_path / f"{name}.shape"
    compiled = compile_spec(target)
    assert compiled.program is not None
    assert compiled.diagnostics == [], f"docs/language.md:{line}:\n{_show(compiled)}"


@pytest.mark.parametrize("line,args,body", BAD, ids=[f"line{line}-{a[0]}" for line, a, _ in BAD])
def test_shape_bad_block_gives_its_code(tmp_path, line, args, body):
    code = args[0]
    if "whole" in args:
        text = body
    else:
        m = _HEADER.match(body)
        text = body[: m.end()] + PRELUDE + body[m.end():] if m else PRELUDE + body
    path = tmp_path / "snippet.shape"
    path.write_text(text, encoding="utf-8")
    compiled = compile_spec(path)
    codes = [d.code for d in compiled.diagnostics]
    assert code in codes, f"docs/language.md:{line}: expected {code}, got:\n{_show(compiled)}"


def test_prelude_in_the_doc_is_the_one_the_test_uses(tmp_path):
    preludes = [body for _, info, body in BLOCKS if info == "shape prelude"]
    assert preludes == [PRELUDE]
    path = tmp_path / "prelude.shape"
    path.write_text(PRELUDE, encoding="utf-8")
    assert compile_spec(path).diagnostics == []


# --- the diagnostics section ----------------------------------------------------------------


def test_diagnostics_section_lists_every_code_with_its_title():
    headings = list(_subsections(_section("Diagnostics")))
    assert headings == [f"{code}: {title}" for code, title in CODES.items()]


def test_every_code_has_an_example_of_the_right_kind():
    subsections = _subsections(_section("Diagnostics"))
    plain_only = set()
    for code, title in CODES.items():
        sub = subsections[f"{code}: {title}"]
        infos = [info for _, info, _ in _blocks(sub)]
        bad_codes = {info.split()[1] for info in infos if info.startswith("shape-bad")}
        assert bad_codes <= {code}, f"{code}: its section shows examples of {sorted(bad_codes - {code})}"
        if not bad_codes:
            assert "" in infos, f"{code}: neither a shape-bad example nor a plain one"
            plain_only.add(code)
    assert plain_only == PLAIN_ONLY


# --- the train and track tables -------------------------------------------------------------


def _spec_value(value) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, list):
        return "[" + ", ".join(_spec_value(v) for v in value) + "]"
    return repr(value)


def _bounds_text(info) -> str:
    parts = [bounds(info)] if bounds(info) else []
    unit = "item" if info.annotation is list or getattr(info.annotation, "__origin__", None) is list else "character"
    lo = next((m.min_length for m in info.metadata if getattr(m, "min_length", None) is not None), None)
    hi = next((m.max_length for m in info.metadata if getattr(m, "max_length", None) is not None), None)

    def plural(n: int) -> str:
        return f"{n} {unit}" + ("s" if n != 1 else "")

    if lo is not None and lo == hi:
        parts.append(f"exactly {plural(lo)}")
    else:
        if lo is not None:
            parts.append(f"at least {plural(lo)}")
        if hi is not None:
            parts.append(f"at most {plural(hi)}")
    return " and ".join(parts) or "-"


def _table_rows(text: str) -> list[list[str]]:
    rows = [line for line in text.splitlines() if line.startswith("|")]
    assert rows[0] == "| key | type | default | bounds | meaning |", rows[0]
    return [[cell.strip() for cell in row.strip("|").split(" | ")] for row in rows[2:]]


@pytest.mark.parametrize("block", list(CONFIG_BLOCKS))
def test_config_table_is_the_config_model(block):
    table = _subsections(_section("`train` and `track`"))[block]
    expected = [
        [f"`{key}`", type_words(info), f"`{_spec_value(info.default)}`", _bounds_text(info), info.description]
        for key, info in CONFIG_BLOCKS[block].model_fields.items()
    ]
    assert _table_rows(table) == expected


# --- the output examples of section 10 ------------------------------------------------------

BAD_SHAPE = PRELUDE.replace("reward    r       = correct\n", "").replace("grpo(r, groups)", "grpo(correct, groups)") + (
    "reward    extra   = correct + adv\n"
)


def _example_after(marker: str) -> str:
    start = TEXT.index(marker)
    return next(body for line, info, body in BLOCKS if info == "" and TEXT.count("\n", 0, start) < line)


def test_human_and_github_examples_are_real_output(tmp_path, monkeypatch):
    from shapeflow.dsl.diagnostics import render_github, render_human, summary

    monkeypatch.chdir(tmp_path)
    Path("bad.shape").write_text(BAD_SHAPE, encoding="utf-8")
    assert BAD_SHAPE.splitlines()[6] == "reward    extra   = correct + adv"
    compiled = compile_spec(Path("bad.shape"))
    human = render_human(compiled.diagnostics, compiled.sources) + "\n" + summary(compiled.diagnostics) + "\n"
    assert _example_after("`--format human` (the default)") == human
    assert _example_after("`--format github`") == render_github(compiled.diagnostics) + "\n"


# --- README: the table of methods ----------------------------------------------------------------

README = DOC.parents[1] / "README.md"
SHARED_STAGES = {"models.causal_lm", "tasks.arithmetic", "rollouts.sample", "verifiers.exact_answer"}
BASIC_NEEDS = {"prompt", "answer", "response", "response_ids", "logprobs", "policy_logprobs"}


def _methods_rows() -> list[tuple[str, list[str], list[str]]]:
    """(spec path, stages, needs) of every row of README's methods table."""
    text = README.read_text(encoding="utf-8")
    section = re.search(r"^## Methods in the library\n(.*?)(?=^## |\Z)", text, re.M | re.S).group(1)
    rows = []
    for line in section.splitlines():
        m = re.match(r"\| [^|]+ \| [^|]+ \| (?P<stages>[^|]+) \| \[`(?P<spec>[^`]+)`\]\([^)]+\) \| [^|]+ \| "
                     r"(?P<needs>[^|]+) \|$", line)
        if m:
            names = lambda cell: re.findall(r"`([^`]+)`", cell)  # noqa: E731
            rows.append((m["spec"], names(m["stages"]), names(m["needs"])))
    return rows


def test_the_methods_table_lists_every_spec_with_its_stages_and_needs():
    root = README.parent
    rows = _methods_rows()
    specs = sorted(str(p.relative_to(root)) for p in (root / "specs").rglob("*.shape"))
    assert sorted(spec for spec, _, _ in rows) == specs
    for spec, stages, needs in rows:
        result = compile_spec(root / spec, roots=[root / "specs"])
        assert result.ok, spec
        program = result.program
        used = []
        for node in sorted(program.nodes.values(), key=lambda n: n.order):
            if node.op == "stage" and node.stage not in SHARED_STAGES and node.stage not in used:
                used.append(node.stage)
        assert sorted(stages) == sorted(used), spec
        assert sorted(needs) == sorted(set(program.needs) - BASIC_NEEDS), spec

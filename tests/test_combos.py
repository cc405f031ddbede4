"""specs/combos/: combinations of published methods written in the language alone.

Every combination checks with no diagnostics at all (warnings included), as
`shapeflow check specs/` would report them, and the README's full example of a method is
the spec file it names, byte for byte. (Training a few steps: tests/test_specs.py, which
globs specs/ recursively.)
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from shapeflow.cli import main
from shapeflow.compiler.pipeline import compile_spec

ROOT = Path(__file__).resolve().parents[1]
COMBOS = sorted((ROOT / "specs" / "combos").glob("*.shape"))
README = ROOT / "README.md"
# A README block shown "in full" names its file in the fence's info string:
# ```shape specs/combos/NAME.shape
FULL_BLOCK = re.compile(r"^```shape[ \t]+(\S+\.shape)[ \t]*\n(.*?)^```[ \t]*$", re.M | re.S)


def test_there_are_at_least_four_combinations():
    assert len(COMBOS) >= 4, [p.name for p in COMBOS]


@pytest.mark.parametrize("spec", COMBOS, ids=[p.name for p in COMBOS])
def test_combination_checks_clean(spec):
    # roots: the folders `shapeflow check specs/` allows, so `extends = "../dapo.shape"` resolves.
    result = compile_spec(spec, roots=[ROOT / "specs"])
    assert result.ok
    assert not result.diagnostics, [f"{d.span.file}:{d.span.line}: {d.code} {d.message}" for d in result.diagnostics]
    header = result.program.header
    text = spec.read_text(encoding="utf-8")
    assert "cite" in header and "arXiv:" in header["cite"], "a combination cites every paper it draws on"
    assert text.startswith("#"), "a combination opens with a comment that says what it combines"


@pytest.mark.parametrize("spec", COMBOS, ids=[p.name for p in COMBOS])
def test_combination_checks_on_its_own_with_the_parents_folder(spec, capsys, monkeypatch):
    """The command each header gives: the parent lies outside specs/combos (docs/language.md §8)."""
    monkeypatch.chdir(ROOT)
    rel = spec.relative_to(ROOT).as_posix()
    assert f"shapeflow check {rel} --path specs" in spec.read_text(encoding="utf-8")
    code = main(["check", rel, "--path", "specs"])
    out, err = capsys.readouterr()
    assert (code, out, err) == (0, "", "")


@pytest.mark.parametrize("spec", COMBOS, ids=[p.name for p in COMBOS])
def test_combination_is_composed_in_the_language(spec):
    """Each combination starts from a method of specs/ (extends a parent there)."""
    text = spec.read_text(encoding="utf-8")
    m = re.search(r'extends\s*=\s*"\.\./([^"/]+\.shape)"', text)
    assert m, "a combination extends a spec of specs/ by a relative path"
    assert (ROOT / "specs" / m.group(1)).is_file()


def test_the_readme_shows_a_combination_in_full():
    blocks = FULL_BLOCK.findall(README.read_text(encoding="utf-8"))
    assert blocks, "README.md has no ```shape block that names its file"
    assert any(name.startswith("specs/combos/") for name, _ in blocks)
    for name, body in blocks:
        path = ROOT / name
        assert path.is_file(), f"README.md shows {name}, which does not exist"
        assert body == path.read_text(encoding="utf-8"), f"README.md's copy of {name} differs from the file"

"""write_plots: which PNG files a metrics.jsonl gives, that they are real images, and
read_metrics' handling of gaps, repeats, non-finite values and broken lines."""

from __future__ import annotations

import json
import math
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

from shapeflow.runtime.plots import PLOT_NAMES, Series, read_metrics, write_plots  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ROOT = Path(__file__).resolve().parents[1]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def full_rows(n: int, eval_every: int = 10) -> list[dict]:
    """Every metric write_plots knows, for steps 0..n-1; eval keys every eval_every steps."""
    rows = [{"step": -1, "eval/accuracy": 0.1, "eval/pass@4": 0.3}]
    for s in range(n):
        t = s / max(1, n - 1)
        wobble = 0.05 * math.sin(s)
        r = {"step": s, "time": 1000.0 + s}
        for b, base in (("correct", 0.2), ("format", 0.6)):
            r[f"reward/{b}/mean"] = base + 0.3 * t + wobble
            r[f"reward/{b}/std"] = 0.3
            r[f"verify/{b}/mean"] = base + 0.3 * t
            r[f"advantage/{b}/mean"] = wobble / 10
            r[f"advantage/{b}/std"] = 0.9 + wobble
        r["rollout/entropy/mean"] = 1.5 - t
        r["policy/entropy/mean"] = 1.4 - t
        r["rollout/response_length/mean"] = 100 + 50 * t
        r["rollout/response_length/max"] = 160 + 50 * t
        r["policy/kl_ref/mean"] = 0.02 * t
        r["policy/approx_kl"] = 0.001 + wobble / 100
        r["objective/pg"] = -0.1 * t + wobble
        r["objective/kl"] = 0.01 * t
        if (s + 1) % eval_every == 0:
            r["eval/accuracy"] = 0.2 + 0.5 * t
            r["eval/pass@4"] = 0.4 + 0.4 * t
        rows.append(r)
    return rows


# ----------------------------------------------------------------------------- write_plots


@pytest.mark.parametrize("n", [5, 60])  # markers only / faint raw + moving average
def test_every_plot_is_written_as_a_png(tmp_path, n):
    m = write_jsonl(tmp_path / "metrics.jsonl", full_rows(n))
    out = tmp_path / "plots"
    written = write_plots(m, out)
    assert written == [out / f"{name}.png" for name in PLOT_NAMES]
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{name}.png" for name in PLOT_NAMES)
    for path in written:
        assert path.read_bytes()[:8] == PNG_MAGIC
        assert path.stat().st_size > 15_000, path.name  # axes, curves and text, not a blank canvas
        # 9 x 5.2 inches at 110 dpi; the advantage figure has one 3-inch panel per binding.
        assert png_size(path) == ((990, 792) if path.name == "advantages.png" else (990, 572))


def test_plots_whose_keys_are_all_absent_are_skipped(tmp_path):
    rows = [{"step": s, "reward/correct/mean": s / 10, "perf/step_seconds": 1.0} for s in range(8)]
    m = write_jsonl(tmp_path / "metrics.jsonl", rows)
    out = tmp_path / "plots"
    assert write_plots(m, out) == [out / "reward.png"]
    assert [p.name for p in out.iterdir()] == ["reward.png"]


def test_only_eval_keys_give_an_accuracy_plot(tmp_path):
    rows = [{"step": s} for s in range(20)]
    for r in rows[4::5]:
        r["eval/pass@8"] = 0.5
    m = write_jsonl(tmp_path / "metrics.jsonl", rows)
    assert [p.name for p in write_plots(m, tmp_path / "p")] == ["accuracy.png"]


def test_keys_with_only_non_finite_values_count_as_absent(tmp_path):
    rows = [{"step": s, "policy/approx_kl": v, "objective/pg": 0.5}
            for s, v in enumerate([float("nan"), "NaN", None, "Infinity"])]
    m = tmp_path / "metrics.jsonl"
    m.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")  # NaN token included
    assert [p.name for p in write_plots(m, tmp_path / "p")] == ["loss.png"]


def test_advantage_panels_one_per_binding(tmp_path):
    rows = [{"step": s, **{f"advantage/{b}/mean": 0.0 for b in "abc"}, "advantage/c/std": 1.0}
            for s in range(4)]
    m = write_jsonl(tmp_path / "metrics.jsonl", rows)
    (path,) = write_plots(m, tmp_path / "p")
    assert path.name == "advantages.png"
    assert png_size(path) == (990, round((1.2 + 3 * 3.0) * 110))


def test_missing_or_empty_metrics_file_writes_nothing(tmp_path):
    assert write_plots(tmp_path / "nope.jsonl", tmp_path / "p") == []
    assert write_plots(write_jsonl(tmp_path / "m.jsonl", []), tmp_path / "p") == []
    assert not (tmp_path / "p").exists()


def test_a_thousand_steps_draw_quickly(tmp_path):
    m = write_jsonl(tmp_path / "metrics.jsonl", full_rows(1000, eval_every=50))
    write_plots(write_jsonl(tmp_path / "warm.jsonl", full_rows(3)), tmp_path / "warm")  # import cost
    t0 = time.perf_counter()
    written = write_plots(m, tmp_path / "plots")
    elapsed = time.perf_counter() - t0
    assert len(written) == len(PLOT_NAMES)
    assert elapsed < 8.0  # about 1 s on 2 idle CPU cores; generous for loaded CI machines


# ----------------------------------------------------------------------------- read_metrics


def test_read_metrics_gaps_repeats_non_finite_and_broken_lines(tmp_path):
    m = tmp_path / "metrics.jsonl"
    m.write_text(
        '{"step": 2, "a": 1.0, "b": 5}\n'
        "\n"
        '{"step": 0, "a": 0.5, "c": "text", "d": true}\n'
        '{"step": 1, "a": NaN, "b": Infinity, "e": null}\n'
        '["not", "an", "object"]\n'
        '{"a": 9.0}\n'
        '{"step": 2, "a": 2.0}\n'  # a resumed run repeats step 2: the later line wins
        '{"step": 3, "a": 3.0, "b": "NaN"}\n'
        '{"step": 4, "a": 4.0, "b": 7',  # cut short by a crash
        encoding="utf-8",
    )
    assert read_metrics(m) == {
        "a": Series([0, 2, 3], [0.5, 2.0, 3.0]),
        "b": Series([2], [5.0]),
    }


def test_importing_plots_does_not_import_matplotlib():
    code = "import sys, shapeflow.runtime.plots; print('matplotlib' in sys.modules, 'numpy' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.split() == ["False", "False"]

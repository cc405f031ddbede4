"""Training curves as PNG files, drawn from a run's ``metrics.jsonl``.

:func:`write_plots` reads the metrics file (one JSON object per line, each with ``"step"``
and flat metric keys) and writes, into a folder, the plots whose metrics are present:

- ``reward.png``: ``reward/<binding>/mean``, with a +-std band from ``reward/<binding>/std``;
- ``accuracy.png``: ``verify/<binding>/mean`` (training rollouts), ``eval/accuracy`` and
  ``eval/pass@<k>`` (held-out);
- ``entropy.png``: ``rollout/entropy/mean``, ``policy/entropy/mean``;
- ``response_length.png``: ``rollout/response_length/mean`` (+-std band from ``.../std``)
  and ``rollout/response_length/max`` (dashed);
- ``kl.png``: ``policy/kl_ref/mean``, ``policy/approx_kl``;
- ``advantages.png``: ``advantage/<binding>/mean`` and ``/std``, one panel per binding;
- ``loss.png``: every key that starts with ``objective/``.

A plot none of whose metrics is in the file is not written. A metric may skip steps
(evaluations run every K steps): each curve shows the steps it has; curves with few points
get markers. Noisy per-step curves (more than 30 points) are drawn faintly with a moving
average on top. Non-finite values are left out. Lines that are not valid JSON (a line cut
short by a crash) are ignored.

Drawing uses matplotlib's Agg canvas directly (no pyplot, no global backend switch), so it
is safe to call from a training process; matplotlib is imported on the first call.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

__all__ = ["read_metrics", "write_plots", "PLOT_NAMES"]

PLOT_NAMES = ("reward", "accuracy", "entropy", "response_length", "kl", "advantages", "loss")

_SMOOTH_MIN_POINTS = 30  # more points than this: faint raw curve + moving average
_MARKER_MAX_POINTS = 40  # this many points or fewer: draw markers
_NONFINITE = {"nan", "+nan", "-nan", "infinity", "+infinity", "-infinity", "inf", "+inf", "-inf"}


@dataclass
class Series:
    """One metric: its steps (ascending, unique) and finite values."""

    steps: list[int] = field(default_factory=list)
    values: list[float] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.steps)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        v = float(value)
    elif isinstance(value, str) and value.strip().lower() in _NONFINITE:
        return None
    else:
        return None
    return v if math.isfinite(v) else None


def read_metrics(metrics_jsonl: Path) -> dict[str, Series]:
    """Every numeric metric of a metrics file, by key, sorted by step.

    A step logged twice (a resumed run repeats steps after its last checkpoint) keeps the
    value logged last.
    """
    raw: dict[str, dict[int, float]] = {}
    with open(metrics_jsonl, encoding="utf-8") as fh:
        for line in fh:
            line = line.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if not isinstance(record, dict):
                continue
            step = record.get("step")
            if isinstance(step, bool) or not isinstance(step, (int, float)) or not math.isfinite(step):
                continue
            step = int(step)
            for key, value in record.items():
                if key == "step":
                    continue
                v = _number(value)
                if v is not None:
                    raw.setdefault(key, {})[step] = v
    out: dict[str, Series] = {}
    for key, points in raw.items():
        steps = sorted(points)
        out[key] = Series(steps, [points[s] for s in steps])
    return out


# ----------------------------------------------------------------------------- drawing


def _moving_average(values, window: int):
    """Centered moving average of a 1-D array. Near the ends the window shrinks
    symmetrically (down to the point itself), so a straight trend stays straight."""
    import numpy as np

    v = np.asarray(values, dtype=float)
    if window <= 1 or len(v) < 3:
        return v
    idx = np.arange(len(v))
    half = np.minimum(np.minimum(idx, len(v) - 1 - idx), window // 2)
    c = np.concatenate([[0.0], np.cumsum(v)])
    return (c[idx + half + 1] - c[idx - half]) / (2 * half + 1)


def _window(n: int) -> int:
    return max(3, min(51, n // 25)) | 1  # odd, about 4% of the run


class _Figure:
    """A figure with one or more stacked panels, drawn with the Agg canvas."""

    def __init__(self, title: str, panels: int = 1, height_per_panel: float = 4.0):
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        height = 1.2 + height_per_panel * panels
        self.fig = Figure(figsize=(9.0, height), dpi=110)
        FigureCanvasAgg(self.fig)
        self.axes = self.fig.subplots(panels, 1, sharex=True, squeeze=False)[:, 0]
        # Fixed margins (in inches) instead of a layout engine, which would draw twice.
        self.fig.subplots_adjust(left=0.095, right=0.985, bottom=0.75 / height,
                                 top=1.0 - 0.5 / height, hspace=0.55 / (height_per_panel - 0.55))
        self.fig.suptitle(title, fontsize=14, fontweight="bold")
        self.smoothed = False
        from matplotlib.ticker import MaxNLocator

        for ax in self.axes:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True, steps=[1, 2, 2.5, 5, 10]))
            ax.grid(True, alpha=0.3)
            ax.tick_params(labelsize=9)
        self.axes[-1].set_xlabel("step")

    def line(self, ax, s: Series, label: str, color, *, band: Series | None = None,
             smooth: bool = True, linestyle: str = "-") -> None:
        import numpy as np

        x = np.asarray(s.steps, dtype=float)
        y = np.asarray(s.values, dtype=float)
        if band is not None and len(band):
            sd = dict(zip(band.steps, band.values))
            keep = [i for i, st in enumerate(s.steps) if st in sd]
            if keep:
                bx = x[keep]
                by = y[keep]
                bs = np.asarray([sd[s.steps[i]] for i in keep])
                if len(s) > _SMOOTH_MIN_POINTS and smooth:
                    w = _window(len(s))
                    by = _moving_average(by, w)
                    bs = _moving_average(bs, w)
                ax.fill_between(bx, by - bs, by + bs, color=color, alpha=0.15, linewidth=0,
                                label=f"{label} ± std")
        if smooth and len(s) > _SMOOTH_MIN_POINTS:
            ax.plot(x, y, color=color, alpha=0.25, linewidth=0.8)
            ax.plot(x, _moving_average(y, _window(len(s))), color=color, linewidth=2.0, label=label,
                    linestyle=linestyle)
            self.smoothed = True
        elif len(s) <= _MARKER_MAX_POINTS:
            ax.plot(x, y, color=color, linewidth=1.8, marker="o", markersize=4, label=label,
                    linestyle=linestyle)
        else:
            ax.plot(x, y, color=color, linewidth=1.5, label=label, linestyle=linestyle)

    def save(self, path: Path) -> Path:
        for ax in self.axes:
            handles, labels = ax.get_legend_handles_labels()
            if handles:
                ax.legend(fontsize=9, loc="best", framealpha=0.85)
        if self.smoothed:
            self.fig.text(0.995, 0.005, "faint: per step · bold: moving average",
                          ha="right", va="bottom", fontsize=8, color="0.4")
        self.fig.savefig(path, dpi=110)
        return path


def _colors():
    from matplotlib import colormaps

    return list(colormaps["tab10"].colors)


def _matching(metrics: dict[str, Series], pattern: str) -> list[tuple[str, str]]:
    """(key, group 1) of every key matching the pattern, sorted by key."""
    rx = re.compile(pattern)
    out = []
    for key in sorted(metrics):
        m = rx.fullmatch(key)
        if m and len(metrics[key]):
            out.append((key, m.group(1) if m.groups() else key))
    return out


def _present(metrics: dict[str, Series], keys: Iterable[str]) -> list[str]:
    return [k for k in keys if k in metrics and len(metrics[k])]


def _unit_ylim(ax, series: list[Series]) -> None:
    vals = [v for s in series for v in s.values]
    if vals and min(vals) >= 0.0 and max(vals) <= 1.0:
        ax.set_ylim(-0.03, 1.03)


def _plot_reward(metrics, path):
    found = _matching(metrics, r"reward/(.+)/mean")
    if not found:
        return None
    f = _Figure("Reward")
    ax = f.axes[0]
    colors = _colors()
    for i, (key, binding) in enumerate(found):
        f.line(ax, metrics[key], binding, colors[i % len(colors)],
               band=metrics.get(f"reward/{binding}/std"))
    ax.set_ylabel("mean reward per response")
    return f.save(path)


def _plot_accuracy(metrics, path):
    train = _matching(metrics, r"verify/(.+)/mean")
    evals = _present(metrics, ["eval/accuracy"]) + [k for k, _ in _matching(metrics, r"eval/pass@(.+)")]
    if not train and not evals:
        return None
    f = _Figure("Accuracy")
    ax = f.axes[0]
    colors = _colors()
    drawn = []
    for i, (key, binding) in enumerate(train):
        f.line(ax, metrics[key], f"{binding} (training rollouts)", colors[i % len(colors)])
        drawn.append(metrics[key])
    for j, key in enumerate(evals):
        color = colors[(len(train) + j) % len(colors)]
        f.line(ax, metrics[key], f"{key} (held-out)", color, smooth=False)
        drawn.append(metrics[key])
    ax.set_ylabel("fraction correct")
    _unit_ylim(ax, drawn)
    return f.save(path)


def _plot_simple(metrics, path, title, ylabel, keys, *, bands: dict[str, str] | None = None):
    found = _present(metrics, keys)
    if not found:
        return None
    f = _Figure(title)
    ax = f.axes[0]
    colors = _colors()
    for i, key in enumerate(found):
        band = metrics.get((bands or {}).get(key, ""))
        f.line(ax, metrics[key], key, colors[i % len(colors)], band=band,
               linestyle="--" if key.endswith("/max") else "-")
    ax.set_ylabel(ylabel)
    return f.save(path)


def _plot_advantages(metrics, path):
    bindings = sorted({b for _, b in _matching(metrics, r"advantage/(.+)/(?:mean|std)")})
    if not bindings:
        return None
    f = _Figure("Advantages", panels=len(bindings), height_per_panel=3.0)
    colors = _colors()
    for ax, binding in zip(f.axes, bindings):
        for i, stat in enumerate(("mean", "std")):
            s = metrics.get(f"advantage/{binding}/{stat}")
            if s is not None and len(s):
                f.line(ax, s, stat, colors[i])
        ax.set_title(f"advantage/{binding}", fontsize=11, loc="left")
        ax.set_ylabel("advantage")
        ax.axhline(0.0, color="0.5", linewidth=0.8, linestyle=":")
    return f.save(path)


def _plot_loss(metrics, path):
    found = [k for k, _ in _matching(metrics, r"objective/.+")]
    if not found:
        return None
    f = _Figure("Objective")
    ax = f.axes[0]
    colors = _colors()
    for i, key in enumerate(found):
        f.line(ax, metrics[key], key[len("objective/"):], colors[i % len(colors)])
    ax.set_ylabel("loss (minimised)")
    return f.save(path)


def write_plots(metrics_jsonl: Path, out_dir: Path) -> list[Path]:
    """Write the PNG plots of a metrics file into ``out_dir``; return the files written
    (in the order of :data:`PLOT_NAMES`). A missing or empty metrics file writes nothing."""
    metrics_jsonl = Path(metrics_jsonl)
    if not metrics_jsonl.is_file():
        return []
    metrics = read_metrics(metrics_jsonl)
    if not metrics:
        return []
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    def p(name: str) -> Path:
        return out_dir / f"{name}.png"

    jobs = [
        lambda: _plot_reward(metrics, p("reward")),
        lambda: _plot_accuracy(metrics, p("accuracy")),
        lambda: _plot_simple(metrics, p("entropy"), "Entropy", "mean entropy per token (nats)",
                             ["rollout/entropy/mean", "policy/entropy/mean"]),
        lambda: _plot_simple(metrics, p("response_length"), "Response length", "tokens",
                             ["rollout/response_length/mean", "rollout/response_length/max"],
                             bands={"rollout/response_length/mean": "rollout/response_length/std"}),
        lambda: _plot_simple(metrics, p("kl"), "KL divergence", "KL (nats per token)",
                             ["policy/kl_ref/mean", "policy/approx_kl"]),
        lambda: _plot_advantages(metrics, p("advantages")),
        lambda: _plot_loss(metrics, p("loss")),
    ]
    written = []
    for job in jobs:
        path = job()
        if path is not None:
            written.append(path)
    return written

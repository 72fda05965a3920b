"""Plots and Markdown for the quickstart and compare reports.

Everything here reads plain data (metrics dicts from ``metrics.jsonl``, evaluation scores,
trajectory records) and writes PNG or Markdown; nothing trains or evaluates.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tspo.errors import TSPOError

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

# Labels of the step metrics the reports plot (keys of the trainer's metrics.jsonl).
METRIC_LABELS = {
    "reward_mean": "training reward (EM)",
    "f1_mean": "training F1",
    "zero_signal_groups_grpo": "zero-signal groups, outcome-only GRPO view",
    "zero_signal_groups": "zero-signal groups, estimator used",
    "near_miss_rate": "near-miss rate (answer retrieved, final answer wrong)",
    "mean_group_reward_std": "reward std within groups",
    "hit_rate": "FOLR hit rate (answer retrieved)",
    "test_em": "test EM (greedy, held-out entities)",
}


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Every JSON object of a jsonl file (blank lines skipped)."""
    path = Path(path)
    if not path.is_file():
        raise TSPOError(f"{path}: file not found")
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise TSPOError(f"{path}, line {number}: not JSON ({err.msg})") from err
    return rows


def moving_average(values: Sequence[float], window: int) -> list[float]:
    """Trailing mean over ``window`` points (shorter at the start); NaN-free input expected."""
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _series(metrics: Sequence[Mapping[str, Any]], key: str) -> tuple[list[int], list[float]]:
    steps, values = [], []
    for row in metrics:
        value = row.get(key)
        if value is not None and not (isinstance(value, float) and math.isnan(value)):
            steps.append(int(row["step"]))
            values.append(float(value))
    return steps, values


def _save_plot(
    fig: Figure, ax: Axes, path: str | Path, *, title: str, ylabel: str, legend_size: int
) -> Path:
    """Label a plot against training step, write it to ``path`` and close it."""
    ax.set_xlabel("training step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_size, loc="best")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    _pyplot().close(fig)
    return path


def plot_step_metrics(
    metrics: Sequence[Mapping[str, Any]],
    keys: Sequence[str],
    path: str | Path,
    *,
    title: str,
    ylabel: str,
    smooth: int = 5,
    points: Mapping[str, tuple[Sequence[int], Sequence[float]]] | None = None,
) -> Path:
    """One line per metric ``key`` against step (raw, faint, and a ``smooth``-step average).

    ``points`` adds labelled markers, e.g. ``{"test EM": ([0, 40], [0.31, 0.52])}``.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=110)
    for index, key in enumerate(keys):
        steps, values = _series(metrics, key)
        if not steps:
            continue
        color = f"C{index}"
        ax.plot(steps, values, color=color, alpha=0.25, linewidth=1)
        ax.plot(
            steps, moving_average(values, smooth), color=color, label=METRIC_LABELS.get(key, key)
        )
    for index, (label, (xs, ys)) in enumerate((points or {}).items(), start=len(keys)):
        ax.plot(list(xs), list(ys), "o--", color=f"C{index}", label=label, markersize=6)
    ax.set_ylim(-0.02, 1.02)
    return _save_plot(fig, ax, path, title=title, ylabel=ylabel, legend_size=7)


@dataclass(frozen=True)
class Curve:
    """Mean and standard deviation over seeds of one metric, at each step."""

    steps: list[int]
    mean: list[float]
    std: list[float]


def mean_std_curve(runs: Sequence[Sequence[tuple[int, float]]]) -> Curve:
    """Average (step, value) series of several seeds at the steps they all share."""
    if not runs:
        return Curve([], [], [])
    shared = set.intersection(*({step for step, _ in run} for run in runs))
    steps = sorted(shared)
    means, stds = [], []
    for step in steps:
        values = [value for run in runs for s, value in run if s == step]
        mean = sum(values) / len(values)
        means.append(mean)
        stds.append(math.sqrt(sum((v - mean) ** 2 for v in values) / len(values)))
    return Curve(steps, means, stds)


def plot_curves(curves: Mapping[str, Curve], path: str | Path, *, title: str, ylabel: str) -> Path:
    """One line per name with a ±1 std band."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=110)
    for index, (name, curve) in enumerate(curves.items()):
        if not curve.steps:
            continue
        color = f"C{index}"
        low = [m - s for m, s in zip(curve.mean, curve.std, strict=True)]
        high = [m + s for m, s in zip(curve.mean, curve.std, strict=True)]
        ax.plot(curve.steps, curve.mean, color=color, label=name, marker="o", markersize=3)
        ax.fill_between(curve.steps, low, high, color=color, alpha=0.15)
    return _save_plot(fig, ax, path, title=title, ylabel=ylabel, legend_size=8)


def steps_to_reach(curve: Curve, target: float) -> int | None:
    """The first step at which ``curve``'s mean reaches ``target`` (None if it never does)."""
    for step, value in zip(curve.steps, curve.mean, strict=True):
        if value >= target - 1e-9:
            return step
    return None


# ---------------------------------------------------------------------------------------------
# Markdown


def fmt(value: float, digits: int = 3) -> str:
    return f"{value:.{digits}f}"


def before_after_table(
    before: Mapping[str, Mapping[str, float]], after: Mapping[str, Mapping[str, float]]
) -> str:
    """EM, F1, turns, searches, answer rate and invalid-action rate per data source, before and
    after RL, with the EM change."""
    lines = [
        "| questions | n | EM before | EM after | change | F1 before | F1 after "
        "| turns before | turns after | searches before | searches after "
        "| answered before | answered after | invalid before | invalid after |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    sources = [s for s in before if s != "overall"] + ["overall"]
    for source in sources:
        if source not in after:
            continue
        b, a = before[source], after[source]
        name = "**all**" if source == "overall" else source
        lines.append(
            f"| {name} | {int(b['count'])} | {fmt(b['em'])} | {fmt(a['em'])} | "
            f"{a['em'] - b['em']:+.3f} | {fmt(b['f1'])} | {fmt(a['f1'])} | "
            f"{fmt(b['turns'], 2)} | {fmt(a['turns'], 2)} | "
            f"{fmt(b['searches'], 2)} | {fmt(a['searches'], 2)} | "
            f"{fmt(b.get('answered', float('nan')))} | {fmt(a.get('answered', float('nan')))} | "
            f"{fmt(b.get('invalid_rate', float('nan')))} | "
            f"{fmt(a.get('invalid_rate', float('nan')))} |"
        )
    return "\n".join(lines) + "\n"


def trajectory_block(record: Mapping[str, Any]) -> str:
    """A trajectory as a fenced block: the response (generations and observations) and its score."""
    response = str(record.get("response", "")).strip()
    verdict = "correct" if record.get("em") else "wrong"
    return (
        f"answer `{record.get('final_answer')}` ({verdict}; gold: "
        f"{', '.join(record.get('golds', []))})\n\n```text\n{response}\n```\n"
    )


def examples_section(
    before: Sequence[Mapping[str, Any]], after: Sequence[Mapping[str, Any]], count: int = 3
) -> str:
    """The first ``count`` questions answered by both policies, before and after, side by side."""
    after_by_id = {r["id"]: r for r in after}
    chosen = [r for r in before if r["id"] in after_by_id][:count]
    parts = []
    for index, record in enumerate(chosen, 1):
        parts.append(f"### Example {index}: {record['question']}\n")
        parts.append(f"**Before RL (SFT start)**: {trajectory_block(record)}")
        parts.append(f"**After RL**: {trajectory_block(after_by_id[record['id']])}")
    return "\n".join(parts)

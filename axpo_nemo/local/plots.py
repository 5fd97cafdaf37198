"""Tables and plots of run metrics (the records of ``metrics.jsonl``), and run comparisons.

Everything works on the RL records by default (``phase="rl"``). Series are indexed by step; a
step logged twice (a resumed run whose log was not truncated) keeps its last value, and a metric
a run did not log (GRPO has no resampling metrics) is NaN: it shows as "n/a" in tables and as a
gap, or no line, in plots. Figures use matplotlib's object API with the Agg canvas (no pyplot
state, no display needed).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from rich.table import Table

from axpo_nemo.run.metrics_log import read_metrics

__all__ = [
    "COMPARE_METRICS",
    "PANEL_METRICS",
    "SUMMARY_METRICS",
    "compare_runs",
    "plot_mean_band",
    "plot_mean_bands",
    "plot_run",
    "rolling_mean",
    "run_label",
    "series",
    "summarize",
    "summary_markdown",
    "summary_table",
]

#: Metrics of the run summary and the comparison table.
SUMMARY_METRICS = (
    "accuracy",
    "accuracy_tool",
    "accuracy_no_tool",
    "tool_use_rate",
    "tool_subgroup_all_wrong_rate",
    "resample_recovery_rate",
    "extra_rollout_fraction",
    "mean_turns",
    "mean_response_tokens",
)
#: The three panels of a run's main figure.
PANEL_METRICS = ("accuracy", "tool_use_rate", "tool_subgroup_all_wrong_rate")
#: One comparison plot each.
COMPARE_METRICS = SUMMARY_METRICS
_RESAMPLE_METRICS = ("resample_recovery_rate", "extra_rollout_fraction")
_DPI = 100


def series(
    records: Sequence[Mapping[str, Any]], metric: str, phase: str | None = "rl"
) -> tuple[np.ndarray, np.ndarray]:
    """``(steps, values)`` of ``metric`` in ``phase`` (None: any), by ascending step.

    Missing or non-numeric values are NaN; a repeated step keeps its last value.
    """
    by_step: dict[int, float] = {}
    for rec in records:
        if phase is not None and rec.get("phase", phase) != phase:
            continue
        v = rec.get(metric)
        ok = isinstance(v, int | float) and not isinstance(v, bool)
        by_step[int(rec["step"])] = float(v) if ok else math.nan
    steps = np.array(sorted(by_step), dtype=np.int64)
    return steps, np.array([by_step[s] for s in steps], dtype=np.float64)


def rolling_mean(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over the last ``window`` points, ignoring NaN (NaN where all are NaN)."""
    values = np.asarray(values, dtype=np.float64)
    if window <= 1 or values.size == 0:
        return values.copy()
    ok = ~np.isnan(values)
    csum = np.concatenate([[0.0], np.cumsum(np.where(ok, values, 0.0))])
    ccount = np.concatenate([[0], np.cumsum(ok)])
    hi = np.arange(1, values.size + 1)
    lo = np.maximum(0, hi - window)
    count = ccount[hi] - ccount[lo]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, (csum[hi] - csum[lo]) / np.maximum(count, 1), np.nan)


def _smooth_window(n: int) -> int:
    # Light smoothing only once curves get long enough to be noisy.
    return max(3, n // 25) if n >= 30 else 1


def _edge_window(n: int) -> int:
    return max(1, min(10, n // 10))


def _nanmean(x: np.ndarray) -> float:
    x = x[~np.isnan(x)]
    return float(x.mean()) if x.size else math.nan


def summarize(
    records: Sequence[Mapping[str, Any]], metrics: Sequence[str] = SUMMARY_METRICS, phase: str = "rl"
) -> list[dict[str, Any]]:
    """Per metric: ``start``, ``end`` and ``change`` (end - start), and the ``window`` used.

    ``start``/``end`` are the means of the first/last ``window`` steps (1 step under 20
    steps, up to 10 for long runs), ignoring NaN: a single step is too noisy to summarise a run.
    """
    out = []
    for metric in metrics:
        steps, values = series(records, metric, phase)
        w = _edge_window(len(steps))
        start, end = _nanmean(values[:w]), _nanmean(values[-w:])
        out.append({"metric": metric, "start": start, "end": end, "change": end - start, "window": w})
    return out


def _fmt(v: float, signed: bool = False, scale: float | None = None) -> str:
    """3 decimals for rates, 1 for large values (``scale``: the magnitude deciding, default ``v``)."""
    if not isinstance(v, int | float) or math.isnan(v):
        return "n/a"
    big = abs(v if scale is None or math.isnan(scale) else scale) >= 100
    return f"{v:{'+' if signed else ''}.{1 if big else 3}f}"


def _fmt_row(row: dict[str, Any]) -> list[str]:
    scale = max(abs(row["start"]), abs(row["end"]))
    return [_fmt(row["start"]), _fmt(row["end"]), _fmt(row["change"], signed=True, scale=scale)]


def _caption(rows: list[dict[str, Any]], records) -> str:
    n = len(series(records, "accuracy")[0]) if records else 0
    w = rows[0]["window"] if rows else 1
    return f"{n} steps; start/end = mean of the first/last {w} step(s)"


def summary_table(records: Sequence[Mapping[str, Any]], title: str | None = "Run summary") -> Table:
    """A rich table of :data:`SUMMARY_METRICS`: start, end and change over the RL steps."""
    rows = summarize(records)
    table = Table(title=title, caption=_caption(rows, records))
    table.add_column("metric")
    for name in ("start", "end", "change"):
        table.add_column(name, justify="right")
    for row in rows:
        table.add_row(row["metric"], *_fmt_row(row))
    return table


def summary_markdown(records: Sequence[Mapping[str, Any]]) -> str:
    """The :func:`summary_table` as a markdown table (with its caption as a last line)."""
    rows = summarize(records)
    lines = ["| metric | start | end | change |", "| --- | ---: | ---: | ---: |"]
    for r in rows:
        lines.append("| " + " | ".join([r["metric"], *_fmt_row(r)]) + " |")
    return "\n".join([*lines, "", f"_{_caption(rows, records)}_"]) + "\n"


def _plot_series(ax, steps, values, label=None, color=None, smooth=None) -> None:
    w = _smooth_window(len(steps)) if smooth is None else smooth
    if w > 1:
        (line,) = ax.plot(steps, values, color=color, alpha=0.25, linewidth=0.8)
        ax.plot(steps, rolling_mean(values, w), color=line.get_color(), linewidth=1.8, label=label)
    else:
        ax.plot(steps, values, color=color, marker="o", markersize=3, linewidth=1.5, label=label)


def _new_figure(panels: int) -> tuple[Figure, list]:
    fig = Figure(figsize=(4.2 * panels, 3.4), dpi=_DPI, layout="constrained")
    axes = fig.subplots(1, panels, squeeze=False)[0]
    return fig, list(axes)


def _finite(values: np.ndarray) -> bool:
    return bool(np.isfinite(values).any())


def plot_run(
    records: Sequence[Mapping[str, Any]], out_dir: str | os.PathLike, phase: str = "rl"
) -> list[Path]:
    """Write a run's curves as PNGs; returns the files written.

    ``curves.png``: accuracy (with the tool/no-tool split, and eval accuracy when logged),
    tool-use rate and the all-wrong tool-subgroup rate over steps. ``resampling.png``:
    resample recovery rate and extra rollout fraction, only when the run logged them (AXPO).
    Long runs show the raw values faintly under a trailing rolling mean.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    fig, axes = _new_figure(len(PANEL_METRICS))
    for ax, metric in zip(axes, PANEL_METRICS, strict=True):
        steps, values = series(records, metric, phase)
        _plot_series(ax, steps, values, label=metric)
        if metric == "accuracy":
            for extra in ("accuracy_tool", "accuracy_no_tool"):
                s, v = series(records, extra, phase)
                if _finite(v):
                    ax.plot(
                        s, rolling_mean(v, _smooth_window(len(s))), linewidth=1.0, linestyle="--", label=extra
                    )
            s, v = series(records, "accuracy", "eval")
            if _finite(v):
                ax.plot(s, v, marker="s", linestyle=":", color="black", label="eval accuracy")
            ax.legend(fontsize=7)
        ax.set_title(metric, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    written.append(out_dir / "curves.png")
    fig.savefig(written[-1])

    if any(_finite(series(records, m, phase)[1]) for m in _RESAMPLE_METRICS):
        fig, axes = _new_figure(len(_RESAMPLE_METRICS))
        for ax, metric in zip(axes, _RESAMPLE_METRICS, strict=True):
            _plot_series(ax, *series(records, metric, phase))
            ax.set_title(metric, fontsize=10)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
        written.append(out_dir / "resampling.png")
        fig.savefig(written[-1])
    return written


def run_label(run_dir: str | os.PathLike) -> str:
    """A run's name for legends: its folder name, plus the algorithm from its ``config.yaml``
    when the name does not already say it (e.g. ``seed0 (grpo)``)."""
    run_dir = Path(run_dir).resolve()
    name = run_dir.name
    cfg = run_dir / "config.yaml"
    if cfg.exists():
        import yaml

        try:
            algo = (yaml.safe_load(cfg.read_text()) or {}).get("algorithm")
        except (yaml.YAMLError, AttributeError):
            algo = None
        if isinstance(algo, str) and algo.lower() not in name.lower():
            return f"{name} ({algo})"
    return name


def _unique_labels(run_dirs: Sequence[Path]) -> list[str]:
    labels = [run_label(d) for d in run_dirs]
    return [
        f"{Path(d).resolve().parent.name}/{label}" if labels.count(label) > 1 else label
        for d, label in zip(run_dirs, labels, strict=True)
    ]


def compare_runs(
    run_dirs: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    labels: Sequence[str] | None = None,
    metrics: Sequence[str] = COMPARE_METRICS,
) -> tuple[list[Path], str]:
    """Overlay several runs (each a folder with ``metrics.jsonl``): one PNG per metric, one table.

    Returns ``(png_paths, markdown)``: ``compare_<metric>.png`` for every metric some run
    logged, and a markdown table with each run's steps and end value of each metric (mean of
    its last steps, as in :func:`summarize`; "n/a" for a metric the run did not log). Runs of
    different lengths are drawn over their own steps.
    """
    run_dirs = [Path(d) for d in run_dirs]
    if not run_dirs:
        raise ValueError("compare_runs: no runs given")
    for d in run_dirs:
        if not (d / "metrics.jsonl").is_file():
            raise FileNotFoundError(f"{d}: no metrics.jsonl (is this a run folder?)")
    if labels is None:
        labels = _unique_labels(run_dirs)
    elif len(labels) != len(run_dirs):
        raise ValueError("compare_runs: one label per run")
    runs = [read_metrics(d, phase="rl") for d in run_dirs]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    written = []
    for metric in metrics:
        data = [series(recs, metric) for recs in runs]
        if not any(_finite(v) for _, v in data):
            continue
        fig = Figure(figsize=(6.4, 4.0), dpi=_DPI, layout="constrained")
        ax = fig.add_subplot()
        for label, (steps, values) in zip(labels, data, strict=True):
            if _finite(values):
                _plot_series(ax, steps, values, label=label)
            else:
                ax.plot([], [], label=f"{label} (not logged)")
        ax.set_title(metric)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        written.append(out_dir / f"compare_{metric}.png")
        fig.savefig(written[-1])

    header = ["run", "steps", *metrics]
    lines = ["| " + " | ".join(header) + " |", "| --- | ---: |" + " ---: |" * len(metrics)]
    for label, recs in zip(labels, runs, strict=True):
        ends = {r["metric"]: r["end"] for r in summarize(recs, metrics)}
        n = len(series(recs, metrics[0])[0]) if metrics else 0
        lines.append("| " + " | ".join([label, str(n), *(_fmt(ends[m]) for m in metrics)]) + " |")
    return written, "\n".join(lines) + "\n"


def _mean_std(runs: Sequence[Sequence[Mapping[str, Any]]], metric: str, phase: str, smooth: int | None):
    data = [series(recs, metric, phase) for recs in runs]
    steps = np.unique(np.concatenate([s for s, _ in data])) if data else np.array([], dtype=np.int64)
    grid = np.full((len(data), steps.size), np.nan)
    for i, (s, v) in enumerate(data):
        w = _smooth_window(len(s)) if smooth is None else smooth
        grid[i, np.searchsorted(steps, s)] = rolling_mean(v, w)
    ok = ~np.isnan(grid)
    count = ok.sum(axis=0)
    total = np.where(ok, grid, 0.0).sum(axis=0)
    mean = np.where(count > 0, total / np.maximum(count, 1), np.nan)
    sq = np.where(ok, (grid - mean) ** 2, 0.0).sum(axis=0)
    # Sample std over the seeds present at a step; 0 where only one seed reached it.
    std = np.where(count > 1, np.sqrt(sq / np.maximum(count - 1, 1)), 0.0)
    return steps, mean, std


def _draw_mean_band(ax, runs_by_label, metric: str, phase: str, smooth: int | None) -> None:
    for label, runs in runs_by_label.items():
        steps, mean, std = _mean_std(runs, metric, phase, smooth)
        if not _finite(mean):
            ax.plot([], [], label=f"{label} (not logged)")
            continue
        (line,) = ax.plot(steps, mean, linewidth=1.8, label=f"{label} (n={len(runs)})")
        ax.fill_between(steps, mean - std, mean + std, color=line.get_color(), alpha=0.2, linewidth=0)
    ax.set_title(f"{metric} (mean ± std over seeds)", fontsize=9)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def plot_mean_band(
    runs_by_label: Mapping[str, Sequence[Sequence[Mapping[str, Any]]]],
    metric: str,
    out: str | os.PathLike,
    *,
    phase: str = "rl",
    smooth: int | None = None,
) -> Path:
    """Plot, per label, the mean ± sample std across seeds of ``metric`` at each step; returns ``out``.

    ``runs_by_label`` maps a label (e.g. "GRPO", "AXPO") to its seeds' record lists. Seeds of
    different lengths are averaged over the seeds that reached a step. Each seed is smoothed
    first (``smooth``: window in steps; None: light smoothing for long runs).
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig = Figure(figsize=(6.4, 4.0), dpi=_DPI, layout="constrained")
    _draw_mean_band(fig.add_subplot(), runs_by_label, metric, phase, smooth)
    fig.savefig(out)
    return out


def plot_mean_bands(
    runs_by_label: Mapping[str, Sequence[Sequence[Mapping[str, Any]]]],
    metrics: Sequence[str],
    out: str | os.PathLike,
    *,
    phase: str = "rl",
    smooth: int | None = None,
    columns: int = 3,
) -> Path:
    """`plot_mean_band` for several metrics, one panel each, in one figure; returns ``out``."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = math.ceil(len(metrics) / columns)
    fig = Figure(figsize=(4.2 * columns, 3.2 * rows), dpi=_DPI, layout="constrained")
    axes = fig.subplots(rows, columns, squeeze=False).ravel()
    for ax, metric in zip(axes, metrics, strict=False):
        _draw_mean_band(ax, runs_by_label, metric, phase, smooth)
    for ax in axes[len(metrics) :]:
        ax.set_visible(False)
    fig.savefig(out)
    return out

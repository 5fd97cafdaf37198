"""The aggregation half of `tools/exp_tool_collapse.py`: finished runs' metrics into the first/last-k
table, eval Pass@k, per-seed paired differences with a 95 % t interval, ``curves.csv`` and the
plots (``results.md``, ``results.json``). The running half plans, runs and resumes the runs.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import os
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

#: The per-step metrics of the plots and the first/last-k table.
CURVE_METRICS = (
    "tool_use_rate",
    "tool_subgroup_all_wrong_rate",
    "resample_recovery_rate",
    "accuracy",
    "accuracy_tool",
    "accuracy_no_tool",
)
#: Per-seed paired differences reported against AXPO: rows of the main table.
PAIRED_ROWS = ("tool_use_rate last", "accuracy last", "eval pass@1", "eval pass@4")
#: Eval metrics besides Pass@k (whose k come from the eval record).
EVAL_EXTRA = ("tool_use_rate",)
#: Each run folder's record of its wall time over invocations.
TIMING_FILE = "exp_timing.json"


@dataclass
class RunInfo:
    """One finished algorithm run to aggregate: its table column (``label``), seed and folder."""

    label: str
    seed: int
    run_dir: Path
    seconds: float = math.nan  # wall time of the run; NaN: read <run_dir>/exp_timing.json


@dataclass
class Aggregate:
    """What :func:`aggregate` wrote and computed."""

    markdown: str
    results_md: Path
    results_json: Path
    curves_csv: Path
    plots: list[Path]
    window: int
    #: label -> row name -> per-seed values (NaN where a run has none)
    values: dict[str, dict[str, list[float]]] = field(default_factory=dict)


def _nanmean(x: Sequence[float] | np.ndarray) -> float:
    a = np.asarray(x, dtype=np.float64)
    a = a[~np.isnan(a)]
    return float(a.mean()) if a.size else math.nan


def mean_std(values: Sequence[float]) -> tuple[float, float, int]:
    """Mean, sample std (NaN with fewer than two values) and count of the non-NaN values."""
    a = np.asarray(values, dtype=np.float64)
    a = a[~np.isnan(a)]
    if not a.size:
        return math.nan, math.nan, 0
    std = float(a.std(ddof=1)) if a.size > 1 else math.nan
    return float(a.mean()), std, int(a.size)


#: Two-sided 95 % quantiles of Student's t for 1..30 degrees of freedom (beyond: the normal's).
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160,
         2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056,
         2.052, 2.048, 2.045, 2.042)  # fmt: skip


def mean_ci95(values: Sequence[float]) -> tuple[float, float, float, int]:
    """Mean and the 95 % t confidence interval of the non-NaN values: (mean, low, high, n).

    With fewer than two values the interval is NaN.
    """
    a = np.asarray(values, dtype=np.float64)
    a = a[~np.isnan(a)]
    if not a.size:
        return math.nan, math.nan, math.nan, 0
    mean = float(a.mean())
    if a.size < 2:
        return mean, math.nan, math.nan, 1
    t = _T975[a.size - 2] if a.size - 1 <= len(_T975) else 1.960
    half = t * float(a.std(ddof=1)) / math.sqrt(a.size)
    return mean, mean - half, mean + half, int(a.size)


def paired_differences(
    per_run: Sequence[Mapping[str, Any]], base: str, others: Sequence[str], rows: Sequence[str]
) -> list[dict[str, Any]]:
    """Per seed, ``base`` minus each of ``others`` on each row; mean and 95 % CI over the seeds
    where both runs have a value. Returns one dict per (other, row)."""
    by = {(r["label"], r["seed"]): r for r in per_run}
    out = []
    for other in others:
        seeds = sorted({seed for (lab, seed) in by if lab == base} & {seed for (lab, seed) in by if lab == other})
        for row in rows:
            diffs = [float(by[(base, sd)].get(row, math.nan)) - float(by[(other, sd)].get(row, math.nan)) for sd in seeds]
            mean, low, high, n = mean_ci95(diffs)
            out.append({"base": base, "other": other, "row": row, "seeds": seeds, "diffs": diffs,
                        "mean": mean, "ci_low": low, "ci_high": high, "n": n})  # fmt: skip
    return out


def default_window(num_steps: int) -> int:
    """k of the first/last-k averages: a quarter of the run, between 1 and 10 steps."""
    return max(1, min(10, num_steps // 4))


def _fmt(v: float, digits: int = 3) -> str:
    if v is None or not isinstance(v, int | float) or math.isnan(v):
        return "n/a"
    return f"{v:.{min(digits, 1)}f}" if abs(v) >= 100 else f"{v:.{digits}f}"


def _fmt_ms(values: Sequence[float], digits: int = 3) -> str:
    mean, std, n = mean_std(values)
    if n == 0:
        return "n/a"
    if n == 1 or math.isnan(std):
        return _fmt(mean, digits)
    return f"{_fmt(mean, digits)} ± {_fmt(std, digits)}"


def _digits(row_name: str) -> int:
    """Decimals of a table row: whole steps, tenths of seconds, else 3 (rates)."""
    if row_name == "RL steps":
        return 0
    return 1 if "second" in row_name or "(s)" in row_name else 3


def run_seconds(run: RunInfo) -> float:
    """The run's wall time: ``run.seconds``, else its folder's timing file (NaN without one)."""
    if not math.isnan(run.seconds):
        return float(run.seconds)
    timing = Path(run.run_dir) / TIMING_FILE
    if timing.is_file():
        try:
            return float(json.loads(timing.read_text())["seconds"])
        except (ValueError, KeyError, TypeError):
            pass
    return math.nan


def _eval_record(run_dir: Path, records: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """The run's last eval record, else the overall metrics of ``eval/report.json``."""
    if records:
        return dict(records[-1])
    report = run_dir / "eval" / "report.json"
    if report.is_file():
        try:
            overall = json.loads(report.read_text())["overall"]
            return {k: (math.nan if v is None else v) for k, v in overall.items()}
        except (ValueError, KeyError, TypeError):
            pass
    return {}


def _pass_keys(evals: Sequence[Mapping[str, Any]]) -> list[str]:
    keys = {k for rec in evals for k in rec if k.startswith("pass@") and "/" not in k}
    return sorted(keys, key=lambda k: int(k.split("@", 1)[1]) if k.split("@", 1)[1].isdigit() else 1 << 30)


def _seconds_per_step(records: Sequence[Mapping[str, Any]]) -> float:
    """The median time between consecutive RL steps' records: a run stopped and resumed has one
    long gap, which a mean over the run's span would spread over every step."""
    times = sorted(float(r["time"]) for r in records if isinstance(r.get("time"), int | float))
    if len(times) < 2:
        return math.nan
    return statistics.median(b - a for a, b in itertools.pairwise(times))


def aggregate(
    runs: Sequence[RunInfo],
    out_dir: str | os.PathLike,
    *,
    window: int | None = None,
    sft_seconds: Mapping[int, float] | None = None,
    title: str = "Tool collapse: GRPO vs AXPO",
    figures: Mapping[str, Sequence[str]] | None = None,
) -> Aggregate:
    """Aggregate finished runs into ``results.md``, ``results.json``, ``curves.csv`` and plots.

    ``runs``: one entry per (algorithm, seed); each ``run_dir`` holds the pipeline's
    ``metrics.jsonl`` (its ``rl`` records and its last ``eval`` record are used). Labels keep the
    order of first appearance. ``window``: k of the first/last-k step averages (None: a quarter
    of the shortest run, 1 to 10 steps). ``sft_seconds``: wall time of each seed's shared SFT
    run, reported under the table. Metrics a run did not log (GRPO has no resampling) are NaN
    and show as "n/a"; means and stds ignore NaN. ``figures``: file name -> the labels drawn in
    it, every curve metric one panel (default: ``curves.png`` with every label); labels without
    runs are left out, and a figure with none is not written.
    """
    from axpo_nemo.local.plots import plot_mean_band, plot_mean_bands, series
    from axpo_nemo.run.metrics_log import read_metrics

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if not runs:
        raise ValueError("aggregate: no runs")
    labels = list(dict.fromkeys(r.label for r in runs))
    rl = {id(r): read_metrics(Path(r.run_dir) / "metrics.jsonl", phase="rl") for r in runs}
    evals = {
        id(r): _eval_record(Path(r.run_dir), read_metrics(Path(r.run_dir) / "metrics.jsonl", phase="eval"))
        for r in runs
    }
    steps_of = {id(r): len(series(rl[id(r)], "accuracy")[0]) for r in runs}
    if window is None:
        window = default_window(min(steps_of.values()))
    window = max(1, int(window))
    pass_keys = _pass_keys(list(evals.values()))

    # Row name -> (label -> per-run values); per-run rows for the second table.
    row_names = ["RL steps"]
    for m in CURVE_METRICS:
        row_names += [f"{m} first-{window}", f"{m} last-{window}"]
    row_names += [f"eval {k}" for k in pass_keys] + [f"eval {m}" for m in EVAL_EXTRA]
    row_names += ["wall time per run (s)", "seconds per RL step"]
    values: dict[str, dict[str, list[float]]] = {lab: {row: [] for row in row_names} for lab in labels}
    per_run: list[dict[str, Any]] = []
    for r in runs:
        recs, ev = rl[id(r)], evals[id(r)]
        row: dict[str, float] = {"RL steps": float(steps_of[id(r)])}
        for m in CURVE_METRICS:
            _, v = series(recs, m)
            row[f"{m} first-{window}"] = _nanmean(v[:window])
            row[f"{m} last-{window}"] = _nanmean(v[-window:])
        for k in pass_keys:
            row[f"eval {k}"] = float(ev.get(k, math.nan))
        for m in EVAL_EXTRA:
            row[f"eval {m}"] = float(ev.get(m, math.nan))
        row["wall time per run (s)"] = run_seconds(r)
        row["seconds per RL step"] = _seconds_per_step(recs)
        for name in row_names:
            values[r.label][name].append(row[name])
        per_run.append({"label": r.label, "seed": r.seed, "run_dir": str(r.run_dir), **row})

    # Plots: mean ± std over seeds per algorithm, one per metric.
    plots_dir = out_dir / "plots"
    plots = []
    by_label = {lab: [rl[id(r)] for r in runs if r.label == lab] for lab in labels}
    for m in CURVE_METRICS:
        plots.append(plot_mean_band(by_label, m, plots_dir / f"{m}.png"))
    for name, wanted in (figures or {"curves.png": labels}).items():
        drawn = {lab: by_label[lab] for lab in wanted if lab in by_label}
        if drawn:
            plots.append(plot_mean_bands(drawn, CURVE_METRICS, plots_dir / name))

    # Per-step table of the curves (unsmoothed mean, sample std, seeds present).
    curves_csv = out_dir / "curves.csv"
    with open(curves_csv, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["algorithm", "metric", "step", "mean", "std", "seeds"])
        for lab in labels:
            lab_runs = [r for r in runs if r.label == lab]
            for m in CURVE_METRICS:
                by_step: dict[int, list[float]] = {}
                for r in lab_runs:
                    for s, v in zip(*series(rl[id(r)], m), strict=True):
                        by_step.setdefault(int(s), []).append(float(v))
                for s in sorted(by_step):
                    mean, std, n = mean_std(by_step[s])
                    writer.writerow([lab, m, s, _csv_num(mean), _csv_num(std), n])

    # Markdown.
    seeds = {lab: sorted({r.seed for r in runs if r.label == lab}) for lab in labels}
    lines = [f"# {title}", ""]
    lines += ["| metric | " + " | ".join(labels) + " |", "| --- |" + " ---: |" * len(labels)]
    lines.append("| seeds | " + " | ".join(" ".join(map(str, seeds[lab])) for lab in labels) + " |")
    for name in row_names:
        lines.append(
            f"| {name} | " + " | ".join(_fmt_ms(values[lab][name], _digits(name)) for lab in labels) + " |"
        )
    lines += [
        "",
        f"_mean ± sample std over seeds; first-{window}/last-{window} = mean of the run's first/last "
        f"{window} RL step(s) (NaN steps ignored); eval = the final model on the held-out questions; "
        "wall time = the run's RL + eval pipeline time (the shared SFT not included)._",
    ]
    if sft_seconds:
        sft_vals = [float(v) for v in sft_seconds.values()]
        lines += ["", f"Shared SFT per seed: {_fmt_ms(sft_vals, 1)} s ({len(sft_vals)} seed(s))."]
    paired: list[dict[str, Any]] = []
    if "AXPO" in labels and len(labels) > 1:
        rows = [r.replace(" last", f" last-{window}") if r.endswith(" last") else r for r in PAIRED_ROWS]
        rows = [r for r in rows if r in row_names]
        baselines = [lab for lab in labels if lab.startswith("GRPO")]
        paired = paired_differences(per_run, "AXPO", baselines, rows)
        if paired:
            lines += ["", "## Paired differences (per seed, same SFT model and questions)", ""]
            lines += ["| difference | metric | seeds | mean | 95 % CI |", "| --- | --- | ---: | ---: | --- |"]
            for d in paired:
                ci = "n/a" if math.isnan(d["ci_low"]) else f"[{d['ci_low']:+.3f}, {d['ci_high']:+.3f}]"
                mean = "n/a" if math.isnan(d["mean"]) else f"{d['mean']:+.3f}"
                lines.append(f"| AXPO − {d['other']} | {d['row']} | {d['n']} | {mean} | {ci} |")
            lines += ["", "_t interval over seeds; an interval that contains 0 is no evidence of a difference._"]
    lines += ["", "## Runs", ""]
    head = ["run", "seed", "steps"]
    head += [f"{m} first→last" for m in CURVE_METRICS]
    head += [f"eval {k}" for k in pass_keys] + [f"eval {m}" for m in EVAL_EXTRA] + ["seconds"]
    lines += ["| " + " | ".join(head) + " |", "| --- | ---: |" + " ---: |" * (len(head) - 2)]
    for pr in per_run:
        cells = [pr["label"], str(pr["seed"]), str(int(pr["RL steps"]))]
        cells += [
            f"{_fmt(pr[f'{m} first-{window}'])} → {_fmt(pr[f'{m} last-{window}'])}" for m in CURVE_METRICS
        ]
        cells += [_fmt(pr[f"eval {k}"]) for k in pass_keys] + [_fmt(pr[f"eval {m}"]) for m in EVAL_EXTRA]
        cells.append(_fmt(pr["wall time per run (s)"], 1))
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "Plots: " + ", ".join(f"`plots/{p.name}`" for p in plots) + "; per-step values: `curves.csv`.",
    ]
    markdown = "\n".join(lines) + "\n"
    results_md = out_dir / "results.md"
    results_md.write_text(markdown)

    summary = {
        lab: {
            name: dict(zip(("mean", "std", "n"), mean_std(vals), strict=True)) for name, vals in rows.items()
        }
        for lab, rows in values.items()
    }
    results_json = out_dir / "results.json"
    results_json.write_text(
        json.dumps(
            _json_safe(
                {"window": window, "labels": labels, "summary": summary, "runs": per_run,
                 "paired": paired, "sft_seconds": dict(sft_seconds or {})}
            ),
            indent=2,
        )
    )  # fmt: skip
    return Aggregate(markdown, results_md, results_json, curves_csv, plots, window, values)


def _csv_num(v: float) -> str:
    return "" if math.isnan(v) else f"{v:.6g}"


def _json_safe(v: Any) -> Any:
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, Mapping):
        return {str(k): _json_safe(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_json_safe(x) for x in v]
    return v

"""The experiment behind the claim: does AXPO keep tool use alive where GRPO lets it collapse?

Runs GRPO and AXPO (optionally also the budget-matched GRPO baseline, N·(1+r) rollouts per
question) on the synthetic tool task for several seeds, from the same SFT model per seed, and
reports over the RL steps, as mean ± sample std across seeds per algorithm:

* ``tool_use_rate``, ``tool_subgroup_all_wrong_rate`` (the collapse symptom AXPO treats),
  ``resample_recovery_rate`` (AXPO only) and ``accuracy``: one plot each (``plot_mean_band``),
  and the per-step values in ``curves.csv``;
* ``results.md`` (and ``results.json``): per algorithm, the first-k and last-k step averages of
  those metrics, the eval Pass@k and eval tool-use rate of the final model, the wall time per
  run and the seconds per RL step; then one row per run.

Usage::

    python tools/exp_tool_collapse.py                       # demo config, seeds 0 1 2, GRPO + AXPO
    python tools/exp_tool_collapse.py --quick               # smoke run (2 seeds, 3 RL steps, tiny data)
    python tools/exp_tool_collapse.py --seeds 0 1 2 3 --steps 40 --budget-matched \\
        --out runs/exp_tool_collapse --config demo rollout.max_new_tokens=128
    python tools/exp_tool_collapse.py --seeds 0 1 2 3 4 --budget-matched --ablations   # the docs/results.md run
    python tools/exp_tool_collapse.py --aggregate-only      # rebuild tables/plots from what exists

Trailing ``key=value`` overrides go to every run (SFT and RL alike), after the ``--quick``
settings and before the experiment's own keys.

**How SFT is shared (no duplicated work).** Per seed S, one SFT run ``<out>/seed<S>/sft`` runs the
pipeline stages ``[data, sft]`` (the synthetic data of seed S goes to ``<out>/seed<S>/sft/data``,
the SFT model to ``<out>/seed<S>/sft/sft/final.pt``). Each algorithm then gets its own run folder
``<out>/seed<S>/<grpo|axpo|grpo_bm>`` with ``data.dir`` pointing at that data folder and the
stages ``[sft, rl, eval, plots]``: before it starts, the SFT model is hard-linked (copied where
links are not possible) to ``<run>/sft/final.pt``, and ``Pipeline.stage_sft`` loads an existing
``sft/final.pt`` and skips training; so RL (and its KL reference, a copy of the model after that
stage) starts from exactly the shared SFT weights, and the run folder has the usual layout
(``axpo eval --run``, ``axpo compare`` and ``bundle_from_run`` work on it). The ``data`` stage is
left out, so nothing is re-synthesised. All algorithms of a seed use the same ``seed`` (question
order, sampling seeds), so their first step samples the same original rollouts.

**Resumable.** An SFT run whose ``sft/final.pt`` exists, and an algorithm run whose newest RL
checkpoint has reached ``rl.steps`` and which has ``eval/report.json``, are reused as they are
(a note is printed when the config differs from the one the folder was made with). Any other run
is (re)started; with ``checkpoint.resume: auto`` (the default) an interrupted run continues from
its newest checkpoint, and its eval from its ``results.jsonl``. A run folder whose ``sft/final.pt`` is not
the seed's SFT model is refused (delete the folder). The wall time of a run is the sum of its
pipeline invocations (kept in ``<run>/exp_timing.json``).

Exit status: 0 when every run finished; 1 when some run failed (the others still run, and the
tables cover the runs that finished) or, with ``--aggregate-only``, when some run is missing or
unfinished (an unfinished one is tabled as far as it got); 75 when a run was stopped by
SIGTERM/SIGUSR1 (it wrote a checkpoint: run the same command again); 2 for bad arguments or
config.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import hashlib
import itertools
import json
import math
import os
import shutil
import statistics
import sys
import time
import traceback
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
#: The DESIGN ablations (AXPO with one mechanism removed): key -> (table label, overrides).
ABLATIONS: dict[str, tuple[str, tuple[str, ...]]] = {
    "no_prefix_fixing": ("AXPO w/o prefix fixing", ("axpo.prefix_fixing=false",)),
    "no_prefix_credit": ("AXPO w/o prefix credit", ("axpo.prefix_credit=false",)),
    "joint_groups": ("AXPO joint groups", ("axpo.separate_groups=false",)),
    "random_selection": ("AXPO random selection", ("axpo.selection=random",)),
}
#: Per-seed paired differences reported against AXPO: rows of the main table.
PAIRED_ROWS = ("tool_use_rate last", "accuracy last", "eval pass@1", "eval pass@4")
#: Eval metrics besides Pass@k (whose k come from the eval record).
EVAL_EXTRA = ("tool_use_rate",)
#: Algorithm keys, in table order, and their display labels.
ALGORITHMS = ("grpo", "axpo")
BUDGET_MATCHED = "grpo_bm"
#: Tiny settings of ``--quick`` (a smoke run of the whole experiment, a few minutes on 2 CPU cores).
QUICK_OVERRIDES = (
    "data.synth.num_sft=24",
    "data.synth.num_rl=16",
    "data.synth.num_eval=8",
    "sft.epochs=1",
    "sft.warmup_steps=1",
    "rollout.questions_per_step=4",
    "rollout.max_new_tokens=48",
    "eval.samples_per_question=4",
    "checkpoint.every=2",
)
QUICK_SEEDS = (0, 1)
QUICK_STEPS = 3
#: Keys the experiment sets itself (one per run); giving them as overrides is refused.
RESERVED_KEYS = ("algorithm", "seed", "output_dir", "train.stages", "data.dir", "checkpoint.dir")
TIMING_FILE = "exp_timing.json"
#: Exit status after a stop signal (as `axpo train`: a checkpoint was written, run again).
EXIT_STOPPED = 75


# --------------------------------------------------------------------------- aggregation


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


def _run_seconds(run: RunInfo) -> float:
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
) -> Aggregate:
    """Aggregate finished runs into ``results.md``, ``results.json``, ``curves.csv`` and plots.

    ``runs``: one entry per (algorithm, seed); each ``run_dir`` holds the pipeline's
    ``metrics.jsonl`` (its ``rl`` records and its last ``eval`` record are used). Labels keep the
    order of first appearance. ``window``: k of the first/last-k step averages (None: a quarter
    of the shortest run, 1 to 10 steps). ``sft_seconds``: wall time of each seed's shared SFT
    run, reported under the table. Metrics a run did not log (GRPO has no resampling) are NaN
    and show as "n/a"; means and stds ignore NaN.
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
        row["wall time per run (s)"] = _run_seconds(r)
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
    plots.append(plot_mean_bands(by_label, CURVE_METRICS, plots_dir / "curves.png"))

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


# --------------------------------------------------------------------------- running


@dataclass
class RunSpec:
    """One pipeline run of the experiment."""

    key: str  # "sft", or the algorithm key (grpo, axpo, grpo_bm)
    label: str  # display name (table column)
    seed: int
    run_dir: Path
    overrides: list[str]


@dataclass
class Outcome:
    spec: RunSpec
    status: str  # "done" (ran now), "reused", "failed", "stopped", "skipped"
    seconds: float = math.nan
    message: str = ""


def _yaml_str(text: str) -> str:
    """A string as a YAML single-quoted scalar (an override value that stays a string)."""
    return "'" + text.replace("'", "''") + "'"


def _override_key(item: str) -> str:
    return item.split("=", 1)[0].lstrip("+~").strip()


def labels_for(budget_matched_n: int | None) -> dict[str, str]:
    labels = {"grpo": "GRPO", "axpo": "AXPO"}
    if budget_matched_n is not None:
        labels[BUDGET_MATCHED] = f"GRPO-BM (N={budget_matched_n})"
    return labels


def budget_matched_group_size(group_size: int, r: float) -> int:
    """N·(1+r) rounded to the nearest integer (the budget-matched GRPO baseline)."""
    return max(group_size, math.floor(group_size * (1.0 + r) + 0.5))


def plan(args: argparse.Namespace, base_overrides: list[str], bm_n: int | None) -> list[RunSpec]:
    """The runs in execution order: per seed, its SFT run then each algorithm."""
    out = Path(args.out).resolve()
    labels = labels_for(bm_n)
    keys = list(ALGORITHMS) + ([BUDGET_MATCHED] if bm_n is not None else [])
    specs = []
    for seed in args.seeds:
        seed_dir = out / f"seed{seed}"
        sft_dir = seed_dir / "sft"
        common = [*base_overrides, f"seed={seed}"]
        specs.append(
            RunSpec("sft", "SFT", seed, sft_dir,
                    [*common, f"output_dir={_yaml_str(str(sft_dir))}", "train.stages=[data,sft]"])
        )  # fmt: skip
        for key in keys:
            run_dir = seed_dir / key
            extra = [
                f"algorithm={'axpo' if key == 'axpo' else 'grpo'}",
                f"output_dir={_yaml_str(str(run_dir))}",
                f"data.dir={_yaml_str(str(sft_dir / 'data'))}",
                "train.stages=[sft,rl,eval,plots]",
            ]
            if key == BUDGET_MATCHED:
                extra.append(f"rollout.group_size={bm_n}")
            specs.append(RunSpec(key, labels[key], seed, run_dir, [*common, *extra]))
        if seed in (getattr(args, "ablation_seeds", None) or ()):
            for key, (label, ablation) in ABLATIONS.items():
                run_dir = seed_dir / key
                extra = [
                    "algorithm=axpo",
                    f"output_dir={_yaml_str(str(run_dir))}",
                    f"data.dir={_yaml_str(str(sft_dir / 'data'))}",
                    "train.stages=[sft,rl,eval,plots]",
                    *ablation,
                ]
                specs.append(RunSpec(key, label, seed, run_dir, [*common, *extra]))
    return specs


def sft_done(run_dir: Path) -> bool:
    return (run_dir / "sft" / "final.pt").is_file() and (run_dir / "data" / "manifest.json").is_file()


def rl_done(run_dir: Path, steps: int) -> bool:
    """The run's newest RL checkpoint has reached ``steps`` and its eval report exists."""
    from axpo_nemo.run.checkpoint import CheckpointManager

    ckpts = CheckpointManager(run_dir / "rl" / "checkpoints").checkpoints()
    return bool(ckpts) and ckpts[-1][0] >= steps and (run_dir / "eval" / "report.json").is_file()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(8 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _same_file(a: Path, b: Path) -> bool:
    if os.path.samefile(a, b):
        return True
    return a.stat().st_size == b.stat().st_size and _sha256(a) == _sha256(b)


def link_sft_model(sft_model: Path, run_dir: Path) -> str:
    """Put the seed's SFT model at ``<run_dir>/sft/final.pt`` (hard link, else copy).

    Returns "linked", "copied" or "present"; raises RuntimeError when the run already holds a
    different SFT model (its RL started from other weights: delete the run folder).
    """
    dest = run_dir / "sft" / "final.pt"
    if dest.exists():
        if _same_file(sft_model, dest):
            return "present"
        raise RuntimeError(
            f"{dest} is not the seed's SFT model {sft_model} (the SFT run was redone?); "
            f"delete {run_dir} to rerun it from the current SFT model"
        )
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    try:
        os.link(sft_model, tmp)
        how = "linked"
    except OSError:
        shutil.copyfile(sft_model, tmp)
        how = "copied"
    tmp.replace(dest)
    return how


#: Config sections an SFT run does not use (a change there does not make its model stale).
SFT_IRRELEVANT = ("algorithm", "rl.", "eval.", "axpo.", "advantage.", "loss.", "checkpoint.", "logging.")


def config_changes(run_dir: Path, tree, ignore: Sequence[str] = ()) -> list[str]:
    """Keys whose value differs from the ``config.yaml`` the run folder was made with.

    ``ignore``: key prefixes left out (``"rl."``: the ``rl`` section; ``"algorithm"``: that key).
    """
    from omegaconf import OmegaConf

    old_path = run_dir / "config.yaml"
    if not old_path.is_file():
        return []
    try:
        old = OmegaConf.to_container(OmegaConf.load(old_path), resolve=True)
    except Exception:  # an unreadable file: report it as a change
        return ["<config.yaml unreadable>"]
    new = OmegaConf.to_container(tree, resolve=True)

    def flat(d: Any, prefix: str = "") -> dict[str, Any]:
        if isinstance(d, dict):
            out: dict[str, Any] = {}
            for k, v in d.items():
                out.update(flat(v, f"{prefix}{k}."))
            return out
        return {prefix[:-1]: d}

    a, b = flat(old), flat(new)
    changed = (k for k in a.keys() | b.keys() if a.get(k, "<unset>") != b.get(k, "<unset>"))
    return sorted(
        k for k in changed if not any(k == p or (p.endswith(".") and k.startswith(p)) for p in ignore)
    )


def _add_timing(run_dir: Path, seconds: float) -> float:
    path = run_dir / TIMING_FILE
    data = {"seconds": 0.0, "invocations": 0}
    if path.is_file():
        with contextlib.suppress(ValueError):
            data.update(json.loads(path.read_text()))
    data["seconds"] = float(data["seconds"]) + seconds
    data["invocations"] = int(data["invocations"]) + 1
    path.write_text(json.dumps(data, indent=2))
    return data["seconds"]


def _read_timing(run_dir: Path) -> float:
    return _run_seconds(RunInfo("", 0, run_dir))


def _release_memory() -> None:
    """Free the finished run's model before the next one (matters for real models on a GPU)."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def say(msg: str) -> None:
    print(f"[exp] {msg}", flush=True)


def execute(spec: RunSpec, args: argparse.Namespace, sft_models: dict[int, Path]) -> Outcome:
    """Run (or reuse) one run; never raises for a failing run (KeyboardInterrupt aside)."""
    from omegaconf import OmegaConf

    from axpo_nemo.config import load_config_tree
    from axpo_nemo.local.pipeline import run_train

    try:
        tree = load_config_tree(args.config, spec.overrides)
        cfg = OmegaConf.to_object(tree)
        if spec.key == "sft":
            done = sft_done(spec.run_dir)
        else:
            sft_model = sft_models.get(spec.seed)
            if sft_model is None:
                return Outcome(spec, "skipped", message="the seed's SFT run did not finish")
            how = link_sft_model(sft_model, spec.run_dir)
            if how != "present":
                say(f"  SFT model {how} from {sft_model}")
            done = rl_done(spec.run_dir, cfg.rl.steps)
        changed = config_changes(spec.run_dir, tree, SFT_IRRELEVANT if spec.key == "sft" else ())
        if changed:
            shown = ", ".join(changed[:8]) + (" …" if len(changed) > 8 else "")
            say(f"  note: {spec.run_dir} was made with a different config ({shown})"
                + ("; reusing it as is (delete the folder to redo it)" if done else "; resuming it"))  # fmt: skip
        if done:
            return Outcome(spec, "reused", seconds=_read_timing(spec.run_dir))
        try:
            result = run_train(cfg, tree, plain=True)
        finally:
            _release_memory()
        total = _add_timing(spec.run_dir, result.seconds)
        if result.stopped:
            return Outcome(spec, "stopped", seconds=total, message="stopped by a signal (checkpoint written)")
        msg = ""
        if result.eval_summary:
            keys = [
                k
                for k in result.eval_summary
                if "/" not in k and (k.startswith("pass@") or k == "tool_use_rate")
            ]
            msg = "eval " + " ".join(f"{k}={result.eval_summary[k]:.3f}" for k in keys)
        return Outcome(spec, "done", seconds=total, message=msg)
    except Exception as exc:
        traceback.print_exc()
        return Outcome(spec, "failed", message=f"{type(exc).__name__}: {exc}")


def existing_outcome(spec: RunSpec, steps: int) -> Outcome:
    """``--aggregate-only``: what the run folder holds, without running anything.

    An algorithm run with RL metrics that has not reached ``steps`` (or has no eval report) is
    "partial": it goes into the tables as it is (its step count shows), and the exit status is 1.
    """
    seconds = _read_timing(spec.run_dir)
    if spec.key == "sft":
        ok = sft_done(spec.run_dir)
        return Outcome(spec, "reused" if ok else "skipped", seconds, "" if ok else "no SFT model")
    if rl_done(spec.run_dir, steps):
        return Outcome(spec, "reused", seconds)
    from axpo_nemo.run.metrics_log import read_metrics

    n = len({r["step"] for r in read_metrics(spec.run_dir / "metrics.jsonl", phase="rl")})
    if not n:
        return Outcome(spec, "skipped", seconds, "no RL metrics")
    report = "" if (spec.run_dir / "eval" / "report.json").is_file() else ", no eval report"
    return Outcome(spec, "partial", seconds, f"unfinished: {n}/{steps} RL steps logged{report}")


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="exp_tool_collapse.py",
        description="GRPO vs AXPO over seeds from a shared SFT model per seed: tool-use, all-wrong "
        "tool-subgroup, resample-recovery and accuracy curves (mean ± std), eval Pass@k and wall time.",
        epilog="Runs are reused when finished and resumed when interrupted: rerun the same command.",
    )
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=None, help="seeds (default: 0 1 2; --quick: 0 1)"
    )
    parser.add_argument(
        "--steps", type=int, default=None, help="RL steps (default: the config's rl.steps; --quick: 3)"
    )
    parser.add_argument(
        "--out", default="runs/exp_tool_collapse", help="output folder (default: %(default)s)"
    )
    parser.add_argument("--config", "-c", default="demo", help="config name or file (default: %(default)s)")
    parser.add_argument(
        "--budget-matched", action="store_true", help="also run GRPO with group_size N·(1+r) (label GRPO-BM)"
    )
    parser.add_argument(
        "--ablations",
        action="store_true",
        help="also run the DESIGN ablations (AXPO without prefix fixing, without prefix credit, with "
        "joint groups, with random selection) on --ablation-seeds",
    )
    parser.add_argument(
        "--ablation-seeds", type=int, nargs="+", default=None, help="seeds of the ablations (default: the first two)"
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny data, 2 seeds, 3 RL steps")
    parser.add_argument(
        "--window",
        type=int,
        default=None,
        help="k of the first/last-k step averages (default: steps//4, 1..10)",
    )
    parser.add_argument(
        "--aggregate-only", action="store_true", help="only rebuild the tables and plots from finished runs"
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="config overrides for every run (key=value, ++key=value)",
    )
    args = parser.parse_args(argv)
    if args.seeds is None:
        args.seeds = list(QUICK_SEEDS if args.quick else (0, 1, 2))
    if len(set(args.seeds)) != len(args.seeds):
        parser.error("--seeds: each seed once")
    if args.ablation_seeds is not None and not args.ablations:
        parser.error("--ablation-seeds needs --ablations")
    if args.ablations:
        args.ablation_seeds = args.ablation_seeds or args.seeds[:2]
        if not set(args.ablation_seeds) <= set(args.seeds):
            parser.error("--ablation-seeds must be among --seeds (they share its SFT model)")
    if args.steps is None and args.quick:
        args.steps = QUICK_STEPS
    if args.steps is not None and args.steps < 1:
        parser.error("--steps must be >= 1")
    bad = [o for o in args.overrides if _override_key(o) in RESERVED_KEYS]
    if bad:
        parser.error(
            f"{', '.join(bad)}: set by the experiment per run (use --seeds / --out); "
            f"reserved keys: {', '.join(RESERVED_KEYS)}"
        )
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    from axpo_nemo.config import ConfigError, load_config_tree

    base = [*(QUICK_OVERRIDES if args.quick else ()), *args.overrides]
    if args.steps is not None:
        base.append(f"rl.steps={args.steps}")
    try:
        tree = load_config_tree(args.config, base)
    except ConfigError as exc:
        print(f"exp_tool_collapse: config error: {exc}", file=sys.stderr)
        return 2
    if tree.backend != "local":
        print("exp_tool_collapse: only backend=local runs here", file=sys.stderr)
        return 2
    steps = int(tree.rl.steps)
    bm_n = (
        budget_matched_group_size(int(tree.rollout.group_size), float(tree.axpo.r))
        if args.budget_matched
        else None
    )
    specs = plan(args, base, bm_n)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    say(
        f"config {args.config}, seeds {' '.join(map(str, args.seeds))}, {steps} RL steps, "
        f"B={tree.rollout.questions_per_step} N={tree.rollout.group_size}"
        + (f", budget-matched N={bm_n}" if bm_n is not None else "")
        + f"; {len(specs)} runs under {out}"
    )

    t0 = time.monotonic()
    outcomes: list[Outcome] = []
    sft_models: dict[int, Path] = {}
    stopped = False
    for i, spec in enumerate(specs, 1):
        name = f"seed {spec.seed} {spec.label}"
        if args.aggregate_only:
            oc = existing_outcome(spec, steps)
        else:
            say(f"({i}/{len(specs)}) {name} -> {spec.run_dir}")
            oc = execute(spec, args, sft_models)
        outcomes.append(oc)
        if spec.key == "sft" and oc.status in ("done", "reused"):
            sft_models[spec.seed] = spec.run_dir / "sft" / "final.pt"
        if not args.aggregate_only:
            took = "" if math.isnan(oc.seconds) else f" ({oc.seconds:.0f} s)"
            say(f"({i}/{len(specs)}) {name}: {oc.status}{took}" + (f" — {oc.message}" if oc.message else ""))
        if oc.status == "stopped":
            stopped = True
            break

    finished = [
        RunInfo(oc.spec.label, oc.spec.seed, oc.spec.run_dir, oc.seconds)
        for oc in outcomes
        if oc.spec.key != "sft" and oc.status in ("done", "reused", "partial")
    ]
    sft_seconds = {
        oc.spec.seed: oc.seconds
        for oc in outcomes
        if oc.spec.key == "sft" and oc.status in ("done", "reused") and not math.isnan(oc.seconds)
    }
    if finished:
        agg = aggregate(finished, out, window=args.window, sft_seconds=sft_seconds)
        print()
        print(agg.markdown)
        say(
            f"wrote {agg.results_md}, {agg.results_json.name}, {agg.curves_csv.name}, plots/ ({len(agg.plots)} PNGs)"
        )
    else:
        say("no finished algorithm run to aggregate")
    bad = [oc for oc in outcomes if oc.status in ("failed", "skipped", "partial")]
    say(
        f"total {time.monotonic() - t0:.0f} s; {len(finished)} algorithm run(s) aggregated, {len(bad)} failed/skipped/partial"
    )
    for oc in bad:
        say(f"  {oc.status}: seed {oc.spec.seed} {oc.spec.label} ({oc.spec.run_dir}): {oc.message}")
    if stopped:
        say(f"stopped by a signal; run the same command again to continue (exit {EXIT_STOPPED})")
        return EXIT_STOPPED
    return 1 if bad or len(finished) < len([s for s in specs if s.key != "sft"]) else 0


if __name__ == "__main__":
    sys.exit(main())

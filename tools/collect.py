"""Gather the final metrics and Pass@k of finished runs into one CSV and one Markdown table.

Usage::

    python tools/collect.py runs/r_vs_n                      # a sweep folder (tools/sweep.py)
    python tools/collect.py runs/axpo_8b-1234 runs/grpo_8b-1240 --keys algorithm,axpo.r
    python tools/collect.py runs/r_vs_n --out results.csv --md results.md --last 10

A run folder is one that holds ``metrics.jsonl`` (the per-step log, axpo_nemo.run.metrics_log)
or ``eval/report.json`` (`axpo eval`'s report); a folder given on the command line that is
neither is searched for runs two levels down. Per run, one row:

* the swept values: from ``sweep.json`` of the sweep folder (tools/sweep.py), or the ``--keys``
  read from the run's ``config.yaml`` (the resolved config the trainer saved);
* ``rl_steps`` and ``sft_steps``: the last step of each phase;
* ``rl/<metric>``: the mean over the last ``--last`` RL steps (NaN steps skipped) of each
  ``--metrics`` name; ``sft/loss``: the last SFT loss;
* ``eval/<name>``: Pass@k for every k and the other overall rates of ``eval/report.json``, or of
  the run's last ``eval`` record in ``metrics.jsonl`` when there is no report.

Missing values are empty in the CSV and ``–`` in the table.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"
REPORT_FILE = Path("eval") / "report.json"
DEFAULT_METRICS = ("accuracy", "tool_use_rate", "tool_subgroup_all_wrong_rate", "extra_rollout_fraction")
EVAL_KEYS = ("accuracy", "tool_use_rate", "tool_call_error_rate", "mean_turns")


def is_run(folder: Path) -> bool:
    """Whether ``folder`` holds a run's metrics or evaluation report."""
    return (folder / METRICS_FILE).is_file() or (folder / REPORT_FILE).is_file()


def find_runs(folder: Path, depth: int = 2) -> list[Path]:
    """``folder`` if it is a run, else the runs below it (up to ``depth`` levels), sorted by path."""
    if is_run(folder):
        return [folder]
    if depth == 0 or not folder.is_dir():
        return []
    return [
        run for child in sorted(folder.iterdir()) if child.is_dir() for run in find_runs(child, depth - 1)
    ]


def read_records(path: Path) -> list[dict[str, Any]]:
    """The JSON lines of a metrics file (``null`` → NaN); unreadable lines are skipped."""
    out = []
    if not path.is_file():
        return out
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict):
            out.append({k: math.nan if v is None else v for k, v in rec.items()})
    return out


def _mean(values: list[Any]) -> float:
    nums = [float(v) for v in values if isinstance(v, int | float) and not math.isnan(float(v))]
    return sum(nums) / len(nums) if nums else math.nan


def _config_value(config: dict[str, Any], key: str) -> Any:
    node: Any = config
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def run_row(run: Path, metrics: list[str], last: int) -> dict[str, Any]:
    """The final metrics and evaluation of one run folder, as ``{column: value}``."""
    records = read_records(run / METRICS_FILE)
    rl = [r for r in records if r.get("phase") == "rl"]
    sft = [r for r in records if r.get("phase") == "sft"]
    row: dict[str, Any] = {
        "rl_steps": rl[-1].get("step") if rl else None,
        "sft_steps": sft[-1].get("step") if sft else None,
        "sft/loss": sft[-1].get("loss", math.nan) if sft else math.nan,
    }
    tail = rl[-last:]
    for name in metrics:
        row[f"rl/{name}"] = _mean([r.get(name) for r in tail])
    overall: dict[str, Any] = {}
    if (run / REPORT_FILE).is_file():
        try:
            overall = json.loads((run / REPORT_FILE).read_text()).get("overall", {})
        except ValueError:
            overall = {}
    else:
        evals = [r for r in records if r.get("phase") == "eval"]
        if evals:
            overall = {k: v for k, v in evals[-1].items() if "/" not in k}
    for key, value in overall.items():
        if key.startswith("pass@") or key in EVAL_KEYS:
            row[f"eval/{key}"] = math.nan if value is None else value
    return row


def _sweep_values(run: Path) -> dict[str, Any] | None:
    for folder in (run.parent, run.parent.parent):
        manifest = folder / "sweep.json"
        if manifest.is_file():
            try:
                data = json.loads(manifest.read_text())
            except ValueError:
                return None
            for point in data.get("points", []):
                if Path(point.get("output_dir", "")).name == run.name:
                    return dict(point.get("values", {}))
    return None


def _config_values(run: Path, keys: list[str]) -> dict[str, Any]:
    if not keys:
        return {}
    config: dict[str, Any] = {}
    path = run / "config.yaml"
    if path.is_file():
        import yaml

        try:
            config = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError:
            config = {}
    return {key: _config_value(config, key) for key in keys}


def collect(folders: list[Path], keys: list[str], metrics: list[str], last: int) -> list[dict[str, Any]]:
    """One row per run found under ``folders``: ``run``, the swept/config values, then metrics."""
    rows = []
    seen = set()
    for folder in folders:
        for run in find_runs(folder):
            if run.resolve() in seen:
                continue
            seen.add(run.resolve())
            row: dict[str, Any] = {"run": str(run)}
            row.update(_sweep_values(run) or {})
            row.update(_config_values(run, keys))
            row.update(run_row(run, metrics, last))
            rows.append(row)
    return rows


def _columns(rows: list[dict[str, Any]]) -> list[str]:
    cols: list[str] = []
    for row in rows:
        cols += [c for c in row if c not in cols]

    def order(col: str) -> tuple[int, Any]:
        if col.startswith("eval/pass@"):
            k = col.removeprefix("eval/pass@")
            return (2, int(k) if k.isdigit() else k)
        return (3, 0) if col.startswith("eval/") else (1, 0)

    return sorted(cols, key=order)  # stable: run, values and rl/sft columns keep their order


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    """All rows as CSV, one column per key of any row; missing values are empty."""
    cols = _columns(rows)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(cols)
        for row in rows:
            writer.writerow(["" if _is_missing(row.get(c)) else row.get(c) for c in cols])


def to_markdown(rows: list[dict[str, Any]]) -> str:
    """All rows as a Markdown table; floats with 4 significant digits, missing values as ``–``."""
    cols = _columns(rows)

    def cell(value: Any) -> str:
        if _is_missing(value):
            return "–"
        if isinstance(value, float):
            return f"{value:.4g}"
        return str(value).replace("|", "\\|")

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in cols) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Command-line entry; returns the exit status."""
    parser = argparse.ArgumentParser(
        description="Gather the final metrics and Pass@k of finished runs into a CSV and a Markdown table.",
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("folders", nargs="+", type=Path, help="run folders or folders holding runs")
    parser.add_argument(
        "--keys", default="", help="comma-separated config keys to show (read from config.yaml)"
    )
    parser.add_argument(
        "--metrics", default=",".join(DEFAULT_METRICS), help="comma-separated RL step metrics to average"
    )
    parser.add_argument(
        "--last", type=int, default=1, help="average the RL metrics over this many last steps"
    )
    parser.add_argument(
        "--out", type=Path, default=Path("results.csv"), help="CSV file (default: results.csv)"
    )
    parser.add_argument("--md", type=Path, default=None, help="also write the Markdown table to this file")
    args = parser.parse_args(argv)
    if args.last < 1:
        parser.error("--last must be >= 1")
    missing = [str(f) for f in args.folders if not f.exists()]
    if missing:
        print(f"collect: no such folder: {', '.join(missing)}", file=sys.stderr)
        return 2
    keys = [k for k in args.keys.split(",") if k]
    metrics = [m for m in args.metrics.split(",") if m]
    rows = collect(args.folders, keys, metrics, args.last)
    if not rows:
        print(f"collect: no runs (metrics.jsonl or {REPORT_FILE}) under {', '.join(map(str, args.folders))}",
              file=sys.stderr)  # fmt: skip
        return 1
    write_csv(rows, args.out)
    table = to_markdown(rows)
    if args.md:
        args.md.write_text(table)
    print(table, end="")
    print(f"\n{len(rows)} run(s) → {args.out}" + (f", {args.md}" if args.md else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Suite reports: the paper-style table (rows = models, benchmarks grouped, Pass@1/Pass@4),
per-model details, a long CSV and JSON.

Rates are written in percent with one decimal in Markdown and as fractions in CSV and JSON;
a missing value (a benchmark a model was not run on, an undefined rate) is ``–`` / empty / null.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

from axpo_nemo.eval.passk import _json_safe
from axpo_nemo.eval.suite.benchmark_scores import BenchmarkScore, SuiteResult
from axpo_nemo.eval.suite.registry import BENCHMARKS, GROUPS

#: File names written by `write_suite_reports`.
REPORT_FILES = {"markdown": "suite.md", "csv": "suite.csv", "json": "suite.json"}


def _pct(x: float | None) -> str:
    return "–" if x is None or math.isnan(x) else f"{100 * x:.1f}"


def _ks(results: Sequence[SuiteResult]) -> list[int]:
    return sorted({k for r in results for k in r.ks})


def _benchmarks_in(results: Sequence[SuiteResult]) -> list[str]:
    present = {b.key for r in results for b in r.benchmarks}
    return [key for key in BENCHMARKS if key in present]


def paper_table(results: Sequence[SuiteResult]) -> str:
    """Markdown laid out like the paper's results table: one row per model; per group its
    benchmarks' Pass@k then the group average; then the average over benchmarks and tool use."""
    ks = _ks(results)
    keys = _benchmarks_in(results)
    groups = [g for g in GROUPS if any(BENCHMARKS[k].group == g for k in keys)]
    head = ["Model"]
    for g in groups:
        for key in (k for k in keys if BENCHMARKS[k].group == g):
            head += [f"{BENCHMARKS[key].title} P@{k}" for k in ks]
        head += [f"{g.capitalize()} avg P@{k}" for k in ks]
    head += [f"Avg P@{k}" for k in ks] + ["Tool use"]
    lines = [
        "Groups: " + "; ".join(
            f"{g} = {', '.join(BENCHMARKS[k].title for k in keys if BENCHMARKS[k].group == g)}" for g in groups
        ),
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]  # fmt: skip
    for r in results:
        by_key = {b.key: b for b in r.benchmarks}
        group_scores = r.group_scores()
        cells = [r.label]
        for g in groups:
            for key in (k for k in keys if BENCHMARKS[k].group == g):
                b = by_key.get(key)
                cells += [_pct(b.pass_at_k.get(k) if b else None) for k in ks]
            cells += [_pct(group_scores.get(g, {}).get(k)) for k in ks]
        avg = r.average()
        cells += [_pct(avg.get(k)) for k in ks] + [_pct(r.tool_use_rate())]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _extra_names(benchmarks: Sequence[BenchmarkScore]) -> list[str]:
    return sorted({name for b in benchmarks for name in b.extra})


def details_table(result: SuiteResult) -> str:
    """Markdown for one model: a row per benchmark with its counts, scores, extra scores and tool use."""
    ks = result.ks
    extras = _extra_names(result.benchmarks)
    head = ["Benchmark", "Group", "Questions", "Rollouts", *(f"P@{k}" for k in ks)]
    head += [f"{name} P@{k}" for name in extras for k in ks]
    head += ["Accuracy", "Tool use", "Tool-call errors", "Turns", "Reused"]
    lines = [f"### {result.label}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for b in result.benchmarks:
        cells = [b.title, b.group, str(b.num_questions), str(b.num_rollouts)]
        cells += [_pct(b.pass_at_k.get(k)) for k in ks]
        cells += [_pct(b.extra.get(name, {}).get(k)) for name in extras for k in ks]
        turns = "–" if math.isnan(b.mean_turns) else f"{b.mean_turns:.2f}"
        cells += [_pct(b.accuracy), _pct(b.tool_use_rate), _pct(b.tool_call_error_rate), turns]
        cells.append(str(b.reused_questions))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def suite_markdown(results: Sequence[SuiteResult]) -> str:
    """The whole Markdown report: the paper table, then each model's details."""
    parts = ["# Benchmark suite", "", paper_table(results), "## Details", ""]
    parts += [details_table(r) for r in results]
    return "\n".join(parts)


def suite_csv(results: Sequence[SuiteResult]) -> str:
    """Long CSV: one row per (model, benchmark), then per (model, group) and (model, all) averages."""
    ks = _ks(results)
    extras = _extra_names([b for r in results for b in r.benchmarks])
    head = ["model", "group", "benchmark", "questions", "rollouts", *(f"pass@{k}" for k in ks)]
    head += [f"{name}@{k}" for name in extras for k in ks] + ["tool_use_rate", "accuracy"]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(head)

    def num(x: float | None) -> str:
        return "" if x is None or math.isnan(x) else f"{x:.6f}"

    for r in results:
        for b in r.benchmarks:
            row = [
                r.label,
                b.group,
                b.key,
                b.num_questions,
                b.num_rollouts,
                *(num(b.pass_at_k.get(k)) for k in ks),
            ]
            row += [num(b.extra.get(name, {}).get(k)) for name in extras for k in ks]
            writer.writerow([*row, num(b.tool_use_rate), num(b.accuracy)])
        blank = [""] * (len(extras) * len(ks))
        for g, scores in r.group_scores().items():
            members = [b for b in r.benchmarks if b.group == g]
            counts = [sum(b.num_questions for b in members), sum(b.num_rollouts for b in members)]
            writer.writerow([r.label, g, "avg", *counts, *(num(scores.get(k)) for k in ks), *blank,
                             num(r.tool_use_rate(g)), ""])  # fmt: skip
        counts = [sum(b.num_questions for b in r.benchmarks), sum(b.num_rollouts for b in r.benchmarks)]
        avg = r.average()
        writer.writerow([r.label, "all", "avg", *counts, *(num(avg.get(k)) for k in ks), *blank,
                         num(r.tool_use_rate()), ""])  # fmt: skip
    return buf.getvalue()


def suite_json(results: Sequence[SuiteResult]) -> str:
    """JSON: ``{"ks": [...], "models": [SuiteResult.to_dict(), ...]}`` (NaN as null)."""
    data = {"ks": _ks(results), "models": [r.to_dict() for r in results]}
    return json.dumps(_json_safe(data), indent=2, ensure_ascii=False)


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_suite_reports(out_dir: str | Path, results: Sequence[SuiteResult]) -> dict[str, Path]:
    """Write ``suite.md``, ``suite.csv`` and ``suite.json`` into ``out_dir``; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {name: out / filename for name, filename in REPORT_FILES.items()}
    _write(paths["markdown"], suite_markdown(results))
    _write(paths["csv"], suite_csv(results))
    _write(paths["json"], suite_json(results))
    return paths

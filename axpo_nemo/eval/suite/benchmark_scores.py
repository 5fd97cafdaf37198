"""Benchmark scores from per-question results: Pass@k per benchmark, per group and on average.

Every question gets the unbiased Pass@k of DESIGN.md §1 from its n samples
(``core.metrics.pass_at_k``). A benchmark turns those into its score by its ``aggregate`` rule:

* ``mean``: the mean over questions.
* ``cycles`` (HRBench): each question is asked once per option rotation (``cycle_category``); the
  official score (VLMEvalKit ``report_acc_hrbench``) is the accuracy within each rotation averaged
  over rotations, i.e. every rotation is an independent question. Reported as the score. The
  stricter *all-rotations* score (a question counts only if every rotation is right) is reported
  as the extra metric ``all_cycles``.
* ``variants`` (DynaMath): the score is the average case (mean over all variant questions); the
  *worst case* (a seed counts only if all its variants are right) is the extra metric
  ``worst_case``.

For the all-of-a-group metrics with n samples per member, Pass@k of a group is the product over its
members of their Pass@k: the chance that k samples drawn for every member contain a right one for
each member. The members' samples are independent, so the product of their unbiased estimates is an
unbiased estimate of it; with k = 1 it is the expected single-sample worst-case accuracy.

Groups and the overall average are plain means over the benchmarks' scores; tool-use rates are
over all rollouts.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from axpo_nemo.core.metrics import pass_at_k
from axpo_nemo.eval.passk import EvalReport


def _mean(values: Sequence[float]) -> float:
    return float(np.mean(values)) if len(values) else math.nan


def question_pass_at_k(records: Sequence[Mapping[str, Any]], k: int) -> dict[str, float]:
    """Question id → unbiased Pass@k from its ``n`` samples and ``correct`` count."""
    if not records:
        return {}
    values = pass_at_k([r["n"] for r in records], [r["correct"] for r in records], k)
    return {r["id"]: float(v) for r, v in zip(records, np.atleast_1d(values), strict=True)}


def all_of_group(per_question: Mapping[str, float], groups: Mapping[str, str]) -> float:
    """Mean over groups of the product of their members' Pass@k (members: questions sharing a group)."""
    products: dict[str, float] = defaultdict(lambda: 1.0)
    for qid, value in per_question.items():
        products[groups.get(qid, qid)] *= value
    return _mean(list(products.values()))


def cycle_mean(per_question: Mapping[str, float], cycles: Mapping[str, str]) -> float:
    """Mean over rotations of the mean Pass@k of the questions in each rotation."""
    by_cycle: dict[str, list[float]] = defaultdict(list)
    for qid, value in per_question.items():
        by_cycle[cycles.get(qid, "0")].append(value)
    return _mean([_mean(v) for v in by_cycle.values()])


@dataclass
class BenchmarkScore:
    """The result of one benchmark for one model.

    Attributes:
        key / title / group: which benchmark.
        pass_at_k: k → the benchmark's score (its official aggregate of per-question Pass@k).
        extra: further scores by name (``worst_case``, ``all_cycles``), each k → value.
        per_category: category → k → mean Pass@k of its questions.
        tool_use_rate: fraction of rollouts with a well-formed tool call.
        accuracy / tool_call_error_rate / mean_turns: as in `GroupMetrics`.
        num_questions / num_rollouts: what the scores average over.
        reused_questions: questions whose results came from an earlier (interrupted) run.
    """

    key: str
    title: str
    group: str
    pass_at_k: dict[int, float]
    extra: dict[str, dict[int, float]] = field(default_factory=dict)
    per_category: dict[str, dict[int, float]] = field(default_factory=dict)
    tool_use_rate: float = math.nan
    accuracy: float = math.nan
    tool_call_error_rate: float = math.nan
    mean_turns: float = math.nan
    num_questions: int = 0
    num_rollouts: int = 0
    reused_questions: int = 0

    @classmethod
    def from_report(
        cls, benchmark: Any, report: EvalReport, metadata: Mapping[str, Mapping[str, Any]]
    ) -> BenchmarkScore:
        """Score ``report`` (one benchmark's `evaluate` result) by the benchmark's aggregate rule;
        ``metadata`` maps question id → `Sample.metadata` (group and cycle labels)."""
        groups = {q: str(m["group"]) for q, m in metadata.items() if m.get("group") is not None}
        cycles = {q: str(m["cycle"]) for q, m in metadata.items() if m.get("cycle") is not None}
        scores: dict[int, float] = {}
        extra: dict[str, dict[int, float]] = {}
        by_cat: dict[str, dict[int, float]] = defaultdict(dict)
        for k in report.ks:
            per_q = question_pass_at_k(report.records, k)
            if benchmark.aggregate == "cycles":
                scores[k] = cycle_mean(per_q, cycles)
                extra.setdefault("all_cycles", {})[k] = all_of_group(per_q, groups)
            else:
                scores[k] = _mean(list(per_q.values()))
                if benchmark.aggregate == "variants":
                    extra.setdefault("worst_case", {})[k] = all_of_group(per_q, groups)
            for cat, metrics in report.per_category.items():
                by_cat[cat][k] = metrics.pass_at_k[k]
        o = report.overall
        return cls(
            key=benchmark.key,
            title=benchmark.title,
            group=benchmark.group,
            pass_at_k=scores,
            extra=extra,
            per_category=dict(by_cat),
            tool_use_rate=o.tool_use_rate,
            accuracy=o.accuracy,
            tool_call_error_rate=o.tool_call_error_rate,
            mean_turns=o.mean_turns,
            num_questions=o.num_questions,
            num_rollouts=o.num_rollouts,
            reused_questions=report.reused_questions,
        )


def _keys_to_int(d: Mapping[Any, Any]) -> dict[int, Any]:
    return {int(k): v for k, v in d.items()}


def _none_to_nan(v: Any) -> float:
    return math.nan if v is None else float(v)


@dataclass
class SuiteResult:
    """One model's results over the benchmarks of a suite run.

    Attributes:
        label: the model's row name in tables.
        ks: the reported k values.
        benchmarks: per-benchmark scores, in registry order.
        model_id: what was evaluated (checkpoint or model path).
        engine: ``local`` or ``vllm``.
    """

    label: str
    ks: list[int]
    benchmarks: list[BenchmarkScore]
    model_id: str = ""
    engine: str = "local"

    def group_scores(self) -> dict[str, dict[int, float]]:
        """Group → k → mean of its benchmarks' scores (groups with a benchmark in this run)."""
        out: dict[str, dict[int, float]] = {}
        for group in dict.fromkeys(b.group for b in self.benchmarks):
            members = [b for b in self.benchmarks if b.group == group]
            out[group] = {k: _mean([b.pass_at_k[k] for b in members]) for k in self.ks}
        return out

    def average(self) -> dict[int, float]:
        """k → mean over all benchmarks of their scores."""
        return {k: _mean([b.pass_at_k[k] for b in self.benchmarks]) for k in self.ks}

    def tool_use_rate(self, group: str | None = None) -> float:
        """Fraction of tool-using rollouts over every benchmark (or one group's)."""
        members = [b for b in self.benchmarks if group is None or b.group == group]
        rollouts = sum(b.num_rollouts for b in members)
        used = sum(b.tool_use_rate * b.num_rollouts for b in members if not math.isnan(b.tool_use_rate))
        return used / rollouts if rollouts else math.nan

    def to_dict(self) -> dict[str, Any]:
        """Plain data for JSON (k keys become strings when dumped)."""
        return {
            "label": self.label,
            "model_id": self.model_id,
            "engine": self.engine,
            "ks": list(self.ks),
            "benchmarks": [asdict(b) for b in self.benchmarks],
            "groups": {
                g: {"pass_at_k": s, "tool_use_rate": self.tool_use_rate(g)}
                for g, s in self.group_scores().items()
            },
            "average": {"pass_at_k": self.average(), "tool_use_rate": self.tool_use_rate()},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SuiteResult:
        """Inverse of `to_dict` (after a JSON round trip: NaN as null, k keys as strings)."""
        benches = []
        for b in data["benchmarks"]:
            b = dict(b)
            b["pass_at_k"] = {k: _none_to_nan(v) for k, v in _keys_to_int(b["pass_at_k"]).items()}
            b["extra"] = {
                name: {k: _none_to_nan(v) for k, v in _keys_to_int(vals).items()}
                for name, vals in b["extra"].items()
            }
            b["per_category"] = {
                c: {k: _none_to_nan(v) for k, v in _keys_to_int(vals).items()}
                for c, vals in b["per_category"].items()
            }
            for name in ("tool_use_rate", "accuracy", "tool_call_error_rate", "mean_turns"):
                b[name] = _none_to_nan(b.get(name))
            benches.append(BenchmarkScore(**b))
        return cls(
            label=data["label"],
            ks=[int(k) for k in data["ks"]],
            benchmarks=benches,
            model_id=data.get("model_id", ""),
            engine=data.get("engine", "local"),
        )

"""Running the suite: load each benchmark, evaluate it through the agent loop, score, report.

Layout of the output folder (``--out``)::

    _images/<benchmark>/          images decoded from the benchmark files (by content hash)
    <label>/<benchmark>/results.jsonl   per-question records, appended as questions finish
    <label>/summary.json          this model's scores (a `SuiteResult`)
    suite.md, suite.csv, suite.json     tables over every model folder in --out

**Resume.** Each benchmark has its own results file (`eval.passk.evaluate`'s format), so a run
that stops — Ctrl-C, a crash, a lost node — is continued by running the same command again: the
finished questions of every benchmark are read back, not regenerated; only the rest are sampled.
Evaluating another model into the same ``--out`` (another ``--label``) adds a row to the tables.

**Engines.** `run_suite` takes any `Generator`; `axpo_nemo.engines` builds the local one or the
vLLM one (the wiring above both backends), and the very same agent loop, tools and scoring run
with either.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from axpo_nemo.agent.loop import AgentLoopConfig
from axpo_nemo.agent.protocol import ChatProtocol
from axpo_nemo.agent.rewards import RewardConfig
from axpo_nemo.agent.tools.base import Tool
from axpo_nemo.eval.passk import EvalConfig, _json_safe, evaluate
from axpo_nemo.eval.suite.benchmark_scores import BenchmarkScore, SuiteResult
from axpo_nemo.eval.suite.registry import Benchmark
from axpo_nemo.eval.suite.report import write_suite_reports
from axpo_nemo.eval.suite.tables import ImageStore

logger = logging.getLogger(__name__)

SUMMARY_FILE = "summary.json"
IMAGES_DIR = "_images"


def run_suite(
    generator: Any,
    protocol: ChatProtocol,
    tools: Sequence[Tool] | Mapping[str, Tool],
    benchmarks: Sequence[Benchmark],
    data_dir: str | Path,
    out_dir: str | Path,
    cfg: EvalConfig,
    loop_cfg: AgentLoopConfig,
    *,
    label: str,
    model_id: str,
    engine: str = "local",
    reward_cfg: RewardConfig | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    overwrite: bool = False,
) -> SuiteResult:
    """Evaluate one model on ``benchmarks`` and write its summary and the suite tables.

    Args:
        generator: a `Generator` (or a `PolicyBundle`, sampled with a `LocalGenerator`).
        protocol: the model's chat protocol.
        tools: the enabled tools; each benchmark gets (and its results depend on) only those it
            allows.
        benchmarks: from `resolve_suite`.
        data_dir: holds one folder per benchmark key with its files in their public format.
        out_dir: the output folder (see the module docstring).
        cfg: samples per question, ks (every k <= n), temperature, seed, max questions per benchmark.
        loop_cfg: agent-loop limits, as in training.
        label: the model's name in the tables (and its folder).
        model_id: identifies the weights in the results fingerprint (resuming with another model
            fails instead of mixing results).
        engine: recorded in the summary.
        reward_cfg: answer-checking settings; a benchmark's ``reward_overrides`` apply on top.
        progress: ``progress(benchmark_key, done, total)`` after each finished question.
        overwrite: start results files written with other settings over instead of failing.

    Returns:
        The model's `SuiteResult`.
    """
    if not label or "/" in label or label.startswith((".", "_")):
        raise ValueError(f"label {label!r}: give a plain folder name (no '/', not starting with '.' or '_')")
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    reward_cfg = reward_cfg or RewardConfig()
    model_dir = out_dir / label
    registry = dict(tools) if isinstance(tools, Mapping) else {t.name: t for t in tools}
    scores: list[BenchmarkScore] = []
    for bench in benchmarks:
        store = ImageStore(out_dir / IMAGES_DIR / bench.key)
        samples = bench.load(data_dir / bench.key, store)
        logger.info("%s: %d questions", bench.key, len(samples))
        bench_tools = {name: tool for name, tool in registry.items() if name in bench.tools}
        report = evaluate(
            generator, protocol, bench_tools, samples, store.root, cfg, loop_cfg,
            results_path=model_dir / bench.key / "results.jsonl",
            progress=(lambda done, total, key=bench.key: progress(key, done, total)) if progress else None,
            reward_cfg=dataclasses.replace(reward_cfg, **bench.reward_overrides),
            model_id=model_id, overwrite=overwrite,
        )  # fmt: skip
        scores.append(BenchmarkScore.from_report(bench, report, {s.id: s.metadata for s in samples}))
    result = SuiteResult(label=label, ks=list(cfg.ks), benchmarks=scores, model_id=model_id, engine=engine)
    model_dir.mkdir(parents=True, exist_ok=True)
    summary = json.dumps(_json_safe(result.to_dict()), indent=2, ensure_ascii=False)
    (model_dir / SUMMARY_FILE).write_text(summary, encoding="utf-8")
    write_suite_reports(out_dir, collect_results(out_dir))
    return result


def collect_results(out_dir: str | Path) -> list[SuiteResult]:
    """Every model's `SuiteResult` found as ``<out_dir>/<label>/summary.json`` (sorted by label)."""
    results = []
    for path in sorted(Path(out_dir).glob(f"*/{SUMMARY_FILE}")):
        try:
            results.append(SuiteResult.from_dict(json.loads(path.read_text(encoding="utf-8"))))
        except (ValueError, KeyError, TypeError) as exc:
            logger.warning("%s: unreadable summary skipped (%s)", path, exc)
    return results


def default_label(run: str | None, model_name: str) -> str:
    """A model's table name: the run folder's name, else the model folder's (or ``tiny``)."""
    name = Path(run).name if run else Path(model_name).name
    return name.lstrip("._") or "model"

"""RL pool pruning (``axpo data prune``): drop the questions that cannot teach anything.

The paper's RL pool drops the questions the SFT model solves k/k (k = 4: too easy, every group
would be all-correct and carry no advantage) and those the teacher fails k/k (too hard or a bad
reference). The evidence is rollout result files in the evaluation format
(`axpo_nemo.eval.passk`: a JSONL header line, then one ``{"type": "question", "id", "n",
"correct", …}`` record per question); any engine that writes that format can supply them.

Rules, applied to each pool question by ``id``:

* **sft_solved**: the SFT model's record has ``n >= k`` rollouts and all of them are correct;
* **teacher_failed**: the teacher's record has ``n >= k`` rollouts and none is correct.

A question matching either rule is dropped (the report counts each rule and their overlap). A
question without a record, or with fewer than k rollouts, is kept (``missing: drop`` drops the
ones without records) and counted. Several result files per role are merged (a later record of
the same question wins, as in the evaluator).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from axpo_nemo.core.config import ValidatedConfig, setting
from axpo_nemo.data.results_file import read_results_file
from axpo_nemo.data.shards import SampleSink, ShardConfig, iter_samples
from axpo_nemo.run.atomic import atomic_output_dir

__all__ = ["PruneConfig", "PruneReport", "prune_pool", "read_results"]

logger = logging.getLogger(__name__)

MISSING_POLICIES = ("keep", "drop")


@dataclass
class PruneConfig(ValidatedConfig):
    """Settings of RL pool pruning."""

    k: int = setting(4, "Rollouts per question the rules need (the paper: 4).", ge=1)
    drop_sft_solved: bool = setting(True, "Drop questions the SFT model solves in all of its >= k rollouts.")
    drop_teacher_failed: bool = setting(True, "Drop questions the teacher fails in all of its >= k rollouts.")
    missing: str = setting(
        "keep",
        "Questions without a record in some results file: keep or drop them.",
        choices=MISSING_POLICIES,
    )


@dataclass
class PruneReport:
    """What pruning did.

    Attributes:
        total / kept / dropped: pool questions, and how many were kept or dropped.
        sft_solved / teacher_failed: questions matching each rule (dropped when the rule is on).
        both: questions matching both rules.
        missing_sft / missing_teacher: questions without a record of that role.
        too_few_sft / too_few_teacher: questions whose record has fewer than k rollouts.
        dropped_missing: dropped for lack of records (``missing: drop``).
        unknown_ids: records whose id is not in the pool.
        skipped_lines: JSONL pool lines that are not a valid sample (skipped, with a WARNING).
    """

    total: int = 0
    kept: int = 0
    dropped: int = 0
    sft_solved: int = 0
    teacher_failed: int = 0
    both: int = 0
    missing_sft: int = 0
    missing_teacher: int = 0
    too_few_sft: int = 0
    too_few_teacher: int = 0
    dropped_missing: int = 0
    unknown_ids: int = 0
    skipped_lines: int = 0
    config: dict[str, Any] = field(default_factory=dict)
    elapsed_s: float = 0.0

    def summary(self) -> str:
        """A few lines of counts."""
        return (
            f"{self.total} questions: kept {self.kept}, dropped {self.dropped} "
            f"(SFT model solves {self.config.get('k')}/{self.config.get('k')}: {self.sft_solved}; "
            f"teacher fails all: {self.teacher_failed}; both: {self.both}; "
            f"no records: {self.dropped_missing})\n"
            f"missing records: sft {self.missing_sft}, teacher {self.missing_teacher}; "
            f"fewer than k rollouts: sft {self.too_few_sft}, teacher {self.too_few_teacher}; "
            f"records of unknown questions: {self.unknown_ids}"
            + (f"; skipped {self.skipped_lines} unreadable pool lines" if self.skipped_lines else "")
        )


def read_results(paths: Iterable[str | Path]) -> dict[str, dict[str, int]]:
    """``{question id: {"n": rollouts, "correct": correct ones}}`` from results files.

    Header lines and other record types are ignored; an unreadable line (a torn tail of an
    interrupted run) or a record without integer ``n``/``correct`` is logged and skipped.
    """
    out: dict[str, dict[str, int]] = {}
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such results file")
        for obj in read_results_file(path)[1]:
            qid, n, correct = obj["id"], obj.get("n"), obj.get("correct")
            if not isinstance(n, int) or not isinstance(correct, int) or not 0 <= correct <= n:
                logger.warning("%s: skipped the record of %s (n=%r, correct=%r)", path, qid, n, correct)
                continue
            out[qid] = {"n": n, "correct": correct}
    return out


def prune_pool(
    pool: str | Path,
    out: str | Path,
    sft_results: Iterable[str | Path],
    teacher_results: Iterable[str | Path],
    cfg: PruneConfig | None = None,
    *,
    output: str = "shards",
    shard_cfg: ShardConfig | None = None,
    overwrite: bool = False,
    allow_incomplete: bool = False,
    progress: Callable[[int], None] | None = None,
) -> PruneReport:
    """Prune the question pool ``pool`` (JSONL or shards) into ``out`` (shards or JSONL).

    Writes ``out/prune_report.json`` and ``out/pruned.jsonl`` (each dropped id with its reasons).
    ``progress`` is called with the number of questions read so far after each one. ``out``
    appears only when the whole pool was read (`atomic_output_dir`; a failure keeps the partial
    output in ``<out>.incomplete``); ``allow_incomplete`` reads an unfinished pool shard folder.
    """
    cfg = cfg or PruneConfig()
    if not Path(pool).exists():  # before anything is written
        raise FileNotFoundError(f"{pool}: no such JSONL file or shard folder")
    start = time.perf_counter()
    sft = read_results(sft_results)
    teacher = read_results(teacher_results)
    report = PruneReport(config=asdict(cfg))
    seen: set[str] = set()

    def skipped(_line: int, _reason: str) -> None:
        report.skipped_lines += 1

    with (
        atomic_output_dir(out, overwrite, keep_failed=True) as tmp,
        SampleSink(tmp, output, shard_cfg, overwrite=True) as sink,
        (tmp / "pruned.jsonl").open("w", encoding="utf-8") as log,
    ):
        for sample in iter_samples(pool, allow_incomplete=allow_incomplete, on_skip=skipped):
            report.total += 1
            seen.add(sample.id)
            reasons = []
            s, t = sft.get(sample.id), teacher.get(sample.id)
            report.missing_sft += s is None
            report.missing_teacher += t is None
            solved = failed = False
            if s is not None:
                if s["n"] < cfg.k:
                    report.too_few_sft += 1
                else:
                    solved = s["correct"] == s["n"]
            if t is not None:
                if t["n"] < cfg.k:
                    report.too_few_teacher += 1
                else:
                    failed = t["correct"] == 0
            report.sft_solved += solved
            report.teacher_failed += failed
            report.both += solved and failed
            if solved and cfg.drop_sft_solved:
                reasons.append("sft_solved")
            if failed and cfg.drop_teacher_failed:
                reasons.append("teacher_failed")
            if cfg.missing == "drop" and (s is None or t is None):
                reasons.append("missing_results")
                report.dropped_missing += 1
            if reasons:
                report.dropped += 1
                log.write(json.dumps({"id": sample.id, "reasons": reasons, "sft": s, "teacher": t}) + "\n")
            else:
                report.kept += 1
                sink.write(sample)
            if progress is not None:
                progress(report.total)
        report.unknown_ids = len((set(sft) | set(teacher)) - seen)
        report.elapsed_s = time.perf_counter() - start
        (tmp / "prune_report.json").write_text(json.dumps(asdict(report), indent=2))
    return report

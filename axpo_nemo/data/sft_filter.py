"""The SFT correctness filter: keep only trajectories whose final answer verifies.

The paper's SFT set is 64,274 *correct* trajectories distilled from a teacher: a trajectory is
kept when the final assistant turn's answer (the last ``\\boxed{}`` outside thinking) checks out
against the sample's reference with the same verifier RL uses (`axpo_nemo.agent.rewards`:
math-verify for ``math``, letters/option text for ``multiple_choice``, normalised match against
the answer and candidates for ``short_answer``). Samples without an assistant turn are dropped
and counted apart. The report also gives the share of kept trajectories that call a tool (the
paper's mix is about 25 %).
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from axpo_nemo.agent.rewards import RewardConfig, score_answer
from axpo_nemo.agent.sample import Sample
from axpo_nemo.data.shards import SampleSink, ShardConfig, iter_samples
from axpo_nemo.run.atomic import atomic_output_dir

__all__ = ["SFTFilterReport", "filter_sft", "filter_trajectories", "final_assistant_text", "uses_tools"]


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # chat "parts": keep the text ones
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return ""


def final_assistant_text(sample: Sample) -> str | None:
    """The text of the trajectory's last assistant turn; None if it has none."""
    for message in reversed(sample.messages):
        if isinstance(message, dict) and message.get("role") == "assistant":
            return _text(message.get("content"))
    return None


def uses_tools(sample: Sample) -> bool:
    """Whether the trajectory calls a tool (a tool turn, or a ``<tool_call>`` in an assistant turn)."""
    return any(
        isinstance(m, dict)
        and (
            m.get("role") == "tool"
            or (m.get("role") == "assistant" and "<tool_call>" in _text(m.get("content")))
        )
        for m in sample.messages
    )


@dataclass
class SFTFilterReport:
    """Counts of the SFT filter.

    Attributes:
        total: trajectories read.
        kept: trajectories whose final answer verifies.
        wrong: dropped: the final answer does not verify.
        no_trajectory: dropped: no assistant turn.
        kept_tool_using: kept trajectories that call a tool.
        kept_by_source / dropped_by_source: per ``Sample.source``.
        skipped_lines: JSONL input lines that are not a valid sample (skipped, with a WARNING).
    """

    total: int = 0
    kept: int = 0
    wrong: int = 0
    no_trajectory: int = 0
    kept_tool_using: int = 0
    kept_by_source: dict[str, int] = field(default_factory=dict)
    dropped_by_source: dict[str, int] = field(default_factory=dict)
    skipped_lines: int = 0
    elapsed_s: float = 0.0

    @property
    def tool_share(self) -> float:
        """Share of kept trajectories that call a tool."""
        return self.kept_tool_using / self.kept if self.kept else 0.0

    def summary(self) -> str:
        """One line of counts."""
        return (
            f"{self.total} trajectories: kept {self.kept} ({self.tool_share:.0%} with tool calls), "
            f"dropped {self.wrong} wrong and {self.no_trajectory} without an assistant turn"
            + (f"; skipped {self.skipped_lines} unreadable input lines" if self.skipped_lines else "")
        )


def filter_trajectories(
    samples: Iterable[Sample], report: SFTFilterReport, reward_cfg: RewardConfig | None = None
) -> Iterator[Sample]:
    """Yield the samples whose final answer verifies; ``report`` is updated as they stream."""
    reward_cfg = reward_cfg or RewardConfig()
    kept_by, dropped_by = Counter(report.kept_by_source), Counter(report.dropped_by_source)
    for sample in samples:
        report.total += 1
        text = final_assistant_text(sample)
        if text is None:
            report.no_trajectory += 1
            ok = False
        else:
            result = score_answer(
                text, sample.answer, sample.answer_type, candidates=sample.candidates,
                options=sample.options, cfg=reward_cfg,
            )  # fmt: skip
            ok = result.correct
            if not ok:
                report.wrong += 1
        if ok:
            report.kept += 1
            report.kept_tool_using += uses_tools(sample)
            kept_by[sample.source] += 1
        else:
            dropped_by[sample.source] += 1
        report.kept_by_source, report.dropped_by_source = dict(kept_by), dict(dropped_by)
        if ok:
            yield sample


def _counted(items: Iterable[Sample], progress: Callable[[int], None]) -> Iterator[Sample]:
    """``items``, calling ``progress(n)`` once the n-th has been handled."""
    for n, item in enumerate(items, start=1):
        yield item
        progress(n)


def filter_sft(
    input_path: str | Path,
    out: str | Path,
    *,
    output: str = "shards",
    shard_cfg: ShardConfig | None = None,
    reward_cfg: RewardConfig | None = None,
    overwrite: bool = False,
    allow_incomplete: bool = False,
    progress: Callable[[int], None] | None = None,
) -> SFTFilterReport:
    """Filter a trajectory set (JSONL or shards) into SFT shards (or JSONL) in ``out``; the
    report is also written to ``out/sft_filter_report.json``. ``progress`` is called with the
    number of trajectories read so far after each one.

    ``out`` appears only when the whole input was read (`atomic_output_dir`; a failure keeps the
    partial output in ``<out>.incomplete``). ``allow_incomplete`` reads an unfinished input
    shard folder (see `read_index`)."""
    if not Path(input_path).exists():  # before anything is written
        raise FileNotFoundError(f"{input_path}: no such JSONL file or shard folder")
    start = time.perf_counter()
    report = SFTFilterReport()

    def skipped(_line: int, _reason: str) -> None:
        report.skipped_lines += 1

    with atomic_output_dir(out, overwrite, keep_failed=True) as tmp:
        with SampleSink(tmp, output, shard_cfg, overwrite=True) as sink:
            samples = iter_samples(input_path, allow_incomplete=allow_incomplete, on_skip=skipped)
            if progress is not None:
                samples = _counted(samples, progress)
            sink.write_all(filter_trajectories(samples, report, reward_cfg))
        report.elapsed_s = time.perf_counter() - start
        payload = {**asdict(report), "tool_share": report.tool_share}
        (tmp / "sft_filter_report.json").write_text(json.dumps(payload, indent=2))
    return report

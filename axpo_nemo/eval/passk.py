"""Pass@k with tool metrics over a question file, through the same agent loop as training.

`evaluate` draws ``n = samples_per_question`` rollouts per question with `run_rollouts` (the
training loop: same protocol, tools, turn and token limits), scores each rollout's final
assistant turn with `score_answer`, and reports the unbiased Pass@k of DESIGN.md §1
(`core.metrics.pass_at_k`, averaged over questions) with accuracy and tool-use metrics, overall
and per category.

**Seeding.** Rollout ``j`` of question ``q`` samples with its own seed
``derive_seed("eval", cfg.seed, q.id, j)`` and the loop's base seed is ``cfg.seed``; the local
generator derives each row's sampling stream only from those seeds and the context length. So a
question's results do not depend on ``batch_size``, on the other questions of the file, on their
order, or on whether the run was resumed.

**Results file and resume.** With ``results_path``, the file (JSONL) starts with a header line
``{"type": "header", "fingerprint": …, "config": …}`` followed by one ``{"type": "question", …}``
record per finished question, appended and flushed as each question finishes. The fingerprint
hashes everything that changes a question's record: ``samples_per_question``, ``temperature``,
``top_p``, ``seed``, the agent-loop limits, the tools' names and schemas, the reward settings and
the optional ``model_id``. (``ks``, ``batch_size`` and ``max_questions`` are left out: they do not
change any record, so a finished run can be re-reported with other k, or extended to more
questions.) Each record also stores a hash of its question (text, images, answer), so an edited
question is recomputed. When the file already exists:

* same fingerprint: finished questions are skipped and their records reused (a torn last line of
  an interrupted run is dropped);
* different fingerprint: `ResultsMismatchError` naming the differing settings, unless
  ``overwrite=True``, which starts the file over.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from axpo_nemo.agent.loop import AgentLoopConfig, Generator, run_rollouts
from axpo_nemo.agent.protocol import ChatProtocol
from axpo_nemo.agent.rewards import RewardConfig, score_answer
from axpo_nemo.agent.sample import Sample
from axpo_nemo.agent.tools.base import Tool
from axpo_nemo.agent.trajectory import TrajectoryState, derive_seed
from axpo_nemo.agent.trajectory_reward import final_assistant_text
from axpo_nemo.config.evaluation import EvalConfig
from axpo_nemo.core.metrics import pass_at_k
from axpo_nemo.data.results_file import read_results_file

__all__ = [
    "EvalConfig",
    "EvalReport",
    "GroupMetrics",
    "ResultsMismatchError",
    "evaluate",
    "final_assistant_text",
]

logger = logging.getLogger(__name__)

#: Version of the results-file layout (part of the fingerprint).
RESULTS_VERSION = 1
#: Category name used for questions without one.
UNCATEGORIZED = "uncategorized"


class ResultsMismatchError(ValueError):
    """The results file was written with other settings than this run's."""


@dataclass
class GroupMetrics:
    """Metrics of a set of questions (all of them, or one category).

    Attributes:
        num_questions / num_rollouts: what the metrics average over.
        pass_at_k: k → unbiased Pass@k, the mean over questions of 1 - C(n-c, k)/C(n, k).
        accuracy: mean over questions of the fraction of correct rollouts.
        tool_use_rate: fraction of rollouts with at least one well-formed tool call.
        tool_call_error_rate: fraction of tool calls (malformed ones included) that failed;
            NaN when no call was made.
        accuracy_tool / accuracy_no_tool: fraction correct among tool-using / other rollouts
            (NaN when there are none).
        mean_turns: assistant turns per rollout.
        mean_tool_calls: tool calls per rollout.
    """

    num_questions: int
    num_rollouts: int
    pass_at_k: dict[int, float]
    accuracy: float
    tool_use_rate: float
    tool_call_error_rate: float
    accuracy_tool: float
    accuracy_no_tool: float
    mean_turns: float
    mean_tool_calls: float

    @classmethod
    def from_records(cls, records: Sequence[Mapping[str, Any]], ks: Sequence[int]) -> GroupMetrics:
        """Aggregate per-question records (as `evaluate` writes them)."""
        n = np.array([r["n"] for r in records], dtype=np.int64)
        c = np.array([r["correct"] for r in records], dtype=np.int64)
        rollouts = int(n.sum())

        def total(key: str) -> float:
            return float(sum(r[key] for r in records))

        def ratio(num: float, den: float) -> float:
            return num / den if den else math.nan

        tool = total("tool_using")
        correct_tool = total("correct_tool")
        return cls(
            num_questions=len(records),
            num_rollouts=rollouts,
            pass_at_k={k: float(np.mean(pass_at_k(n, c, k))) if len(records) else math.nan for k in ks},
            accuracy=float(np.mean(c / n)) if len(records) else math.nan,
            tool_use_rate=ratio(tool, rollouts),
            tool_call_error_rate=ratio(total("tool_call_errors"), total("tool_calls")),
            accuracy_tool=ratio(correct_tool, tool),
            accuracy_no_tool=ratio(float(c.sum()) - correct_tool, rollouts - tool),
            mean_turns=ratio(total("turns"), rollouts),
            mean_tool_calls=ratio(total("tool_calls"), rollouts),
        )

    def as_dict(self) -> dict[str, float]:
        """Flat metrics: ``pass@k`` for each k, then the other rates (NaN kept)."""
        out: dict[str, float] = {f"pass@{k}": v for k, v in self.pass_at_k.items()}
        for name in (
            "accuracy",
            "tool_use_rate",
            "tool_call_error_rate",
            "accuracy_tool",
            "accuracy_no_tool",
            "mean_turns",
            "mean_tool_calls",
        ):
            out[name] = getattr(self, name)
        out["num_questions"] = float(self.num_questions)
        out["num_rollouts"] = float(self.num_rollouts)
        return out


def _json_safe(value: Any) -> Any:
    """NaN/inf → None, recursively (strict JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


@dataclass
class EvalReport:
    """The result of `evaluate`.

    Attributes:
        ks: the reported k values.
        overall: metrics over every question.
        per_category: metrics per ``Sample.category`` (empty categories: ``uncategorized``).
        records: the per-question records, in question order (as in the results file).
        config: the settings the results were produced with (the fingerprinted ones, plus ks).
        fingerprint: the results fingerprint.
        reused_questions: questions whose records came from an earlier run (resume).
    """

    ks: list[int]
    overall: GroupMetrics
    per_category: dict[str, GroupMetrics]
    records: list[dict[str, Any]]
    config: dict[str, Any] = field(default_factory=dict)
    fingerprint: str = ""
    reused_questions: int = 0

    @classmethod
    def from_records(
        cls,
        records: Sequence[dict[str, Any]],
        ks: Sequence[int],
        *,
        config: dict[str, Any] | None = None,
        fingerprint: str = "",
        reused_questions: int = 0,
    ) -> EvalReport:
        """Build a report from per-question records (e.g. read back from a results file)."""
        ks = sorted(set(ks))
        by_cat: dict[str, list[dict[str, Any]]] = {}
        for r in records:
            by_cat.setdefault(r.get("category") or UNCATEGORIZED, []).append(r)
        return cls(
            ks=list(ks),
            overall=GroupMetrics.from_records(records, ks),
            per_category={cat: GroupMetrics.from_records(rs, ks) for cat, rs in sorted(by_cat.items())},
            records=list(records),
            config=dict(config or {}),
            fingerprint=fingerprint,
            reused_questions=reused_questions,
        )

    def summary(self) -> dict[str, float]:
        """Flat metrics for loggers: ``pass@1``, ``pass@4``, ``accuracy``, ``tool_use_rate``, … and
        ``<category>/pass@1`` etc. for each category."""
        out = self.overall.as_dict()
        for cat, metrics in self.per_category.items():
            out.update({f"{cat}/{key}": value for key, value in metrics.as_dict().items()})
        return out

    def to_json(self, *, indent: int | None = 2) -> str:
        """The report as JSON (NaN as null): config, overall and per-category metrics, and each
        question's counts (per-rollout details live in the results file)."""
        questions = [
            {key: r[key] for key in ("id", "category", "n", "correct", "tool_using", "turns")}
            for r in self.records
        ]
        data = {
            "ks": self.ks,
            "fingerprint": self.fingerprint,
            "config": self.config,
            "overall": self.overall.as_dict(),
            "per_category": {cat: m.as_dict() for cat, m in self.per_category.items()},
            "questions": questions,
        }
        return json.dumps(_json_safe(data), indent=indent, ensure_ascii=False)

    def to_markdown(self) -> str:
        """A Markdown table: one row for all questions, then one per category; rates in percent."""

        def pct(x: float) -> str:
            return "–" if math.isnan(x) else f"{100 * x:.1f}"

        def num(x: float) -> str:
            return "–" if math.isnan(x) else f"{x:.2f}"

        head = ["split", "questions", "rollouts", *(f"pass@{k}" for k in self.ks)]
        head += ["accuracy", "tool use", "tool-call errors", "acc. with tools", "acc. without tools", "turns"]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        rows = [("**all**", self.overall), *self.per_category.items()]
        for name, m in rows:
            cells = [name, str(m.num_questions), str(m.num_rollouts), *(pct(m.pass_at_k[k]) for k in self.ks)]
            cells += [pct(m.accuracy), pct(m.tool_use_rate), pct(m.tool_call_error_rate)]
            cells += [pct(m.accuracy_tool), pct(m.accuracy_no_tool), num(m.mean_turns)]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"


def _hash(obj: Any) -> str:
    text = json.dumps(obj, sort_keys=True, ensure_ascii=False, default=repr)
    return hashlib.blake2b(text.encode(), digest_size=12).hexdigest()


def _question_hash(q: Sample) -> str:
    return _hash(
        [q.question, q.images, q.answer, q.answer_type, q.candidates, q.options, sorted(q.allowed_tools)]
    )


def _tool_registry(tools: Sequence[Tool] | Mapping[str, Tool]) -> dict[str, Tool]:
    if isinstance(tools, Mapping):
        return dict(tools)
    return {t.name: t for t in tools}


def _fingerprint_config(
    cfg: EvalConfig,
    loop_cfg: AgentLoopConfig,
    tools: Mapping[str, Tool],
    reward_cfg: RewardConfig,
    model_id: str | None,
) -> dict[str, Any]:
    """The settings a question's record depends on (see the module docstring)."""
    loop = dataclasses.asdict(loop_cfg)
    loop.pop("tool_workers", None)  # concurrency only
    return {
        "version": RESULTS_VERSION,
        "samples_per_question": cfg.samples_per_question,
        "temperature": cfg.temperature,
        "top_p": cfg.top_p,
        "seed": cfg.seed,
        "loop": loop,
        "tools": {name: _hash(tool.schema()) for name, tool in sorted(tools.items())},
        "reward": dataclasses.asdict(reward_cfg),
        "model_id": model_id,
    }


def _config_diff(old: Mapping[str, Any], new: Mapping[str, Any], prefix: str = "") -> list[str]:
    diffs = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += _config_diff(a, b, f"{prefix}{key}.")
        elif a != b:
            diffs.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return diffs


def _open_results(
    path: Path, fingerprint: str, config: dict[str, Any], overwrite: bool
) -> dict[str, dict[str, Any]]:
    """Validate or create the results file; returns its records by question id (last one wins).

    The file is rewritten (atomically) with its header and readable records, so that appending
    after a torn last line is safe.
    """
    records: dict[str, dict[str, Any]] = {}
    if path.exists():
        header, old = read_results_file(path)
        if header is not None and header.get("fingerprint") == fingerprint:
            records = {r["id"]: r for r in old if r.get("fingerprint") == fingerprint}
        elif header is None and not old:
            pass  # empty or fully torn file: start it over
        elif not overwrite:
            diff = _config_diff((header or {}).get("config", {}), config) or ["(no header)"]
            raise ResultsMismatchError(
                f"{path} holds results of other settings ({'; '.join(diff)}). Use another results "
                "path, or overwrite=True to start it over."
            )
        else:
            logger.warning("%s: results of other settings; starting it over", path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        header = {"type": "header", "fingerprint": fingerprint, "config": config}
        f.write(json.dumps(_json_safe(header), ensure_ascii=False) + "\n")
        for r in records.values():
            f.write(json.dumps(_json_safe(r), ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return records


def _sample_record(
    state: TrajectoryState, question: Sample, protocol: ChatProtocol, reward_cfg: RewardConfig, max_chars: int
) -> dict[str, Any]:
    """Score one finished rollout and describe it."""
    text = final_assistant_text(state, protocol)
    result = score_answer(
        text, question.answer, question.answer_type, candidates=question.candidates,
        options=question.options, cfg=reward_cfg,
    )  # fmt: skip
    calls = [{"name": c.name, "arguments": c.arguments, "error": c.error} for c in state.tool_calls]
    return {
        "index": state.metadata["sample"],
        "seed": state.seed,
        "correct": result.correct,
        "reward": result.reward,
        "answer": state.answer,
        "extracted": result.extracted,
        "tool_using": any(c.well_formed for c in state.tool_calls),
        "tool_calls": calls,
        "errors": [c.error for c in state.tool_calls if c.error is not None],
        "turns": state.num_turns,
        "finish_reason": state.finish_reason,
        "response_tokens": sum(state.generated),
        "text": text[-max_chars:] if max_chars else "",
    }


def _question_record(
    question: Sample, samples: list[dict[str, Any]], qhash: str, fingerprint: str
) -> dict[str, Any]:
    samples = sorted(samples, key=lambda s: s["index"])
    return {
        "type": "question",
        "fingerprint": fingerprint,
        "id": question.id,
        "question_hash": qhash,
        "category": question.category,
        "n": len(samples),
        "correct": sum(s["correct"] for s in samples),
        "tool_using": sum(s["tool_using"] for s in samples),
        "correct_tool": sum(s["correct"] and s["tool_using"] for s in samples),
        "turns": sum(s["turns"] for s in samples),
        "mean_turns": sum(s["turns"] for s in samples) / len(samples),
        "tool_calls": sum(len(s["tool_calls"]) for s in samples),
        "tool_call_errors": sum(len(s["errors"]) for s in samples),
        "samples": samples,
    }


def evaluate(
    generator: Generator,
    protocol: ChatProtocol,
    tools: Sequence[Tool] | Mapping[str, Tool],
    questions: Sequence[Sample],
    data_root: str | os.PathLike,
    cfg: EvalConfig,
    loop_cfg: AgentLoopConfig,
    *,
    results_path: str | os.PathLike | None = None,
    progress: Callable[[int, int], None] | None = None,
    reward_cfg: RewardConfig | None = None,
    model_id: str | None = None,
    overwrite: bool = False,
) -> EvalReport:
    """Pass@k and tool metrics of a policy on ``questions`` (see the module docstring).

    Args:
        generator: any `Generator` (the local backend's: `axpo_nemo.engines.local_generator(bundle)`).
        protocol: the chat protocol of the policy's processor.
        tools: the enabled tools (a `Toolbox`, a name → tool mapping or a list). A question with
            ``allowed_tools`` is shown (and may run) only those of them.
        questions: the questions; ids must be unique.
        data_root: the folder question image paths are relative to (the dataset file's folder).
        cfg: evaluation settings; its temperature, top_p and seed override ``loop_cfg``'s.
        loop_cfg: agent-loop limits (turns, tokens, images, tool timeout), as in training.
        results_path: JSONL file of per-question records, appended as questions finish; an
            existing file with the same settings is resumed.
        progress: called as ``progress(done, total)`` after each finished (or reused) question.
        reward_cfg: answer-checking settings (default `RewardConfig()`).
        model_id: identifies the policy in the results fingerprint (e.g. the checkpoint path),
            so resuming with another model fails instead of mixing results.
        overwrite: start an existing results file over when its settings differ.

    Returns:
        The `EvalReport` over the (first ``cfg.max_questions``) questions.

    Raises:
        ResultsMismatchError: ``results_path`` holds results of other settings.
        ValueError: duplicate question ids.
    """
    reward_cfg = reward_cfg or RewardConfig()
    questions = list(questions)[: cfg.max_questions]
    position: dict[str, int] = {}
    for i, q in enumerate(questions):
        if position.setdefault(q.id, i) != i:
            raise ValueError(f"evaluate: question ids must be unique (duplicate {q.id!r})")
    registry = _tool_registry(tools)
    loop_cfg = dataclasses.replace(loop_cfg, temperature=cfg.temperature, top_p=cfg.top_p, seed=cfg.seed)
    config = _fingerprint_config(cfg, loop_cfg, registry, reward_cfg, model_id)
    fingerprint = _hash(config)
    report_config = {**config, "ks": list(cfg.ks)}
    n = cfg.samples_per_question
    qhashes = {q.id: _question_hash(q) for q in questions}

    done: dict[str, dict[str, Any]] = {}
    path = Path(results_path) if results_path is not None else None
    if path is not None:
        stored = _open_results(path, fingerprint, config, overwrite)
        by_id = {q.id: q for q in questions}
        # The category is not part of the question hash: a re-labelled question keeps its results.
        done = {
            i: {**r, "category": by_id[i].category}
            for i, r in stored.items()
            if i in qhashes and r.get("question_hash") == qhashes[i]
        }
    reused = len(done)
    total = len(questions)
    if progress is not None and reused:
        progress(reused, total)

    todo = [q for q in questions if q.id not in done]
    if todo:
        root = Path(data_root)

        def tools_for(q: Sample) -> dict[str, Tool]:
            if not q.allowed_tools:
                return registry
            return {name: tool for name, tool in registry.items() if name in q.allowed_tools}

        # Work items (question, sample index), cut into chunks of at most batch_size that share a
        # tool set (run_rollouts executes calls against one registry).
        chunks: list[list[tuple[Sample, int]]] = []
        for q in todo:
            for j in range(n):
                if (
                    chunks
                    and len(chunks[-1]) < cfg.batch_size
                    and tools_for(chunks[-1][0][0]) == tools_for(q)
                ):
                    chunks[-1].append((q, j))
                else:
                    chunks.append([(q, j)])

        prompts: dict[str, Any] = {}
        pending: dict[str, list[dict[str, Any]]] = {}
        sink = path.open("a", encoding="utf-8") if path is not None else None
        try:
            for chunk in chunks:
                states = []
                for q, j in chunk:
                    if q.id not in prompts:
                        prompts[q.id] = protocol.build_prompt(
                            q.question, q.load_images(root), list(tools_for(q).values())
                        )
                    states.append(
                        TrajectoryState.from_prompt(
                            prompts[q.id],
                            group=position[q.id],
                            seed=derive_seed("eval", cfg.seed, q.id, j),
                            question_id=q.id,
                            metadata={"sample": j},
                        )
                    )
                run_rollouts(states, generator, tools_for(chunk[0][0]), loop_cfg, protocol=protocol)
                for (q, _), state in zip(chunk, states, strict=True):
                    pending.setdefault(q.id, []).append(
                        _sample_record(state, q, protocol, reward_cfg, cfg.max_text_chars)
                    )
                    if len(pending[q.id]) == n:
                        record = _question_record(q, pending.pop(q.id), qhashes[q.id], fingerprint)
                        prompts.pop(q.id, None)
                        done[q.id] = record
                        if sink is not None:
                            sink.write(json.dumps(_json_safe(record), ensure_ascii=False) + "\n")
                            sink.flush()
                        if progress is not None:
                            progress(len(done), total)
        finally:
            if sink is not None:
                sink.close()

    records = [done[q.id] for q in questions]
    return EvalReport.from_records(
        records, cfg.ks, config=report_config, fingerprint=fingerprint, reused_questions=reused
    )

"""`score_answer`: extract the final answer, dispatch on the answer type, add the format term."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

from axpo_nemo.agent.rewards.choice import _check_multiple_choice, _options_map
from axpo_nemo.agent.rewards.config import ANSWER_TYPES, AnswerType, RewardConfig, RewardResult
from axpo_nemo.agent.rewards.extract import check_format, extract_answer
from axpo_nemo.agent.rewards.math_check import check_math
from axpo_nemo.agent.rewards.normalize import _check_short_answer


def _reference_list(answer: Any, candidates: Sequence[Any] | None) -> list[str]:
    """The reference answer plus any alternative candidates, as non-empty strings."""
    refs: list[Any] = []
    if isinstance(answer, list | tuple):
        refs.extend(answer)
    elif answer is not None:
        refs.append(answer)
    if candidates is not None and not isinstance(candidates, str):
        refs.extend(candidates)
    elif isinstance(candidates, str):
        refs.append(candidates)
    return [str(r) for r in refs if r is not None and str(r).strip()]


def score_answer(
    response_text: str,
    answer: Any,
    answer_type: AnswerType | str,
    candidates: Sequence[Any] | None = None,
    options: Sequence[Any] | Mapping[Any, Any] | None = None,
    cfg: RewardConfig | None = None,
) -> RewardResult:
    """Score a model response against the reference answer.

    Args:
        response_text: the final assistant text (or the whole generated text: the last boxed
            answer outside thinking counts).
        answer: the reference answer (a string or number; a list means several accepted ones).
        answer_type: ``math``, ``multiple_choice`` or ``short_answer``.
        candidates: further accepted answers (aliases).
        options: multiple-choice options, a list (letters A, B, … in order) or ``{letter: text}``.
        cfg: reward settings.

    Returns:
        A `RewardResult`. Model output never makes this raise; an unknown ``answer_type`` (a data
        bug, not a model error) raises ValueError.
    """
    cfg = cfg or RewardConfig()
    try:
        kind = AnswerType(answer_type)
    except ValueError:
        raise ValueError(
            f"answer_type must be one of {', '.join(ANSWER_TYPES)} (got {answer_type!r})"
        ) from None
    start = time.perf_counter()
    text = (
        response_text
        if isinstance(response_text, str)
        else ("" if response_text is None else str(response_text))
    )
    details: dict[str, Any] = {"answer_type": kind.value}
    correct = False
    extracted: str | None = None
    fmt = False
    try:
        fmt = check_format(text)
        extracted, how = extract_answer(text, cfg.answer_fallback)
        details["extraction"] = how
        golds = _reference_list(answer, candidates)
        if extracted is None or not extracted.strip():
            details["method"] = "no_answer"
        elif len(extracted) > cfg.max_answer_chars:
            details["method"] = "too_long"
        elif not golds:
            details["method"] = "no_reference"
        elif kind is AnswerType.MATH:
            correct, sub = check_math(golds, extracted, cfg)
            details.update(sub)
        elif kind is AnswerType.MULTIPLE_CHOICE:
            correct, sub = _check_multiple_choice(extracted, golds, _options_map(options), cfg)
            details.update(sub)
        else:
            correct, sub = _check_short_answer(extracted, golds, cfg)
            details.update(sub)
    except Exception as e:  # never let a strange output crash training
        correct = False
        details["method"] = "error"
        details["error"] = repr(e)[:500]
    details["elapsed_s"] = round(time.perf_counter() - start, 6)
    reward = (cfg.correct_reward if correct else cfg.wrong_reward) + cfg.format_weight * float(fmt)
    return RewardResult(
        reward=float(reward), correct=bool(correct), extracted=extracted, format_ok=fmt, details=details
    )

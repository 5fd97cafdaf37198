"""Reward settings, answer types and the result of checking one response."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from axpo_nemo.core.config import ValidatedConfig, setting


class AnswerType(enum.StrEnum):
    """How a reference answer is checked."""

    MATH = "math"
    MULTIPLE_CHOICE = "multiple_choice"
    SHORT_ANSWER = "short_answer"


ANSWER_TYPES = tuple(t.value for t in AnswerType)
MATH_TIMEOUT_MODES = ("auto", "process", "none")


@dataclass
class RewardConfig(ValidatedConfig):
    """Settings of the verifiable reward."""

    correct_reward: float = setting(1.0, "Reward of a correct answer.")
    wrong_reward: float = setting(0.0, "Reward of a wrong or missing answer.")
    format_weight: float = setting(
        0.0,
        "Added to the reward when the final text has a <think>…</think> block followed by a "
        "non-empty \\boxed{} answer (0 disables the format term).",
        ge=0.0,
    )
    answer_fallback: bool = setting(
        False,
        "When the text has no \\boxed{} answer, fall back to an <answer>…</answer> tag, then a "
        "'the answer is X' phrase, then a short last line. False: no box means no answer.",
    )
    max_answer_chars: int = setting(
        1000, "Longer extracted answers are judged wrong without being parsed.", ge=1
    )
    math_timeout_s: float = setting(
        5.0, "Wall-clock budget of one math comparison (parsing and verifying).", gt=0.0
    )
    math_timeout_mode: str = setting(
        "auto",
        "How the math budget is enforced: 'auto' (SIGALRM timer in the main thread, a helper "
        "process elsewhere), 'process' (always the helper process) or 'none' (no limit).",
        choices=MATH_TIMEOUT_MODES,
    )
    math_float_rounding: int = setting(
        6, "Decimal places math-verify rounds floats to before comparing.", ge=0, le=15
    )
    math_rel_tol: float = setting(
        0.0,
        "Extra relative tolerance for answers that are plain numbers, tried when math-verify "
        "says no (0: math-verify's rounding only).",
        ge=0.0,
    )
    contain_max_words: int = setting(
        10,
        "short_answer: a prediction of at most this many (normalised) words is correct when it "
        "contains a candidate as whole words; 0 allows exact matches only.",
        ge=0,
    )


@dataclass
class RewardResult:
    """The outcome of checking one response.

    Attributes:
        reward: the scalar reward (correctness plus the weighted format term).
        correct: whether the extracted answer matches the reference.
        extracted: the final answer found in the text, or None.
        format_ok: whether the text has a thinking block followed by a boxed answer.
        details: per-sample information for logging (method, normalised forms, errors).
    """

    reward: float
    correct: bool
    extracted: str | None
    format_ok: bool
    details: dict[str, Any] = field(default_factory=dict)

"""Verifiable rewards: extract the model's final answer and check it against the reference.

Three answer types are supported:

* ``math``: numeric or symbolic answers, compared with math-verify (LaTeX fractions, roots,
  intervals, sets, equations, percentages and units are handled by its normaliser). Every
  comparison runs under a wall-clock budget: a SIGALRM timer when called from the main thread,
  otherwise a persistent helper process that is killed if it overruns (math-verify's own timeout
  uses ``signal.alarm`` and cannot work in a worker thread).
* ``multiple_choice``: an option letter (``B``, ``(B)``, ``B.``, ``Option B``, ``\\text{B}``,
  ``B) 42``), falling back to matching the option's text when the model wrote that instead.
* ``short_answer``: SQuAD-style normalised exact match against the reference and any candidate
  answers, or a candidate contained as whole words in a short prediction.

The final answer is the content of the last ``\\boxed{...}`` outside ``<think>`` blocks. The
reward is ``correct_reward`` (or ``wrong_reward``) plus ``format_weight`` when the text has a
thinking block followed by a boxed answer. `score_answer` never raises on model output.

The package is split by responsibility: `config` (settings, answer types, result),
`extract` (answer extraction, format check), `normalize` (normalisation, short answers),
`choice` (multiple choice), `math_check` (math-verify under a budget) and `answer_score`
(`score_answer`).
"""

from __future__ import annotations

from axpo_nemo.agent.rewards.answer_score import score_answer
from axpo_nemo.agent.rewards.choice import extract_choice
from axpo_nemo.agent.rewards.config import (
    ANSWER_TYPES,
    AnswerType,
    RewardConfig,
    RewardResult,
)
from axpo_nemo.agent.rewards.config import MATH_TIMEOUT_MODES as MATH_TIMEOUT_MODES
from axpo_nemo.agent.rewards.extract import check_format, extract_answer, extract_boxed, strip_thinking
from axpo_nemo.agent.rewards.math_check import check_math
from axpo_nemo.agent.rewards.normalize import clean_latex, normalize_answer, normalize_tokens

__all__ = [
    "ANSWER_TYPES",
    "AnswerType",
    "RewardConfig",
    "RewardResult",
    "check_format",
    "check_math",
    "clean_latex",
    "extract_answer",
    "extract_boxed",
    "extract_choice",
    "normalize_answer",
    "normalize_tokens",
    "score_answer",
    "strip_thinking",
]

"""The user-turn text of a benchmark question: the question, its options, the answer instruction.

Every benchmark is asked in the protocol of DESIGN.md §2 (think, optionally call tools, answer in
``\\boxed{}``), so the instruction names the answer form the scorer extracts. The tools a question
may use are declared by the chat template from `Sample.allowed_tools`; the text only mentions them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

#: Answer instructions by answer type.
INSTRUCTIONS = {
    "multiple_choice": "Answer with the option's letter, and put the final answer in \\boxed{}.",
    "math": "Put the final answer in \\boxed{}.",
    "short_answer": "Answer with a short phrase, and put the final answer in \\boxed{}.",
}
#: Added for benchmarks whose questions need outside knowledge.
SEARCH_HINT = "You can search for knowledge you do not have."

_IMAGE_TAG = re.compile(r"<image\d*>\s*", re.I)


def clean_question(text: str) -> str:
    """The question without ``<image>`` / ``<image1>`` placeholders (images come with the prompt)."""
    return _IMAGE_TAG.sub("", str(text)).strip()


def format_options(options: Mapping[str, str]) -> str:
    """``Options:`` followed by one ``A. text`` line per option."""
    return "Options:\n" + "\n".join(f"{letter}. {text}" for letter, text in options.items())


def build_question(
    question: str,
    answer_type: str,
    options: Mapping[str, str] | None = None,
    *,
    search: bool = False,
) -> str:
    """The text of a benchmark question as the model sees it.

    Args:
        question: the benchmark's question text.
        answer_type: ``multiple_choice``, ``math`` or ``short_answer`` (selects the instruction).
        options: multiple-choice options, letter → text; shown after the question. Leave empty
            when the question text already lists them.
        search: add the search hint (search-group benchmarks).
    """
    parts = [clean_question(question)]
    if options:
        parts.append(format_options(options))
    if search:
        parts.append(SEARCH_HINT)
    parts.append(INSTRUCTIONS[answer_type])
    return "\n".join(parts)

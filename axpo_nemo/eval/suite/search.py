"""Loaders of the search benchmarks: HR-MMSearch, FVQA-test, MMSearch.

All three are short free-form answers; a prediction is right when it matches the reference or
any of the listed alternative answers (`Sample.candidates`), after normalisation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from axpo_nemo.agent.sample import Sample
from axpo_nemo.eval.suite.prompts import build_question
from axpo_nemo.eval.suite.tables import (
    BenchmarkFormatError,
    ImageStore,
    as_list,
    first,
    parse_file,
    require,
    row_images,
    table_files,
)

SEARCH_TOOLS = ["image_zoom_in", "python", "search"]


def _strings(value: Any) -> list[str]:
    return [str(v).strip() for v in as_list(value) if v is not None and str(v).strip()]


def load_hr_mmsearch(folder: Path, store: ImageStore) -> list[Sample]:
    """HR-MMSearch (SenseNova-MARS): rows of ``query`` (or ``question``), ``ground_truth`` (or
    ``answer``), ``difficulty``, ``category`` and a high-resolution ``image`` (bytes, base64 or a
    path); optional ``candidate_answers``."""
    samples: list[Sample] = []
    for path in table_files(folder):

        def parse(number: int, row: dict[str, Any], path: Path = path) -> Sample:
            answers = _strings(require(row, path, number, "ground_truth", "answer"))
            return Sample(
                id=str(first(row, "id", "index", "sample_id", default=number)),
                question=build_question(
                    str(require(row, path, number, "query", "question")), "short_answer", search=True
                ),
                answer=answers[0],
                answer_type="short_answer",
                candidates=answers[1:] + _strings(first(row, "candidate_answers", "alternative_answers")),
                images=row_images(row, store, path, number, "image", "images"),
                allowed_tools=list(SEARCH_TOOLS),
                source="hr_mmsearch",
                category=str(first(row, "category", default="")),
                metadata={"difficulty": first(row, "difficulty")},
            )

        samples += parse_file(path, parse)
    return samples


def _prompt_text(value: Any) -> str:
    """The user text of a verl-style ``prompt`` (a list of chat messages) or a plain string."""
    if isinstance(value, str):
        return value
    texts = []
    for message in as_list(value):
        if isinstance(message, dict) and message.get("role", "user") == "user":
            content = message.get("content")
            if isinstance(content, list):
                content = " ".join(c.get("text", "") for c in content if isinstance(c, dict))
            texts.append(str(content or ""))
    if not texts:
        raise BenchmarkFormatError("prompt has no user message")
    return "\n".join(texts)


def load_fvqa(folder: Path, store: ImageStore) -> list[Sample]:
    """FVQA-test (MMSearch-R1, ``lmms-lab/FVQA`` ``fvqa_test.parquet``): verl-style rows with
    ``prompt`` (chat messages), ``images`` (``[{"bytes": …}]``) and ``reward_model``
    (``{"ground_truth", "candidate_answers"}``); flat ``question`` / ``image`` / ``answer`` /
    ``candidate_answers`` columns are accepted too."""
    samples: list[Sample] = []
    for path in table_files(folder):

        def parse(number: int, row: dict[str, Any], path: Path = path) -> Sample:
            reward = row.get("reward_model") if isinstance(row.get("reward_model"), dict) else {}
            truth = first(reward, "ground_truth") or first(row, "ground_truth", "answer")
            answers = _strings(truth)
            if not answers:
                raise BenchmarkFormatError("no ground_truth / answer")
            question = first(row, "question")
            if question is None:
                question = _prompt_text(require(row, path, number, "prompt"))
            extra = row.get("extra_info") if isinstance(row.get("extra_info"), dict) else {}
            return Sample(
                id=str(first(row, "id", "index", default=first(extra, "index", default=number))),
                question=build_question(str(question), "short_answer", search=True),
                answer=answers[0],
                answer_type="short_answer",
                candidates=answers[1:]
                + _strings(first(reward, "candidate_answers") or first(row, "candidate_answers")),
                images=row_images(row, store, path, number, "images", "image"),
                allowed_tools=list(SEARCH_TOOLS),
                source="fvqa",
                category=str(first(row, "category", default=first(extra, "category", default=""))),
            )

        samples += parse_file(path, parse)
    return samples


def load_mmsearch(folder: Path, store: ImageStore) -> list[Sample]:
    """MMSearch end-to-end (``CaraJ/MMSearch``): ``sample_id, query, query_image`` (may be empty),
    ``area, subfield, gt_answer, alternative_gt_answers``. Questions without an image are asked
    as text only."""
    samples: list[Sample] = []
    for path in table_files(folder):

        def parse(number: int, row: dict[str, Any], path: Path = path) -> Sample:
            return Sample(
                id=str(require(row, path, number, "sample_id", "index", "id")),
                question=build_question(
                    str(require(row, path, number, "query", "question")), "short_answer", search=True
                ),
                answer=str(require(row, path, number, "gt_answer", "answer")).strip(),
                answer_type="short_answer",
                candidates=_strings(first(row, "alternative_gt_answers")),
                images=row_images(row, store, path, number, "query_image", "image"),
                allowed_tools=list(SEARCH_TOOLS),
                source="mmsearch",
                category=str(first(row, "area", default="")),
                metadata={"subfield": first(row, "subfield")},
            )

        samples += parse_file(path, parse)
    return samples

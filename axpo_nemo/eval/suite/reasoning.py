"""Loaders of the reasoning benchmarks: MATH-Vision, DynaMath, MathVerse, WeMath.

Each loader reads every table file of its benchmark folder (see `tables`) and returns `Sample`\\ s
whose ``question`` is the full user text (`prompts.build_question`). Column names follow the
public releases; alternatives are listed where the Hugging Face and VLMEvalKit files differ.
"""

from __future__ import annotations

import re
import string
from pathlib import Path
from typing import Any

from axpo_nemo.agent.sample import Sample
from axpo_nemo.eval.suite.prompts import build_question
from axpo_nemo.eval.suite.tables import (
    BenchmarkFormatError,
    ImageStore,
    as_list,
    first,
    letter_options,
    parse_file,
    require,
    row_images,
    table_files,
)

REASONING_TOOLS = ["image_zoom_in", "python"]
_LETTERS = string.ascii_uppercase


def load_mathvision(folder: Path, store: ImageStore) -> list[Sample]:
    """MATH-Vision: HF ``MathLLMs/MathVision`` (``id, question, options, image, decoded_image, answer,
    level, subject``) or VLMEvalKit ``MathVision.tsv`` (``index, image, question, answer, choices,
    category``). Questions with options are multiple choice (answer: a letter), others math."""
    samples: list[Sample] = []
    for path in table_files(folder):

        def parse(number: int, row: dict[str, Any], path: Path = path) -> Sample:
            qid = str(require(row, path, number, "id", "index"))
            question = str(require(row, path, number, "question"))
            answer = str(require(row, path, number, "answer")).strip()
            raw = as_list(first(row, "options", "choices"))
            options = {_LETTERS[i]: str(o).strip() for i, o in enumerate(raw) if str(o).strip()}
            kind = "multiple_choice" if options else "math"
            return Sample(
                id=qid,
                question=build_question(question, kind, options),
                answer=answer,
                answer_type=kind,
                images=row_images(row, store, path, number, "decoded_image", "image"),
                options=options,
                allowed_tools=list(REASONING_TOOLS),
                source="mathvision",
                category=str(first(row, "subject", "category", default="")),
                metadata={"level": first(row, "level")},
            )

        samples += parse_file(path, parse)
    return samples


_DYNAMATH_TYPES = {"float": "math", "multiple choice": "multiple_choice", "free form": "short_answer"}
_VARIANT_IN_NAME = re.compile(r"(?:variant|sample)[_-]?(\d+)", re.I)


def load_dynamath(folder: Path, store: ImageStore) -> list[Sample]:
    """DynaMath: HF ``DynaMath/DynaMath_Sample`` (one file per ``sample_variantK`` split; ``id,
    question, image, decoded_image, ground_truth, answer_type, subject, knowledge_level``) or
    VLMEvalKit ``DynaMath.tsv`` (``index, qid, varid, image, question, answer, answer_type, …``).

    The seed question (``qid``, else ``id``) and the variant (``varid``, else the number in the file
    name) go to ``metadata["group"]`` / ``metadata["variant"]`` for the worst-case score. Answer
    types: ``float`` → math, ``multiple choice`` → letter, ``free form`` → short answer.
    """
    samples: list[Sample] = []
    for path in table_files(folder):
        match = _VARIANT_IN_NAME.search(path.stem)
        file_variant = match.group(1) if match else None

        def parse(number: int, row: dict[str, Any], path: Path = path, file_variant=file_variant) -> Sample:
            seed = str(require(row, path, number, "qid", "id"))
            variant = str(first(row, "varid", "variant", default=file_variant or "1"))
            kind_name = str(require(row, path, number, "answer_type")).strip().lower()
            if kind_name not in _DYNAMATH_TYPES:
                raise BenchmarkFormatError(f"unknown answer_type {kind_name!r}")
            kind = _DYNAMATH_TYPES[kind_name]
            answer = str(require(row, path, number, "ground_truth", "answer")).strip()
            return Sample(
                id=f"{seed}_v{variant}",
                question=build_question(str(require(row, path, number, "question")), kind),
                answer=answer,
                answer_type=kind,
                images=row_images(row, store, path, number, "decoded_image", "image"),
                allowed_tools=list(REASONING_TOOLS),
                source="dynamath",
                category=str(first(row, "subject", default="")),
                metadata={"group": seed, "variant": variant, "level": first(row, "knowledge_level")},
            )

        samples += parse_file(path, parse)
    return samples


def load_mathverse(folder: Path, store: ImageStore) -> list[Sample]:
    """MathVerse: HF ``AI4Math/MathVerse`` testmini (``sample_index, problem_index, problem_version,
    question, image, answer, question_type, metadata, query_wo, query_cot``) or a VLMEvalKit
    ``MathVerse_MINI*.tsv``. ``multi-choice`` questions (options in the text) are scored by letter,
    ``free-form`` ones as math. Text-only versions have no image."""
    samples: list[Sample] = []
    for path in table_files(folder):

        def parse(number: int, row: dict[str, Any], path: Path = path) -> Sample:
            qid = str(require(row, path, number, "sample_index", "index"))
            qtype = str(first(row, "question_type", default="free-form")).lower()
            kind = "multiple_choice" if "choice" in qtype else "math"
            answer = str(require(row, path, number, "answer")).strip()
            return Sample(
                id=qid,
                question=build_question(str(require(row, path, number, "question")), kind),
                answer=answer,
                answer_type=kind,
                images=row_images(row, store, path, number, "image", "decoded_image"),
                allowed_tools=list(REASONING_TOOLS),
                source="mathverse",
                category=str(first(row, "problem_version", default="")),
                metadata={"problem_index": first(row, "problem_index")},
            )

        samples += parse_file(path, parse)
    return samples


_WEMATH_OPTION = re.compile(r"(?:^|;)\s*([A-H])\s*[.:：]\s*")


def _wemath_options(text: str) -> dict[str, str]:
    """``"A. 3; B. 4; C. 5"`` → ``{"A": "3", "B": "4", "C": "5"}``."""
    marks = list(_WEMATH_OPTION.finditer(text))
    out = {}
    for i, m in enumerate(marks):
        end = marks[i + 1].start() if i + 1 < len(marks) else len(text)
        out[m.group(1)] = text[m.end() : end].strip().rstrip(";").strip()
    return out


def load_wemath(folder: Path, store: ImageStore) -> list[Sample]:
    """WeMath: ``testmini.json`` (``ID, split, knowledge concept, question, option, answer,
    image_path, key, question number``; options as ``"A. …; B. …"``) or VLMEvalKit ``WeMath.tsv``
    (``index, image, question, A…, answer, key, …``). Multiple choice; ``key`` (e.g. ``2steps_1``)
    is kept in metadata for the step-wise metrics."""
    samples: list[Sample] = []
    for path in table_files(folder):

        def parse(number: int, row: dict[str, Any], path: Path = path) -> Sample:
            options = letter_options(row) or _wemath_options(str(first(row, "option", "options", default="")))
            if not options:
                raise BenchmarkFormatError("no options (columns A, B, … or 'option')")
            ident = first(row, "index")
            if ident is None:
                ident = f"{require(row, path, number, 'ID')}_{first(row, 'key', default=number)}"
            return Sample(
                id=str(ident),
                question=build_question(
                    str(require(row, path, number, "question")), "multiple_choice", options
                ),
                answer=str(require(row, path, number, "answer")).strip(),
                answer_type="multiple_choice",
                images=row_images(row, store, path, number, "image_path", "image"),
                options=options,
                allowed_tools=list(REASONING_TOOLS),
                source="wemath",
                category=str(first(row, "knowledge concept", "category", default="")),
                metadata={"key": first(row, "key"), "ID": first(row, "ID")},
            )

        samples += parse_file(path, parse)
    return samples

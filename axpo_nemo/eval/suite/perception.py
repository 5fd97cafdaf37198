"""Loaders of the perception benchmarks: HRBench-4K/8K, VisualProbe, V* Bench."""

from __future__ import annotations

import hashlib
import re
import string
from pathlib import Path
from typing import Any

from axpo_nemo.agent.sample import Sample
from axpo_nemo.eval.suite.prompts import build_question, clean_question
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

PERCEPTION_TOOLS = ["image_zoom_in", "python"]


def load_hrbench(folder: Path, store: ImageStore) -> list[Sample]:
    """HRBench (4K or 8K): ``hr_bench_4k.tsv`` / ``.parquet`` with ``index, question, answer,
    category, A, B, C, D, cycle_category, image`` (base64).

    Each question appears once per option rotation (``cycle_category`` 0–3, the correct letter
    moving with it). The rotations of one question share ``metadata["group"]`` (a hash of the
    question, its image and its option set) and carry ``metadata["cycle"]``.
    """
    samples: list[Sample] = []
    for path in table_files(folder):

        def parse(number: int, row: dict[str, Any], path: Path = path) -> Sample:
            options = letter_options(row)
            if not options:
                raise BenchmarkFormatError("no option columns A, B, …")
            question = str(require(row, path, number, "question"))
            images = row_images(row, store, path, number, "image")
            key = "\x1f".join([question, *images, *sorted(options.values())])
            return Sample(
                id=str(require(row, path, number, "index")),
                question=build_question(question, "multiple_choice", options),
                answer=str(require(row, path, number, "answer")).strip(),
                answer_type="multiple_choice",
                images=images,
                options=options,
                allowed_tools=list(PERCEPTION_TOOLS),
                source="hrbench",
                category=str(first(row, "category", default="")),
                metadata={
                    "group": hashlib.sha1(key.encode()).hexdigest()[:16],
                    "cycle": str(first(row, "cycle_category", default="0")),
                },
            )

        samples += parse_file(path, parse)
    return samples


_ANSWER_TAG = re.compile(r"</?answer>", re.I)


def load_visualprobe(folder: Path, store: ImageStore) -> list[Sample]:
    """VisualProbe (Mini-o3): ``VisualProbe_{Easy,Medium,Hard}/val.json`` lists of ``{images,
    problem, solution}`` (``question`` / ``answer`` also accepted), images relative to the file.
    The difficulty (category) comes from a ``difficulty`` column or the file's folder name.
    Open-ended short answers."""
    samples: list[Sample] = []
    for path in table_files(folder, ("*", "*/*")):
        level = next((w for w in ("easy", "medium", "hard") if w in str(path.parent.name).lower()), "")

        def parse(number: int, row: dict[str, Any], path: Path = path, level: str = level) -> Sample:
            answer = _ANSWER_TAG.sub(
                "", str(require(row, path, number, "solution", "answer", "ground_truth"))
            )
            prefix = path.parent.name if path.parent != folder else path.stem
            return Sample(
                id=f"{prefix}/{first(row, 'doc_id', 'id', 'index', default=number)}",
                question=build_question(
                    str(require(row, path, number, "problem", "question", "prompt")), "short_answer"
                ),
                answer=answer.strip(),
                answer_type="short_answer",
                images=row_images(row, store, path, number, "images", "image"),
                allowed_tools=list(PERCEPTION_TOOLS),
                source="visualprobe",
                category=str(first(row, "difficulty", default=level)).lower(),
            )

        samples += parse_file(path, parse)
    return samples


_VSTAR_OPTION = re.compile(r"^\(([A-Z])\)\s*(.*)$")


def _split_vstar_text(text: str) -> tuple[str, dict[str, str]]:
    """The official V* ``text``: question lines, then ``(A) …`` option lines, then an instruction."""
    question, options = [], {}
    for line in str(text).splitlines():
        m = _VSTAR_OPTION.match(line.strip())
        if m:
            options[m.group(1)] = m.group(2).strip()
        elif not options:
            question.append(line)
    return clean_question("\n".join(question)), options


def load_vstar(folder: Path, store: ImageStore) -> list[Sample]:
    """V* Bench: the official ``test_questions.jsonl`` (``image, text, category, question_id,
    label``; options inside ``text`` as ``(A) …`` lines, images under the folder), VLMEvalKit
    ``VStarBench.tsv`` (``index, question, A…, answer, category, image``), or a table with a
    ``choices`` list and an ``answer`` letter or index. Multiple choice."""
    samples: list[Sample] = []
    for path in table_files(folder):

        def parse(number: int, row: dict[str, Any], path: Path = path) -> Sample:
            if "text" in row and "label" in row:
                question, options = _split_vstar_text(row["text"])
                answer = str(row["label"]).strip()
            else:
                question = str(require(row, path, number, "question"))
                options = letter_options(row)
                if not options:
                    choices = as_list(first(row, "choices", "options"))
                    options = {string.ascii_uppercase[i]: str(c) for i, c in enumerate(choices)}
                answer = str(require(row, path, number, "answer", "label")).strip()
                if answer.isdigit() and int(answer) < len(options):
                    answer = string.ascii_uppercase[int(answer)]
            if not options:
                raise BenchmarkFormatError("no options")
            return Sample(
                id=str(require(row, path, number, "question_id", "index", "id")),
                question=build_question(question, "multiple_choice", options),
                answer=answer,
                answer_type="multiple_choice",
                images=row_images(row, store, path, number, "image"),
                options=options,
                allowed_tools=list(PERCEPTION_TOOLS),
                source="vstar",
                category=str(first(row, "category", default="")),
            )

        samples += parse_file(path, parse)
    return samples

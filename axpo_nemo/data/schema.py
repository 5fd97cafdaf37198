"""One sample schema for every dataset: questions for RL and eval, trajectories for SFT.

On disk a dataset is a JSONL file, one `Sample` per line, with its images as files next to it
(paths relative to the JSONL file's folder). SFT samples also carry ``messages``: a whole
conversation in chat form, whose assistant turns are the training targets.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

logger = logging.getLogger(__name__)

ANSWER_TYPES = ("math", "multiple_choice", "short_answer")


@dataclass
class Sample:
    """A question with its reference answer, and optionally a worked trajectory.

    Attributes:
        id: unique within its dataset.
        question: the user's text.
        images: image file paths, relative to the dataset file's folder (question images, in order).
        answer: the reference answer.
        answer_type: how answers are checked: ``math``, ``multiple_choice`` or ``short_answer``.
        candidates: other acceptable answers (short answers).
        options: the choices of a multiple-choice question (letter → text).
        allowed_tools: tools the question may use (empty: every enabled tool).
        source: the dataset it came from.
        category: a family or benchmark split, for per-category metrics.
        messages: for SFT, the conversation after the question: alternating ``assistant`` turns
            (text, including ``<think>`` and ``<tool_call>`` blocks) and ``tool`` turns
            (``{"role": "tool", "content": text, "images": [paths]}``).
        metadata: anything else.
    """

    id: str
    question: str
    answer: str
    answer_type: str = "short_answer"
    images: list[str] = field(default_factory=list)
    candidates: list[str] = field(default_factory=list)
    options: dict[str, str] = field(default_factory=dict)
    allowed_tools: list[str] = field(default_factory=list)
    source: str = ""
    category: str = ""
    messages: list[dict[str, Any]] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.answer_type not in ANSWER_TYPES:
            raise ValueError(f"sample {self.id}: answer_type must be one of {ANSWER_TYPES}, got {self.answer_type!r}")

    def load_images(self, root: str | Path) -> list[Image.Image]:
        """The question's images as RGB PIL images (paths resolved against ``root``)."""
        out = []
        for rel in self.images:
            with Image.open(Path(root) / rel) as img:
                out.append(img.convert("RGB"))
        return out

    def to_json(self) -> str:
        """One JSONL line."""
        return json.dumps(asdict(self), ensure_ascii=False)


def write_samples(samples: Iterable[Sample], path: str | Path) -> int:
    """Write samples as JSONL (atomically: a temporary file renamed into place); returns the count."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    count = 0
    with tmp.open("w", encoding="utf-8") as f:
        for sample in samples:
            f.write(sample.to_json() + "\n")
            count += 1
    tmp.replace(path)
    return count


def read_samples(path: str | Path) -> Iterator[Sample]:
    """Read samples from JSONL; a bad line is logged with its line number and skipped."""
    path = Path(path)
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield Sample(**json.loads(line))
            except (ValueError, TypeError) as exc:
                logger.warning("%s:%d: skipped a bad sample (%s)", path, number, exc)

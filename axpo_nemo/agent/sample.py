"""One sample schema for every dataset: questions for RL and eval, trajectories for SFT.

On disk a dataset is a JSONL file, one `Sample` per line, with its images as files next to it
(paths relative to the JSONL file's folder), or a folder of webdataset shards
(`axpo_nemo.data.shards`) that carry the images' bytes. SFT samples also carry ``messages``: a
whole conversation in chat form, whose assistant turns are the training targets.

A sample read from shards holds its images in memory (`Sample.image_data`, never serialised);
`Sample.load_images` returns those, so every consumer reads both kinds of dataset the same way.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

logger = logging.getLogger(__name__)

ANSWER_TYPES = ("math", "multiple_choice", "short_answer")
# Fields that must hold lists / dicts (a string there would be iterated character by character).
_LIST_FIELDS = ("images", "candidates", "allowed_tools", "messages")
_DICT_FIELDS = ("options", "metadata")


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
        image_data: the images themselves, in the order of ``images``, when the sample was read
            from shards: RGB PIL images or encoded bytes. In memory only: never written to JSON.
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
    image_data: list[Any] = field(default_factory=list, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.answer_type not in ANSWER_TYPES:
            raise ValueError(
                f"sample {self.id}: answer_type must be one of {ANSWER_TYPES}, got {self.answer_type!r}"
            )
        for name in _LIST_FIELDS:
            if not isinstance(getattr(self, name), list):
                raise ValueError(
                    f"sample {self.id}: {name} must be a list, got {type(getattr(self, name)).__name__}"
                )
        for name in _DICT_FIELDS:
            if not isinstance(getattr(self, name), dict):
                raise ValueError(
                    f"sample {self.id}: {name} must be an object, got {type(getattr(self, name)).__name__}"
                )
        if self.image_data and len(self.image_data) != len(self.images):
            raise ValueError(
                f"sample {self.id}: {len(self.image_data)} in-memory images for {len(self.images)} image names"
            )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Sample:
        """Build a sample from its JSON object; unknown or missing keys raise ValueError naming them."""
        if not isinstance(data, dict):
            raise ValueError(f"a sample must be a JSON object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls) if f.name != "image_data"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown sample key(s): {', '.join(unknown)}")
        missing = [k for k in ("id", "question", "answer") if k not in data]
        if missing:
            raise ValueError(f"sample {data.get('id', '?')}: missing key(s): {', '.join(missing)}")
        return cls(**data)

    def load_images(self, root: str | Path | None = None) -> list[Image.Image]:
        """The question's images as RGB PIL images: the in-memory ones (`image_data`) if any,
        else the files named by ``images``, resolved against ``root``."""
        if self.image_data:
            return [decode_image(x) for x in self.image_data]
        if self.images and root is None:
            raise ValueError(f"sample {self.id}: image paths need the dataset folder (root)")
        out = []
        for rel in self.images:
            with Image.open(Path(root) / rel) as img:  # type: ignore[arg-type]
                out.append(img.convert("RGB"))
        return out

    def to_dict(self) -> dict[str, Any]:
        """The JSON-serialisable fields (everything but `image_data`)."""
        out = asdict(dataclasses.replace(self, image_data=[]))
        del out["image_data"]
        return out

    def to_json(self) -> str:
        """One JSONL line."""
        return json.dumps(self.to_dict(), ensure_ascii=False)


def decode_image(data: Any) -> Image.Image:
    """An RGB PIL image from a PIL image or encoded bytes (PNG, JPEG, …)."""
    if isinstance(data, Image.Image):
        return data if data.mode == "RGB" else data.convert("RGB")
    if isinstance(data, bytes | bytearray | memoryview):
        with Image.open(io.BytesIO(bytes(data))) as img:
            return img.convert("RGB")
    raise TypeError(f"cannot decode an image from {type(data).__name__}")


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


def read_samples(path: str | Path, on_skip: Callable[[int, str], None] | None = None) -> Iterator[Sample]:
    """Read samples from JSONL; a bad line is logged with its line number and skipped.

    ``on_skip(line_number, reason)`` is called for each skipped line (so reports can count them).
    """
    path = Path(path)
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield Sample.from_dict(json.loads(line))
            except (ValueError, TypeError) as exc:
                logger.warning("%s:%d: skipped a bad sample (%s)", path, number, exc)
                if on_skip is not None:
                    on_skip(number, str(exc))

"""What every converter shares: reading rows from parquet / JSON / JSONL, decoding the image
encodings public datasets use, answer-type inference, and the settings of a conversion."""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from axpo_nemo.agent.rewards import extract_boxed
from axpo_nemo.agent.sample import Sample
from axpo_nemo.core.config import ValidatedConfig, setting
from axpo_nemo.data.shards import ShardConfig

__all__ = [
    "BadRow",
    "ConvertConfig",
    "RowContext",
    "answer_from",
    "image_bytes",
    "infer_answer_type",
    "parse_options",
    "read_rows",
    "strip_image_tags",
]

OUTPUT_KINDS = ("shards", "jsonl")
_LETTER_RE = re.compile(r"^\s*[\(\[]?\s*([A-J])\s*[\)\]]?\s*[.:]?\s*$")
# One option per line: "(A) text", "A. text", "A) text", "A: text".
_OPTION_RE = re.compile(r"^\s*(?:\(([A-J])\)|([A-J])[.):])\s*(.+?)\s*$")
_NUMBER_RE = re.compile(r"^\s*[-+]?(\d+(\.\d*)?|\.\d+)\s*%?\s*$")
_IMAGE_TAG_RE = re.compile(r"<image>\s*")
_BASE64_RE = re.compile(r"^[A-Za-z0-9+/\s]+={0,2}$")


class BadRow(ValueError):
    """A row that cannot be converted (the message says why)."""


@dataclass
class ConvertConfig(ValidatedConfig):
    """Settings of ``axpo data convert``."""

    output: str = setting(
        "shards", "Write webdataset shards, or JSONL with image files.", choices=OUTPUT_KINDS
    )
    image_root: str | None = setting(
        None, "Folder that relative image paths are resolved against; null: the input file's folder."
    )
    allowed_tools: list[str] = setting(
        [], "Tools the converted questions may use; empty: every enabled tool."
    )
    max_pass_rate: float | None = setting(
        None,
        "Keep only rows whose published pass rate is at most this (ViRL39K PassRate_32BTrained, "
        "MMFineReason pass_rate; 0: MMFineReason's hard subset); rows without one are kept. null: all rows.",
        ge=0.0,
        le=1.0,
    )
    keep_responses: bool = setting(
        False, "MMFineReason: keep the teacher's response as an assistant turn in messages (SFT data)."
    )
    limit: int | None = setting(None, "Convert at most this many rows; null: all.", ge=1)
    shard: ShardConfig = field(default_factory=ShardConfig)


@dataclass
class RowContext:
    """What a row converter needs besides the row: the settings and the image folder."""

    cfg: ConvertConfig
    image_root: Path
    row: int = 0


def read_rows(path: str | Path) -> Iterator[tuple[int, Any]]:
    """(row number from 0, row) of a ``.parquet``, ``.json`` (an array) or ``.jsonl`` file; an
    unreadable JSONL line comes as (row number, `BadRow`) so that the caller reports and skips it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix in (".parquet", ".pq"):
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ModuleNotFoundError(
                f"{path}: reading parquet needs pyarrow (pip install pyarrow), or give the rows as JSON/JSONL"
            ) from None
        number = 0
        for batch in pq.ParquetFile(path).iter_batches(batch_size=256):
            for row in batch.to_pylist():
                yield number, row
                number += 1
    elif suffix == ".jsonl":
        with path.open(encoding="utf-8") as f:
            number = 0
            for line in f:
                if not line.strip():
                    continue
                try:
                    yield number, json.loads(line)
                except json.JSONDecodeError as exc:
                    yield number, BadRow(f"not valid JSON ({exc})")
                number += 1
    elif suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc})") from None
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            data = data["data"]
        if not isinstance(data, list):
            raise ValueError(f"{path}: a .json input must hold an array of rows")
        yield from enumerate(data)
    else:
        raise ValueError(f"{path}: unknown input type {suffix!r} (use .parquet, .json or .jsonl)")


def image_bytes(value: Any, root: Path) -> bytes:
    """Encoded image bytes from the encodings public datasets use: raw bytes; Hugging Face's image
    struct ``{"bytes": …, "path": …}`` (bytes, base64 text or a list of byte values; else the
    path); a list of byte values; a ``data:`` URI or base64 text; or a file path (relative to
    ``root``)."""
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    if isinstance(value, Mapping):
        if value.get("bytes") is not None:
            return image_bytes(value["bytes"], root)
        if value.get("path"):
            return image_bytes(str(value["path"]), root)
        raise BadRow("image struct has neither bytes nor path")
    if isinstance(value, list) and value and all(isinstance(x, int) for x in value):
        return bytes(value)
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("data:"):
            text = text.split(",", 1)[-1]
            return _b64(text)
        if len(text) < 4096:
            path = Path(text) if Path(text).is_absolute() else root / text
            if path.is_file():
                return path.read_bytes()
        if len(text) >= 64 and _BASE64_RE.match(text):
            return _b64(text)
        raise BadRow(f"image file not found: {root / text if len(text) < 4096 else text[:40] + '…'}")
    raise BadRow(f"cannot read an image from {type(value).__name__}")


def _b64(text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=False)
    except (binascii.Error, ValueError) as exc:
        raise BadRow(f"bad base64 image ({exc})") from None


def strip_image_tags(text: str) -> str:
    """The question without ``<image>`` placeholders (the chat protocol places the images)."""
    return _IMAGE_TAG_RE.sub("", text).strip()


def answer_from(value: Any) -> str:
    """The reference answer as text: the content of a ``\\boxed{}`` if it has one."""
    if value is None:
        raise BadRow("no answer")
    if isinstance(value, list | tuple):
        if not value:
            raise BadRow("empty answer list")
        value = value[0]
    text = str(value).strip()
    boxed = extract_boxed(text)
    text = boxed.strip() if boxed is not None else text
    if not text:
        raise BadRow("empty answer")
    return text


def parse_options(question: str) -> dict[str, str]:
    """Options listed one per line in the question (``(A) x``, ``A. x``, ``A) x``, ``A: x``),
    when they run A, B, C… without gaps; else empty."""
    found: dict[str, str] = {}
    for line in question.splitlines():
        m = _OPTION_RE.match(line)
        if m:
            letter = m.group(1) or m.group(2)
            found.setdefault(letter, m.group(3))
    letters = sorted(found)
    if len(letters) < 2 or letters != [chr(ord("A") + i) for i in range(len(letters))]:
        return {}
    return found


def infer_answer_type(answer: str, question: str, default: str) -> tuple[str, str, dict[str, str]]:
    """(answer type, answer, options): a lone option letter makes a multiple-choice question
    (options parsed from the question when listed there), a number a math one, else ``default``."""
    m = _LETTER_RE.match(answer)
    if m:
        return "multiple_choice", m.group(1), parse_options(question)
    if _NUMBER_RE.match(answer):
        return "math", answer, {}
    return default, answer, {}


def pass_rate_ok(value: Any, cfg: ConvertConfig) -> bool:
    """Whether a row passes the ``max_pass_rate`` filter (rows without a pass rate do)."""
    if cfg.max_pass_rate is None or value is None:
        return True
    try:
        return float(value) <= cfg.max_pass_rate
    except (TypeError, ValueError):
        return True


def converted_sample(
    ctx: RowContext, source: str, ident: Any, image_data: list[bytes], **fields: Any
) -> Sample:
    """A converted row as a `Sample`: id ``<source>-<ident>``, its images (bytes in ``image_data``)
    named by position, the configured ``allowed_tools``; ``fields`` are the other Sample fields."""
    return Sample(
        id=f"{source}-{ident}",
        images=[str(i) for i in range(len(image_data))],
        image_data=image_data,
        allowed_tools=list(ctx.cfg.allowed_tools),
        source=source,
        **fields,
    )

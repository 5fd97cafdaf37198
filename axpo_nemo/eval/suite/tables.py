"""Reading benchmark files in their public formats: rows, and the images they carry.

Benchmarks ship as one of four table formats, and images inside them in one of four ways:

* **TSV** (VLMEvalKit style, e.g. ``hr_bench_4k.tsv``): one row per question, the image as a
  base64 string in the ``image`` column. A short value there that names another row's
  ``index`` reuses that row's image (VLMEvalKit's way of not repeating an image).
* **Parquet** (Hugging Face ``datasets`` exports): an image column holds ``{"bytes", "path"}``
  structs. Needs ``pyarrow``.
* **JSON / JSONL**: a JSON list (or ``{"data": [...]}``) or one object per line; images are paths
  relative to the file's folder, base64 strings, or ``{"bytes": base64, "path": …}`` objects.

`read_rows` yields ``(row_number, row)``; `ImageStore` turns any image value into a file under
its root (named by content hash, so re-reading a benchmark gives identical paths and an image
repeated over rows is written once) and returns the path relative to that root.
"""

from __future__ import annotations

import base64
import binascii
import csv
import hashlib
import io
import json
import logging
import string
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from PIL import Image

logger = logging.getLogger(__name__)

#: File suffixes `read_rows` understands.
TABLE_SUFFIXES = (".tsv", ".parquet", ".jsonl", ".json")


class BenchmarkFormatError(ValueError):
    """A benchmark file or row does not have the format its loader expects."""


def table_files(folder: Path, patterns: tuple[str, ...] = ("*",)) -> list[Path]:
    """The table files in ``folder`` matching any of ``patterns`` (sorted, suffixes as above)."""
    found: set[Path] = set()
    for pattern in patterns:
        found.update(p for p in folder.glob(pattern) if p.is_file() and p.suffix.lower() in TABLE_SUFFIXES)
    return sorted(found)


def _read_tsv(path: Path) -> Iterator[dict[str, Any]]:
    csv.field_size_limit(sys.maxsize)  # base64 images are far longer than csv's default limit
    images: dict[str, str] = {}
    with path.open(encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f, delimiter="\t"):
            image = row.get("image")
            if isinstance(image, str):
                if len(image) <= 64 and image.strip() in images:  # a reference to another row's image
                    row["image"] = images[image.strip()]
                elif len(image) > 64 and row.get("index") is not None:
                    images[str(row["index"]).strip()] = image
            yield row


def _read_json(path: Path) -> Iterator[dict[str, Any]]:
    if path.suffix.lower() == ".jsonl":
        with path.open(encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if line.strip():
                    try:
                        yield json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise BenchmarkFormatError(f"{path}:{number}: not JSON ({exc})") from None
        return
    data = json.loads(path.read_text(encoding="utf-8"))
    if isinstance(data, dict):
        data = data.get("data", data.get("rows"))
    if not isinstance(data, list):
        raise BenchmarkFormatError(f"{path}: expected a JSON list of rows (or {{'data': [...]}})")
    yield from data


def _read_parquet(path: Path) -> Iterator[dict[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise BenchmarkFormatError(
            f"{path}: reading Parquet needs pyarrow (pip install pyarrow), or convert the file to JSONL"
        ) from None
    table = pq.ParquetFile(path)
    for batch in table.iter_batches(batch_size=64):
        yield from batch.to_pylist()


def read_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(row_number, row)`` for every row of a TSV, Parquet, JSON or JSONL file (1-based numbers)."""
    suffix = path.suffix.lower()
    if suffix == ".tsv":
        rows = _read_tsv(path)
    elif suffix == ".parquet":
        rows = _read_parquet(path)
    elif suffix in (".json", ".jsonl"):
        rows = _read_json(path)
    else:
        raise BenchmarkFormatError(f"{path}: unsupported file type (use one of {', '.join(TABLE_SUFFIXES)})")
    for number, row in enumerate(rows, 1):
        if not isinstance(row, dict):
            raise BenchmarkFormatError(f"{path}: row {number} is not an object")
        yield number, row


def first(row: dict[str, Any], *keys: str, default: Any = None) -> Any:
    """The value of the first key of ``keys`` that ``row`` has with a non-empty value."""
    for key in keys:
        value = row.get(key)
        if value is not None and not (isinstance(value, str) and not value.strip()):
            return value
    return default


def require(row: dict[str, Any], path: Path, number: int, *keys: str) -> Any:
    """Like `first`, but a missing value is a `BenchmarkFormatError` naming the file, row and keys."""
    value = first(row, *keys)
    if value is None:
        raise BenchmarkFormatError(f"{path}: row {number} has no {' / '.join(keys)}")
    return value


def as_list(value: Any) -> list[Any]:
    """A list from a list, a tuple, a JSON/Python list literal string, or a single value (None: [])."""
    if value is None:
        return []
    if isinstance(value, list | tuple):
        return list(value)
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                parsed = json.loads(text)
            except json.JSONDecodeError:
                import ast

                try:
                    parsed = ast.literal_eval(text)
                except (ValueError, SyntaxError):
                    return [value]
            return list(parsed) if isinstance(parsed, list | tuple) else [parsed]
        return [value] if text else []
    if hasattr(value, "tolist"):  # numpy arrays from pyarrow/pandas
        return list(value.tolist())
    return [value]


class ImageStore:
    """Writes the images of benchmark rows as files under ``root``; returns relative paths.

    Args:
        root: the folder images are written to (and `Sample.images` are relative to).
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def _write(self, data: bytes, where: str) -> str:
        digest = hashlib.sha1(data).hexdigest()[:20]
        try:
            with Image.open(io.BytesIO(data)) as img:
                fmt = (img.format or "PNG").lower()
                img.verify()
        except Exception as exc:
            raise BenchmarkFormatError(f"{where}: image bytes do not decode ({exc})") from None
        name = f"{digest}.{'jpg' if fmt == 'jpeg' else fmt}"
        target = self.root / name
        if not target.exists():
            tmp = target.with_name(target.name + ".tmp")
            tmp.write_bytes(data)
            tmp.replace(target)
        return name

    def add(self, value: Any, base: Path, where: str) -> str:
        """Store one image value and return its path relative to the root.

        ``value`` is raw bytes, a base64 string, a ``{"bytes": …, "path": …}`` dict (bytes may be
        base64 text), or a path relative to ``base`` (the data file's folder). ``where`` names the
        row in error messages.
        """
        if isinstance(value, dict):
            data = value.get("bytes")
            if data:
                return self.add(data, base, where)
            if value.get("path"):
                return self.add(str(value["path"]), base, where)
            raise BenchmarkFormatError(f"{where}: image object has neither bytes nor path")
        if isinstance(value, bytes | bytearray | memoryview):
            return self._write(bytes(value), where)
        if isinstance(value, Image.Image):
            buf = io.BytesIO()
            value.convert("RGB").save(buf, format="PNG")
            return self._write(buf.getvalue(), where)
        if isinstance(value, str):
            text = value.strip()
            candidate = base / text
            if len(text) < 1024 and candidate.is_file():
                return self._write(candidate.read_bytes(), where)
            try:
                data = base64.b64decode(text, validate=True)
            except (binascii.Error, ValueError):
                data = b""
            if data:
                return self._write(data, where)
            raise BenchmarkFormatError(
                f"{where}: image {text[:80]!r} is neither a file under {base} nor base64"
            )
        raise BenchmarkFormatError(f"{where}: unsupported image value of type {type(value).__name__}")

    def add_all(self, values: Any, base: Path, where: str) -> list[str]:
        """`add` for each image of a list-like value (a single image is a list of one)."""
        if isinstance(values, dict | bytes | str | Image.Image):
            values = [values]
        return [self.add(v, base, where) for v in as_list(values) if v is not None]


def letter_options(row: dict[str, Any]) -> dict[str, str]:
    """Options from single-letter columns ``A``, ``B``, … (VLMEvalKit TSV layout)."""
    out = {}
    for letter in string.ascii_uppercase:
        value = row.get(letter)
        if value is None or (isinstance(value, float) and value != value):  # NaN from pandas exports
            continue
        if str(value).strip():
            out[letter] = str(value).strip()
    return out


def row_images(row: dict[str, Any], store: ImageStore, path: Path, number: int, *keys: str) -> list[str]:
    """The row's images (the first of ``keys`` present) stored in ``store``; their stored names."""
    value = first(row, *keys)
    return store.add_all(value, path.parent, f"{path}: row {number}") if value is not None else []


def parse_file(path: Path, parse: Any) -> list[Any]:
    """``parse(number, row)`` over every row of ``path``; a row it rejects is logged and skipped.

    ``parse`` returns a `Sample` (or None to leave the row out) and raises `BenchmarkFormatError`
    for a malformed row: the row is reported with its number and the file's other rows are kept.
    Question ids are made unique by appending the row number to a repeated one.
    """
    out = []
    seen: set[str] = set()
    skipped = 0
    for number, row in read_rows(path):
        try:
            sample = parse(number, row)
        except BenchmarkFormatError as exc:
            skipped += 1
            logger.warning("%s: row %d skipped: %s", path, number, exc)
            continue
        if sample is None:
            continue
        if sample.id in seen:
            sample.id = f"{sample.id}#row{number}"
        seen.add(sample.id)
        out.append(sample)
    if skipped:
        logger.warning("%s: %d malformed row(s) skipped, %d loaded", path, skipped, len(out))
    return out

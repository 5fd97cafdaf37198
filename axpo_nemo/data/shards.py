"""Webdataset shards of `Sample`s: a writer with a target shard size and a resumable reader.

**Layout.** A dataset is a folder of tar files ``shard-000000.tar``, ``shard-000001.tar``, … in
the webdataset convention, plus ``index.json``. Each sample is a run of consecutive tar members
sharing a key (a 9-digit running number): ``<key>.json`` (the `Sample` as JSON, its ``images``
field naming the image members) and ``<key>.0.jpg``, ``<key>.1.png``, … (each image's encoded
bytes, as given: JPEG stays JPEG). So ``webdataset.WebDataset("shard-{000000..000009}.tar")`` reads
the shards too, yielding ``{"__key__", "json", "0.jpg", …}``. Only the standard library writes them.

**Index.** ``index.json`` lists the shards with their sample counts, sizes and each sample's byte
offsets inside its tar; it is rewritten (atomically) after every finished shard, so an
interrupted write leaves a readable dataset of the finished shards. Shards are written to a
temporary name and renamed into place when complete. `index_shards` rebuilds an index for tars
written by other tools.

**Reader.** `ShardReader` yields one epoch per iteration. The epoch's order is computed from the
index alone: shards in order (or permuted, ``shuffle_shards``), their samples concatenated, then
passed through a seeded shuffle buffer of ``shuffle_buffer`` samples (each output is a random
draw from the buffer, which is refilled from the stream), then every ``world_size``-th sample
from ``rank``. Workers fetch samples by byte range, and their results are put back in that order,
so the order depends only on the seed, the epoch and the index: never on the number of workers
or on timing. ``state_dict`` is (epoch, position); ``load_state_dict`` continues with exactly the
next sample, with or without shuffling and workers. Because the shuffle buffer works on sample
positions, the buffer holds no decoded images and resuming replays nothing.

**Workers are threads by default.** The expensive part of reading is image decoding, and Pillow
releases the GIL while it decodes, so threads decode in parallel and hand the decoded images to
the consumer without copying them; a process would have to pickle every decoded image (megabytes
each) back through a pipe. ``worker_type="process"`` is there for when Python-side work dominates.
"""

from __future__ import annotations

import io
import json
import logging
import os
import tarfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from axpo_nemo.agent.sample import Sample, decode_image, read_samples
from axpo_nemo.core.config import ValidatedConfig, setting
from axpo_nemo.data.shard_index import (
    BLOCK,
    INDEX_FORMAT,
    INDEX_NAME,
    INDEX_VERSION,
    RECORD,
    atomic_write_json,
    index_shards,
    is_shard_dir,
    padded_size,
    read_index,
)
from axpo_nemo.data.shard_reader import ShardReader

__all__ = [
    "INDEX_NAME",
    "SampleSink",
    "ShardConfig",
    "ShardReader",
    "ShardWriter",
    "encode_image",
    "index_shards",
    "is_shard_dir",
    "iter_samples",
    "read_index",
]

logger = logging.getLogger(__name__)

# Pillow format name -> file extension of the image members.
IMAGE_EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tiff"}


@dataclass
class ShardConfig(ValidatedConfig):
    """How samples are split into shard files."""

    max_samples: int = setting(1000, "A shard holds at most this many samples.", ge=1)
    max_bytes: int = setting(
        256 * 2**20,
        "A shard grows to at most this many bytes (a larger single sample gets its own shard).",
        ge=1,
    )
    prefix: str = setting("shard", "Shard file names: <prefix>-000000.tar, …")


def encode_image(image: Any) -> tuple[str, bytes]:
    """(extension, bytes) of an image member: encoded bytes are kept as they are (their format is
    checked), a PIL image is encoded as PNG, a path is read. Unreadable data raises ValueError."""
    if isinstance(image, str | os.PathLike):
        image = Path(image).read_bytes()
    if isinstance(image, Image.Image):
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return "png", buf.getvalue()
    if isinstance(image, bytes | bytearray | memoryview):
        data = bytes(image)
        try:
            with Image.open(io.BytesIO(data)) as img:
                fmt = img.format
        except Exception as exc:  # Pillow raises several types on garbage
            raise ValueError(f"not a readable image ({len(data)} bytes): {exc}") from None
        if fmt in IMAGE_EXTENSIONS:
            return IMAGE_EXTENSIONS[fmt], data
        with Image.open(io.BytesIO(data)) as img:  # an unusual format: store it as PNG
            return encode_image(img.convert("RGB"))
    raise ValueError(f"cannot store an image of type {type(image).__name__}")


def _member(name: str, data: bytes) -> bytes:
    """One tar member: USTAR header, data, zero padding (fixed mtime/owner: reproducible files)."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    info.mtime = 0
    header = info.tobuf(format=tarfile.USTAR_FORMAT, encoding="utf-8", errors="strict")
    return header + data + b"\0" * (padded_size(len(data)) - len(data))


class ShardWriter:
    """Write samples into tar shards of a target size, with ``index.json``.

    Use as a context manager (or call `close`). Leaving the block with an exception keeps every
    sample whose `write` returned: the partial shard is cut back to its last whole sample and
    finished, and the index lists it (marked ``complete: false``).
    """

    def __init__(
        self, out_dir: str | Path, cfg: ShardConfig | None = None, *, overwrite: bool = False
    ) -> None:
        self.out_dir = Path(out_dir)
        self.cfg = cfg or ShardConfig()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        existing = sorted(self.out_dir.glob(f"{self.cfg.prefix}-*.tar")) + sorted(
            self.out_dir.glob(INDEX_NAME)
        )
        if existing and not overwrite:
            raise FileExistsError(
                f"{self.out_dir} already holds shards ({existing[0].name}); pass overwrite=True"
            )
        for path in existing:
            path.unlink()
        self.shards: list[dict[str, Any]] = []
        self.num_samples = 0
        self._file: io.BufferedWriter | None = None
        self._tmp: Path | None = None
        self._offsets: list[int] = []
        self._size = 0
        self._closed = False

    # -- shard files ---------------------------------------------------------------------------
    def _shard_name(self) -> str:
        return f"{self.cfg.prefix}-{len(self.shards):06d}.tar"

    def _start_shard(self) -> None:
        self._tmp = self.out_dir / (self._shard_name() + ".tmp")
        self._file = self._tmp.open("wb")
        self._offsets = []
        self._size = 0

    def _finish_shard(self, complete: bool = True) -> None:
        assert self._file is not None and self._tmp is not None
        end = self._size
        # End-of-archive: two zero blocks, then padding to a whole record (what tar(1) writes).
        total = (end + 2 * BLOCK + RECORD - 1) // RECORD * RECORD
        self._file.write(b"\0" * (total - end))
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        name = self._shard_name()
        os.replace(self._tmp, self.out_dir / name)
        self.shards.append(
            {"name": name, "samples": len(self._offsets), "bytes": (self.out_dir / name).stat().st_size,
             "offsets": [*self._offsets, end]}
        )  # fmt: skip
        self._file = self._tmp = None
        self._write_index(complete)

    def _write_index(self, complete: bool) -> None:
        index = {
            "format": INDEX_FORMAT,
            "version": INDEX_VERSION,
            "complete": complete,
            "num_samples": sum(s["samples"] for s in self.shards),
            "shards": self.shards,
        }
        atomic_write_json(self.out_dir / INDEX_NAME, index)

    # -- samples -------------------------------------------------------------------------------
    def write(
        self, sample: Sample, images: Sequence[Any] | None = None, root: str | Path | None = None
    ) -> str:
        """Append one sample; returns its key.

        Args:
            sample: the sample; its ``images`` are replaced by the member names in the shard.
            images: its images (encoded bytes, PIL images or paths). Default: ``sample.image_data``
                if present, else the files ``sample.images`` under ``root``.
            root: folder of the sample's relative image paths.

        Raises:
            ValueError: an image cannot be read (nothing is written for this sample).
        """
        if self._closed:
            raise RuntimeError("ShardWriter is closed")
        if images is None:
            if sample.image_data:
                images = sample.image_data
            elif sample.images:
                if root is None:
                    raise ValueError(f"sample {sample.id}: image paths need root")
                images = [Path(root) / rel for rel in sample.images]
            else:
                images = []
        encoded = []
        for i, image in enumerate(images):
            try:
                encoded.append(encode_image(image))
            except (OSError, ValueError) as exc:
                raise ValueError(f"sample {sample.id}: image {i}: {exc}") from None
        record = sample.to_dict()
        record["images"] = [f"{i}.{ext}" for i, (ext, _) in enumerate(encoded)]
        key = f"{self.num_samples:09d}"
        blob = _member(f"{key}.json", json.dumps(record, ensure_ascii=False).encode("utf-8")) + b"".join(
            _member(f"{key}.{name}", data) for name, (_, data) in zip(record["images"], encoded, strict=True)
        )
        if self._file is not None and (
            len(self._offsets) >= self.cfg.max_samples or self._size + len(blob) > self.cfg.max_bytes
        ):
            self._finish_shard(complete=False)
        if self._file is None:
            self._start_shard()
        assert self._file is not None
        self._file.write(blob)  # one write: a sample is in the file whole or (after a crash) cut off
        self._offsets.append(self._size)
        self._size += len(blob)
        self.num_samples += 1
        return key

    def close(self) -> dict[str, Any]:
        """Finish the last shard and write the final index; returns the index."""
        if not self._closed:
            self._closed = True
            if self._file is not None:
                self._finish_shard(complete=True)
            else:
                self._write_index(complete=True)
        return read_index(self.out_dir)

    def _abort(self) -> None:
        """Keep the whole samples written so far (see the class docstring)."""
        if self._closed:
            return
        self._closed = True
        if self._file is not None:
            self._file.seek(self._size)
            self._file.truncate()
            self._finish_shard(complete=False)
        else:
            self._write_index(complete=False)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self._abort()


# -- JSONL or shards, the same way ---------------------------------------------------------------
def iter_samples(
    path: str | Path,
    decode: str = "bytes",
    *,
    allow_incomplete: bool = False,
    on_skip: Callable[[int, str], None] | None = None,
) -> Iterator[Sample]:
    """Samples of a JSONL file or a shard folder, in stored order, images in ``image_data``.

    JSONL images are read from their files (relative to the file's folder); ``decode`` is
    ``bytes`` (encoded, as stored) or ``pil``. ``allow_incomplete``: see `read_index`.
    ``on_skip(line, reason)`` is called for each bad JSONL line skipped (see `read_samples`).
    """
    path = Path(path)
    if path.is_dir():
        with ShardReader(path, decode=decode, allow_incomplete=allow_incomplete) as reader:
            yield from reader
        return
    if not path.is_file():
        raise ValueError(f"{path}: no such JSONL file or shard folder")
    for sample in read_samples(path, on_skip=on_skip):
        data = [(path.parent / rel).read_bytes() for rel in sample.images]
        sample.image_data = data if decode == "bytes" else [decode_image(d) for d in data]
        yield sample


class SampleSink:
    """Write samples (with their images in ``image_data``) as shards or as JSONL + image files.

    ``kind="shards"``: `ShardWriter` into ``out``. ``kind="jsonl"``: ``out/samples.jsonl`` (renamed
    into place on close) and the images under ``out/images/``.
    """

    KINDS = ("shards", "jsonl")

    def __init__(self, out: str | Path, kind: str = "shards", shard_cfg: ShardConfig | None = None,
                 *, overwrite: bool = False) -> None:  # fmt: skip
        if kind not in self.KINDS:
            raise ValueError(f"output kind must be one of {', '.join(self.KINDS)} (got {kind!r})")
        self.out = Path(out)
        self.kind = kind
        self.count = 0
        if kind == "shards":
            self._writer: ShardWriter | None = ShardWriter(self.out, shard_cfg, overwrite=overwrite)
        else:
            self._writer = None
            target = self.out / "samples.jsonl"
            if target.exists() and not overwrite:
                raise FileExistsError(f"{target} exists; pass overwrite=True")
            (self.out / "images").mkdir(parents=True, exist_ok=True)
            self._tmp = target.with_name(target.name + ".tmp")
            self._jsonl = self._tmp.open("w", encoding="utf-8")

    def write(self, sample: Sample) -> None:
        """Write one sample; an unreadable image raises ValueError and writes nothing."""
        if self._writer is not None:
            self._writer.write(sample)
        else:
            encoded = [encode_image(x) for x in sample.image_data]
            names = []
            for i, (ext, data) in enumerate(encoded):
                rel = f"images/{self.count:09d}.{i}.{ext}"
                (self.out / rel).write_bytes(data)
                names.append(rel)
            record = sample.to_dict()
            record["images"] = names
            self._jsonl.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.count += 1

    def write_all(self, samples: Iterable[Sample]) -> int:
        """Write every sample; returns how many."""
        for sample in samples:
            self.write(sample)
        return self.count

    def close(self, complete: bool = True) -> None:
        """Finish the output (``complete=False``: keep what was written, marked unfinished)."""
        if self._writer is not None:
            if complete:
                self._writer.close()
            else:
                self._writer._abort()
        elif not self._jsonl.closed:
            self._jsonl.close()
            os.replace(self._tmp, self.out / "samples.jsonl")

    def __enter__(self) -> SampleSink:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        self.close(complete=exc_type is None)

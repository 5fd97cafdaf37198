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

import hashlib
import io
import json
import logging
import os
import random
import tarfile
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from axpo_nemo.agent.sample import Sample, decode_image, read_samples
from axpo_nemo.core.config import ValidatedConfig, setting

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

INDEX_NAME = "index.json"
INDEX_FORMAT = "axpo-shards"
INDEX_VERSION = 1
STATE_VERSION = 1
BLOCK = 512
RECORD = 20 * BLOCK  # tar files are padded to a multiple of this
DECODE_MODES = ("pil", "bytes")
WORKER_TYPES = ("thread", "process")
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


def _padded(n: int) -> int:
    return (n + BLOCK - 1) // BLOCK * BLOCK


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
    return header + data + b"\0" * (_padded(len(data)) - len(data))


def _atomic_write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, ensure_ascii=False), encoding="utf-8")
    os.replace(tmp, path)


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
        _atomic_write_json(self.out_dir / INDEX_NAME, index)

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


# -- index ---------------------------------------------------------------------------------------
def is_shard_dir(path: str | Path) -> bool:
    """Whether ``path`` is a folder with a shard index."""
    return (Path(path) / INDEX_NAME).is_file()


def read_index(folder: str | Path, *, allow_incomplete: bool = False) -> dict[str, Any]:
    """The shard index of ``folder``; a missing or malformed index raises ValueError naming it.

    An index marked ``complete: false`` (its writer failed or was interrupted) also raises
    ValueError unless ``allow_incomplete``: then its finished shards are read, with a WARNING.
    """
    path = Path(folder) / INDEX_NAME
    if not path.is_file():
        raise ValueError(f"{folder}: no {INDEX_NAME} (write shards with ShardWriter, or run index_shards)")
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    if index.get("format") != INDEX_FORMAT or not isinstance(index.get("shards"), list):
        raise ValueError(f"{path}: not a shard index (format must be {INDEX_FORMAT!r} with a 'shards' list)")
    for i, shard in enumerate(index["shards"]):
        offsets = shard.get("offsets")
        if not isinstance(offsets, list) or len(offsets) != shard.get("samples", -1) + 1:
            raise ValueError(
                f"{path}: shards[{i}] ({shard.get('name')}): offsets must have samples + 1 entries"
            )
    if not index.get("complete", True):
        finished = f"{len(index['shards'])} finished shard(s), {sum(s['samples'] for s in index['shards'])} samples"
        if not allow_incomplete:
            raise ValueError(
                f"{folder}: an unfinished dataset (its writer failed or was stopped; {finished}): rerun the "
                "command that wrote it, or read it anyway with --allow-incomplete (allow_incomplete=True)"
            )
        logger.warning("%s: the writer did not finish; reading its %s", path, finished)
    return index


def _sample_key(name: str) -> str:
    """The webdataset key of a member: its path up to the first dot of its file name."""
    head, _, base = name.rpartition("/")
    key = base.split(".", 1)[0]
    return f"{head}/{key}" if head else key


def index_shards(folder: str | Path, pattern: str = "*.tar") -> dict[str, Any]:
    """Scan the tar files of ``folder`` (sorted by name) and write ``index.json`` for them.

    Samples are runs of consecutive members sharing a key (the webdataset rule); each must have a
    ``.json`` member holding a `Sample` for `ShardReader` to read it.
    """
    folder = Path(folder)
    shards = []
    for path in sorted(folder.glob(pattern)):
        offsets: list[int] = []
        end = 0
        last_key = None
        with tarfile.open(path, "r:") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                key = _sample_key(info.name)
                if key != last_key:
                    offsets.append(info.offset)
                    last_key = key
                end = info.offset_data + _padded(info.size)
        shards.append({"name": path.name, "samples": len(offsets), "bytes": path.stat().st_size,
                       "offsets": [*offsets, end]})  # fmt: skip
    index = {
        "format": INDEX_FORMAT,
        "version": INDEX_VERSION,
        "complete": True,
        "num_samples": sum(s["samples"] for s in shards),
        "shards": shards,
    }
    _atomic_write_json(folder / INDEX_NAME, index)
    return index


# -- reading one sample (runs in workers) ----------------------------------------------------------
def _load_sample(path: str, start: int, end: int, decode: str) -> tuple[dict[str, Any], list[Any]]:
    """The JSON record and images of the sample stored at ``path[start:end]``."""
    with open(path, "rb") as f:
        f.seek(start)
        chunk = f.read(end - start)
    where = f"{path} (bytes {start}-{end})"
    if len(chunk) != end - start:
        raise ValueError(f"{where}: file is shorter than the index says")
    members: dict[str, bytes] = {}
    key = None
    try:
        with tarfile.open(fileobj=io.BytesIO(chunk), mode="r:") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                key = key or _sample_key(info.name)
                data = tar.extractfile(info)
                members[info.name[len(key) + 1 :]] = data.read() if data else b""
    except tarfile.TarError as exc:
        raise ValueError(f"{where}: not a tar record ({exc})") from None
    if "json" not in members:
        raise ValueError(f"{where}: sample {key} has no .json member")
    try:
        record = json.loads(members["json"])
    except json.JSONDecodeError as exc:
        raise ValueError(f"{where}: sample {key}: bad JSON ({exc})") from None
    images = []
    for name in record.get("images", []):
        if name not in members:
            raise ValueError(f"{where}: sample {key}: image member {key}.{name} is missing")
        data = members[name]
        if decode == "pil":
            with Image.open(io.BytesIO(data)) as img:
                images.append(img.convert("RGB"))  # convert() loads (decodes) the pixels here
        else:
            images.append(data)
    return record, images


def _load_chunk(tasks: list[tuple[str, int, int]], decode: str) -> list[tuple[dict[str, Any], list[Any]]]:
    return [_load_sample(path, start, end, decode) for path, start, end in tasks]


def _seed_int(*parts: Any) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little")


def _buffer_shuffle(stream: Sequence[int], size: int, rng: random.Random) -> list[int]:
    """A shuffle buffer over ``stream``: fill ``size`` slots, then each output is a random slot,
    refilled with the next stream item; the rest is emitted in random order at the end."""
    if size <= 1:
        return list(stream)
    out: list[int] = []
    buf: list[int] = []
    for item in stream:
        if len(buf) < size:
            buf.append(item)
            continue
        j = rng.randrange(size)
        out.append(buf[j])
        buf[j] = item
    rng.shuffle(buf)
    out.extend(buf)
    return out


class ShardReader:
    """Stream `Sample`s (images decoded to RGB PIL images, or as bytes) from a shard folder.

    Iterating yields the rest of the current epoch and then moves to the next epoch; see the
    module docstring for the order and for why workers are threads by default. Samples carry
    their images in ``image_data`` (``images`` names the members: ``0.jpg``, …), so
    ``sample.load_images()`` works as for JSONL datasets. Use as a context manager, or call
    `close`, to stop the workers.
    """

    def __init__(
        self,
        folder: str | Path,
        *,
        shuffle_buffer: int = 0,
        shuffle_shards: bool = False,
        seed: int = 0,
        num_workers: int = 0,
        worker_type: str = "thread",
        decode: str = "pil",
        prefetch: int = 4,
        chunk_size: int = 4,
        rank: int = 0,
        world_size: int = 1,
        allow_incomplete: bool = False,
    ) -> None:
        """Open a shard folder.

        Args:
            folder: the folder with ``index.json``.
            shuffle_buffer: samples in the shuffle buffer; 0 or 1: stored order.
            shuffle_shards: permute the shards each epoch (seeded) before the buffer.
            seed: seed of all shuffling (per epoch: derived from seed and epoch).
            num_workers: loading/decoding workers; 0: load in the caller's thread.
            worker_type: ``thread`` or ``process``.
            decode: ``pil`` (RGB PIL images) or ``bytes`` (encoded bytes).
            prefetch: chunks in flight per worker.
            chunk_size: samples per worker task.
            rank / world_size: read every ``world_size``-th sample of the epoch, from ``rank``.
            allow_incomplete: read a folder whose writer did not finish (see `read_index`).
        """
        errors = []
        if shuffle_buffer < 0:
            errors.append(f"shuffle_buffer must be >= 0 (got {shuffle_buffer})")
        if num_workers < 0:
            errors.append(f"num_workers must be >= 0 (got {num_workers})")
        if worker_type not in WORKER_TYPES:
            errors.append(f"worker_type must be one of {', '.join(WORKER_TYPES)} (got {worker_type!r})")
        if decode not in DECODE_MODES:
            errors.append(f"decode must be one of {', '.join(DECODE_MODES)} (got {decode!r})")
        if prefetch < 1 or chunk_size < 1:
            errors.append(f"prefetch and chunk_size must be >= 1 (got {prefetch}, {chunk_size})")
        if world_size < 1 or not 0 <= rank < world_size:
            errors.append(f"rank must be in [0, world_size) (got rank {rank}, world_size {world_size})")
        if errors:
            raise ValueError("ShardReader: " + "; ".join(errors))
        self.folder = Path(folder)
        self.index = read_index(self.folder, allow_incomplete=allow_incomplete)
        self.shuffle_buffer = shuffle_buffer
        self.shuffle_shards = shuffle_shards
        self.seed = seed
        self.num_workers = num_workers
        self.worker_type = worker_type
        self.decode = decode
        self.prefetch = prefetch
        self.chunk_size = chunk_size
        self.rank = rank
        self.world_size = world_size
        shards = self.index["shards"]
        self._paths = [str(self.folder / s["name"]) for s in shards]
        self._offsets = [np.asarray(s["offsets"], dtype=np.int64) for s in shards]
        counts = np.array([s["samples"] for s in shards], dtype=np.int64)
        self._bases = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.num_samples = int(self._bases[-1])
        self.epoch = 0
        self.position = 0
        self._order: tuple[int, np.ndarray] | None = None
        self._executor: Executor | None = None

    def __len__(self) -> int:
        """Samples per epoch for this rank."""
        return len(range(self.rank, self.num_samples, self.world_size))

    def _settings(self) -> dict[str, Any]:
        return {
            "shards": [[s["name"], s["samples"]] for s in self.index["shards"]],
            "shuffle_buffer": self.shuffle_buffer,
            "shuffle_shards": self.shuffle_shards,
            "seed": self.seed,
            "rank": self.rank,
            "world_size": self.world_size,
        }

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The global sample numbers this rank reads in ``epoch``, in order."""
        if self._order is not None and self._order[0] == epoch:
            return self._order[1]
        rng = random.Random(_seed_int("shards", self.seed, epoch))
        shard_order = list(range(len(self._paths)))
        if self.shuffle_shards:
            rng.shuffle(shard_order)
        stream = [n for s in shard_order for n in range(int(self._bases[s]), int(self._bases[s + 1]))]
        order = np.asarray(_buffer_shuffle(stream, self.shuffle_buffer, rng), dtype=np.int64)
        order = order[self.rank :: self.world_size]
        self._order = (epoch, order)
        return order

    def _locate(self, n: int) -> tuple[str, int, int]:
        shard = int(np.searchsorted(self._bases, n, side="right")) - 1
        local = n - int(self._bases[shard])
        offsets = self._offsets[shard]
        return self._paths[shard], int(offsets[local]), int(offsets[local + 1])

    # -- state -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Where the reader is: the next sample to yield is number ``position`` of ``epoch``."""
        return {"version": STATE_VERSION, "epoch": self.epoch, "position": self.position, **self._settings()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a `state_dict`; a state of another dataset or other shuffle settings raises
        ValueError naming what differs (resuming it would silently skip or repeat samples)."""
        diffs = [
            f"{k}: {state.get(k)!r} -> {v!r}"
            for k, v in self._settings().items()
            if json.loads(json.dumps(state.get(k))) != json.loads(json.dumps(v))
        ]
        if diffs:
            raise ValueError(
                "ShardReader.load_state_dict: the state is of another reader (" + "; ".join(diffs) + ")"
            )
        epoch, position = state.get("epoch"), state.get("position")
        if (
            not isinstance(epoch, int)
            or not isinstance(position, int)
            or epoch < 0
            or not 0 <= position <= len(self)
        ):
            raise ValueError(f"ShardReader.load_state_dict: bad epoch/position ({epoch!r}, {position!r})")
        self.epoch, self.position = epoch, position

    # -- iteration -----------------------------------------------------------------------------
    def _pool(self) -> Executor:
        if self._executor is None:
            if self.worker_type == "thread":
                self._executor = ThreadPoolExecutor(self.num_workers, thread_name_prefix="shard-reader")
            else:
                import multiprocessing

                # spawn: safe with threads (torch, the BLAS pools) already running in the parent.
                self._executor = ProcessPoolExecutor(
                    self.num_workers, mp_context=multiprocessing.get_context("spawn")
                )
        return self._executor

    def _records(self, order: np.ndarray, start: int) -> Iterator[tuple[dict[str, Any], list[Any]]]:
        # Lazily: an epoch of millions of samples needs no task list up front.
        chunks = (
            [self._locate(int(n)) for n in order[i : i + self.chunk_size]]
            for i in range(start, len(order), self.chunk_size)
        )
        if self.num_workers == 0:
            for chunk in chunks:
                yield from _load_chunk(chunk, self.decode)
            return
        pool = self._pool()
        pending: deque[Future] = deque()
        window = self.num_workers * self.prefetch
        try:
            for chunk in chunks:
                pending.append(pool.submit(_load_chunk, chunk, self.decode))
                if len(pending) >= window:
                    yield from pending.popleft().result()
            while pending:
                yield from pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()

    def __iter__(self) -> Iterator[Sample]:
        if self.position >= len(self):
            self.epoch, self.position = self.epoch + 1, 0
        order = self.epoch_order(self.epoch)
        for record, images in self._records(order, self.position):
            sample = Sample.from_dict(record)
            sample.image_data = images
            self.position += 1  # counted before the yield: a state taken now resumes after it
            yield sample
        self.epoch, self.position = self.epoch + 1, 0

    def close(self) -> None:
        """Stop the workers."""
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None

    def __enter__(self) -> ShardReader:
        return self

    def __exit__(self, *_: Any) -> None:
        self.close()


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

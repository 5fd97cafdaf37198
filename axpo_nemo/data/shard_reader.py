"""`ShardReader`: a shard folder streamed in a seeded, resumable order, with workers.

See `axpo_nemo.data.shards` for the layout and the reader's guarantees.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import random
import tarfile
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from axpo_nemo.agent.sample import Sample
from axpo_nemo.data.shard_index import read_index, sample_key

__all__ = ["ShardReader"]

logger = logging.getLogger(__name__)

STATE_VERSION = 1
DECODE_MODES = ("pil", "bytes")
WORKER_TYPES = ("thread", "process")


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
                key = key or sample_key(info.name)
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
            try:
                with Image.open(io.BytesIO(data)) as img:
                    images.append(img.convert("RGB"))  # convert() loads (decodes) the pixels here
            except Exception as exc:  # Pillow raises several types on garbage
                raise ValueError(
                    f"{where}: sample {key}: image {key}.{name} cannot be decoded ({exc})"
                ) from None
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

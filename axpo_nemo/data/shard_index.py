"""The shard folder's ``index.json``: its format, reading it (refusing an unfinished one unless
asked), and rebuilding it for tar files written by other tools. See `axpo_nemo.data.shards`."""

from __future__ import annotations

import json
import logging
import os
import tarfile
from pathlib import Path
from typing import Any

__all__ = ["INDEX_NAME", "index_shards", "is_shard_dir", "read_index"]

logger = logging.getLogger(__name__)

INDEX_NAME = "index.json"
INDEX_FORMAT = "axpo-shards"
INDEX_VERSION = 1
BLOCK = 512
RECORD = 20 * BLOCK  # tar files are padded to a multiple of this


def padded_size(n: int) -> int:
    """``n`` bytes rounded up to whole 512-byte tar blocks."""
    return (n + BLOCK - 1) // BLOCK * BLOCK


def atomic_write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as JSON to ``path`` through a temporary file renamed into place."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, ensure_ascii=False), encoding="utf-8")
    os.replace(tmp, path)


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
        finished = (
            f"{len(index['shards'])} finished shard(s), {sum(s['samples'] for s in index['shards'])} samples"
        )
        if not allow_incomplete:
            raise ValueError(
                f"{folder}: an unfinished dataset (its writer failed or was stopped; {finished}): rerun the "
                "command that wrote it, or read it anyway with --allow-incomplete (allow_incomplete=True)"
            )
        logger.warning("%s: the writer did not finish; reading its %s", path, finished)
    return index


def sample_key(name: str) -> str:
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
                key = sample_key(info.name)
                if key != last_key:
                    offsets.append(info.offset)
                    last_key = key
                end = info.offset_data + padded_size(info.size)
        shards.append({"name": path.name, "samples": len(offsets), "bytes": path.stat().st_size,
                       "offsets": [*offsets, end]})  # fmt: skip
    index = {
        "format": INDEX_FORMAT,
        "version": INDEX_VERSION,
        "complete": True,
        "num_samples": sum(s["samples"] for s in shards),
        "shards": shards,
    }
    atomic_write_json(folder / INDEX_NAME, index)
    return index

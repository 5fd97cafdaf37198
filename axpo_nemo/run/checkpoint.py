"""Crash-safe training checkpoints and what a run resumes from.

**Layout.** ``<dir>/step_000123/`` holds one ``<key>.pt`` file per top-level key of the saved
state (``model.pt``, ``optimizer.pt``, ``rng.pt``, ...; each written with ``torch.save``) and a
``COMPLETE`` marker: a JSON manifest with the step, the time and every file's size and sha256.
Everything, model weights included, goes through ``torch.save``: it handles tied/shared tensors
(safetensors refuses them) and one format keeps loading simple. A checkpoint is for resuming; a
Hugging Face export of the weights is a separate step (``save_pretrained``).

**Atomic save.** Files are written into a temporary sibling ``.tmp-step_000123-<pid>``, hashed
as they are written (no second read), fsynced; the marker is written last; then the folder is
renamed into place and the parent folder fsynced. A run killed at any point leaves either the new
checkpoint complete or only a temporary folder, which loading ignores and the next save deletes.

**Safe load.** Files load with ``torch.load(weights_only=True)``: a checkpoint cannot run code.
So a state may hold only tensors, str/bytes/int/float/bool/None, dicts, lists and tuples
(``save`` checks this up front and names the offending key; numpy arrays must be converted, as
:func:`capture_rng_state` does). ``load_latest`` takes the newest checkpoint whose manifest
verifies and skips corrupt ones (missing marker, missing/short/changed file, unreadable torch
file) with a WARNING naming the folder and the reason. When checkpoints exist and *none*
verifies, ``resolve_resume('auto')`` stops with a CheckpointError instead of starting over: a
fresh start would prune the folder and lose weights that may still be intact behind a damaged
marker. Folders without a valid marker are never deleted, only moved aside (``invalid-…``).

**Pitfalls of peer frameworks this avoids** (shared/notes/peers_and_pitfalls.md, "Resume"):
resuming at an epoch boundary skipping an epoch, and a changed dataset silently skipping samples
(see `axpo_nemo.run.data_cursor.DataCursor`); an older checkpoint resumed while newer ones exist (those are moved
aside as ``superseded-…`` on the next save, so a later ``resume: auto`` cannot jump back to the
abandoned timeline); optimizer and data state not saved (the trainer saves both).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from axpo_nemo.config.checkpoint import CheckpointConfig

__all__ = ["CheckpointConfig", "CheckpointError", "CheckpointManager", "resolve_resume"]

logger = logging.getLogger(__name__)

MARKER = "COMPLETE"
FORMAT = "axpo-checkpoint/1"
_STEP_RE = re.compile(r"^step_(\d+)$")
_KEY_RE = re.compile(r"^[A-Za-z0-9_.-]+$")
_TMP_RE = re.compile(r"^\.(?:tmp|old)-step_\d+-(\d+)$")
_CHUNK = 8 << 20


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names its folder and the reason.

    A ValueError: like a bad config value, it is the user's to fix (the CLI prints one line).
    """


class _HashingWriter:
    """File wrapper that hashes and counts the bytes ``torch.save`` writes through it."""

    def __init__(self, f):
        self._f = f
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, data) -> int:
        self.sha.update(data)
        self.size += len(data)
        return self._f.write(data)

    def flush(self) -> None:
        self._f.flush()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some filesystems do not allow opening folders
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


_PLAIN = (str, bytes, int, float, bool, type(None), torch.Tensor, torch.Size, torch.dtype, torch.device)


def _check_loadable(obj: Any, where: str) -> None:
    """Raise TypeError unless ``obj`` is made of types ``torch.load(weights_only=True)`` reads."""
    if isinstance(obj, _PLAIN):
        return
    if isinstance(obj, dict):  # OrderedDict included
        for k, v in obj.items():
            if not isinstance(k, str | int | float | bool | tuple | type(None)):
                raise TypeError(f"{where}: dict key {k!r} of type {type(k).__name__} is not checkpointable")
            _check_loadable(v, f"{where}[{k!r}]")
        return
    if isinstance(obj, list | tuple):
        for i, v in enumerate(obj):
            _check_loadable(v, f"{where}[{i}]")
        return
    hint = " (use .tolist(), .item() or torch.from_numpy)" if type(obj).__module__ == "numpy" else ""
    raise TypeError(
        f"{where}: {type(obj).__module__}.{type(obj).__qualname__} is not checkpointable{hint}; a "
        "state may hold tensors, str/bytes/int/float/bool/None, dicts, lists and tuples"
    )


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class CheckpointManager:
    """Writes, prunes, verifies and loads the checkpoints of one run folder (one writer at a time).

    Args:
        dir: the checkpoint folder (created on the first save).
        keep_last: complete checkpoints kept after each save (>= 1, so the newest always stays).
    """

    def __init__(self, dir: str | os.PathLike, keep_last: int = 3):
        if keep_last < 1:
            raise ValueError(f"CheckpointManager: keep_last must be >= 1 (got {keep_last})")
        self.dir = Path(dir)
        self.keep_last = keep_last

    @classmethod
    def from_config(cls, cfg: CheckpointConfig, output_dir: str | os.PathLike) -> CheckpointManager:
        """The manager for ``cfg`` in a run writing to ``output_dir``."""
        return cls(cfg.resolve_dir(output_dir), cfg.keep_last)

    @staticmethod
    def step_dir_name(step: int) -> str:
        """The folder name of a step's checkpoint: ``step_000123``."""
        return f"step_{step:06d}"

    # ---------------------------------------------------------------- save
    def save(self, step: int, state: dict[str, Any]) -> Path:
        """Write ``state`` as the checkpoint of ``step`` atomically, then prune; return its folder.

        Each top-level key becomes ``<key>.pt`` (keys: letters, digits, ``_.-``). An existing
        checkpoint of the same step is replaced; checkpoints of later steps (an abandoned
        timeline) are moved aside, see the module docstring. Raises TypeError before writing
        anything when the state holds a type a safe load cannot read.
        """
        if step < 0:
            raise ValueError(f"checkpoint step must be >= 0 (got {step})")
        if not state:
            raise ValueError("checkpoint state is empty")
        for key, value in state.items():
            if not isinstance(key, str) or not _KEY_RE.match(key):
                raise ValueError(f"checkpoint state key {key!r}: use letters, digits, '_', '.', '-'")
            _check_loadable(value, f"state[{key!r}]")

        self.dir.mkdir(parents=True, exist_ok=True)
        name = self.step_dir_name(step)
        final = self.dir / name
        tmp = self.dir / f".tmp-{name}-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        files = {}
        for key, value in state.items():
            files[f"{key}.pt"] = self._write_file(tmp / f"{key}.pt", value)
        now = time.time()
        manifest = {
            "format": FORMAT,
            "step": step,
            "time": datetime.datetime.fromtimestamp(now, datetime.UTC).isoformat(timespec="seconds"),
            "unix_time": now,
            "files": files,
        }
        with open(tmp / MARKER, "w") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)

        if final.exists():
            # A directory rename cannot replace a non-empty directory: move the old one aside first.
            old = self.dir / f".old-{name}-{os.getpid()}"
            if old.exists():
                shutil.rmtree(old)
            os.replace(final, old)
            os.replace(tmp, final)
            _fsync_dir(self.dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
            _fsync_dir(self.dir)
        logger.info("saved checkpoint %s", final)
        self._prune(step)
        return final

    def _write_file(self, path: Path, value: Any) -> dict[str, Any]:
        with open(path, "wb") as f:
            w = _HashingWriter(f)
            torch.save(value, w)
            f.flush()
            os.fsync(f.fileno())
        return {"size": w.size, "sha256": w.sha.hexdigest()}

    def _prune(self, saved_step: int) -> None:
        """Move later steps and invalid folders aside, delete stale temporaries, keep the last k."""
        for entry in self.dir.iterdir():
            m = _TMP_RE.match(entry.name)
            if m and entry.is_dir():
                pid = int(m.group(1))
                if pid != os.getpid() and _pid_alive(pid):
                    continue  # another live writer's (or a reused pid's); left for a later save
                logger.warning("removing stale temporary checkpoint folder %s (a killed save)", entry)
                shutil.rmtree(entry, ignore_errors=True)

        complete = []
        for step, path in self.step_folders():
            if self._read_marker(path) is None:
                # Only a damaged marker can get here (saves are atomic): the weights may be intact.
                aside = self.dir / f"invalid-{path.name}-{int(time.time())}"
                logger.warning(
                    "checkpoint folder %s has no valid %s marker: moved to %s (delete it when no "
                    "longer wanted)",
                    path,
                    MARKER,
                    aside,
                )
                os.replace(path, aside)
            elif step > saved_step:
                aside = self.dir / f"superseded-{path.name}-{int(time.time())}"
                logger.warning(
                    "checkpoint %s is newer than the one just saved (step %d): a resumed run abandoned "
                    "it; moved to %s so it is not resumed from (delete it when no longer wanted)",
                    path,
                    saved_step,
                    aside,
                )
                os.replace(path, aside)
            else:
                complete.append((step, path))
        complete.sort()
        for _step, path in complete[: max(0, len(complete) - self.keep_last)]:
            logger.info("pruning checkpoint %s (keep_last=%d)", path, self.keep_last)
            shutil.rmtree(path, ignore_errors=True)
        _fsync_dir(self.dir)

    # ---------------------------------------------------------------- listing
    def step_folders(self) -> list[tuple[int, Path]]:
        """``(step, folder)`` of every ``step_*`` folder, valid or not, oldest first."""
        if not self.dir.is_dir():
            return []
        out = []
        for entry in self.dir.iterdir():
            m = _STEP_RE.match(entry.name)
            if m and entry.is_dir():
                out.append((int(m.group(1)), entry))
        return sorted(out)

    @staticmethod
    def _read_marker(path: Path) -> dict | None:
        try:
            manifest = json.loads((path / MARKER).read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
            return None
        return manifest

    def checkpoints(self) -> list[tuple[int, Path]]:
        """``(step, folder)`` of every checkpoint with a readable marker, oldest first (not verified)."""
        return [(s, p) for s, p in self.step_folders() if self._read_marker(p) is not None]

    # ---------------------------------------------------------------- load
    def verify(self, path: str | os.PathLike, *, checksums: bool = True) -> dict[str, Any]:
        """Check a checkpoint folder against its manifest; return the manifest or raise CheckpointError.

        Checks the marker, the step, and every listed file's presence, size and (with
        ``checksums``) sha256.
        """
        path = Path(path)
        if not path.is_dir():
            raise CheckpointError(f"{path}: not a folder")
        if not (path / MARKER).exists():
            raise CheckpointError(f"{path}: no {MARKER} marker (an interrupted save)")
        manifest = self._read_marker(path)
        if manifest is None:
            raise CheckpointError(f"{path}: the {MARKER} marker is not a valid manifest")
        m = _STEP_RE.match(path.name)
        if m and int(m.group(1)) != manifest.get("step"):
            raise CheckpointError(f"{path}: manifest step {manifest.get('step')} does not match the folder")
        for name, info in manifest["files"].items():
            f = path / name
            if not f.is_file():
                raise CheckpointError(f"{path}: file {name} is missing")
            size = f.stat().st_size
            if size != info.get("size"):
                raise CheckpointError(
                    f"{path}: file {name} has {size} bytes, the manifest says {info.get('size')}"
                )
            if checksums and _sha256(f) != info.get("sha256"):
                raise CheckpointError(f"{path}: file {name} fails its sha256 check (corrupted)")
        return manifest

    def load(
        self, path: str | os.PathLike, *, map_location: Any = "cpu", checksums: bool = True
    ) -> tuple[int, dict[str, Any]]:
        """Verify and load one checkpoint folder: ``(step, state)``; raises CheckpointError.

        Tensors load onto ``map_location`` (CPU by default; ``load_state_dict`` moves them).
        """
        path = Path(path)
        manifest = self.verify(path, checksums=checksums)
        state = {}
        for name in manifest["files"]:
            try:
                state[name.removesuffix(".pt")] = torch.load(
                    path / name, map_location=map_location, weights_only=True
                )
            except Exception as exc:  # a truncated zip, a bad pickle, an unsafe type
                raise CheckpointError(
                    f"{path}: file {name} cannot be loaded ({type(exc).__name__}: {exc})"
                ) from exc
        return int(manifest["step"]), state

    def load_latest(
        self, *, map_location: Any = "cpu", checksums: bool = True, require_one: bool = False
    ) -> tuple[int, dict[str, Any]] | None:
        """The newest checkpoint that verifies and loads, as ``(step, state)``; None when there is none.

        Each newer one that fails is skipped with a WARNING naming it and why. With
        ``require_one`` a folder that holds ``step_*`` folders none of which loads raises
        CheckpointError (naming the folder, the count and the newest one's fault) instead of
        returning None.
        """
        first_error = None
        folders = self.step_folders()
        for step, path in reversed(folders):
            try:
                loaded = self.load(path, map_location=map_location, checksums=checksums)
            except CheckpointError as exc:
                logger.warning("skipping corrupt checkpoint: %s", exc)
                first_error = first_error or exc
                continue
            logger.info("resuming from checkpoint %s (step %d)", path, step)
            return loaded
        if require_one and folders:
            raise CheckpointError(
                f"{self.dir}: none of its {len(folders)} checkpoint(s) is valid (newest: {first_error}); "
                "nothing was changed: repair or move them away to start over, or set "
                "checkpoint.resume to one of them"
            )
        return None


def resolve_resume(
    resume: str, manager: CheckpointManager, *, map_location: Any = "cpu"
) -> tuple[int, dict[str, Any]] | None:
    """Apply a ``checkpoint.resume`` setting: the ``(step, state)`` to continue from, or None.

    'auto': ``manager.load_latest(require_one=True)``: None for a fresh folder, CheckpointError
    when checkpoints exist but none is valid (never a silent restart over them). 'never': None, but raises FileExistsError when the
    folder already holds checkpoints (a fresh run there would prune or mix with them). A path:
    that ``step_*`` folder (errors raise CheckpointError, no fallback: it was asked for by name),
    or the newest valid checkpoint of that checkpoint folder.
    """
    if resume == "auto":
        return manager.load_latest(map_location=map_location, require_one=True)
    if resume == "never":
        existing = manager.checkpoints()
        if existing:
            raise FileExistsError(
                f"checkpoint.resume is 'never' but {manager.dir} already holds {len(existing)} "
                "checkpoint(s): use another output_dir or checkpoint.dir, delete them, or set "
                "checkpoint.resume=auto to continue"
            )
        return None
    path = Path(resume).expanduser()
    if _STEP_RE.match(path.name) or (path / MARKER).exists():
        return manager.load(path, map_location=map_location)
    if path.is_dir():
        loaded = CheckpointManager(path, manager.keep_last).load_latest(map_location=map_location)
        if loaded is None:
            raise CheckpointError(f"{path}: checkpoint.resume names a folder with no valid checkpoint")
        return loaded
    raise CheckpointError(f"{path}: checkpoint.resume path does not exist")

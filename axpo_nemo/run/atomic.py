"""Output folders that appear whole or not at all.

A command writes into a fresh temporary sibling (``.<name>.tmp-XXXX``) and renames it onto the
output path only when it succeeds, so a path that exists always holds finished output. On a
failure the temporary folder is removed, or, with ``keep_failed``, renamed to
``<name>.incomplete`` so the work done is not lost but can never be mistaken for a finished
output (readers of shard folders also refuse their ``complete: false`` index).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["INCOMPLETE_SUFFIX", "atomic_output_dir"]

logger = logging.getLogger(__name__)

#: Suffix of the folder a failed command's partial output is kept under (``keep_failed``).
INCOMPLETE_SUFFIX = ".incomplete"


def _replace_dir(src: Path, dst: Path) -> None:
    """Rename ``src`` onto ``dst``, replacing a folder already there."""
    if dst.exists():
        old = dst.parent / f".{dst.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)


@contextmanager
def atomic_output_dir(
    out_dir: str | os.PathLike, overwrite: bool = False, *, keep_failed: bool = False
) -> Iterator[Path]:
    """Context manager yielding a temporary folder beside ``out_dir`` that replaces it on success.

    A failure (or interruption) leaves ``out_dir`` as it was and removes the temporary folder,
    or with ``keep_failed`` moves it to ``<out_dir>.incomplete`` (replacing an older one) with a
    WARNING naming it. Raises FileExistsError when ``out_dir`` exists and ``overwrite`` is False.
    """
    out = Path(out_dir).expanduser().absolute()
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists (pass overwrite=True to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp creates 0700; outputs are meant to be shared
        yield tmp
        _replace_dir(tmp, out)
    except BaseException:
        if keep_failed:
            kept = out.with_name(out.name + INCOMPLETE_SUFFIX)
            _replace_dir(tmp, kept)
            logger.warning(
                "%s: the command failed; what it wrote is kept in %s (not a finished output)", out, kept
            )
        else:
            shutil.rmtree(tmp, ignore_errors=True)
        raise

"""Where a run is in its data (`DataCursor`) and which data that position belongs to (fingerprints)."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

__all__ = ["DataCursor", "dataset_fingerprint"]

logger = logging.getLogger(__name__)


def dataset_fingerprint(ids: Iterable[str]) -> str:
    """A short hash of a dataset's ordered ids (a checkpoint's data position is only valid for it)."""
    h = hashlib.sha256()
    for i in ids:
        h.update(str(i).encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


@dataclass
class DataCursor:
    """Where the data stream is: epoch and examples consumed in it, checkpointed with the run.

    ``advance`` normalises at the boundary (a finished epoch is stored as ``(epoch+1, 0)``,
    never ``(epoch, size)``), so a checkpoint saved exactly at an epoch end resumes at the next
    epoch's start instead of skipping it (verl#7401). ``load_state_dict`` compares a dataset
    fingerprint: after a dataset change the stored offset means nothing, so the epoch restarts
    at offset 0 with a WARNING instead of silently skipping samples (NeMo-RL#2519).
    """

    epoch: int = 0
    offset: int = 0

    def advance(self, n: int, epoch_size: int) -> None:
        """Record ``n`` more consumed examples of an epoch of ``epoch_size``."""
        if epoch_size < 1:
            raise ValueError(f"DataCursor: epoch_size must be >= 1 (got {epoch_size})")
        total = self.offset + n
        self.epoch += total // epoch_size
        self.offset = total % epoch_size

    def state_dict(self, fingerprint: str = "", epoch_size: int | None = None) -> dict[str, Any]:
        """Checkpointable state; ``fingerprint`` identifies the dataset (e.g. a hash of its ids)."""
        return {
            "epoch": self.epoch,
            "offset": self.offset,
            "fingerprint": fingerprint,
            "epoch_size": epoch_size,
        }

    @classmethod
    def from_state_dict(
        cls, state: dict[str, Any], fingerprint: str = "", epoch_size: int | None = None
    ) -> DataCursor:
        """The cursor to continue from, given the current dataset's fingerprint and size."""
        cursor = cls(int(state["epoch"]), int(state["offset"]))
        changed = state.get("fingerprint", "") != fingerprint or (
            epoch_size is not None and state.get("epoch_size") not in (None, epoch_size)
        )
        if changed:
            logger.warning(
                "the dataset changed since the checkpoint (fingerprint or size differs): restarting "
                "epoch %d from its first example instead of skipping %d examples",
                cursor.epoch,
                cursor.offset,
            )
            cursor.offset = 0
        elif epoch_size is not None and cursor.offset >= epoch_size:
            cursor.advance(0, epoch_size)
        return cursor

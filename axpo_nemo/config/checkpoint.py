"""Checkpoint schedule, retention and resume settings (`CheckpointConfig`), apart from the
checkpoint manager so that loading a config imports no torch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from axpo_nemo.core.config import ValidatedConfig, setting

__all__ = ["CheckpointConfig"]


@dataclass
class CheckpointConfig(ValidatedConfig):
    """When checkpoints are written, how many are kept, and what a run resumes from."""

    every: int = setting(
        50, "Save a checkpoint every this many steps; 0: only at the end and on a stop signal.", ge=0
    )
    keep_last: int = setting(3, "Complete checkpoints kept on disk; the newest is never deleted.", ge=1)
    resume: str = setting(
        "auto",
        "'auto': continue from the newest valid checkpoint in dir (start fresh if there is none); "
        "'never': start fresh (refused if dir already holds checkpoints); otherwise a path to a "
        "step_* folder, or to a checkpoint folder whose newest valid checkpoint is used.",
    )
    dir: str | None = setting(None, "Checkpoint folder; null: <output_dir>/checkpoints.")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not str(self.resume).strip():
            raise ValueError("CheckpointConfig: resume: must be 'auto', 'never' or a path (got '')")

    def resolve_dir(self, output_dir: str | os.PathLike) -> Path:
        """The checkpoint folder: ``dir``, or ``<output_dir>/checkpoints`` when unset."""
        return Path(self.dir) if self.dir else Path(output_dir) / "checkpoints"

    def due(self, step: int) -> bool:
        """Whether the periodic schedule saves after ``step``."""
        return self.every > 0 and step > 0 and step % self.every == 0

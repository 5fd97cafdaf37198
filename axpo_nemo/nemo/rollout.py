"""Pure pieces of the NeMo-RL AXPO step: question order, rewards, per-row images, logprob checks, metrics.

Nothing here touches NeMo-RL or Ray; `axpo_nemo.nemo.trainer` strings these together around the
NeMo-RL calls, and the tests run them on plain data.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from axpo_nemo.agent.trajectory import TrajectoryState

__all__ = [
    "QuestionOrder",
    "exclude_nonfinite_rows",
    "reduce_train_metrics",
    "row_images",
    "sanitize_behaviour_logprobs",
]

#: Micro-batch metrics NeMo-RL averages (grpo_train); all others are summed (they come pre-divided
#: by the global token/sample count, so the sum is the global value).
_MEAN_METRICS = frozenset({"lr", "wd", "global_valid_seqs", "global_valid_toks"})


class QuestionOrder:
    """B questions per step in a seeded order: a fresh permutation each epoch, a pure function of
    ``(seed, epoch)`` — the same order the local trainer draws — with the position checkpointed."""

    def __init__(self, num_questions: int, seed: int, epoch: int = 0, position: int = 0) -> None:
        if num_questions < 1:
            raise ValueError("QuestionOrder: no questions")
        self.num_questions, self.seed = int(num_questions), int(seed)
        self.epoch, self.position = int(epoch), int(position)

    def _permutation(self, epoch: int) -> list[int]:
        rng = np.random.default_rng([self.seed & 0xFFFFFFFF, int(epoch)])
        return rng.permutation(self.num_questions).tolist()

    def draw(self, count: int) -> list[int]:
        """The next ``count`` question indices (advances the position, rolling over epochs)."""
        out: list[int] = []
        perm = self._permutation(self.epoch)
        while len(out) < count:
            if self.position >= len(perm):
                self.epoch, self.position = self.epoch + 1, 0
                perm = self._permutation(self.epoch)
            take = min(count - len(out), len(perm) - self.position)
            out.extend(perm[self.position : self.position + take])
            self.position += take
        return out


def row_images(states: Sequence[TrajectoryState]) -> list[list[dict[str, torch.Tensor]]]:
    """Per row, its images in token order as ``{"pixel_values", "image_grid_thw"}`` (for `build_train_data`)."""
    return [
        [
            {"pixel_values": slot.image.pixel_values, "image_grid_thw": slot.image.grid_thw}
            for slot in sorted(s.images, key=lambda slot: slot.start)
        ]
        for s in states
    ]


def sanitize_behaviour_logprobs(
    generated: torch.Tensor, logprobs: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(valid rows [R], logprobs with every non-finite entry set to 0).

    A row is invalid when any token the policy generated has a non-finite behaviour logprob (the
    vLLM generator writes NaN for a missing or bad one). Invalid rows are excluded from the loss;
    zeroing keeps the core's selection arithmetic finite (such a row's uncertainty is then only
    an estimate; its reward is still valid, so it still counts in its group's statistics).
    """
    finite = torch.isfinite(logprobs)
    valid = ~(generated & ~finite).any(dim=1)
    return valid, torch.where(finite, logprobs, torch.zeros_like(logprobs))


def exclude_nonfinite_rows(
    tensors: dict[str, torch.Tensor], keys: Sequence[str], num_rows: int | None = None
) -> int:
    """Drop from the loss every row whose ``keys`` logprobs are non-finite on a loss token.

    Sets that row's ``token_mask`` and ``sample_mask`` to 0 and every non-finite value of ``keys``
    to 0 (NeMo-RL's masked means multiply, so a NaN off the mask would still poison the loss).
    Only the first ``num_rows`` rows are counted (the rest are padding). Returns the rows dropped.
    """
    mask = tensors["token_mask"].bool() & (tensors["sample_mask"][:, None] > 0)
    bad = torch.zeros(mask.shape[0], dtype=torch.bool)
    for key in keys:
        if key not in tensors:
            continue
        finite = torch.isfinite(tensors[key])
        bad |= (mask & ~finite).any(dim=1)
        tensors[key] = torch.where(finite, tensors[key], torch.zeros_like(tensors[key]))
    if bool(bad.any()):
        tensors["token_mask"][bad] = 0
        tensors["sample_mask"][bad] = 0
    limit = mask.shape[0] if num_rows is None else num_rows
    return int(bad[:limit].sum())


def reduce_train_metrics(results: Mapping[str, Any]) -> dict[str, float]:
    """``policy.train`` results as scalars, combined the way ``grpo_train`` does.

    ``loss`` and ``grad_norm`` come from the results; micro-batch metrics are summed (lr, wd and
    the global counts are averaged; ``*_min``/``*_max`` take the min/max of the finite values).
    """
    out: dict[str, float] = {}
    for key in ("loss", "grad_norm"):
        if key in results:
            out[key] = float(np.asarray(results[key], dtype=np.float64).reshape(-1).mean())
    for key, values in dict(results.get("all_mb_metrics", {})).items():
        arr = np.asarray(values, dtype=np.float64).reshape(-1)
        if arr.size == 0:
            continue
        if key.endswith("_min") or key.endswith("_max"):
            finite = arr[np.isfinite(arr)]
            out[key] = (
                float(finite.min() if key.endswith("_min") else finite.max()) if finite.size else math.nan
            )
        elif key in _MEAN_METRICS:
            out[key] = float(arr.mean())
        else:
            out[key] = float(arr.sum())
    return out

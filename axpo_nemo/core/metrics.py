"""Per-step AXPO metrics (the names every backend logs) and the unbiased pass@k estimator."""

from __future__ import annotations

import math

import numpy as np
import torch

from axpo_nemo.core.rollout import RolloutBatch
from axpo_nemo.core.selection import ResamplePlan, group_tool_stats

#: The per-step metric names of DESIGN.md §1, logged every step by every backend.
STEP_METRIC_NAMES = (
    "tool_use_rate",
    "tool_subgroup_all_wrong_rate",
    "triggered_groups",
    "prefixes_selected",
    "resample_recovery_rate",
    "extra_rollout_fraction",
    "accuracy",
    "accuracy_tool",
    "accuracy_no_tool",
    "mean_turns",
    "mean_response_tokens",
    "prefix_uncertainty_mean",
)


def _ratio(num: float, den: float) -> float:
    return num / den if den else math.nan


def step_metrics(batch: RolloutBatch, plan: ResamplePlan | None = None) -> dict[str, float]:
    """The DESIGN.md per-step metrics for one step.

    Rates describe the original rollouts (so GRPO and AXPO runs compare like for like);
    resampling metrics describe the plan and the resampled rows. A rate with an empty
    denominator (no tool use, nothing selected) is NaN rather than a misleading 0.

    ``tool_subgroup_all_wrong_rate`` = triggered groups / groups with any tool use, and is
    reported for GRPO too: it is the symptom AXPO treats.
    """
    orig = batch.is_original
    tool = batch.tool_using[orig]
    correct = batch.correct[orig].double()
    n = int(orig.sum())
    stats = group_tool_stats(batch)
    groups_with_tool = int((stats.tool > 0).sum())
    triggered = int(stats.triggered.sum())

    selected = plan.num_selected if plan is not None else 0
    resampled = ~orig
    if selected:
        sel_of_row = plan.selection_index(batch.num_rows)[batch.source[resampled]]
        recovered = torch.bincount(sel_of_row, weights=batch.correct[resampled].double(), minlength=selected)
        recovery = float((recovered > 0).double().mean())
        uncertainty = float(plan.selected_uncertainty.double().mean())
    else:
        recovery = uncertainty = math.nan

    return {
        "tool_use_rate": _ratio(float(tool.sum()), n),
        "tool_subgroup_all_wrong_rate": _ratio(triggered, groups_with_tool),
        "triggered_groups": float(triggered),
        "prefixes_selected": float(selected),
        "resample_recovery_rate": recovery,
        "extra_rollout_fraction": _ratio(float(resampled.sum()), n),
        "accuracy": _ratio(float(correct.sum()), n),
        "accuracy_tool": _ratio(float(correct[tool].sum()), float(tool.sum())),
        "accuracy_no_tool": _ratio(float(correct[~tool].sum()), float((~tool).sum())),
        "mean_turns": _ratio(float(batch.num_turns[orig].double().sum()), n),
        "mean_response_tokens": _ratio(float(batch.response_tokens()[orig].double().sum()), n),
        "prefix_uncertainty_mean": uncertainty,
    }


def pass_at_k(num_samples, num_correct, k: int) -> np.ndarray | float:
    """Unbiased pass@k = 1 - C(n-c, k) / C(n, k) per question (Chen et al., 2021).

    ``num_samples`` and ``num_correct`` are per-question counts: arrays give an array, two
    scalars give a float. Computed as 1 - prod_{i=n-c+1}^{n} (1 - k/i), which is exact and never
    overflows. Raises ValueError when some question has fewer than k samples or more correct
    than samples.
    """
    scalar = np.ndim(num_samples) == 0 and np.ndim(num_correct) == 0
    n = np.atleast_1d(np.asarray(num_samples, dtype=np.int64))
    c = np.atleast_1d(np.asarray(num_correct, dtype=np.int64))
    n, c = np.broadcast_arrays(n, c)
    if k < 1:
        raise ValueError(f"pass_at_k: k must be >= 1 (got {k})")
    if (n < k).any():
        raise ValueError(f"pass_at_k: every question needs n >= k={k} samples (min n is {int(n.min())})")
    if ((c < 0) | (c > n)).any():
        raise ValueError("pass_at_k: num_correct must lie in [0, num_samples]")
    width = int(c.max()) if c.size else 0
    if width:
        # Factor j (0-based) of question q is 1 - k/(n-c+1+j), used for j < c.
        j = np.arange(width)
        denom = (n - c + 1)[..., None] + j
        factors = np.where(j < c[..., None], 1.0 - k / denom, 1.0)
        # When n - c < k some factor is <= 0: pass@k is exactly 1.
        out = np.where(n - c < k, 1.0, 1.0 - np.prod(factors, axis=-1))
    else:
        out = np.zeros(n.shape, dtype=np.float64)
    return float(out[0]) if scalar else out

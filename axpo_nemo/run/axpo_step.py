"""One AXPO / GRPO training step, as DESIGN.md §1 reads, for every backend.

`run_step` is the algorithm's skeleton; a backend (`StepBackend`) supplies only what differs
between training stacks: generation (rolling trajectories out and rewarding them), and the
update (old/reference logprobs, the loss, the optimizer). The order is fixed here:

1. the drawn questions become prompts, and each prompt a group of N trajectory states
   (`agent.groups.group_states`: seeds derived from ``(seed, step, question, sample)``);
2. the backend rolls the originals out and rewards them;
3. ``algorithm: axpo``: `core.plan_resampling` triggers groups whose tool-using rollouts are all
   wrong and selects prefixes under the budget (seed ``derive_seed("plan", seed, step)``);
4. the K continuations of each selected prefix (`agent.groups.resample_states`) are rolled out by
   the backend, rewarded, and appended after the originals;
5. `core.assemble_advantages` (rows the backend found unusable carry no loss);
6. the backend's update;
7. the DESIGN metrics (`core.step_metrics`, originals only) and the step's counters.

Generation happens inside the backend's ``generating()`` context, so a backend can bracket it
(the cluster backend wakes vLLM and puts it back to sleep; the local one runs its speculative
resample wave alongside). GRPO is this same step with stage 3-4 off.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from axpo_nemo.agent.groups import group_states
from axpo_nemo.agent.protocol import ChatProtocol
from axpo_nemo.agent.sample import Sample
from axpo_nemo.agent.tools.base import Tool
from axpo_nemo.agent.trajectory import TrajectoryState, derive_seed
from axpo_nemo.core import (
    AdvantageConfig,
    AXPOConfig,
    ResamplePlan,
    RolloutBatch,
    StepAdvantages,
    assemble_advantages,
    plan_resampling,
    step_metrics,
)

__all__ = ["COUNTERS", "Generation", "StepBackend", "StepRecord", "StepSettings", "run_step"]

#: Counters every backend keeps across steps (checkpointed with the trainer).
COUNTERS = ("rollouts", "resampled_rollouts", "prefixes_selected", "triggered_groups", "nonfinite_rows")


class Generation(Protocol):
    """A backend's generation for one step (what its ``generating()`` context yields)."""

    def originals(self, states: list[TrajectoryState], prompts: list[Any]) -> RolloutBatch:
        """Roll ``states`` (N per question, group-major) out to the end and reward them."""

    def resample(
        self, plan: ResamplePlan, states: list[TrajectoryState], prompts: list[Any], originals: RolloutBatch
    ) -> tuple[list[TrajectoryState], RolloutBatch]:
        """The selected prefixes' continuations (`resample_states` order) rolled out and rewarded."""


class StepBackend(Protocol):
    """What a training stack supplies to `run_step`."""

    def generating(self) -> contextlib.AbstractContextManager[Generation]:
        """A context around the step's rollouts, yielding the `Generation`."""

    def row_mask(self, batch: RolloutBatch) -> torch.Tensor | None:
        """``[R]`` bool: rows usable for the loss (e.g. finite behaviour logprobs); None: all."""

    def update(
        self, batch: RolloutBatch, plan: ResamplePlan | None, adv: StepAdvantages, states: list[TrajectoryState]
    ) -> dict[str, float]:
        """Logprobs, loss and optimizer for the step; returns the update's metrics.

        Returns at least ``loss_tokens``, ``nonfinite_rows``, ``logprob_s`` and ``train_s``.
        """


@dataclass(frozen=True)
class StepSettings:
    """The step's algorithm settings (identical in every backend)."""

    algorithm: str
    axpo: AXPOConfig
    advantage: AdvantageConfig
    group_size: int
    seed: int
    pad_id: int = 0


@dataclass
class StepRecord:
    """What one step produced (kept by the trainers as ``last`` for inspection and tests)."""

    states: list[TrajectoryState]
    batch: RolloutBatch
    plan: ResamplePlan | None
    advantages: StepAdvantages


def build_prompts(
    questions: Sequence[Sample],
    picks: Sequence[int],
    protocol: ChatProtocol,
    data_root: str | Path,
    tools: Mapping[str, Tool],
) -> list[Any]:
    """The rendered prompt of each drawn question: its images, and the ``tools`` it may use
    (``Sample.allowed_tools``; all of them when it names none)."""
    prompts = []
    for q in picks:
        sample = questions[q]
        allowed = [t for name, t in tools.items() if not sample.allowed_tools or name in sample.allowed_tools]
        prompts.append(protocol.build_prompt(sample.question, sample.load_images(data_root), allowed))
    return prompts


def run_step(
    backend: StepBackend,
    questions: Sequence[Sample],
    picks: Sequence[int],
    prompts: list[Any],
    settings: StepSettings,
    step: int,
    counters: dict[str, float],
) -> tuple[StepRecord, dict[str, float]]:
    """One step (module docstring) on the drawn questions ``picks`` with their ``prompts``.

    ``step`` is the number of steps done before this one (it seeds the step). Adds to
    ``counters`` (`COUNTERS`); returns the record and the metrics: every `core.STEP_METRIC_NAMES`
    name, the update's, ``reward_mean``, ``resample_reward_mean``, ``rows``, ``total_tokens``,
    ``generated_tokens`` and the timings ``rollout_s``, ``resample_s``, ``step_s``.
    """
    t_start = time.perf_counter()
    states = group_states(
        prompts, list(picks), [questions[q].id for q in picks],
        group_size=settings.group_size, seed=settings.seed, step=step,
    )  # fmt: skip
    plan: ResamplePlan | None = None
    with backend.generating() as gen:
        originals = gen.originals(states, prompts)
        t_rollout = time.perf_counter()
        batch, all_states = originals, states
        if settings.algorithm == "axpo":
            plan = plan_resampling(originals, settings.axpo, seed=derive_seed("plan", settings.seed, step))
            if plan.num_selected:
                extra, resampled = gen.resample(plan, states, prompts, originals)
                batch = originals.concat(resampled, pad_id=settings.pad_id)
                all_states = states + extra
    t_resample = time.perf_counter()

    adv = assemble_advantages(batch, plan, settings.axpo, settings.advantage, row_mask=backend.row_mask(batch))
    update_metrics = backend.update(batch, plan, adv, all_states)

    metrics = step_metrics(batch, plan)
    metrics.update(update_metrics)
    orig = batch.is_original
    resampled_rows = ~orig
    counters["rollouts"] += batch.num_rows
    counters["resampled_rollouts"] += int(resampled_rows.sum())
    counters["prefixes_selected"] += metrics["prefixes_selected"]
    counters["triggered_groups"] += metrics["triggered_groups"]
    counters["nonfinite_rows"] += int(update_metrics["nonfinite_rows"])
    metrics.update(
        {
            "reward_mean": float(batch.reward[orig].mean()),
            "resample_reward_mean": float(batch.reward[resampled_rows].mean()) if resampled_rows.any() else math.nan,
            "rows": float(batch.num_rows),
            "total_tokens": float(batch.lengths.sum()),
            "generated_tokens": float(batch.generated.sum()),
            "rollout_s": t_rollout - t_start,
            "resample_s": t_resample - t_rollout,
            "step_s": time.perf_counter() - t_start,
        }
    )
    return StepRecord(all_states, batch, plan, adv), metrics

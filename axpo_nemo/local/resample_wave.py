"""The local backend's generation for one step (`ResampleWave`), with what runs alongside AXPO's
resample wave.

The wave (rolling out the selected prefixes' continuations) is sequential decoding; on a CPU it
leaves a core idle. Two ways to use it, both exact:

* **Speculation** (`RLConfig.speculative_resampling`): the wave starts once every original's
  first turn is done, on a second thread (`local.speculation`), and when the originals finish
  both threads score them (`_finish_speculation`).
* **Overlap** (`RLConfig.overlap_scoring`), when the wave was not speculated: a second thread
  scores the originals and backpropagates the rows whose advantages the wave cannot change while
  the wave generates (`_rollouts_while_scoring`, `EarlyUpdate`, `_confirm_early`).

`ResampleWave` is the `run.axpo_step.Generation` of `RLTrainer`: one per step, created by the
trainer's ``generating()`` context. It reaches the trainer only through `WaveOps` (rollouts,
rewards, logprob scoring, micro-batching, gradient accumulation and the settings), and leaves what
it scored and backpropagated early (``prescored``, ``early``, ``pre``) for the trainer's update.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from axpo_nemo.agent.groups import continuation_states, resample_states
from axpo_nemo.agent.trajectory import TrajectoryState
from axpo_nemo.config.rl import LOSS_METRIC_NAMES, RLConfig
from axpo_nemo.core import (
    AdvantageConfig,
    AXPOConfig,
    LossConfig,
    ResamplePlan,
    RolloutBatch,
    StepAdvantages,
    assemble_advantages,
    resample_budget,
    speculative_plan,
)
from axpo_nemo.local.speculation import SpeculativeWave

__all__ = ["EarlyUpdate", "Prescored", "ResampleWave", "WaveOps", "confirm_early", "single_threaded"]

logger = logging.getLogger(__name__)
#: Makes the event that tells the early-update thread the resample wave is done (tests replace it).
_wave_signal = threading.Event

#: Old and reference logprobs already computed for some rows: (rows, old [n, S'], ref or None).
Prescored = tuple[list[int], torch.Tensor, torch.Tensor | None]


@contextlib.contextmanager
def single_threaded() -> Iterator[None]:
    """Run torch ops of the calling thread on one intra-op thread (a per-thread setting)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@dataclass
class EarlyUpdate:
    """The rows backpropagated from while the resample wave generated (`RLConfig.overlap_scoring`).

    Attributes:
        rows: the original rows of groups with no selected prefix that carry loss.
        remaining: their micro-batches the wave left undone, in order.
        done: micro-batches done during the wave (their gradients are in ``.grad``, unscaled).
        advantages, loss_mask: the originals' ([R0, S0]) as those rows train.
        sums: the loss metrics of the done micro-batches, as sums (``num_tokens`` = 1).
    """

    rows: list[int]
    remaining: list[list[int]]
    done: int
    advantages: torch.Tensor
    loss_mask: torch.Tensor
    sums: dict[str, float]


class WaveOps(Protocol):
    """What `ResampleWave` uses of the trainer: its settings and six operations."""

    cfg: RLConfig
    axpo_cfg: AXPOConfig
    adv_cfg: AdvantageConfig
    loss_cfg: LossConfig
    pad_id: int
    step_count: int
    model: Any
    reference: Any
    optimizer: torch.optim.Optimizer

    def _run_loop(self, states: list[TrajectoryState], on_round_end: Callable[[int], None] | None = None) -> None:
        """Roll ``states`` out to the end (``on_round_end(i)`` after each generation round)."""

    def _rewarded(self, states: list[TrajectoryState]) -> RolloutBatch:
        """``states`` as a rewarded `RolloutBatch`."""

    def _score(self, model: Any, states: Any, needed: torch.Tensor, batches: list[list[int]]) -> torch.Tensor:
        """``model``'s logprobs at the ``needed`` positions, on the given micro-batches."""

    def _score_pair(self, states: Any, needed: torch.Tensor, batches: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Old-policy and reference logprobs (`_score` with both models)."""

    def _score_continuations(self, states: list[TrajectoryState], needed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`_score_pair` of speculated continuations on their own micro-batches."""

    def _micro_batches(self, rows: list[int], states: Any) -> list[list[int]]:
        """``rows`` cut into micro-batches."""

    def _accumulate(self, states: Any, adv: Any, old: Any, ref: Any, batches: Any, scale: float, sums: dict) -> Any:
        """Backpropagate the loss of ``batches`` (gradients accumulate in ``.grad``)."""


class ResampleWave:
    """One step's generation on the local backend (a `run.axpo_step.Generation`).

    Args:
        ops: the trainer (`WaveOps`).
        speculate: start the resample wave early on a second thread (`RLConfig.speculative_resampling`).
        plan_seed: the step's plan seed (the speculative guess uses the plan's own seed).
    """

    def __init__(self, ops: WaveOps, *, speculate: bool, plan_seed: int) -> None:
        self.ops = ops
        self.plan_seed = plan_seed
        self.spec = SpeculativeWave(ops._run_loop, ops._score_continuations) if speculate else None
        self.speculated: dict[int, list[TrajectoryState]] = {}
        self.hits: list[int] = []
        self.prescored: list[Prescored] = []
        self.early: tuple[torch.Tensor, torch.Tensor | None] | None = None  # originals scored during the wave
        self.pre: EarlyUpdate | None = None  # rows already backpropagated during the wave
        self.num_originals = 0

    # -- the Generation protocol ---------------------------------------------------------------

    def originals(self, states: list[TrajectoryState], prompts: list[Any]) -> RolloutBatch:
        """Roll the originals out (starting the speculative wave after their first turn) and reward them."""
        hook = self._speculate(states, prompts) if self.spec is not None else None
        self.ops._run_loop(states, hook)
        batch = self.ops._rewarded(states)
        self.num_originals = batch.num_rows
        if self.spec is not None:
            self.speculated = self.spec.forks
        return batch

    def resample(
        self, plan: ResamplePlan, states: list[TrajectoryState], prompts: list[Any], originals: RolloutBatch
    ) -> tuple[list[TrajectoryState], RolloutBatch]:
        """The selected prefixes' continuations, rewarded: speculated ones joined, the rest rolled
        out (while the originals are scored, with `RLConfig.overlap_scoring`)."""
        ops = self.ops
        self.hits = [src for src in plan.selected.tolist() if src in self.speculated]
        if self.spec is not None and not self.hits:
            self.spec.cancel()  # nothing it makes is used, so stopping it early changes nothing
        extra = resample_states(
            plan, states, prompts, seed=ops.cfg.seed, step=ops.step_count, made=self.speculated
        )
        ran = {id(f) for fs in self.speculated.values() for f in fs}
        leftovers = [f for f in extra if id(f) not in ran]

        def wave() -> RolloutBatch:
            ops._run_loop(leftovers)
            return ops._rewarded(extra)

        if self.spec is not None and self.hits:
            return extra, self._finish_speculation(extra, leftovers, states, originals, plan)
        if ops.cfg.overlap_scoring:
            resampled, self.early, self.pre = self._rollouts_while_scoring(wave, states, originals, plan)
            return extra, resampled
        return extra, wave()

    def cancel(self) -> None:
        """Stop the speculative wave without waiting for its rollouts (an error, Ctrl-C, or unused)."""
        if self.spec is not None:
            self.spec.cancel()

    def close(self) -> None:
        """End the step's generation: an unused speculative wave is cancelled, its thread joined."""
        if self.spec is not None:
            if not self.hits:
                self.spec.cancel()
            self.spec.close()

    # -- what runs alongside ---------------------------------------------------------------------

    def _speculate(self, states: list[TrajectoryState], prompts: list) -> Callable[[int], None]:
        """The originals' round hook that starts the wave once every first turn is done."""
        ops, wave = self.ops, self.spec

        def on_round_end(round_index: int) -> None:
            if round_index != 0 or resample_budget(len(states), ops.axpo_cfg.r, ops.axpo_cfg.k) == 0:
                return
            partial = RolloutBatch.from_rollouts([s.to_rollout() for s in states], pad_id=ops.pad_id)
            guess = speculative_plan(
                partial, ops.axpo_cfg, seed=self.plan_seed, extra=ops.cfg.speculative_extra_prefixes
            )
            make = {"k": guess.k, "prefix_fixing": guess.prefix_fixing, "seed": ops.cfg.seed}
            wave.start(
                {
                    src: continuation_states(src, states, prompts, step=ops.step_count, **make)
                    for src in guess.selected.tolist()
                }
            )

        return on_round_end

    def _rollouts_while_scoring(
        self,
        wave: Callable[[], RolloutBatch],
        states: list[TrajectoryState],
        originals: RolloutBatch,
        plan: ResamplePlan,
    ) -> tuple[RolloutBatch, tuple[torch.Tensor, torch.Tensor | None], EarlyUpdate | None]:
        """Run ``wave`` (the resampled rows' rollouts) while a second thread works on the originals.

        Nothing the resample wave produces changes the originals' old and reference logprobs (the
        weights do not change before the update), nor the advantages of groups with no selected
        prefix. So the second thread scores every original row, at every generated position (a
        superset of the loss tokens), and then, when the step takes one optimizer step,
        backpropagates those groups' rows, micro-batch by micro-batch, until the wave is done
        (`EarlyUpdate`; `_confirm_early` checks the premise afterwards, the update does the
        rest). Those micro-batches always run single-threaded and in the same order, wherever
        they run, so where the wave happens to cut them changes no result.
        """
        batches = self.ops._micro_batches(list(range(originals.num_rows)), states)
        cfg = self.ops.cfg
        train_early = cfg.ppo_epochs == 1 and cfg.mini_batches == 1 and not cfg.log_entropy
        selected_groups = {int(states[src].group) for src in plan.selected.tolist()}

        def work():
            torch.set_num_threads(1)
            old, ref = self.ops._score_pair(states, originals.generated, batches)
            if not train_early:
                return (old, ref), None
            finite = torch.where(originals.generated, old, 0.0).isfinite().all(dim=1)
            if ref is not None:
                finite &= torch.where(originals.generated, ref, 0.0).isfinite().all(dim=1)
            adv = assemble_advantages(originals, None, self.ops.axpo_cfg, self.ops.adv_cfg, row_mask=finite)
            signal = ((adv.advantages != 0) & adv.loss_mask).any(dim=1)
            skips = cfg.skip_zero_advantage and self.ops.loss_cfg.kl_coef == 0
            rows = [
                i
                for i in range(originals.num_rows)
                if int(originals.group[i]) not in selected_groups
                and bool(finite[i])
                and bool(adv.loss_mask[i].any())
                and not (skips and not bool(signal[i]))
            ]
            sums = {name: 0.0 for name in LOSS_METRIC_NAMES}
            self.ops.optimizer.zero_grad(set_to_none=True)
            todo = self.ops._micro_batches(rows, states)
            done = 0
            while done < len(todo) and not wave_done.is_set():  # loss sums; scaled in the update
                self.ops._accumulate(states, adv, old, ref, todo[done : done + 1], 1, sums)
                done += 1
            return (old, ref), EarlyUpdate(rows, todo[done:], done, adv.advantages, adv.loss_mask, sums)

        wave_done = _wave_signal()
        with single_threaded(), ThreadPoolExecutor(max_workers=1, thread_name_prefix="axpo-score") as pool:
            future = pool.submit(work)
            try:
                extra_batch = wave()
            finally:
                wave_done.set()  # the thread finishes its micro-batch and leaves the rest
            early, pre = future.result()
        return extra_batch, early, pre

    def _finish_speculation(
        self,
        extra: list[TrajectoryState],
        leftovers: list[TrajectoryState],
        states: list[TrajectoryState],
        originals: RolloutBatch,
        plan: ResamplePlan,
    ) -> RolloutBatch:
        """Roll out the selected prefixes nobody speculated, score the originals, join the wave.

        The originals' old and reference logprobs do not depend on the wave, so they are scored
        now, one micro-batch at a time, by this thread and by the wave's thread once its own
        work is done, each single-threaded: a micro-batch gives the same bits whichever thread
        takes it. Appends the originals' and the speculated continuations' logprobs to
        ``prescored``; returns the resampled rows, rewarded.
        """
        spec = self.spec
        tasks, old, ref, rows = self._original_scoring_tasks(states, originals, plan)
        spec.tasks.put_all(tasks)
        self.ops._run_loop(leftovers)  # the wave's thread, once done, starts on the tasks meanwhile
        with single_threaded():
            spec.tasks.run()
        result = spec.result()
        self.prescored.append((rows, old[rows], ref[rows] if ref is not None else None))
        if result.old is not None:
            at = result.rows_of(extra)
            fork_rows, pos = [i for _, i in at], [p for p, _ in at]
            self.prescored.append(
                (fork_rows, result.old[pos], result.ref[pos] if result.ref is not None else None)
            )
        return self.ops._rewarded(extra)

    def _original_scoring_tasks(
        self, states: list[TrajectoryState], originals: RolloutBatch, plan: ResamplePlan
    ) -> tuple[list[Callable[[], None]], torch.Tensor, torch.Tensor | None, list[int]]:
        """One task per micro-batch filling ``old``/``ref`` ([R0, S0]) of the originals that train.

        A row is left out only when it surely skips training (`RLConfig.skip_zero_advantage`):
        no GRPO signal and no selected prefix in its group, whose advantages resampling may change.
        """
        needed = originals.generated
        trains = needed.any(dim=1)  # the originals' loss tokens are their generated ones
        if self.ops.cfg.skip_zero_advantage and self.ops.loss_cfg.kl_coef == 0:
            adv = assemble_advantages(originals, None, self.ops.axpo_cfg, self.ops.adv_cfg)
            touched = torch.zeros(originals.num_groups, dtype=torch.bool)
            touched[originals.group[plan.selected]] = True
            trains &= ((adv.advantages != 0) & adv.loss_mask).any(dim=1) | touched[originals.group]
        rows = torch.nonzero(trains).flatten().tolist()
        old = torch.zeros(needed.shape, dtype=torch.float32)
        ref = torch.zeros(needed.shape, dtype=torch.float32) if self.ops.reference is not None else None

        def task(mb: list[int]) -> None:
            old[mb] = self.ops._score(self.ops.model, states, needed, [mb])[mb]
            if ref is not None:
                ref[mb] = self.ops._score(self.ops.reference, states, needed, [mb])[mb]

        return [functools.partial(task, mb) for mb in self.ops._micro_batches(rows, states)], old, ref, rows


def confirm_early(
    pre: EarlyUpdate, adv: StepAdvantages, trained: set[int], optimizer: torch.optim.Optimizer
) -> EarlyUpdate | None:
    """``pre`` if its rows train with exactly the step's final advantages and masks; else None.

    It holds by construction (their groups have no resampled rows); checked anyway, and on a
    mismatch the early gradients are dropped (``optimizer.zero_grad``) and every row is computed
    in the update.
    """
    s0 = pre.loss_mask.shape[1]
    for i in pre.rows:
        same = (
            i in trained
            and torch.equal(adv.loss_mask[i, :s0], pre.loss_mask[i])
            and not adv.loss_mask[i, s0:].any()
            and torch.equal(adv.advantages[i, :s0], pre.advantages[i])
        )
        if not same:
            logger.warning("rl: row %d's advantages changed after the resample wave; recomputing the update", i)
            optimizer.zero_grad(set_to_none=True)
            return None
    return pre

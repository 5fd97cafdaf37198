"""What runs alongside AXPO's resample wave in the local trainer (`RLTrainer` mixes it in).

The wave (rolling out the selected prefixes' continuations) is sequential decoding; on a CPU it
leaves a core idle. Two ways to use it, both exact:

* **Speculation** (`RLConfig.speculative_resampling`): the wave starts once every original's
  first turn is done, on a second thread (`local.speculation`), and when the originals finish
  both threads score them (`_finish_speculation`).
* **Overlap** (`RLConfig.overlap_scoring`), when the wave was not speculated: a second thread
  scores the originals and backpropagates the rows whose advantages the wave cannot change while
  the wave generates (`_rollouts_while_scoring`, `EarlyUpdate`, `_confirm_early`).

The mixin uses the trainer's configs, models, optimizer and its ``_run_loop``, ``_rewarded``,
``_score``, ``_score_pair``, ``_micro_batches``, ``_accumulate`` and ``_plan_seed``.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from axpo_nemo.agent.groups import continuation_states
from axpo_nemo.agent.trajectory import TrajectoryState
from axpo_nemo.config.rl import LOSS_METRIC_NAMES
from axpo_nemo.core import (
    ResamplePlan,
    RolloutBatch,
    StepAdvantages,
    assemble_advantages,
    resample_budget,
    speculative_plan,
)
from axpo_nemo.local.speculation import SpeculativeWave

__all__ = ["EarlyUpdate", "Prescored", "ResampleWaveMixin", "single_threaded"]

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


class ResampleWaveMixin:
    """The resample-wave methods of `RLTrainer` (see the module docstring)."""

    def _speculate(
        self, wave: SpeculativeWave, states: list[TrajectoryState], prompts: list
    ) -> Callable[[int], None]:
        """The originals' round hook that starts ``wave`` once every first turn is done."""

        def on_round_end(round_index: int) -> None:
            if round_index != 0 or resample_budget(len(states), self.axpo_cfg.r, self.axpo_cfg.k) == 0:
                return
            partial = RolloutBatch.from_rollouts([s.to_rollout() for s in states], pad_id=self.pad_id)
            guess = speculative_plan(
                partial, self.axpo_cfg, seed=self._plan_seed(), extra=self.cfg.speculative_extra_prefixes
            )
            make = {"k": guess.k, "prefix_fixing": guess.prefix_fixing, "seed": self.cfg.seed}
            wave.start(
                {
                    src: continuation_states(src, states, prompts, step=self.step_count, **make)
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
        batches = self._micro_batches(list(range(originals.num_rows)), states)
        cfg = self.cfg
        train_early = cfg.ppo_epochs == 1 and cfg.mini_batches == 1 and not cfg.log_entropy
        selected_groups = {int(states[src].group) for src in plan.selected.tolist()}

        def work():
            torch.set_num_threads(1)
            old, ref = self._score_pair(states, originals.generated, batches)
            if not train_early:
                return (old, ref), None
            finite = torch.where(originals.generated, old, 0.0).isfinite().all(dim=1)
            if ref is not None:
                finite &= torch.where(originals.generated, ref, 0.0).isfinite().all(dim=1)
            adv = assemble_advantages(originals, None, self.axpo_cfg, self.adv_cfg, row_mask=finite)
            signal = ((adv.advantages != 0) & adv.loss_mask).any(dim=1)
            skips = cfg.skip_zero_advantage and self.loss_cfg.kl_coef == 0
            rows = [
                i
                for i in range(originals.num_rows)
                if int(originals.group[i]) not in selected_groups
                and bool(finite[i])
                and bool(adv.loss_mask[i].any())
                and not (skips and not bool(signal[i]))
            ]
            sums = {name: 0.0 for name in LOSS_METRIC_NAMES}
            self.optimizer.zero_grad(set_to_none=True)
            todo = self._micro_batches(rows, states)
            done = 0
            while done < len(todo) and not wave_done.is_set():  # loss sums; scaled in the update
                self._accumulate(states, adv, old, ref, todo[done : done + 1], 1, sums)
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
        spec: SpeculativeWave,
        extra: list[TrajectoryState],
        leftovers: list[TrajectoryState],
        states: list[TrajectoryState],
        originals: RolloutBatch,
        plan: ResamplePlan,
        prescored: list[Prescored],
    ) -> RolloutBatch:
        """Roll out the selected prefixes nobody speculated, score the originals, join the wave.

        The originals' old and reference logprobs do not depend on the wave, so they are scored
        now, one micro-batch at a time, by this thread and by the wave's thread once its own
        work is done, each single-threaded: a micro-batch gives the same bits whichever thread
        takes it. Appends the originals' and the speculated continuations' logprobs to
        ``prescored``; returns the resampled rows, rewarded.
        """
        tasks, old, ref, rows = self._original_scoring_tasks(states, originals, plan)
        spec.tasks.put_all(tasks)
        self._run_loop(leftovers)  # the wave's thread, once done, starts on the tasks meanwhile
        with single_threaded():
            spec.tasks.run()
        result = spec.result()
        prescored.append((rows, old[rows], ref[rows] if ref is not None else None))
        if result.old is not None:
            at = result.rows_of(extra)
            fork_rows, pos = [i for _, i in at], [p for p, _ in at]
            prescored.append((fork_rows, result.old[pos], result.ref[pos] if result.ref is not None else None))
        return self._rewarded(extra)

    def _original_scoring_tasks(
        self, states: list[TrajectoryState], originals: RolloutBatch, plan: ResamplePlan
    ) -> tuple[list[Callable[[], None]], torch.Tensor, torch.Tensor | None, list[int]]:
        """One task per micro-batch filling ``old``/``ref`` ([R0, S0]) of the originals that train.

        A row is left out only when it surely skips training (`RLConfig.skip_zero_advantage`):
        no GRPO signal and no selected prefix in its group, whose advantages resampling may change.
        """
        needed = originals.generated
        trains = needed.any(dim=1)  # the originals' loss tokens are their generated ones
        if self.cfg.skip_zero_advantage and self.loss_cfg.kl_coef == 0:
            adv = assemble_advantages(originals, None, self.axpo_cfg, self.adv_cfg)
            touched = torch.zeros(originals.num_groups, dtype=torch.bool)
            touched[originals.group[plan.selected]] = True
            trains &= ((adv.advantages != 0) & adv.loss_mask).any(dim=1) | touched[originals.group]
        rows = torch.nonzero(trains).flatten().tolist()
        old = torch.zeros(needed.shape, dtype=torch.float32)
        ref = torch.zeros(needed.shape, dtype=torch.float32) if self.reference is not None else None

        def task(mb: list[int]) -> None:
            old[mb] = self._score(self.model, states, needed, [mb])[mb]
            if ref is not None:
                ref[mb] = self._score(self.reference, states, needed, [mb])[mb]

        return [functools.partial(task, mb) for mb in self._micro_batches(rows, states)], old, ref, rows

    def _confirm_early(self, pre: EarlyUpdate, adv: StepAdvantages, trained: set[int]) -> EarlyUpdate | None:
        """``pre`` if its rows train with exactly the step's final advantages and masks; else None.

        It holds by construction (their groups have no resampled rows); checked anyway, and on a
        mismatch the early gradients are dropped and every row is computed in the update.
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
                self.optimizer.zero_grad(set_to_none=True)
                return None
        return pre

"""The local AXPO / GRPO trainer: one RL step exactly as DESIGN.md §1, on a HF Qwen3-VL.

One `RLTrainer.step`:

1. **Questions.** B questions in a seeded order (a fresh permutation each epoch, a pure function of
   ``(seed, epoch)``); the position is part of the trainer's state.
2. **Rollouts.** N rollouts per question through `run_rollouts` (each its own seed, derived from
   ``(seed, step, question, sample)``), rewarded with `agent.trajectory_reward.score_trajectory` (the final assistant turn).
3. **Resampling** (``algorithm: axpo``). `plan_resampling` picks the prefixes; each is forked K
   times at its first ``<tool_call>`` (`fork_at_tool_call`; the generator prefills the shared
   prefix once) — or, with ``prefix_fixing`` off, K fresh rollouts of the question — and the
   continuations are rolled out, rewarded and appended after the originals.
4. **Advantages** with `assemble_advantages` (frozen prefixes, prompts and observations carry no
   loss).
5. **Logprobs.** Old-policy logprobs are recomputed with the current weights (no grad), and
   reference logprobs when the KL term is on, at the loss tokens only. A row with a non-finite
   logprob is dropped from the loss (``row_mask``) and counted.
6. **Update.** ``ppo_epochs`` x ``mini_batches`` optimizer steps of token-level PPO-clip
   (`core.policy_loss` with the mini-batch's token count, so micro-batch losses sum to the
   mini-batch loss), gradient accumulation over micro-batches, gradient clipping, AdamW; the LR
   schedule advances once per RL step. With one epoch and one mini-batch the old logprobs are
   computed on the same micro-batches as the training forward, so the first ratio is exactly 1.
   Without a KL term, rows whose advantages are all 0 (e.g. a group with equal rewards) have no
   gradient and are skipped in steps 5-6 (``skip_zero_advantage``).

Determinism: every random choice is a function of ``(seed, step, ...)`` — sampling seeds, the
``random`` selection seed, mini-batch shuffles — and the global RNG states are saved, so a run
resumed from `RLTrainer.state_dict` reproduces the uninterrupted run's metrics exactly (CPU).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from axpo_nemo.agent.loop import AgentLoopConfig, Generator, run_rollouts
from axpo_nemo.agent.protocol import ChatProtocol
from axpo_nemo.agent.rewards import RewardConfig
from axpo_nemo.agent.sample import Sample
from axpo_nemo.agent.tools.base import Tool
from axpo_nemo.agent.trajectory import TrajectoryState, derive_seed
from axpo_nemo.agent.trajectory_reward import score_trajectory
from axpo_nemo.config.rl import LOSS_METRIC_NAMES, RLConfig
from axpo_nemo.config.schema import ALGORITHMS
from axpo_nemo.core import (
    AdvantageConfig,
    AXPOConfig,
    LossConfig,
    ResamplePlan,
    RolloutBatch,
    StepAdvantages,
    assemble_advantages,
    policy_loss,
)
from axpo_nemo.local.optim import WarmupCosineSchedule, build_adamw, clip_and_step
from axpo_nemo.local.policy import iter_logprobs, plan_micro_batches
from axpo_nemo.local.resample_wave import EarlyUpdate, ResampleWave, confirm_early, single_threaded
from axpo_nemo.local.resumable import ResumableTrainer
from axpo_nemo.run.axpo_step import COUNTERS, StepSettings, build_prompts, run_step
from axpo_nemo.run.axpo_step import StepRecord as SharedStepRecord
from axpo_nemo.run.data_cursor import dataset_fingerprint

__all__ = ["LOSS_METRIC_NAMES", "RLConfig", "RLTrainer", "StepRecord"]

#: ``reward_fn(state, sample) -> (reward, correct)`` replaces `score_answer` when given.
RewardFn = Callable[[TrajectoryState, Sample], tuple[float, bool]]


@dataclass
class StepRecord(SharedStepRecord):
    """What the last step trained on (for inspection and tests): `run.axpo_step.StepRecord` plus

    Attributes:
        old_logprobs: ``[R, S]`` the pre-update policy's logprobs at the loss tokens (0 on rows
            skipped for having no advantage signal).
        row_mask: ``[R]`` rows kept in the loss (False: non-finite logprobs).
    """

    old_logprobs: torch.Tensor
    row_mask: torch.Tensor


class RLTrainer(ResumableTrainer):
    """AXPO / GRPO training of a local policy (see the module docstring for one step).

    Args:
        policy_bundle: the policy (its model is trained in place; the generator must sample from
            the same model object so rollouts are on-policy).
        reference_model: frozen reference for the KL term; None when ``loss_cfg.kl_coef == 0``.
        questions: the RL questions.
        data_root: folder the questions' image paths are relative to.
        tools: tools by name (declared in prompts, restricted per question by ``allowed_tools``).
        protocol: chat protocol of the policy's processor.
        generator: sampling backend (e.g. `LocalGenerator.from_bundle(policy_bundle)`).
        axpo_cfg, adv_cfg, loss_cfg: the algorithm's settings.
        rl_cfg: `RLConfig`.
        loop_cfg: turn/token limits and sampling settings (the ``rollout`` section).
        reward_cfg: reward settings for `score_answer`.
        questions_per_step, group_size: B and N (the ``rollout`` section's).
        reward_fn: optional ``(state, sample) -> (reward, correct)`` replacing `score_answer`.
        algorithm: ``axpo`` or ``grpo`` (the config's run-wide ``algorithm``).
    """

    data_name = "questions"

    def __init__(
        self,
        policy_bundle,
        reference_model,
        questions: Sequence[Sample],
        data_root: str | Path,
        tools: Mapping[str, Tool],
        protocol: ChatProtocol,
        generator: Generator,
        axpo_cfg: AXPOConfig,
        adv_cfg: AdvantageConfig,
        loss_cfg: LossConfig,
        rl_cfg: RLConfig,
        loop_cfg: AgentLoopConfig,
        reward_cfg: RewardConfig | None = None,
        *,
        questions_per_step: int,
        group_size: int,
        reward_fn: RewardFn | None = None,
        algorithm: str = "axpo",
    ) -> None:
        if algorithm not in ALGORITHMS:
            raise ValueError(f"RLTrainer: algorithm must be one of {', '.join(ALGORITHMS)} (got {algorithm!r})")
        if not questions:
            raise ValueError("RLTrainer: no questions")
        if questions_per_step < 1 or group_size < 1:
            raise ValueError(f"RLTrainer: B={questions_per_step} and N={group_size} must be >= 1")
        if loss_cfg.kl_coef > 0 and reference_model is None:
            raise ValueError("RLTrainer: loss.kl_coef > 0 needs a reference model")
        if reference_model is not None and reference_model is policy_bundle.model:
            raise ValueError("RLTrainer: the reference model must be a frozen copy, not the policy itself")
        self.bundle = policy_bundle
        self.model = policy_bundle.model
        self.model.eval()  # no dropout: old and new logprobs come from the same function
        self.reference = reference_model if loss_cfg.kl_coef > 0 else None
        if self.reference is not None:
            self.reference.eval().requires_grad_(False)
        self.questions = list(questions)
        self.fingerprint = dataset_fingerprint(q.id for q in self.questions)
        self.data_root = Path(data_root)
        self.tools = dict(tools)
        self.protocol = protocol
        self.generator = generator
        self.axpo_cfg, self.adv_cfg, self.loss_cfg = axpo_cfg, adv_cfg, loss_cfg
        self.cfg = rl_cfg
        self.algorithm = algorithm
        self.questions_per_step, self.group_size = int(questions_per_step), int(group_size)
        self.loop_cfg = loop_cfg
        self.reward_cfg = reward_cfg or RewardConfig()
        self.reward_fn = reward_fn
        self.pad_id = policy_bundle.tokenizer.pad_token_id or 0
        self.temperature = loop_cfg.temperature if loop_cfg.temperature > 0 else 1.0
        self.optimizer = build_adamw(self.model, rl_cfg.lr, rl_cfg.weight_decay)
        self.scheduler = WarmupCosineSchedule(
            self.optimizer, rl_cfg.warmup_steps, rl_cfg.steps, rl_cfg.min_lr_ratio
        )
        self.step_count = 0
        self.epoch = 0
        self.position = 0
        self.counters: dict[str, float] = {**dict.fromkeys(COUNTERS, 0), "skipped_updates": 0}
        self.settings = StepSettings(
            algorithm, axpo_cfg, adv_cfg, self.group_size, rl_cfg.seed, policy_bundle.tokenizer.pad_token_id or 0
        )
        self._wave: ResampleWave | None = None
        self.last: StepRecord | None = None
        self.last_early_micro_batches = 0  # of the last step (see `RLConfig.overlap_scoring`)

    # -- data ----------------------------------------------------------------------------------

    def _permutation(self, epoch: int) -> list[int]:
        rng = np.random.default_rng([int(self.cfg.seed) & 0xFFFFFFFF, int(epoch)])
        return rng.permutation(len(self.questions)).tolist()

    def draw_questions(self) -> list[int]:
        """The next B question indices (advances the data position, rolling over epochs)."""
        out: list[int] = []
        perm = self._permutation(self.epoch)
        while len(out) < self.questions_per_step:
            if self.position >= len(perm):
                self.epoch, self.position = self.epoch + 1, 0
                perm = self._permutation(self.epoch)
            take = min(self.questions_per_step - len(out), len(perm) - self.position)
            out.extend(perm[self.position : self.position + take])
            self.position += take
        return out

    # -- rollouts ------------------------------------------------------------------------------

    def _reward(self, state: TrajectoryState) -> tuple[float, bool]:
        sample = self.questions[state.metadata["question"]]
        if self.reward_fn is not None:
            reward, correct = self.reward_fn(state, sample)
            return float(reward), bool(correct)
        res = score_trajectory(state, sample, self.protocol, self.reward_cfg)
        return res.reward, res.correct

    def _run_loop(self, states: list[TrajectoryState], on_round_end: Callable[[int], None] | None = None) -> None:
        run_rollouts(
            states, self.generator, self.tools, self.loop_cfg, protocol=self.protocol,
            allowed_tools=lambda s: self.questions[s.metadata["question"]].allowed_tools,
            on_round_end=on_round_end,
        )  # fmt: skip

    def _rewarded(self, states: list[TrajectoryState]) -> RolloutBatch:
        out = []
        for s in states:
            reward, correct = self._reward(s)
            out.append(s.to_rollout(reward=reward, correct=correct))
        return RolloutBatch.from_rollouts(out, pad_id=self.pad_id)

    def _plan_seed(self) -> int:
        return derive_seed("plan", self.cfg.seed, self.step_count)

    # -- logprobs and update -------------------------------------------------------------------

    def _micro_batches(self, rows: list[int], states: Sequence[TrajectoryState]) -> list[list[int]]:
        return plan_micro_batches(
            states, self.cfg.micro_batch_size, self.cfg.micro_batch_tokens or None, rows=rows
        )

    def _score(self, model, states, needed: torch.Tensor, batches: list[list[int]]) -> torch.Tensor:
        """``[R, S]`` logprobs (CPU, no grad) at the ``needed`` positions, on the given micro-batches."""
        out = torch.zeros(needed.shape, dtype=torch.float32)
        with torch.no_grad():
            for chunk in iter_logprobs(
                model,
                states,
                micro_batch_size=self.cfg.micro_batch_size,
                temperature=self.temperature,
                needed=needed,
                pad_id=self.pad_id,
                batches=batches,
            ):
                out[chunk.rows, : chunk.logprobs.shape[1]] = chunk.logprobs.cpu()
        return out

    def _score_continuations(
        self, states: list[TrajectoryState], needed: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Old and reference logprobs of speculated continuations (on their own micro-batches)."""
        return self._score_pair(states, needed, self._micro_batches(list(range(len(states))), states))

    def _score_pair(
        self, states, needed: torch.Tensor, batches: list[list[int]]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Old-policy and reference (None without KL) logprobs, as `_score` computes them."""
        old = self._score(self.model, states, needed, batches)
        ref = self._score(self.reference, states, needed, batches) if self.reference is not None else None
        return old, ref

    def _mini_batches(self, rows: list[int], epoch: int) -> list[list[int]]:
        if self.cfg.mini_batches == 1 and epoch == 0:
            return [rows]
        rng = np.random.default_rng([int(self.cfg.seed) & 0xFFFFFFFF, self.step_count, epoch])
        order = [rows[i] for i in rng.permutation(len(rows)).tolist()]
        return [
            part.tolist() for part in np.array_split(np.array(order, dtype=np.int64), self.cfg.mini_batches)
        ]

    def _update(
        self,
        states: list[TrajectoryState],
        adv: StepAdvantages,
        old: torch.Tensor,
        ref: torch.Tensor | None,
        rows: list[int],
        first_batches: list[list[int]],
        skip: set[int],
        pre: EarlyUpdate | None = None,
    ) -> dict[str, float]:
        """PPO epochs x mini-batches of optimizer steps; returns the averaged loss metrics.

        Mini-batches split all loss rows (``rows``), so each optimizer step averages over the
        same tokens with or without skipping; rows in ``skip`` (no gradient) are not computed.
        With ``pre``, the first (only) optimizer step continues from the loss sums its micro-batches
        left during the resample wave, does its remaining ones, then ``first_batches`` (the other
        rows), and scales the sums to the step's token average once.
        """
        totals: dict[str, float] = {name: 0.0 for name in LOSS_METRIC_NAMES}
        totals["grad_norm"] = 0.0
        entropy_sum, entropy_tokens = 0.0, 0.0
        updates = 0
        for epoch in range(self.cfg.ppo_epochs):
            for mb in self._mini_batches(rows, epoch):
                if not mb:
                    continue
                num_tokens = int(adv.loss_mask[mb].sum())
                computed = [i for i in mb if i not in skip]
                batches = (
                    first_batches
                    if (epoch == 0 and len(mb) == len(rows))
                    else self._micro_batches(computed, states)
                )
                step_metrics_sum: dict[str, float] = {name: 0.0 for name in LOSS_METRIC_NAMES}
                skipped_tokens = int(adv.loss_mask[[i for i in mb if i in skip]].sum())
                step_metrics_sum["ratio_mean"] = skipped_tokens / max(num_tokens, 1)
                if pre is not None and updates == 0:
                    # Continue the early sums in the same order (the rest of those micro-batches
                    # single-threaded, as they run during the wave), then scale once.
                    sums = dict(pre.sums)
                    with single_threaded():
                        self._accumulate(states, adv, old, ref, pre.remaining, 1, sums)
                    self._accumulate(states, adv, old, ref, batches, 1, sums)
                    scale = 1.0 / max(num_tokens, 1)
                    for param in self.model.parameters():
                        if param.grad is not None:
                            param.grad.mul_(scale)
                    for name, value in sums.items():
                        step_metrics_sum[name] += value * scale
                else:
                    self.optimizer.zero_grad(set_to_none=True)
                    ent = self._accumulate(
                        states, adv, old, ref, batches, num_tokens, step_metrics_sum,
                        entropy=self.cfg.log_entropy and epoch == 0,
                    )  # fmt: skip
                    entropy_sum, entropy_tokens = entropy_sum + ent[0], entropy_tokens + ent[1]
                grad_norm, stepped = clip_and_step(self.model, self.optimizer, self.cfg.grad_clip)
                self.counters["skipped_updates"] += int(not stepped)
                for name, value in step_metrics_sum.items():
                    totals[name] += value
                totals["grad_norm"] += grad_norm
                updates += 1
        out = {name: value / max(updates, 1) for name, value in totals.items()}
        out["optimizer_steps"] = float(updates)
        if self.cfg.log_entropy:
            out["entropy"] = entropy_sum / entropy_tokens if entropy_tokens else math.nan
        return out

    def _accumulate(
        self,
        states: list[TrajectoryState],
        adv: StepAdvantages,
        old: torch.Tensor,
        ref: torch.Tensor | None,
        batches: list[list[int]],
        num_tokens: int,
        sums: dict[str, float],
        entropy: bool = False,
    ) -> tuple[float, float]:
        """Backpropagate the loss of ``batches`` (gradients accumulate) normalised by ``num_tokens``.

        Adds each micro-batch's loss metrics to ``sums``; returns (entropy sum, entropy tokens).
        """
        dev = next(self.model.parameters()).device
        entropy_sum, entropy_tokens = 0.0, 0.0
        for chunk in iter_logprobs(
            self.model,
            states,
            micro_batch_size=self.cfg.micro_batch_size,
            temperature=self.temperature,
            needed=adv.loss_mask,
            entropy=entropy,
            pad_id=self.pad_id,
            batches=batches,
        ):
            r, w = chunk.rows, chunk.logprobs.shape[1]
            mask = adv.loss_mask[r, :w].to(dev)
            loss, m = policy_loss(
                chunk.logprobs,
                old[r, :w].to(dev),
                adv.advantages[r, :w].to(dev),
                mask,
                self.loss_cfg,
                ref_logprobs=ref[r, :w].to(dev) if ref is not None else None,
                num_tokens=num_tokens,
            )
            loss.backward()
            sums["loss"] += float(loss.detach())
            for name in LOSS_METRIC_NAMES[1:]:
                sums[name] += float(m[name])
            if chunk.entropy is not None:
                entropy_sum += float((chunk.entropy.detach() * mask).sum())
                entropy_tokens += float(mask.sum())
        return entropy_sum, entropy_tokens

    # -- the step ------------------------------------------------------------------------------

    def step(self) -> dict[str, float]:
        """One RL step (`run.axpo_step.run_step`, the module docstring); returns its metrics.

        Metrics: every name in `core.STEP_METRIC_NAMES`; the loss metrics (`LOSS_METRIC_NAMES`,
        averaged over optimizer steps) with ``grad_norm``, ``lr``, ``optimizer_steps`` (and
        ``entropy`` if enabled); ``reward_mean`` (originals) and ``resample_reward_mean``;
        ``rows``, ``loss_tokens``, ``total_tokens``, ``generated_tokens``, ``nonfinite_rows``,
        ``zero_advantage_rows`` (skipped, see `RLConfig.skip_zero_advantage`);
        ``speculated_prefixes`` and ``speculation_hits`` (speculated prefixes the plan selected,
        see `RLConfig.speculative_resampling`);
        timings ``rollout_s``, ``resample_s``, ``logprob_s``, ``train_s``, ``step_s``; ``step``
        and ``epoch``.
        """
        picks = self.draw_questions()
        prompts = build_prompts(self.questions, picks, self.protocol, self.data_root, self.tools)
        _, metrics = run_step(self, self.questions, picks, prompts, self.settings, self.step_count, self.counters)
        self.step_count += 1
        metrics.update({"step": float(self.step_count), "epoch": float(self.epoch)})
        return metrics

    # -- the StepBackend protocol (run.axpo_step) ------------------------------------------------

    @contextlib.contextmanager
    def generating(self) -> Iterator[ResampleWave]:
        """This step's `ResampleWave` (speculation and overlap included), closed at the end."""
        speculate = self.algorithm == "axpo" and self.cfg.speculative_resampling
        self._wave = ResampleWave(self, speculate=speculate, plan_seed=self._plan_seed())
        try:
            yield self._wave
        except BaseException:
            self._wave.cancel()  # e.g. Ctrl-C: do not wait for the wave to finish its rollouts
            raise
        finally:
            self._wave.close()

    def row_mask(self, batch: RolloutBatch) -> None:
        """Every row may train (non-finite logprobs are found, and dropped, in `update`)."""
        return None

    def update(
        self, batch: RolloutBatch, plan: ResamplePlan | None, adv: StepAdvantages, all_states: list[TrajectoryState]
    ) -> dict[str, float]:
        """Old/reference logprobs (reusing what the wave scored), then `_update`; the update's metrics."""
        t_start = time.perf_counter()
        cfg, wave = self.cfg, self._wave
        rows = [i for i in range(batch.num_rows) if bool(adv.loss_mask[i].any())]
        skip: set[int] = set()
        if cfg.skip_zero_advantage and self.loss_cfg.kl_coef == 0:
            signal = ((adv.advantages != 0) & adv.loss_mask).any(dim=1)
            skip = {i for i in rows if not bool(signal[i])}
        batches = self._micro_batches([i for i in rows if i not in skip], all_states)
        prescored = list(wave.prescored)
        if wave.early is not None:
            prescored.append((list(range(wave.num_originals)), wave.early[0], wave.early[1]))
        if not prescored:
            old, ref = self._score_pair(all_states, adv.loss_mask, batches)
        else:  # only the rows nobody scored yet
            known = {i for part_rows, _, _ in prescored for i in part_rows}
            late = self._micro_batches([i for i in rows if i not in skip and i not in known], all_states)
            old, ref = self._score_pair(all_states, adv.loss_mask, late)
            for part_rows, part_old, part_ref in prescored:
                width = min(part_old.shape[1], old.shape[1])  # discarded continuations may be longer
                old[part_rows, :width] = part_old[:, :width]
                if ref is not None and part_ref is not None:
                    ref[part_rows, :width] = part_ref[:, :width]
        finite = torch.where(adv.loss_mask, old, 0.0).isfinite().all(dim=1)
        if ref is not None:
            finite &= torch.where(adv.loss_mask, ref, 0.0).isfinite().all(dim=1)
        nonfinite = int((~finite).sum())
        if nonfinite:  # those rows leave the loss; their rewards still count in their groups
            adv = assemble_advantages(batch, plan, self.axpo_cfg, self.adv_cfg, row_mask=finite)
            rows = [i for i in rows if bool(finite[i])]
            batches = [[i for i in mb if bool(finite[i])] for mb in batches]
            batches = [mb for mb in batches if mb]
        pre = wave.pre
        # Timing-dependent, so not a step metric: metrics must not depend on machine load.
        self.last_early_micro_batches = pre.done if pre is not None else 0
        if pre is not None:
            pre = confirm_early(pre, adv, set(rows) - skip, self.optimizer)
            if pre is not None:
                done = set(pre.rows)
                batches = self._micro_batches([i for i in rows if i not in skip and i not in done], all_states)
        t_logprob = time.perf_counter()

        lr = self.scheduler.apply()
        metrics = self._update(all_states, adv, old, ref, rows, batches, skip, pre)
        self.scheduler.step()
        t_train = time.perf_counter()
        self.last = StepRecord(all_states, batch, plan, adv, old, finite)
        metrics.update(
            {
                "lr": lr,
                "loss_tokens": float(adv.loss_mask.sum()),
                "nonfinite_rows": float(nonfinite),
                "zero_advantage_rows": float(len(skip)),
                "speculated_prefixes": float(len(wave.speculated)),
                "speculation_hits": float(len(wave.hits)),
                "logprob_s": t_logprob - t_start,
                "train_s": t_train - t_logprob,
            }
        )
        return metrics

    def train(
        self, steps: int | None = None, log: Callable[[dict[str, float]], None] | None = None
    ) -> list[dict]:
        """Run ``steps`` steps (default: up to ``rl_cfg.steps``), calling ``log(metrics)`` after each."""
        n = steps if steps is not None else max(self.cfg.steps - self.step_count, 0)
        history = []
        for _ in range(n):
            metrics = self.step()
            history.append(metrics)
            if log is not None:
                log(metrics)
        return history

    # -- checkpointing -------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs to continue exactly (tensors cloned).

        Holds the policy weights, optimizer and schedule, global RNG states, the data position,
        the step and the cumulative counters. The reference model is not included: it is the
        frozen initial policy, rebuilt from its checkpoint.
        """
        return {
            **self.training_state(),
            "counters": dict(self.counters),
            "config": {
                "algorithm": self.algorithm,
                "rl": asdict(self.cfg),
                "axpo": asdict(self.axpo_cfg),
                "advantage": asdict(self.adv_cfg),
                "loss": asdict(self.loss_cfg),
            },
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a `state_dict`.

        If the questions changed since it was taken (another fingerprint), the stored position
        means nothing: the epoch restarts at its first question, with a warning.
        """
        self.restore_training_state(state)
        self.counters = dict(state["counters"])

"""Supervised fine-tuning on tool-use trajectories, tokenized exactly as RL would produce them.

Each `Sample`'s assistant turns are replayed through the real agent loop (`agent.replay`): the
tools run for real and the observation tokens and images are the ones RL rollouts get, so SFT and
RL train on one token layout. The loss is token-level cross-entropy on the assistant's tokens
only (``state.generated``): prompt and tool-observation tokens never carry loss. Tokens are
averaged over the whole optimizer batch (gradient accumulation over micro-batches gives exactly
the full-batch gradient).

Before that, two optional warm-ups for a model built from scratch (`SFTConfig`): copy warm-up
steps (`copy_warmup`: random-token sequences that repeat a span, which grow the induction heads
a pretrained checkpoint has) and short-context epochs (the same examples with the tool schemas
left out of the prompt). Both are pure functions of the step count. Then SFT on the full prompts.

Data order is a pure function of ``(seed, epoch)``; with ``bucket_by_length`` each window of
``batch_size · bucket_batches`` shuffled examples is sorted by length and cut into batches, whose
order is then shuffled, so batches hold similar lengths (little padding) without a fixed order.
`SFTTrainer.state_dict` holds the model, optimizer, schedule, RNG states and data position: a run
resumed from it continues bit-identically (CPU).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from axpo_nemo.agent.loop import AgentLoopConfig
from axpo_nemo.agent.protocol import ChatProtocol
from axpo_nemo.agent.sample import Sample
from axpo_nemo.agent.sft_examples import SFTExample, assistant_turns, tokenize_samples
from axpo_nemo.agent.tools.base import Tool
from axpo_nemo.config.sft import SFTConfig
from axpo_nemo.local.copy_warmup import copy_batch, copy_loss
from axpo_nemo.local.optim import WarmupCosineSchedule, build_adamw, clip_and_step
from axpo_nemo.local.policy import iter_logprobs
from axpo_nemo.local.resumable import ResumableTrainer
from axpo_nemo.run.data_cursor import dataset_fingerprint

__all__ = ["SFTConfig", "SFTExample", "SFTTrainer", "assistant_turns", "epoch_batches", "tokenize_samples"]


logger = logging.getLogger(__name__)


def epoch_batches(
    lengths: Sequence[int], batch_size: int, seed: int, epoch: int, bucket_batches: int | None = None
) -> list[list[int]]:
    """The batches (example indices) of one epoch: a pure function of its arguments.

    Without bucketing (``bucket_batches`` None): a seeded permutation cut into batches. With it:
    windows of ``batch_size · bucket_batches`` permuted examples are sorted by length (longest
    first) and cut into batches, then the batch order is shuffled. Every epoch has
    ``ceil(n / batch_size)`` batches.
    """
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, int(epoch)])
    perm = rng.permutation(len(lengths)).tolist()
    if bucket_batches is None:
        return [perm[i : i + batch_size] for i in range(0, len(perm), batch_size)]
    window = batch_size * bucket_batches
    batches = []
    for w in range(0, len(perm), window):
        chunk = sorted(perm[w : w + window], key=lambda i: (-int(lengths[i]), i))
        batches.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
    order = rng.permutation(len(batches)).tolist()
    return [batches[i] for i in order]


class SFTTrainer(ResumableTrainer):
    """Supervised fine-tuning of a `PolicyBundle` on replayed trajectories.

    Args:
        bundle: the policy (its model is trained in place).
        samples: SFT samples (``messages`` holds the assistant turns).
        data_root: folder the samples' image paths are relative to.
        tools: the tools the replay executes (e.g. `build_tools(cfg.tools)`).
        protocol: the chat protocol of ``bundle.processor``.
        cfg: `SFTConfig`.
        loop_cfg: turn and token limits of the replay (as in RL).

    Raises ValueError when no sample survives tokenization.
    """

    data_name = "examples"

    def __init__(
        self,
        bundle,
        samples: Sequence[Sample],
        data_root: str | Path,
        tools: Mapping[str, Tool],
        protocol: ChatProtocol,
        cfg: SFTConfig,
        loop_cfg: AgentLoopConfig,
    ) -> None:
        self.bundle = bundle
        self.model = bundle.model
        self.cfg = cfg
        self.pad_id = bundle.tokenizer.pad_token_id or 0
        self.examples, self.skipped, self.skipped_samples = tokenize_samples(
            samples, data_root, tools, protocol, loop_cfg, cfg.max_tokens
        )
        if not self.examples:
            raise ValueError(f"SFT: no usable sample among {len(samples)} (skipped: {dict(self.skipped)})")
        self.lengths = [len(e) for e in self.examples]
        self.fingerprint = dataset_fingerprint(f"{e.sample_id}:{len(e)}" for e in self.examples)
        self.batches_per_epoch = math.ceil(len(self.examples) / cfg.batch_size)
        self.short_examples: list[SFTExample] = []
        if cfg.short_context_epochs:
            self.short_examples, _, _ = tokenize_samples(
                samples, data_root, tools, protocol, loop_cfg, cfg.max_tokens, declare_tools=False
            )
        self.short_batches_per_epoch = math.ceil(len(self.short_examples) / cfg.batch_size)
        self._short_batches: tuple[int, list[list[int]]] | None = None  # (epoch, its batches)
        #: the step at which SFT on full prompts starts (after the copy and short-context warm-ups)
        self.full_prompt_start = cfg.copy_warmup_steps + cfg.short_context_epochs * self.short_batches_per_epoch
        self.vocab_limit = min(bundle.tokenizer.all_special_ids or [len(bundle.tokenizer)])
        # the digits and the space around them: numbers are what SFT copies most
        digit_ids = {t for c in "0123456789 " for t in bundle.tokenizer.encode(c, add_special_tokens=False)}
        self.copy_alphabet = torch.tensor(sorted(digit_ids))
        self.total_steps = self.full_prompt_start + (cfg.steps or cfg.epochs * self.batches_per_epoch)
        self.optimizer = build_adamw(self.model, cfg.lr, cfg.weight_decay)
        self.scheduler = WarmupCosineSchedule(
            self.optimizer, cfg.warmup_steps, self.total_steps, cfg.min_lr_ratio
        )
        self.step_count = 0
        self.epoch = 0
        self.position = 0  # next batch of the current epoch
        self.skipped_updates = 0
        self._batches: list[list[int]] | None = None

    # -- data ----------------------------------------------------------------------------------

    def _epoch_batches(self) -> list[list[int]]:
        if self._batches is None:
            bucket = self.cfg.bucket_batches if self.cfg.bucket_by_length else None
            self._batches = epoch_batches(
                self.lengths, self.cfg.batch_size, self.cfg.seed, self.epoch, bucket
            )
        return self._batches

    def _warmup_batch(self) -> list[SFTExample] | None:
        """The short-context examples of this step, or None past the short-context epochs."""
        if self.step_count >= self.full_prompt_start:
            return None
        epoch, position = divmod(self.step_count - self.cfg.copy_warmup_steps, self.short_batches_per_epoch)
        if self._short_batches is None or self._short_batches[0] != epoch:
            lengths = [len(e) for e in self.short_examples]
            bucket = self.cfg.bucket_batches if self.cfg.bucket_by_length else None
            # other epoch numbers than the main phase's, so the two orders differ
            order = epoch_batches(lengths, self.cfg.batch_size, self.cfg.seed, 1_000_000 + epoch, bucket)
            self._short_batches = (epoch, order)
        return [self.short_examples[i] for i in self._short_batches[1][position]]

    def _copy_step(self, batch_size: int) -> float:
        """One copy batch's loss and backward (the caller steps the optimizer)."""
        span = 24
        tokens = copy_batch(
            self.vocab_limit, batch_size, span, 16, self.cfg.seed, self.step_count, self.copy_alphabet
        )
        loss = copy_loss(self.model, tokens, span)
        loss.backward()
        return float(loss.detach())

    def next_batch(self) -> list[int]:
        """The next batch's example indices (advances the data position, rolling over epochs)."""
        if self.position >= self.batches_per_epoch:
            self.epoch, self.position, self._batches = self.epoch + 1, 0, None
        batch = self._epoch_batches()[self.position]
        self.position += 1
        return batch

    @property
    def done(self) -> bool:
        """True once ``total_steps`` steps have run."""
        return self.step_count >= self.total_steps

    # -- training ------------------------------------------------------------------------------

    def step(self) -> dict[str, float]:
        """One optimizer step on the next batch; returns its metrics.

        Metrics: ``loss`` (mean NLL per assistant token of the batch), ``tokens`` (loss tokens),
        ``sequences``, ``lr``, ``grad_norm``, ``skipped_update`` (1 when a non-finite gradient
        norm dropped the update), ``epoch``, ``step`` (1-based), ``step_s`` and ``warmup`` (1:
        a copy warm-up step, 2: a short-context step, 0: SFT on full prompts), ``copy_loss`` (of the
        copy warm-up or rehearsal batch; NaN without one).
        """
        t0 = time.perf_counter()
        lr = self.scheduler.apply()
        self.model.zero_grad(set_to_none=True)
        copy = math.nan
        if self.step_count < self.cfg.copy_warmup_steps:
            warmup, seqs, num_tokens = 1.0, [], 0.0
            total = copy = self._copy_step(self.cfg.copy_warmup_batch)
        else:
            seqs = self._warmup_batch()
            warmup = 2.0 if seqs is not None else 0.0
            if seqs is None:
                seqs = [self.examples[i] for i in self.next_batch()]
            total, num_tokens = self._sft_backward(seqs)
            if self.cfg.copy_rehearsal_batch:
                copy = self._copy_step(self.cfg.copy_rehearsal_batch)
        grad_norm, stepped = clip_and_step(self.model, self.optimizer, self.cfg.grad_clip)
        self.scheduler.step()
        self.skipped_updates += int(not stepped)
        self.step_count += 1
        return {
            "step": float(self.step_count),
            "epoch": float(self.epoch),
            "loss": total,
            "tokens": num_tokens,
            "sequences": float(len(seqs)),
            "lr": lr,
            "grad_norm": grad_norm,
            "skipped_update": float(not stepped),
            "warmup": warmup,
            "copy_loss": copy,
            "step_s": time.perf_counter() - t0,
        }

    def _sft_backward(self, seqs: list[SFTExample]) -> tuple[float, float]:
        """Backward of the batch's mean NLL per assistant token (tokens after a tool observation
        weighted by ``observation_weight``); returns (loss, loss tokens)."""
        masks = [e.loss_mask for e in seqs]
        num_tokens = float(sum(int(m.sum()) for m in masks))
        w_obs = self.cfg.observation_weight
        weights = masks  # plain SFT: no per-step weight masks
        if w_obs != 1.0:
            weights = [m.float() + (w_obs - 1.0) * e.after_observation.float() for m, e in zip(masks, seqs, strict=True)]
        total = 0.0
        for chunk in iter_logprobs(
            self.model,
            seqs,
            micro_batch_size=self.cfg.micro_batch_size,
            max_tokens=self.cfg.micro_batch_tokens or None,
            needed=masks,
            pad_id=self.pad_id,
        ):
            w = chunk.logprobs.shape[1]
            mask = torch.stack(
                [torch.nn.functional.pad(weights[i], (0, w - weights[i].numel())) for i in chunk.rows]
            )
            mask = mask.to(chunk.logprobs.device)
            loss = -(chunk.logprobs * mask).sum() / max(num_tokens, 1.0)
            loss.backward()
            total += float(loss.detach())
        return total, num_tokens

    def train(
        self, steps: int | None = None, log: Callable[[dict[str, float]], None] | None = None
    ) -> list[dict]:
        """Run ``steps`` steps (default: until ``total_steps``); returns every step's metrics.

        Every ``log_every`` steps a metrics line is logged and ``log(metrics)`` called.
        """
        n = steps if steps is not None else max(self.total_steps - self.step_count, 0)
        history = []
        for _ in range(n):
            metrics = self.step()
            history.append(metrics)
            if self.step_count % self.cfg.log_every == 0 or self.done:
                logger.info(
                    "sft step %d/%d loss %.4f lr %.3g grad_norm %.3f",
                    self.step_count, self.total_steps, metrics["loss"], metrics["lr"], metrics["grad_norm"],
                )  # fmt: skip
                if log is not None:
                    log(metrics)
        return history

    # -- checkpointing -------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly: weights, optimizer, schedule, RNGs, data position.

        Tensors are cloned, so the snapshot does not change as training continues.
        """
        return {
            **self.training_state(),
            "skipped_updates": self.skipped_updates,
            "config": asdict(self.cfg),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a `state_dict`.

        If the examples changed since it was taken (another fingerprint), the stored position
        means nothing: the epoch restarts at its first batch, with a warning.
        """
        self.restore_training_state(state)
        self._batches = None
        self.skipped_updates = int(state.get("skipped_updates", 0))

"""Settings of supervised fine-tuning (`SFTConfig`), apart from the trainer so that loading a config
imports no torch.
"""

from __future__ import annotations

from dataclasses import dataclass

from axpo_nemo.core.config import ValidatedConfig, setting

__all__ = ["SFTConfig"]


@dataclass
class SFTConfig(ValidatedConfig):
    """Settings of supervised fine-tuning."""

    steps: int = setting(
        0, "Optimizer steps on full prompts; 0 means `epochs` passes (the warm-ups below come first).", ge=0
    )
    epochs: int = setting(1, "Passes over the data when steps is 0.", ge=1)
    lr: float = setting(1e-5, "Peak learning rate (AdamW).", gt=0.0)
    warmup_steps: int = setting(10, "Linear warm-up steps.", ge=0)
    min_lr_ratio: float = setting(0.1, "Cosine decay ends at lr · min_lr_ratio.", ge=0.0, le=1.0)
    weight_decay: float = setting(0.0, "AdamW weight decay (matrices only).", ge=0.0)
    batch_size: int = setting(16, "Sequences per optimizer step.", ge=1)
    micro_batch_size: int = setting(4, "Sequences per forward/backward pass at most.", ge=1)
    micro_batch_tokens: int = setting(
        0,
        "Tokens encoded per forward pass at most (a shared prefix counts once, padding counts); 0: no limit.",
        ge=0,
    )
    grad_clip: float = setting(1.0, "Clip the global gradient norm to this; 0: no clipping.", ge=0.0)
    max_tokens: int = setting(8192, "Sequences longer than this (after replay) are skipped.", ge=2)
    bucket_by_length: bool = setting(True, "Batch examples of similar length together (less padding).")
    bucket_batches: int = setting(16, "Batches per length-sorting window when bucketing.", ge=1)
    copy_warmup_steps: int = setting(
        0,
        "Steps of language modelling on random-token copy sequences before SFT (local backend): the "
        "induction heads a pretrained checkpoint has, for a tiny model built from scratch. 0 for "
        "real checkpoints.",
        ge=0,
    )
    copy_warmup_batch: int = setting(32, "Sequences per copy warm-up step.", ge=1)
    copy_rehearsal_batch: int = setting(
        0,
        "Copy sequences added to every step after the copy warm-up (local backend), so that SFT keeps "
        "the copy circuit the warm-up grew instead of overwriting it. 0: none.",
        ge=0,
    )
    observation_weight: float = setting(
        1.0,
        "Loss weight of the assistant tokens that follow a tool observation (the answer read from "
        "the tool's output); the mean stays over the plain token count. A tiny model built from "
        "scratch learned to copy the output on some seeds only: those few tokens carry little of "
        "the loss (docs/results.md). 1: plain SFT.",
        ge=0.0,
    )
    short_context_epochs: int = setting(
        0,
        "Epochs over the data with the prompts' tool schemas left out, before the `epochs` with "
        "full prompts (local backend): a tiny model learns to copy in a short context first; in "
        "the ~1,100-token prompt of three tool schemas it does not within minutes.",
        ge=0,
    )
    seed: int = setting(0, "Seed of the data order.")
    log_every: int = setting(10, "Log a metrics line every this many steps in `train`.", ge=1)

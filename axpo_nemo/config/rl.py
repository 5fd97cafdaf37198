"""Settings of the local RL trainer (`RLConfig`), apart from the trainer so that loading a config
imports no torch.
"""

from __future__ import annotations

from dataclasses import dataclass

from axpo_nemo.core.config import ValidatedConfig, setting

__all__ = ["LOSS_METRIC_NAMES", "RLConfig"]


@dataclass
class RLConfig(ValidatedConfig):
    """Settings of the local RL trainer (the algorithm is the run-wide ``algorithm``; its knobs live
    in AXPO/Advantage/LossConfig)."""

    steps: int = setting(100, "RL steps.", ge=1)
    lr: float = setting(1e-6, "Peak learning rate (AdamW).", gt=0.0)
    warmup_steps: int = setting(0, "Linear warm-up steps.", ge=0)
    min_lr_ratio: float = setting(
        1.0, "Cosine decay ends at lr · min_lr_ratio (1.0: constant after warm-up).", ge=0.0, le=1.0
    )
    weight_decay: float = setting(0.0, "AdamW weight decay (matrices only).", ge=0.0)
    grad_clip: float = setting(1.0, "Clip the global gradient norm to this; 0: no clipping.", ge=0.0)
    micro_batch_size: int = setting(8, "Sequences per forward/backward pass at most.", ge=1)
    micro_batch_tokens: int = setting(
        0,
        "Tokens encoded per forward pass at most (a shared prefix counts once, padding counts); 0: no limit.",
        ge=0,
    )
    ppo_epochs: int = setting(1, "Passes over each step's rollouts.", ge=1)
    mini_batches: int = setting(1, "Optimizer steps per pass (rollout rows split evenly).", ge=1)
    skip_zero_advantage: bool = setting(
        True,
        "With the KL term off (loss.kl_coef 0), rows whose loss tokens all have advantage 0 carry "
        "no gradient: skip their logprob and training passes. Exact: the token average still "
        "counts their tokens (as ratio 1, unclipped, in the ratio metrics).",
    )
    log_entropy: bool = setting(False, "Report the policy entropy on loss tokens (costs a softmax).")
    overlap_scoring: bool = setting(
        True,
        "AXPO, when the wave was not speculated (`speculative_resampling` off, or no speculated "
        "prefix selected): while the resample wave generates, a second thread computes the original rollouts' "
        "old and reference logprobs and (one optimizer step per RL step, i.e. ppo_epochs = "
        "mini_batches = 1) backpropagates the rows of groups with no selected prefix, whose "
        "advantages the wave cannot change. Same update up to float summation order; on a CPU it "
        "puts the core that single-threaded decoding leaves idle to work.",
    )
    speculative_resampling: bool = setting(
        True,
        "AXPO: once every original rollout's first turn is done (the candidate prefixes are then "
        "final), guess the plan as if every group with a tool-using rollout ended all wrong "
        "(`core.speculative_plan`) and roll those prefixes' continuations out, and score them, on "
        "a second thread while the originals finish. The final plan uses the ones it selects "
        "(continuations are seeded by source row, so they are the ones the wave would sample) and "
        "rolls out the rest afterwards, while both threads score the originals one micro-batch "
        "each at a time. Same rollouts up to float noise from batch composition, and independent "
        "of thread timing; on a CPU it moves the wave onto the core single-threaded decoding leaves idle.",
    )
    speculative_extra_prefixes: int = setting(
        0,
        "Prefixes speculated beyond the budget M, the next in selection order: each covers a "
        "guessed group that ends with a correct tool rollout (not triggered). Costs second-"
        "thread work and discarded rollouts; worth it once tool rollouts are often right.",
        ge=0,
    )
    seed: int = setting(0, "Seed of question order, sampling, selection and mini-batch shuffles.")


#: Loss metrics `RLTrainer.step` reports (averaged over the step's optimizer steps).
LOSS_METRIC_NAMES = (
    "loss",
    "pg_loss",
    "kl_penalty",
    "clip_fraction_low",
    "clip_fraction_high",
    "dual_clip_fraction",
    "ratio_mean",
)

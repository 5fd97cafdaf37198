"""Framework-free AXPO: the algorithm of DESIGN.md §1, on torch tensors only.

Every backend (the local trainer, the NeMo-RL loop) calls these functions unchanged; any other
RL framework can too. Nothing here imports a backend, a model library or the agent code.

One training step::

    import torch
    from axpo_nemo import core

    axpo_cfg, adv_cfg, loss_cfg = core.AXPOConfig(), core.AdvantageConfig(), core.LossConfig()

    # 1. Your rollouts: B questions x N samples each, as token-level records.
    originals = core.RolloutBatch.from_rollouts([
        core.Rollout(group=q, token_ids=ids, prompt_len=p, generated=gen_mask, logprobs=lps,
                     reward=r, correct=ok, tool_calls=[core.ToolCallSpan(start=s, end=e)],
                     num_turns=t)
        for q, ids, p, gen_mask, lps, r, ok, s, e, t in my_rollouts
    ])

    # 2. Which prefixes to resample (triggered groups, uncertainty, budget, breadth-first).
    plan = core.plan_resampling(originals, axpo_cfg, seed=step)

    # 3. Your generator continues each selected prefix K times: fork row plan.selected[j] at
    #    plan.prefix_len[j] tokens and sample plan.k continuations; record them as Rollouts with
    #    source=int(plan.selected[j]) and prefix_len=int(plan.prefix_len[j]).
    batch = originals.concat(core.RolloutBatch.from_rollouts(continuations))

    # 4. Per-token advantages and loss mask for every row, then the loss.
    adv = core.assemble_advantages(batch, plan, axpo_cfg, adv_cfg)
    loss, loss_metrics = core.policy_loss(new_logprobs, old_logprobs, adv.advantages, adv.loss_mask,
                                          loss_cfg, ref_logprobs=ref_logprobs)
    metrics = core.step_metrics(batch, plan)   # tool_use_rate, resample_recovery_rate, ...

GRPO is the same with the resampling stage off: ``assemble_advantages(originals)`` (no plan).

Exports resolve lazily (on first use): importing `axpo_nemo.core.config` alone, as the config
schema does, imports no torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from axpo_nemo.lazy import lazy_exports

if TYPE_CHECKING:
    from axpo_nemo.core.advantages import StepAdvantages, assemble_advantages, group_normalize
    from axpo_nemo.core.budget import resample_budget
    from axpo_nemo.core.config import AdvantageConfig, AXPOConfig, LossConfig
    from axpo_nemo.core.loss import kl_estimate, policy_loss
    from axpo_nemo.core.metrics import STEP_METRIC_NAMES, pass_at_k, step_metrics
    from axpo_nemo.core.rollout import Rollout, RolloutBatch, ToolCallSpan
    from axpo_nemo.core.selection import (
        GroupToolStats,
        ResamplePlan,
        group_tool_stats,
        plan_resampling,
        speculative_plan,
        tool_call_uncertainty,
    )

__all__ = [
    "STEP_METRIC_NAMES",
    "AXPOConfig",
    "AdvantageConfig",
    "GroupToolStats",
    "LossConfig",
    "ResamplePlan",
    "Rollout",
    "RolloutBatch",
    "StepAdvantages",
    "ToolCallSpan",
    "assemble_advantages",
    "group_normalize",
    "group_tool_stats",
    "kl_estimate",
    "pass_at_k",
    "plan_resampling",
    "policy_loss",
    "resample_budget",
    "speculative_plan",
    "step_metrics",
    "tool_call_uncertainty",
]

#: Exported name -> the submodule that defines it.
_HOME = {
    "StepAdvantages": "advantages",
    "assemble_advantages": "advantages",
    "group_normalize": "advantages",
    "AXPOConfig": "config",
    "AdvantageConfig": "config",
    "LossConfig": "config",
    "kl_estimate": "loss",
    "policy_loss": "loss",
    "STEP_METRIC_NAMES": "metrics",
    "pass_at_k": "metrics",
    "step_metrics": "metrics",
    "Rollout": "rollout",
    "RolloutBatch": "rollout",
    "ToolCallSpan": "rollout",
    "GroupToolStats": "selection",
    "ResamplePlan": "selection",
    "group_tool_stats": "selection",
    "plan_resampling": "selection",
    "resample_budget": "budget",
    "speculative_plan": "selection",
    "tool_call_uncertainty": "selection",
}

__getattr__, __dir__ = lazy_exports(__name__, _HOME)

"""Advantage assembly for a whole step: originals, resample groups and prefix credit.

DESIGN.md §1 step 6 ("paper" mode, the default):

* Originals keep the GRPO advantage A_i = (r_i - mean_q) / (std_q + eps) on all their generated
  tokens.
* The K continuations of one prefix form their own group s: A_k = (r_k - mean_s) / (std_s + eps)
  on the continuation's generated tokens only; the frozen prefix carries no loss.
* Prefix credit: r_prefix(s) = 1 if any continuation of s is correct, else 0. Within group q the
  selected sources' rewards are replaced by their r_prefix; with the new mean'/std' the source's
  generated tokens before and including the ``<tool_call>`` marker get
  (r_prefix - mean'_q) / (std'_q + eps). The source's tail keeps A_i.
* Prompt and observation tokens never carry loss.

Ablations (`AXPOConfig`): ``separate_groups=False`` normalises continuations jointly with group q;
``prefix_credit=False`` leaves source prefixes at A_i; ``prefix_fixing=False`` treats the extra
rows as fresh rollouts of the question, normalised with group q (no prefix, so no credit).
With no plan (``algorithm: grpo``) this is exactly GRPO.

Statistics follow NeMo-RL/TRL: Bessel-corrected std, eps added, and a group whose rewards are all
equal gets advantage exactly 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from axpo_nemo.core.config import AdvantageConfig, AXPOConfig
from axpo_nemo.core.rollout import RolloutBatch
from axpo_nemo.core.selection import ResamplePlan


@dataclass(frozen=True)
class StepAdvantages:
    """Per-token training signal for a step, aligned with ``RolloutBatch.token_ids``.

    Attributes:
        advantages: [R, S] float32, 0 wherever ``loss_mask`` is False.
        loss_mask: [R, S] bool, the tokens that enter the loss.
        row_advantage: [R] the advantage on each row's (non-credited) generated tokens.
        prefix_reward: [M'] r_prefix of each selected prefix (empty without a plan).
        prefix_advantage: [M'] advantage on each source's prefix tokens (its row_advantage when
            prefix credit is off or does not apply).
    """

    advantages: torch.Tensor
    loss_mask: torch.Tensor
    row_advantage: torch.Tensor
    prefix_reward: torch.Tensor
    prefix_advantage: torch.Tensor


def group_normalize(
    rewards: torch.Tensor, groups: torch.Tensor, num_groups: int, cfg: AdvantageConfig
) -> torch.Tensor:
    """Group-relative advantages (r - mean_g) / (std_g + eps) for rows tagged with group ids.

    Bessel-corrected std (0 for a single-row group); groups with identical rewards get exactly 0.
    With ``cfg.normalize_std`` False only the mean is subtracted.
    """
    r = rewards.to(torch.float64)
    count = torch.bincount(groups, minlength=num_groups).to(torch.float64)
    mean = torch.bincount(groups, weights=r, minlength=num_groups) / count.clamp(min=1)
    dev = r - mean[groups]
    sq = torch.bincount(groups, weights=dev * dev, minlength=num_groups)
    std = (sq / (count - 1).clamp(min=1)).sqrt()
    hi = torch.full((num_groups,), -torch.inf, dtype=torch.float64).scatter_reduce(0, groups, r, "amax")
    lo = torch.full((num_groups,), torch.inf, dtype=torch.float64).scatter_reduce(0, groups, r, "amin")
    constant = (hi == lo)[groups]
    adv = dev / (std[groups] + cfg.epsilon) if cfg.normalize_std else dev
    return torch.where(constant, torch.zeros_like(adv), adv).to(torch.float32)


def assemble_advantages(
    batch: RolloutBatch,
    plan: ResamplePlan | None = None,
    axpo: AXPOConfig | None = None,
    cfg: AdvantageConfig | None = None,
    row_mask: torch.Tensor | None = None,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> StepAdvantages:
    """Per-token advantages and loss mask for every row of the step.

    Args:
        batch: originals followed by the rows resampled for ``plan`` (their ``source`` set).
        plan: the step's `ResamplePlan`; None runs plain GRPO (the batch must hold only originals).
        axpo: the ablation switches (defaults: paper mode). ``prefix_fixing`` is read from the plan.
        cfg: normalisation settings (defaults: std-normalised, eps 1e-6).
        row_mask: optional [R] bool; False rows (e.g. NaN logprobs) get no loss. Group statistics
            still include them: their reward is valid even if their tokens can't be trained on.
        out: optional reusable (advantages float32, loss_mask bool) buffers of at least [R, S];
            the results are views into them. A trainer that keeps them across steps avoids
            re-faulting hundreds of MB per step; it must not hold on to last step's results.
    """
    axpo = axpo or AXPOConfig()
    cfg = cfg or AdvantageConfig()
    rows = batch.num_rows
    width = batch.token_ids.shape[1]
    groups = batch.num_groups
    resampled = ~batch.is_original
    if plan is None:
        if bool(resampled.any()):
            raise ValueError("assemble_advantages: the batch has resampled rows but no plan was given")
        plan_selected = torch.zeros(0, dtype=torch.long)
    else:
        plan_selected = plan.selected
    prefix_fixing = plan.prefix_fixing if plan is not None else True

    # Which resample group each resampled row belongs to (position of its source in the plan).
    sel_of_row = torch.full((rows,), -1, dtype=torch.long)
    if plan is not None:
        sel_of_row = plan.selection_index(rows)[batch.source.clamp(min=0)]
        sel_of_row[~resampled] = -1
        if bool((sel_of_row[resampled] < 0).any()):
            raise ValueError("assemble_advantages: a resampled row's source was not selected by the plan")

    own_groups = prefix_fixing and axpo.separate_groups
    stat_group = batch.group.clone()
    if own_groups:
        stat_group[resampled] = groups + sel_of_row[resampled]
    num_stat_groups = groups + plan_selected.numel()
    row_adv = group_normalize(batch.reward, stat_group, num_stat_groups, cfg)

    num_sel = plan_selected.numel()
    cont_correct = torch.bincount(
        sel_of_row[resampled], weights=batch.correct[resampled].double(), minlength=num_sel
    )
    prefix_reward = (cont_correct > 0).to(torch.float32)
    prefix_adv = row_adv[plan_selected].clone()
    credit = prefix_fixing and axpo.prefix_credit and num_sel > 0
    if credit:
        credited = batch.reward.clone()
        credited[plan_selected] = prefix_reward
        members = batch.is_original if own_groups else torch.ones(rows, dtype=torch.bool)
        idx = torch.nonzero(members).flatten()
        adv_credited = group_normalize(credited[idx], stat_group[idx], num_stat_groups, cfg)
        position = torch.full((rows,), -1, dtype=torch.long)
        position[idx] = torch.arange(idx.numel())
        prefix_adv = adv_credited[position[plan_selected]]

    loss_mask, advantages = _token_buffers(batch, out)
    # Loss tokens: generated tokens, minus each resampled row's frozen prefix.
    if bool(resampled.any()):
        rows_res = torch.nonzero(resampled).flatten()
        loss_mask.view(-1)[_flat_ranges(rows_res, batch.prefix_len[rows_res], width)] = False
    if row_mask is not None:
        loss_mask[~row_mask.to(torch.bool)] = False
    # uint8 -> float copy then an in-place scale is the fastest way to broadcast on CPU.
    advantages.copy_(loss_mask.view(torch.uint8))
    advantages.mul_(row_adv[:, None])

    if credit:
        starts = batch.prompt_lens[plan_selected]
        flat = _flat_ranges(plan_selected, plan.prefix_len, width, starts)
        values = prefix_adv.repeat_interleave((plan.prefix_len - starts).clamp(min=0))
        advantages.view(-1)[flat] = values * loss_mask.view(-1)[flat]

    return StepAdvantages(
        advantages=advantages,
        loss_mask=loss_mask,
        row_advantage=row_adv,
        prefix_reward=prefix_reward,
        prefix_advantage=prefix_adv,
    )


def _token_buffers(
    batch: RolloutBatch, out: tuple[torch.Tensor, torch.Tensor] | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss_mask holding ``generated``, uninitialised advantages), fresh or in the caller's buffers."""
    rows, width = batch.token_ids.shape
    if out is None:
        return batch.generated.clone(), torch.empty((rows, width), dtype=torch.float32)
    adv_buf, mask_buf = out
    if adv_buf.dtype != torch.float32 or mask_buf.dtype != torch.bool:
        raise ValueError("assemble_advantages: out must be (float32 advantages, bool loss_mask) buffers")
    if adv_buf.numel() < rows * width or mask_buf.numel() < rows * width:
        raise ValueError(f"assemble_advantages: out buffers hold fewer than {rows}x{width} elements")
    loss_mask = mask_buf.view(-1)[: rows * width].view(rows, width).copy_(batch.generated)
    return loss_mask, adv_buf.view(-1)[: rows * width].view(rows, width)


def _flat_ranges(
    rows: torch.Tensor, stops: torch.Tensor, width: int, starts: torch.Tensor | None = None
) -> torch.Tensor:
    """Flat indices into a row-major [R, width] tensor of positions [starts[i], stops[i]) of rows[i]."""
    starts = torch.zeros_like(stops) if starts is None else starts
    counts = (stops - starts).clamp(min=0)
    total = int(counts.sum())
    row_base = rows * width + starts
    offsets = torch.arange(total) - torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
    return torch.repeat_interleave(row_base, counts) + offsets

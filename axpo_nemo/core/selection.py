"""Which prefixes AXPO resamples: triggers, uncertainty, budget and breadth-first selection.

DESIGN.md §1 steps 1-4, vectorised over the whole step:

1. A group is *triggered* when its tool-using subgroup is non-empty and all wrong.
2. Each tool-using rollout of a triggered group offers one candidate prefix: the prompt plus its
   first-turn tokens through the first ``<tool_call>`` marker.
3. Its uncertainty u is the mean behaviour probability exp(logprob) of the first tool call's
   tokens after the opening marker through the closing marker; lower u is resampled first.
4. At most M = floor(r·B·N / K) prefixes are taken, breadth-first: every triggered group's
   best candidate (round 1) before any group's second (round 2), and so on; inside a round the
   more uncertain candidate goes first.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from axpo_nemo.core.budget import resample_budget
from axpo_nemo.core.config import AXPOConfig
from axpo_nemo.core.rollout import RolloutBatch


@dataclass(frozen=True)
class GroupToolStats:
    """Per-group tool-use counts over a batch's original rollouts ([B] tensors)."""

    size: torch.Tensor
    tool: torch.Tensor
    tool_correct: torch.Tensor
    triggered: torch.Tensor


def group_tool_stats(batch: RolloutBatch) -> GroupToolStats:
    """Count, per question, rollouts, tool-using rollouts and correct tool-using rollouts.

    ``triggered[q]`` is True when group q has tool-using rollouts and none of them is correct,
    whatever its non-tool rollouts did (DESIGN.md §1 step 1).
    """
    orig = batch.is_original
    groups = batch.num_groups
    g = batch.group[orig]
    tool = batch.tool_using[orig]
    correct = batch.correct[orig]
    size = torch.bincount(g, minlength=groups)
    n_tool = torch.bincount(g[tool], minlength=groups)
    n_tool_correct = torch.bincount(g[tool & correct], minlength=groups)
    return GroupToolStats(size, n_tool, n_tool_correct, (n_tool > 0) & (n_tool_correct == 0))


def tool_call_uncertainty(batch: RolloutBatch, rows: torch.Tensor) -> torch.Tensor:
    """Mean exp(logprob) over each row's first tool call, after the opening marker.

    Covers tokens ``call_start+1 .. call_end-1`` (through the closing marker) that the policy
    generated. A call with no such token (cut off right after the marker) scores 0, i.e. most
    uncertain. Rows without a tool call must not be passed.
    """
    if rows.numel() == 0:
        return torch.zeros(0, dtype=torch.float32)
    start = batch.call_start[rows] + 1
    end = batch.call_end[rows]
    if bool((batch.call_start[rows] < 0).any()):
        raise ValueError("tool_call_uncertainty: a row without a tool call was given")
    span = int((end - start).max().clamp(min=1))
    offsets = torch.arange(span)
    pos = start[:, None] + offsets[None, :]
    inside = pos < end[:, None]
    pos = pos.clamp(max=batch.token_ids.shape[1] - 1)
    inside &= batch.generated[rows[:, None], pos]
    probs = batch.logprobs[rows[:, None], pos].exp() * inside
    count = inside.sum(dim=1)
    return torch.where(count > 0, probs.sum(dim=1) / count.clamp(min=1), torch.zeros(()))


@dataclass(frozen=True)
class ResamplePlan:
    """The resampling stage's decisions for one step.

    Attributes:
        triggered: [B] bool, groups whose tool-using subgroup is all wrong.
        candidates: [C] row indices of every candidate prefix's source rollout.
        candidate_uncertainty: [C] their u.
        selected: [M'] row indices of the chosen sources, in selection order (M' <= budget).
        selected_uncertainty: [M'] their u.
        prefix_len: [M'] tokens the backend keeps from each chosen source before sampling: the
            prompt + first-turn tokens through the ``<tool_call>`` marker, or just the prompt when
            prefix fixing is off (fresh rollouts of the same question).
        budget: M, the most prefixes this step could take.
        k: continuations to draw per chosen prefix.
        prefix_fixing: continuations start from the prefix (True) or are fresh rollouts (False).
    """

    triggered: torch.Tensor
    candidates: torch.Tensor
    candidate_uncertainty: torch.Tensor
    selected: torch.Tensor
    selected_uncertainty: torch.Tensor
    prefix_len: torch.Tensor
    budget: int
    k: int
    prefix_fixing: bool = True

    @property
    def num_selected(self) -> int:
        """Number of prefixes chosen this step."""
        return int(self.selected.numel())

    def selection_index(self, num_rows: int) -> torch.Tensor:
        """[num_rows] map from a batch row to its position in ``selected`` (-1 if not selected)."""
        index = torch.full((num_rows,), -1, dtype=torch.long)
        index[self.selected] = torch.arange(self.num_selected)
        return index


def _ranks_within_groups(groups: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Rank of each element inside its group when the elements are visited in ``order``."""
    by_group = order[torch.sort(groups[order], stable=True).indices]
    sorted_groups = groups[by_group]
    position = torch.arange(by_group.numel())
    starts = torch.ones_like(sorted_groups, dtype=torch.bool)
    starts[1:] = sorted_groups[1:] != sorted_groups[:-1]
    first = torch.cummax(torch.where(starts, position, torch.zeros_like(position)), dim=0).values
    ranks = torch.empty_like(position)
    ranks[by_group] = position - first
    return ranks


def plan_resampling(
    batch: RolloutBatch, cfg: AXPOConfig, seed: int = 0, *, extra_budget: int = 0
) -> ResamplePlan:
    """Find triggered groups and choose up to M prefixes to resample, breadth-first.

    Only original rows are considered. ``seed`` drives the ``random`` selection mode: one
    ``torch.rand`` key per candidate, in row order, from a CPU generator seeded with it, ordered
    breadth-first like the other modes (use a different seed each step; both trainers pass
    ``derive_seed("plan", seed, step)``). The other modes are deterministic, with ties broken by
    row index. ``extra_budget`` takes that many prefixes beyond M (the next ones in selection
    order; `speculative_plan` uses it, AXPO itself never does). docs/core.md lists these choices.
    """
    stats = group_tool_stats(batch)
    orig = batch.is_original
    is_candidate = orig & batch.tool_using & stats.triggered[batch.group]
    candidates = torch.nonzero(is_candidate).flatten()
    uncertainty = tool_call_uncertainty(batch, candidates)
    budget = resample_budget(int(orig.sum()), cfg.r, cfg.k) + max(int(extra_budget), 0)

    if cfg.selection == "uncertainty":
        key = uncertainty
    elif cfg.selection == "confident":
        key = -uncertainty
    else:
        gen = torch.Generator().manual_seed(int(seed))
        key = torch.rand(candidates.numel(), generator=gen)
    # Candidates are in row order, so stable sorts break ties by row index.
    by_key = torch.sort(key, stable=True).indices
    ranks = _ranks_within_groups(batch.group[candidates], by_key)
    order = by_key[torch.sort(ranks[by_key], stable=True).indices][:budget]

    selected = candidates[order]
    return ResamplePlan(
        triggered=stats.triggered,
        candidates=candidates,
        candidate_uncertainty=uncertainty,
        selected=selected,
        selected_uncertainty=uncertainty[order],
        # Without prefix fixing the extra rollouts are fresh: only the prompt is shared.
        prefix_len=batch.call_start[selected] + 1 if cfg.prefix_fixing else batch.prompt_lens[selected],
        budget=budget,
        k=cfg.k,
        prefix_fixing=cfg.prefix_fixing,
    )


def speculative_plan(batch: RolloutBatch, cfg: AXPOConfig, seed: int = 0, extra: int = 0) -> ResamplePlan:
    """The plan `plan_resampling` would make if every group with a tool-using rollout ended all wrong.

    A guess a trainer can act on before the originals finish: once every rollout's first turn is
    done, the candidate prefixes and their uncertainty are final (a rollout without a call in its
    first turn ends there, so every first tool call is in turn 1), and only correctness is
    missing. The guess is exact when every group that has a tool-using rollout ends triggered
    (the collapse regime AXPO is for) and no rollout becomes tool-using later (a malformed first
    call followed by a well-formed one). Pass the rows with placeholder correctness; it is ignored.
    ``extra`` more prefixes, the next in selection order, cover that many groups that turn out
    not triggered (their budget field counts them).
    """
    pessimistic = dataclasses.replace(batch, correct=torch.zeros_like(batch.correct))
    return plan_resampling(pessimistic, cfg, seed, extra_budget=extra)

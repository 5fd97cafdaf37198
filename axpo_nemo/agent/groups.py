"""The rollout states of one RL step, the same for every backend's trainer.

A step starts from B questions: each gets a *group* of N fresh states (`group_states`). After the
originals finish and `core.plan_resampling` picks prefixes, each selected prefix gets K
continuations (`resample_states`): forks at the source's first ``<tool_call>`` with prefix
fixing, fresh rollouts of the question without it. Seeds derive from (step seed, step, group/prefix, index), so a step's
rollouts do not depend on the backend or on batching.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

from axpo_nemo.agent.trajectory import TrajectoryState, derive_seed, fork_at_tool_call
from axpo_nemo.core import ResamplePlan

__all__ = ["group_states", "resample_states"]


def group_states(
    prompts: Sequence[Any],
    question_indices: Sequence[int],
    question_ids: Sequence[str],
    *,
    group_size: int,
    seed: int,
    step: int,
) -> list[TrajectoryState]:
    """N fresh states per question, group-major (row ``g·N + i`` is rollout i of question g).

    ``prompts[g]`` is question g's rendered prompt; ``question_indices[g]`` its position in the
    trainer's question list (kept in ``metadata["question"]``).
    """
    return [
        TrajectoryState.from_prompt(
            prompts[g],
            group=g,
            seed=derive_seed("rollout", seed, step, g, i),
            question_id=question_ids[g],
            metadata={"question": q},
            index=g * group_size + i,
        )
        for g, q in enumerate(question_indices)
        for i in range(group_size)
    ]


def resample_states(
    plan: ResamplePlan, states: Sequence[TrajectoryState], prompts: Sequence[Any], *, seed: int, step: int
) -> list[TrajectoryState]:
    """The K continuations of every selected prefix, indexed after ``states``.

    With ``plan.prefix_fixing`` they are forks of the source at its first ``<tool_call>``;
    without it, fresh rollouts of the source's question that still record the source and the
    prefix length (the ablation normalises them with the group).
    """
    extra: list[TrajectoryState] = []
    for j, src in enumerate(plan.selected.tolist()):
        seeds = [derive_seed("resample", seed, step, j, k) for k in range(plan.k)]
        source = states[src]
        if plan.prefix_fixing:
            forks = fork_at_tool_call(source, plan.k, source=src, seeds=seeds)
        else:
            forks = []
            for fork_seed in seeds:
                fresh = TrajectoryState.from_prompt(
                    prompts[source.group],
                    group=source.group,
                    seed=fork_seed,
                    question_id=source.question_id,
                    metadata=copy.deepcopy(source.metadata),
                )
                fresh.source, fresh.prefix_len = src, int(plan.prefix_len[j])
                forks.append(fresh)
        for f in forks:
            f.index = len(states) + len(extra)
            extra.append(f)
    return extra

"""The rollout states of one RL step, the same for every backend's trainer.

A step starts from B questions: each gets a *group* of N fresh states (`group_states`). After the
originals finish and `core.plan_resampling` picks prefixes, each selected prefix gets K
continuations (`resample_states`): forks at the source's first ``<tool_call>`` with prefix
fixing, fresh rollouts of the question without it. Seeds derive from (step seed, step, group or
source row, index), so a step's rollouts depend neither on the backend nor on batching, and a
source's continuations are the same whenever they are made (`continuation_states`: a trainer may
start them speculatively, before the plan is final).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

from axpo_nemo.agent.trajectory import TrajectoryState, derive_seed, fork_at_tool_call
from axpo_nemo.core import ResamplePlan

__all__ = ["continuation_states", "group_states", "resample_states"]


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


def continuation_states(
    src: int,
    states: Sequence[TrajectoryState],
    prompts: Sequence[Any],
    *,
    k: int,
    prefix_fixing: bool,
    seed: int,
    step: int,
) -> list[TrajectoryState]:
    """The K continuations of source row ``src`` (``index`` unset; `resample_states` numbers them).

    With ``prefix_fixing`` they are forks of the source at its first ``<tool_call>``; without it,
    fresh rollouts of the source's question that still record the source and the prompt as their
    prefix (the ablation normalises them with the group). Seeds are keyed by the source row, so
    the result depends only on the source's first turn.
    """
    seeds = [derive_seed("resample", seed, step, src, i) for i in range(k)]
    source = states[src]
    if prefix_fixing:
        return fork_at_tool_call(source, k, source=src, seeds=seeds)
    forks = []
    for fork_seed in seeds:
        fresh = TrajectoryState.from_prompt(
            prompts[source.group],
            group=source.group,
            seed=fork_seed,
            question_id=source.question_id,
            metadata=copy.deepcopy(source.metadata),
        )
        fresh.source, fresh.prefix_len = src, source.prompt_len
        forks.append(fresh)
    return forks


def resample_states(
    plan: ResamplePlan,
    states: Sequence[TrajectoryState],
    prompts: Sequence[Any],
    *,
    seed: int,
    step: int,
    made: Mapping[int, Sequence[TrajectoryState]] | None = None,
) -> list[TrajectoryState]:
    """The K continuations of every selected prefix, in plan order, indexed after ``states``.

    ``made[src]``, when given, are continuations of source ``src`` already made (and possibly
    rolled out) by `continuation_states`; they are used as they are, the others are made here.
    """
    extra: list[TrajectoryState] = []
    for src in plan.selected.tolist():
        forks = list(made[src]) if made is not None and src in made else continuation_states(
            src, states, prompts, k=plan.k, prefix_fixing=plan.prefix_fixing, seed=seed, step=step
        )
        for f in forks:
            f.index = len(states) + len(extra)
            extra.append(f)
    return extra

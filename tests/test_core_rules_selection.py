"""Hand-computed examples for AXPO rules 1-4 (DESIGN.md §1): triggers, candidate prefixes, uncertainty, budget and breadth-first selection.

Every expected number is worked out by hand in the comments next to it; the batches use the
standard rollout layouts and the two-group scenario of `core_helpers`.
"""

from __future__ import annotations

import math

import pytest
import torch
from core_helpers import (
    CALL_START,
    OTHER_LP,
    PREFIX_LEN,
    assert_close,
    batch,
    continuation,
    no_tool_rollout,
    originals,
    tool_rollout,
)

from axpo_nemo import core

pytestmark = pytest.mark.numerics

# ---------------------------------------------------------------------------------------------
# Rule 1: trigger
# ---------------------------------------------------------------------------------------------


def test_trigger_cases():
    rollouts = [
        # g0: no tool use at all, all wrong -> tool subgroup empty -> not triggered
        *[no_tool_rollout(0, 0.0) for _ in range(4)],
        # g1: tool subgroup {correct, wrong} -> not triggered
        tool_rollout(1, 1.0),
        tool_rollout(1, 0.0),
        no_tool_rollout(1, 0.0),
        no_tool_rollout(1, 0.0),
        # g2: tool subgroup all wrong while both no-tool rollouts are right -> triggered
        tool_rollout(2, 0.0),
        tool_rollout(2, 0.0),
        no_tool_rollout(2, 1.0),
        no_tool_rollout(2, 1.0),
        # g3: every rollout a wrong tool rollout -> triggered
        *[tool_rollout(3, 0.0) for _ in range(4)],
        # g4: only malformed tool calls (not tool-using), all wrong -> not triggered
        *[tool_rollout(4, 0.0, well_formed=False) for _ in range(4)],
        # g5: one wrong tool rollout; the other tool rollout is correct only with a format
        #     penalty (reward .8, correct=True) -> correctness, not reward, decides: not triggered
        tool_rollout(5, 0.0),
        tool_rollout(5, 0.8, correct=True),
        no_tool_rollout(5, 0.0),
        no_tool_rollout(5, 0.0),
    ]
    b = batch(rollouts)
    stats = core.group_tool_stats(b)
    assert stats.size.tolist() == [4, 4, 4, 4, 4, 4]
    assert stats.tool.tolist() == [0, 2, 2, 4, 0, 2]
    assert stats.tool_correct.tolist() == [0, 1, 0, 0, 0, 1]
    assert stats.triggered.tolist() == [False, False, True, True, False, False]
    plan = core.plan_resampling(b, core.AXPOConfig(r=1.0, k=1))
    assert plan.triggered.tolist() == [False, False, True, True, False, False]
    # candidates: every tool-using rollout of g2 (rows 8, 9) and g3 (rows 12-15), nothing else
    assert sorted(plan.candidates.tolist()) == [8, 9, 12, 13, 14, 15]


def test_trigger_ignores_resampled_rows():
    # A correct continuation of g0's prefix must not un-trigger g0 (triggers are about originals).
    orig = [tool_rollout(0, 0.0, u=0.3), tool_rollout(0, 0.0, u=0.6)]
    b = batch([*orig, continuation(orig[0], 0, 1.0)])
    assert core.group_tool_stats(b).triggered.tolist() == [True]
    assert core.group_tool_stats(b).tool.tolist() == [2]


# ---------------------------------------------------------------------------------------------
# Rules 2-3: candidate prefixes and uncertainty
# ---------------------------------------------------------------------------------------------


def test_uncertainty_counts_only_first_call_after_marker_through_closing_marker():
    #  0 1   prompt
    #  2     thinking            p=.01
    #  3     <tool_call>         p=.01   (first call: start 3)
    #  4 5 6 call body           p=.2 .4 .6
    #  7     </tool_call>        p=.8    (end = 8)
    #  8 9   observation
    #  10 11 12 second call      p=.01 each  (start 10, end 13)
    #  13 14 observation
    #  15 16 answer              p=.01
    # u = mean(.2, .4, .6, .8) = .5 ; including the marker would give (.01 + 2.0)/5 = .402,
    # including the second call (2.0 + .03)/7 = .29.
    p = [None, None, 0.01, 0.01, 0.2, 0.4, 0.6, 0.8, None, None, 0.01, 0.01, 0.01, None, None, 0.01, 0.01]
    gen = [x is not None for x in p]
    lps = [math.log(x) if x is not None else 0.0 for x in p]
    r = core.Rollout(
        group=0,
        token_ids=list(range(17)),
        prompt_len=2,
        generated=gen,
        logprobs=lps,
        reward=0.0,
        correct=False,
        tool_calls=[core.ToolCallSpan(3, 8, 0), core.ToolCallSpan(10, 13, 1)],
        num_turns=3,
    )
    b = batch([r, tool_rollout(0, 0.0, call_probs=(0.1, 0.2, 0.9))])
    u = core.tool_call_uncertainty(b, torch.tensor([0, 1]))
    # row 1: mean(.1, .2, .9) = .4 (thinking, marker and answer tokens at p=.01 are excluded)
    assert_close(u, [0.5, 0.4])
    plan = core.plan_resampling(b, core.AXPOConfig(r=1.0, k=1))
    assert plan.candidates.tolist() == [0, 1]
    assert_close(plan.candidate_uncertainty, [0.5, 0.4])
    # selection order: lower u first -> row 1 (.4) then row 0 (.5)
    assert plan.selected.tolist() == [1, 0]
    # prefix = tokens [0, call_start + 1): 4 for row 0, 6 for row 1
    assert plan.prefix_len.tolist() == [PREFIX_LEN, 4]
    assert_close(plan.selected_uncertainty, [0.4, 0.5])


def test_uncertainty_of_call_cut_off_before_closing_marker():
    # Generation cut inside the call: span ends past the turn's last token (start 5, end 8:
    # tokens 6, 7 only) -> u = mean(.3, .5) = .4. A call cut right after the marker has no token
    # to average: the core scores it 0 (most uncertain, documented convention).
    def cut(end, probs):
        lps = [0.0] * 3 + [OTHER_LP] * 3 + [math.log(p) for p in probs] + [0.0] * (13 - 6 - len(probs))
        gen = [False] * 3 + [True] * (3 + len(probs)) + [False] * (13 - 6 - len(probs))
        return core.Rollout(0, list(range(13)), 3, gen, lps, 0.0, False, [core.ToolCallSpan(CALL_START, end)])

    b = batch([cut(8, [0.3, 0.5]), cut(6, [])])
    assert_close(core.tool_call_uncertainty(b, torch.tensor([0, 1])), [0.4, 0.0])


def test_tool_call_uncertainty_rejects_rows_without_a_call():
    b = batch([no_tool_rollout(0, 0.0), tool_rollout(0, 0.0)])
    with pytest.raises(ValueError):
        core.tool_call_uncertainty(b, torch.tensor([0]))


def test_candidate_prefix_uses_first_call_even_when_it_is_malformed():
    # Tool-using because the *second* call is well formed; the candidate prefix and the
    # uncertainty still come from the first call (its marker at 5).
    lps = [0.0] * 3 + [OTHER_LP] * 3 + [math.log(0.2)] * 3 + [0.0] * 2 + [math.log(0.9)] * 3
    r = core.Rollout(
        0,
        list(range(14)),
        3,
        [False] * 3 + [True] * 6 + [False] * 2 + [True] * 3,
        lps,
        0.0,
        False,
        [core.ToolCallSpan(5, 9, 0, well_formed=False), core.ToolCallSpan(11, 14, 1, well_formed=True)],
    )
    b = batch([r, no_tool_rollout(0, 1.0)])
    plan = core.plan_resampling(b, core.AXPOConfig(r=1.0, k=1))
    assert plan.triggered.tolist() == [True]
    assert plan.selected.tolist() == [0]
    assert plan.prefix_len.tolist() == [6]
    assert_close(plan.selected_uncertainty, [0.2])


# ---------------------------------------------------------------------------------------------
# Rule 4: budget and breadth-first selection
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bn", "r", "k", "expected"),
    [
        (30, 0.1, 3, 1),  # .1*30/3 = 1
        (4096, 0.25, 4, 256),  # .25*4096/4 = 256
        (100, 0.29, 29, 1),  # exactly 1, although math.floor(.29*100/29) == 0 in floats
        (10, 0.3, 3, 1),
        (10, 0.7, 7, 1),
        (12, 1 / 3, 1, 4),
        (8, 0.5, 2, 2),
        (7, 1.0, 8, 0),  # r·B·N < K
        (12, 0.0, 1, 0),
        (12, 1.0, 1, 12),
        (13, 0.5, 2, 3),  # 3.25 -> 3
    ],
)
def test_budget_formula(bn, r, k, expected):
    assert core.resample_budget(bn, r, k) == expected


def test_budget_awkward_float_really_is_awkward():
    # guards the (100, .29, 29) case above: naive float arithmetic gets it wrong
    assert math.floor(0.29 * 100 / 29) == 0


def test_plan_uses_the_exact_budget():
    # B·N = 100 (B=1, N=100), r = .29, K = 29 -> M = 1 (naive float arithmetic gives 0)
    rows = [tool_rollout(0, 0.0, u=0.01 * (i + 1)) for i in range(100)]
    plan = core.plan_resampling(batch(rows), core.AXPOConfig(r=0.29, k=29))
    assert plan.budget == 1
    assert plan.selected.tolist() == [0]


def three_triggered_groups():
    # each group: 2 tool wrong (u as given) + 2 no-tool wrong; B=3, N=4 -> B·N = 12
    us = {0: (0.6, 0.3), 1: (0.5, 0.1), 2: (0.2, 0.4)}
    rows = []
    for g, (ua, ub) in us.items():
        rows += [tool_rollout(g, 0.0, u=ua), tool_rollout(g, 0.0, u=ub), no_tool_rollout(g, 0.0)]
        rows += [no_tool_rollout(g, 0.0)]
    return batch(rows)


def test_budget_exhausted_in_the_middle_of_round_one():
    # rows: g0 = 0 (u .6), 1 (u .3); g1 = 4 (.5), 5 (.1); g2 = 8 (.2), 9 (.4)
    # round 1 picks each group's most uncertain: g1 row 5 (.1), g2 row 8 (.2), g0 row 1 (.3)
    # M = floor(.5*12/3) = 2 -> only rows 5 and 8
    b = three_triggered_groups()
    plan = core.plan_resampling(b, core.AXPOConfig(r=0.5, k=3))
    assert plan.budget == 2
    assert plan.candidates.tolist() == [0, 1, 4, 5, 8, 9]
    assert plan.selected.tolist() == [5, 8]
    assert_close(plan.selected_uncertainty, [0.1, 0.2])
    assert plan.prefix_len.tolist() == [PREFIX_LEN, PREFIX_LEN]
    assert plan.k == 3
    # M = 4: whole round 1 (5, 8, 1), then round 2's most uncertain: row 9 (.4) before 4 (.5), 0 (.6)
    plan = core.plan_resampling(b, core.AXPOConfig(r=1.0, k=3))
    assert plan.budget == 4
    assert plan.selected.tolist() == [5, 8, 1, 9]
    # M = 12 > 6 candidates: all of them, round by round
    plan = core.plan_resampling(b, core.AXPOConfig(r=1.0, k=1))
    assert plan.selected.tolist() == [5, 8, 1, 9, 4, 0]


def test_one_group_gets_a_second_prefix_in_round_two():
    # g0: rows 0, 1, 2 tool wrong u .3 .5 .7 + row 3 no tool; g1: row 4 tool wrong u .1 + 3 no
    # tool; g2: not triggered (tool correct). B·N = 12, r=1, K=4 -> M = 3
    # round 1: g1 row 4 (.1), g0 row 0 (.3); round 2: only g0 has candidates left: row 1 (.5)
    rows = [tool_rollout(0, 0.0, u=0.3), tool_rollout(0, 0.0, u=0.5), tool_rollout(0, 0.0, u=0.7)]
    rows += [no_tool_rollout(0, 1.0), tool_rollout(1, 0.0, u=0.1)]
    rows += [no_tool_rollout(1, 0.0) for _ in range(3)]
    rows += [tool_rollout(2, 1.0, u=0.01), tool_rollout(2, 0.0, u=0.01), no_tool_rollout(2, 0.0)]
    rows += [no_tool_rollout(2, 0.0)]
    b = batch(rows)
    plan = core.plan_resampling(b, core.AXPOConfig(r=1.0, k=4))
    assert plan.triggered.tolist() == [True, True, False]
    assert plan.selected.tolist() == [4, 0, 1]
    # M = 4 (K=3): ... then round 3: row 2
    plan = core.plan_resampling(b, core.AXPOConfig(r=1.0, k=3))
    assert plan.selected.tolist() == [4, 0, 1, 2]


def two_groups_two_candidates():
    # g0: rows 0, 1 tool wrong u .1, .2 ; rows 2, 3 no tool wrong
    # g1: rows 4, 5 tool wrong u .5, .6 ; rows 6, 7 no tool correct. B·N = 8, r=1, K=2 -> M = 4
    rows = [tool_rollout(0, 0.0, u=0.1), tool_rollout(0, 0.0, u=0.2), no_tool_rollout(0, 0.0)]
    rows += [no_tool_rollout(0, 0.0), tool_rollout(1, 0.0, u=0.5), tool_rollout(1, 0.0, u=0.6)]
    rows += [no_tool_rollout(1, 1.0), no_tool_rollout(1, 1.0)]
    return batch(rows)


def test_breadth_first_is_not_a_global_sort():
    # global sort by u would be [0 (.1), 1 (.2), 4 (.5), 5 (.6)]; breadth-first is
    # round 1 [0 (.1), 4 (.5)], round 2 [1 (.2), 5 (.6)]
    plan = core.plan_resampling(two_groups_two_candidates(), core.AXPOConfig(r=1.0, k=2))
    assert plan.selected.tolist() == [0, 4, 1, 5]
    assert_close(plan.selected_uncertainty, [0.1, 0.5, 0.2, 0.6])


def test_confident_mode_order():
    # highest u first, within group and within round:
    # round 1: g0's best is row 1 (.2), g1's row 5 (.6) -> [5, 1]; round 2: [4 (.5), 0 (.1)]
    plan = core.plan_resampling(
        two_groups_two_candidates(), core.AXPOConfig(r=1.0, k=2, selection="confident")
    )
    assert plan.selected.tolist() == [5, 1, 4, 0]
    # M = 1: only the most confident candidate of round 1
    plan = core.plan_resampling(
        two_groups_two_candidates(), core.AXPOConfig(r=0.25, k=2, selection="confident")
    )
    assert plan.selected.tolist() == [5]


@pytest.mark.parametrize("selection", ["uncertainty", "confident"])
def test_ties_broken_by_row_index(selection):
    # every candidate has u = .3: rows 0, 1 (g0) and 4, 5 (g1) -> [0, 4, 1, 5] in both modes
    rows = [tool_rollout(0, 0.0, u=0.3), tool_rollout(0, 0.0, u=0.3), no_tool_rollout(0, 0.0)]
    rows += [no_tool_rollout(0, 0.0), tool_rollout(1, 0.0, u=0.3), tool_rollout(1, 0.0, u=0.3)]
    rows += [no_tool_rollout(1, 0.0), no_tool_rollout(1, 0.0)]
    plan = core.plan_resampling(batch(rows), core.AXPOConfig(r=1.0, k=2, selection=selection))
    assert plan.selected.tolist() == [0, 4, 1, 5]


def test_random_selection_is_seeded_and_breadth_first():
    # 3 triggered groups, 3 tool candidates each (+1 no-tool row); B·N = 12
    rows = []
    for g in range(3):
        rows += [tool_rollout(g, 0.0, u=0.1 * (g + 1) + 0.05 * j) for j in range(3)] + [
            no_tool_rollout(g, 1.0)
        ]
    b = batch(rows)
    group_of = {i: i // 4 for i in range(12)}
    seen = set()
    for seed in range(20):
        cfg = core.AXPOConfig(r=1.0, k=2, selection="random")  # M = 6 -> two rounds exactly
        plan = core.plan_resampling(b, cfg, seed=seed)
        again = core.plan_resampling(b, cfg, seed=seed)
        assert torch.equal(plan.selected, again.selected)
        sel = plan.selected.tolist()
        assert len(sel) == 6 and len(set(sel)) == 6
        assert sorted(group_of[i] for i in sel[:3]) == [0, 1, 2]  # round 1: one per group
        assert sorted(group_of[i] for i in sel[3:]) == [0, 1, 2]  # round 2: one per group
        seen.add(tuple(sel))
    assert len(seen) > 1, "different seeds never gave a different order"


def test_random_selection_order_and_rng_are_pinned():
    # The random ablation draws one key per candidate, in row order, from torch.rand on a CPU
    # torch.Generator seeded with `seed`; it then runs the same breadth-first rounds as the other
    # modes on those keys (smallest first; ties by row). u plays no part: reversing every u leaves
    # the plan unchanged. A change of RNG or key order changes every random-selection experiment.
    def rows(reverse):
        out = []
        for g in range(3):
            us = [0.1 * (g + 1) + 0.05 * j for j in range(3)]
            out += [tool_rollout(g, 0.0, u=u) for u in (us[::-1] if reverse else us)]
            out.append(no_tool_rollout(g, 1.0))
        return batch(out)

    cfg = core.AXPOConfig(r=1.0, k=3, selection="random")  # M = 4: round 1 and one of round 2
    for seed in (0, 1, 7, 12345):
        plan = core.plan_resampling(rows(False), cfg, seed=seed)
        candidates = plan.candidates.tolist()
        assert candidates == [0, 1, 2, 4, 5, 6, 8, 9, 10]
        key = torch.rand(len(candidates), generator=torch.Generator().manual_seed(seed)).tolist()
        rank = {}
        for g in range(3):
            members = sorted((key[j], j) for j, row in enumerate(candidates) if row // 4 == g)
            rank.update({j: r for r, (_, j) in enumerate(members)})
        order = sorted(range(len(candidates)), key=lambda j: (rank[j], key[j], j))
        assert plan.selected.tolist() == [candidates[j] for j in order][:4]
        assert torch.equal(core.plan_resampling(rows(True), cfg, seed=seed).selected, plan.selected)


# ---------------------------------------------------------------------------------------------
# Speculation: the plan guessed before correctness is known
# ---------------------------------------------------------------------------------------------


def test_speculative_plan_assumes_every_tool_group_all_wrong():
    # The scenario's g1 has a correct tool rollout (row 4), so the real plan (budget M = 2) takes
    # g0's two candidates, rows 0 (u=.2) then 1 (u=.4). The guess ignores correctness: g1 counts
    # as triggered, so round 1 takes both groups' most uncertain candidates, row 7 (u=.05) first.
    orig = originals()
    axpo = core.AXPOConfig(r=0.5, k=2)
    real = core.plan_resampling(batch(orig), axpo)
    guess = core.speculative_plan(batch(orig), axpo)
    assert real.selected.tolist() == [0, 1]
    assert guess.selected.tolist() == [7, 0] and guess.budget == real.budget == 2
    # One extra prefix is the next in selection order: round 2 opens with g1's row 6 (u=.1 < .4).
    assert core.speculative_plan(batch(orig), axpo, extra=1).selected.tolist() == [7, 0, 6]
    # With g1's right rollout wrong too, the real plan is the guess: exact in the collapse regime.
    orig[4] = tool_rollout(1, 0.0, u=0.9)
    assert core.plan_resampling(batch(orig), axpo).selected.tolist() == [7, 0]
    assert core.speculative_plan(batch(orig), axpo).selected.tolist() == [7, 0]

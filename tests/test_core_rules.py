"""Hand-computed examples, one or more per rule of the AXPO algorithm (DESIGN.md §1).

Every expected number is worked out by hand in the comments next to it; the batches use the
standard rollout layouts of `core_helpers` (13-token tool rollouts: prompt 0-2, thinking 3-4,
``<tool_call>`` at 5, call 6-8, observation 9-10, answer 11-12; 10-token no-tool rollouts).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from core_helpers import (
    CALL_END,
    CALL_START,
    CONT_MASK,
    EPS,
    NO_TOOL_MASK,
    OTHER_LP,
    PREFIX_LEN,
    TOOL_MASK,
    batch,
    cont_row,
    continuation,
    fresh_rollout,
    no_tool_rollout,
    no_tool_row,
    tool_rollout,
    tool_row,
)

from axpo_nemo import core

# Group statistics used throughout (Bessel std, eps added):
# rewards [0,0,1,0] or [1,0,0,0]: mean .25, sum sq dev .75, var .75/3 = .25, std .5
HI = 0.75 / (0.5 + EPS)  # reward 1 in such a group
LO = -0.25 / (0.5 + EPS)  # reward 0 in such a group
# rewards [1,0] (K=2): mean .5, var (.25+.25)/1 = .5, std sqrt(.5)
S2 = 0.5 / (0.7071067811865476 + EPS)
# rewards [1,0,1,0]: mean .5, var 1/3, std sqrt(1/3)
P4 = 0.5 / (0.5773502691896257 + EPS)
# joint [0,0,1,0, 1,0, 0,0]: mean .25, sum sq dev 2*.5625 + 6*.0625 = 1.5, var 1.5/7
J1 = 0.75 / (0.4629100498862757 + EPS)
J0 = -0.25 / (0.4629100498862757 + EPS)
# joint with sources replaced [1,0,1,0, 1,0, 0,0]: mean .375, sum sq 3*.390625 + 5*.140625 = 1.875
C1 = 0.625 / (0.5175491695067657 + EPS)
C0 = -0.375 / (0.5175491695067657 + EPS)


def assert_close(actual, expected, atol=1e-6, rtol=1e-6):
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype), atol=atol, rtol=rtol)


# ---------------------------------------------------------------------------------------------
# The shared two-group scenario (B=2, N=4, K=2, r=0.5 -> M = floor(.5*8/2) = 2)
#   g0 (triggered: tool subgroup {0, 1} all wrong, although no-tool row 2 is right)
#     row 0  tool  wrong r=0  u=.2
#     row 1  tool  wrong r=0  u=.4
#     row 2  no tool correct r=1
#     row 3  no tool wrong r=0
#   g1 (not triggered: row 4 is a correct tool rollout); rows 5-7 have very low u on purpose
#     row 4  tool correct r=1 u=.9;  rows 5, 6, 7 tool wrong r=0, u=.3, .1, .05
#   continuations: rows 8, 9 from row 0 (rewards 1, 0); rows 10, 11 from row 1 (rewards 0, 0)
# ---------------------------------------------------------------------------------------------


def originals():
    return [
        tool_rollout(0, 0.0, u=0.2),
        tool_rollout(0, 0.0, u=0.4),
        no_tool_rollout(0, 1.0),
        no_tool_rollout(0, 0.0),
        tool_rollout(1, 1.0, u=0.9),
        tool_rollout(1, 0.0, u=0.3),
        tool_rollout(1, 0.0, u=0.1),
        tool_rollout(1, 0.0, u=0.05),
    ]


def scenario(**cfg):
    orig = originals()
    axpo = core.AXPOConfig(r=0.5, k=2, **cfg)
    plan = core.plan_resampling(batch(orig), axpo, seed=0)
    assert plan.selected.tolist() == [0, 1]
    if axpo.prefix_fixing:
        extra = [continuation(orig[0], 0, 1.0), continuation(orig[0], 0, 0.0)]
        extra += [continuation(orig[1], 1, 0.0), continuation(orig[1], 1, 0.0)]
    else:
        extra = [fresh_rollout(orig[0], 0, 1.0), fresh_rollout(orig[0], 0, 0.0)]
        extra += [fresh_rollout(orig[1], 1, 0.0), fresh_rollout(orig[1], 1, 0.0)]
    return batch(orig + extra), plan, axpo


G1_ROWS = [tool_row(HI, HI), tool_row(LO, LO), tool_row(LO, LO), tool_row(LO, LO)]
SCENARIO_MASK = [TOOL_MASK, TOOL_MASK, NO_TOOL_MASK, NO_TOOL_MASK] + [TOOL_MASK] * 4 + [CONT_MASK] * 4


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


# ---------------------------------------------------------------------------------------------
# Rule 6: advantages
# ---------------------------------------------------------------------------------------------


def test_grpo_without_plan_by_hand():
    # g0 rewards [0,0,1,0] -> [LO, LO, HI, LO]; g1 rewards [1,0,0,0] -> [HI, LO, LO, LO]
    b = batch(originals())
    adv = core.assemble_advantages(b)
    expected = [tool_row(LO, LO), tool_row(LO, LO), no_tool_row(HI), no_tool_row(LO), *G1_ROWS]
    assert_close(adv.advantages, expected)
    assert torch.equal(adv.loss_mask, torch.tensor(SCENARIO_MASK[:8]))
    assert_close(adv.row_advantage, [LO, LO, HI, LO, HI, LO, LO, LO])
    assert adv.prefix_reward.numel() == 0 and adv.prefix_advantage.numel() == 0


def test_zero_variance_groups_get_exactly_zero():
    rows = [tool_rollout(0, 1.0) for _ in range(4)]  # all correct
    rows += [no_tool_rollout(1, 0.0) for _ in range(4)]  # all wrong, no tool
    rows += [tool_rollout(2, 0.3, correct=False) for _ in range(3)] + [no_tool_rollout(2, 0.3, correct=False)]
    rows += [tool_rollout(3, 0.0, u=0.1 * (j + 1)) for j in range(4)]  # all wrong tool: triggered
    orig = batch(rows)
    grpo = core.assemble_advantages(orig)
    assert torch.equal(grpo.advantages, torch.zeros(16, 13))
    assert torch.equal(grpo.row_advantage, torch.zeros(16))
    # AXPO: g3 triggered, M = floor(.25*16/4) = 1 -> row 12 (u .1); its 4 continuations all
    # wrong -> resample group all 0, r_prefix 0, credited g3 still all 0 -> everything exactly 0
    plan = core.plan_resampling(orig, core.AXPOConfig())
    assert plan.selected.tolist() == [12]
    full = orig.concat(batch([continuation(rows[12], 12, 0.0) for _ in range(4)]))
    adv = core.assemble_advantages(full, plan)
    assert torch.equal(adv.advantages, torch.zeros(20, 13))
    assert adv.prefix_reward.tolist() == [0.0]
    assert adv.prefix_advantage.tolist() == [0.0]
    # masks are unaffected by A = 0: 11 tool rows x 8 + 5 no-tool rows x 7 + 4 continuations x 5
    assert int(adv.loss_mask.sum()) == 11 * 8 + 5 * 7 + 4 * 5


def test_single_member_group_gets_zero():
    b = batch([tool_rollout(0, 1.0), tool_rollout(1, 0.0), no_tool_rollout(2, 0.7, correct=False)])
    adv = core.assemble_advantages(b)
    assert torch.equal(adv.advantages, torch.zeros(3, 13))
    g = core.group_normalize(
        torch.tensor([1.0, 0.0, 0.5]), torch.tensor([0, 1, 2]), 3, core.AdvantageConfig()
    )
    assert torch.equal(g, torch.zeros(3))


def test_equal_rewards_give_exactly_zero_even_when_the_mean_is_inexact():
    # .1 + .1 + .1 = .30000000000000004 in float64, so r - mean is ~1e-17, not 0; the spec asks
    # for exactly 0 (not ~1e-11 after dividing by a ~1e-17 std + eps)
    rewards = torch.tensor([0.1, 0.1, 0.1, 0.7, 0.7, 0.7, 0.7, 0.7, 0.7, 0.7], dtype=torch.float64)
    groups = torch.tensor([0, 0, 0, 1, 1, 1, 1, 1, 1, 1])
    for normalize_std in (True, False):
        g = core.group_normalize(rewards, groups, 2, core.AdvantageConfig(normalize_std=normalize_std))
        assert torch.equal(g, torch.zeros(10))


def test_group_normalize_by_hand():
    # group 0: [1, 0, .5] mean .5 var (.25+.25+0)/2 = .25 std .5 -> [1, -1, 0] (eps in denominator)
    # group 1: [2, 2] -> 0 exactly
    g = core.group_normalize(
        torch.tensor([1.0, 2.0, 0.0, 2.0, 0.5]), torch.tensor([0, 1, 0, 1, 0]), 2, core.AdvantageConfig()
    )
    a = 0.5 / (0.5 + EPS)
    assert_close(g, [a, 0.0, -a, 0.0, 0.0])
    g = core.group_normalize(
        torch.tensor([1.0, 2.0, 0.0, 2.0, 0.5]),
        torch.tensor([0, 1, 0, 1, 0]),
        2,
        core.AdvantageConfig(normalize_std=False),
    )
    assert_close(g, [0.5, 0.0, -0.5, 0.0, 0.0])


def test_paper_mode_by_hand():
    b, plan, axpo = scenario()
    adv = core.assemble_advantages(b, plan, axpo)
    # originals keep GRPO stats: g0 [0,0,1,0] -> [LO, LO, HI, LO]
    # resample group s0 (rows 8, 9) rewards [1, 0] -> [S2, -S2]; s1 (rows 10, 11) [0, 0] -> 0
    # prefix credit: r_prefix = [1, 0]; g0 credited rewards [1, 0, 1, 0] -> source prefixes
    #   row 0: +P4, row 1: -P4 on tokens 3, 4, 5; their tails keep LO
    expected = [
        tool_row(P4, LO),
        tool_row(-P4, LO),
        no_tool_row(HI),
        no_tool_row(LO),
        *G1_ROWS,
        cont_row(S2),
        cont_row(-S2),
        cont_row(0.0),
        cont_row(0.0),
    ]
    assert_close(adv.advantages, expected)
    assert torch.equal(adv.loss_mask, torch.tensor(SCENARIO_MASK))
    assert_close(adv.row_advantage, [LO, LO, HI, LO, HI, LO, LO, LO, S2, -S2, 0, 0])
    assert adv.prefix_reward.tolist() == [1.0, 0.0]
    assert_close(adv.prefix_advantage, [P4, -P4])


def test_prefix_tokens_of_resampled_rows_are_masked_even_though_generated():
    b, plan, axpo = scenario()
    # the continuations' copied thinking + marker tokens (3, 4, 5) are flagged generated ...
    assert b.generated[8:, 3:6].all()
    adv = core.assemble_advantages(b, plan, axpo)
    # ... but the frozen prefix [0, 6) never carries loss or advantage
    assert not adv.loss_mask[8:, :PREFIX_LEN].any()
    assert torch.equal(adv.advantages[8:, :PREFIX_LEN], torch.zeros(4, PREFIX_LEN))
    assert adv.loss_mask[8:, PREFIX_LEN:].sum() == 4 * 5


def test_prompt_and_observation_tokens_never_in_loss():
    # Source row 0 is selected and credited; its observation tokens 9, 10 sit between the call and
    # the answer, are not generated, and must get neither mask nor advantage in any mode.
    for cfg in (
        {},
        {"prefix_credit": False},
        {"separate_groups": False},
        {"prefix_fixing": False},
    ):
        b, plan, axpo = scenario(**cfg)
        adv = core.assemble_advantages(b, plan, axpo)
        not_generated = ~b.generated
        assert not (adv.loss_mask & not_generated).any()
        assert torch.equal(adv.advantages[not_generated], torch.zeros(int(not_generated.sum())))
        assert not adv.loss_mask[:, :3].any()  # prompts
        assert not adv.loss_mask[:, 9:11][b.lengths == 13].any()  # observations


def test_resample_group_advantages_by_hand_k3_non_binary():
    # one triggered group (B=1, N=3): rows 0, 1 tool wrong (u .2, .6), row 2 no tool wrong (.1 format)
    # M = floor(1*3/3) = 1 -> row 0; continuations rewards [1, 0, .5] (the .5 one wrong):
    #   mean .5, var (.25 + .25 + 0)/2 = .25, std .5 -> [1, -1, 0] / (1 + 2 eps)
    # r_prefix = 1; credited g0 = [1, 0, .1]: mean 1.1/3, dev [.6333, -.3667, -.2667],
    #   sum sq = .401111 + .134444 + .071111 = .606667, var .303333, std .550757
    orig = [tool_rollout(0, 0.0, u=0.2), tool_rollout(0, 0.0, u=0.6), no_tool_rollout(0, 0.1, correct=False)]
    plan = core.plan_resampling(batch(orig), core.AXPOConfig(r=1.0, k=3))
    assert plan.selected.tolist() == [0]
    conts = [
        continuation(orig[0], 0, 1.0),
        continuation(orig[0], 0, 0.0),
        continuation(orig[0], 0, 0.5, correct=False),
    ]
    adv = core.assemble_advantages(batch(orig + conts), plan)
    a = 0.5 / (0.5 + EPS)
    # g0 originals [0, 0, .1]: mean 1/30, dev [-1/30, -1/30, 2/30], var (1+1+4)/900/2 = 1/300
    std0 = math.sqrt(1 / 300)
    lo0, hi0 = -(1 / 30) / (std0 + EPS), (2 / 30) / (std0 + EPS)
    mean_c = 1.1 / 3
    std_c = math.sqrt(((1 - mean_c) ** 2 + mean_c**2 + (0.1 - mean_c) ** 2) / 2)
    pc = (1 - mean_c) / (std_c + EPS)
    assert abs(std_c - 0.550757) < 1e-6
    expected = [
        tool_row(pc, lo0),
        tool_row(lo0, lo0),
        no_tool_row(hi0),
        cont_row(a),
        cont_row(-a),
        cont_row(0.0),
    ]
    assert_close(adv.advantages, expected)
    assert_close(adv.row_advantage, [lo0, lo0, hi0, a, -a, 0.0])


# ---------------------------------------------------------------------------------------------
# Rule 6: ablation flags
# ---------------------------------------------------------------------------------------------


def test_ablation_prefix_credit_off_changes_only_source_prefixes():
    b, plan, axpo = scenario(prefix_credit=False)
    adv = core.assemble_advantages(b, plan, axpo)
    expected = [
        tool_row(LO, LO),  # source prefix keeps A_i
        tool_row(LO, LO),
        no_tool_row(HI),
        no_tool_row(LO),
        *G1_ROWS,
        cont_row(S2),
        cont_row(-S2),
        cont_row(0.0),
        cont_row(0.0),
    ]
    assert_close(adv.advantages, expected)
    assert torch.equal(adv.loss_mask, torch.tensor(SCENARIO_MASK))
    assert_close(adv.prefix_advantage, [LO, LO])
    # versus paper mode: exactly the source prefix tokens (rows 0, 1; positions 3, 4, 5) differ
    b2, plan2, axpo2 = scenario()
    paper = core.assemble_advantages(b2, plan2, axpo2)
    differ = (paper.advantages != adv.advantages).nonzero().tolist()
    assert differ == [[0, 3], [0, 4], [0, 5], [1, 3], [1, 4], [1, 5]]


def test_plan_prefix_len_is_the_prompt_without_prefix_fixing():
    orig = originals()
    plan = core.plan_resampling(batch(orig), core.AXPOConfig(r=0.5, k=2, prefix_fixing=False))
    assert plan.selected.tolist() == [0, 1]
    assert plan.prefix_len.tolist() == [3, 3]  # the prompt, not the <tool_call> prefix (6)


def test_ablation_separate_groups_off_by_hand():
    # g0 joint with its 4 continuations: rewards [0,0,1,0, 1,0, 0,0] -> J1 / J0 for everyone in g0
    # credit on the joint set with sources replaced: [1,0,1,0, 1,0,0,0] -> C1 (row 0), C0 (row 1)
    # g1 untouched
    b, plan, axpo = scenario(separate_groups=False)
    adv = core.assemble_advantages(b, plan, axpo)
    expected = [
        tool_row(C1, J0),
        tool_row(C0, J0),
        no_tool_row(J1),
        no_tool_row(J0),
        *G1_ROWS,
        cont_row(J1),
        cont_row(J0),
        cont_row(J0),
        cont_row(J0),
    ]
    assert_close(adv.advantages, expected)
    assert torch.equal(adv.loss_mask, torch.tensor(SCENARIO_MASK))
    assert_close(adv.row_advantage, [J0, J0, J1, J0, HI, LO, LO, LO, J1, J0, J0, J0])
    assert adv.prefix_reward.tolist() == [1.0, 0.0]
    assert_close(adv.prefix_advantage, [C1, C0])
    # and with prefix credit off too: sources are plain J0
    b, plan, axpo = scenario(separate_groups=False, prefix_credit=False)
    adv = core.assemble_advantages(b, plan, axpo)
    expected[0] = tool_row(J0, J0)
    expected[1] = tool_row(J0, J0)
    assert_close(adv.advantages, expected)


def test_ablation_prefix_fixing_off_by_hand():
    # extra rows are fresh rollouts (prefix_len = prompt_len = 3), normalised jointly with g0
    # (same rewards as the joint case -> J1 / J0), no prefix credit; all their generated tokens
    # carry loss; g1 untouched
    b, plan, axpo = scenario(prefix_fixing=False)
    assert plan.prefix_fixing is False
    assert b.prefix_len[8:].tolist() == [3, 3, 3, 3]
    adv = core.assemble_advantages(b, plan, axpo)
    expected = [
        tool_row(J0, J0),
        tool_row(J0, J0),
        no_tool_row(J1),
        no_tool_row(J0),
        *G1_ROWS,
        tool_row(J1, J1),
        tool_row(J0, J0),
        tool_row(J0, J0),
        tool_row(J0, J0),
    ]
    assert_close(adv.advantages, expected)
    assert torch.equal(adv.loss_mask, torch.tensor(SCENARIO_MASK[:8] + [TOOL_MASK] * 4))
    assert_close(adv.prefix_advantage, [J0, J0])
    # separate_groups / prefix_credit have no further effect without prefix fixing
    for extra in ({"separate_groups": False}, {"prefix_credit": False}):
        b2, plan2, axpo2 = scenario(prefix_fixing=False, **extra)
        assert torch.equal(core.assemble_advantages(b2, plan2, axpo2).advantages, adv.advantages)


def test_normalize_std_off_by_hand():
    # Dr.GRPO: A = r - mean. g0 [0,0,1,0] -> -.25 / .75; s0 [1,0] -> ±.5; s1 -> 0;
    # credited [1,0,1,0] -> ±.5; g1 [1,0,0,0] -> .75 / -.25
    b, plan, axpo = scenario()
    adv = core.assemble_advantages(b, plan, axpo, core.AdvantageConfig(normalize_std=False))
    expected = [
        tool_row(0.5, -0.25),
        tool_row(-0.5, -0.25),
        no_tool_row(0.75),
        no_tool_row(-0.25),
        tool_row(0.75, 0.75),
        *[tool_row(-0.25, -0.25)] * 3,
        cont_row(0.5),
        cont_row(-0.5),
        cont_row(0.0),
        cont_row(0.0),
    ]
    assert_close(adv.advantages, expected)


def test_epsilon_is_added_to_the_std():
    # g [1, 0]: std sqrt(.5); with eps = .5 the advantages are ±.5 / (.70711 + .5)
    b = batch([tool_rollout(0, 1.0), tool_rollout(0, 0.0)])
    adv = core.assemble_advantages(b, cfg=core.AdvantageConfig(epsilon=0.5))
    a = 0.5 / (0.7071067811865476 + 0.5)
    assert_close(adv.row_advantage, [a, -a])


def test_non_triggered_groups_untouched_by_axpo():
    b, plan, axpo = scenario()
    adv = core.assemble_advantages(b, plan, axpo)
    grpo = core.assemble_advantages(batch(originals()))
    assert torch.equal(adv.advantages[4:8], grpo.advantages[4:8])
    assert torch.equal(adv.advantages[2:4], grpo.advantages[2:4])  # g0's non-tool rows too


def test_assemble_rejects_inconsistent_plans():
    b, plan, axpo = scenario()
    with pytest.raises(ValueError):
        core.assemble_advantages(b)  # resampled rows but no plan
    orig = originals()
    bad = batch([*orig, continuation(orig[5], 5, 1.0)])  # row 5 was never selected
    with pytest.raises(ValueError):
        core.assemble_advantages(bad, plan, axpo)


# ---------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------

SPEC_METRIC_NAMES = {
    "tool_use_rate",
    "tool_subgroup_all_wrong_rate",
    "triggered_groups",
    "prefixes_selected",
    "resample_recovery_rate",
    "extra_rollout_fraction",
    "accuracy",
    "accuracy_tool",
    "accuracy_no_tool",
    "mean_turns",
    "mean_response_tokens",
    "prefix_uncertainty_mean",
}


def test_metric_names_match_the_spec():
    assert set(core.STEP_METRIC_NAMES) == SPEC_METRIC_NAMES
    b, plan, _ = scenario()
    assert set(core.step_metrics(b, plan)) == SPEC_METRIC_NAMES


def test_step_metrics_by_hand():
    b, plan, _ = scenario()
    m = core.step_metrics(b, plan)
    expected = {
        "tool_use_rate": 6 / 8,  # rows 0, 1, 4, 5, 6, 7 of 8 originals
        "tool_subgroup_all_wrong_rate": 1 / 2,  # g0 triggered, g0 and g1 use tools
        "triggered_groups": 1.0,
        "prefixes_selected": 2.0,
        "resample_recovery_rate": 1 / 2,  # s0 has a correct continuation, s1 none
        "extra_rollout_fraction": 4 / 8,
        "accuracy": 2 / 8,  # rows 2, 4
        "accuracy_tool": 1 / 6,  # row 4 of the 6 tool rollouts
        "accuracy_no_tool": 1 / 2,  # row 2 of rows 2, 3
        "mean_turns": (6 * 2 + 2 * 1) / 8,  # tool rollouts 2 turns, no-tool 1
        "mean_response_tokens": (6 * 8 + 2 * 7) / 8,  # 8 generated tokens vs 7
        "prefix_uncertainty_mean": (0.2 + 0.4) / 2,
    }
    for name, value in expected.items():
        assert m[name] == pytest.approx(value, abs=1e-6), name


def test_step_metrics_nan_cases():
    # no tool use at all, no plan
    b = batch(
        [no_tool_rollout(0, 1.0), no_tool_rollout(0, 0.0), no_tool_rollout(1, 0.0), no_tool_rollout(1, 0.0)]
    )
    m = core.step_metrics(b)
    assert m["tool_use_rate"] == 0.0
    assert math.isnan(m["tool_subgroup_all_wrong_rate"])  # no group uses tools
    assert math.isnan(m["accuracy_tool"])
    assert m["accuracy_no_tool"] == pytest.approx(0.25)
    assert math.isnan(m["resample_recovery_rate"])  # nothing selected
    assert math.isnan(m["prefix_uncertainty_mean"])
    assert m["triggered_groups"] == 0.0 and m["prefixes_selected"] == 0.0
    assert m["extra_rollout_fraction"] == 0.0
    # only tool use; a plan that selects nothing (r = 0)
    b = batch([tool_rollout(0, 0.0), tool_rollout(0, 0.0)])
    plan = core.plan_resampling(b, core.AXPOConfig(r=0.0))
    m = core.step_metrics(b, plan)
    assert math.isnan(m["accuracy_no_tool"])
    assert m["tool_use_rate"] == 1.0 and m["accuracy_tool"] == 0.0
    assert m["tool_subgroup_all_wrong_rate"] == 1.0 and m["triggered_groups"] == 1.0
    assert math.isnan(m["resample_recovery_rate"]) and math.isnan(m["prefix_uncertainty_mean"])


# ---------------------------------------------------------------------------------------------
# pass@k
# ---------------------------------------------------------------------------------------------


def test_pass_at_k_against_comb():
    for n in range(1, 16):
        for c in range(n + 1):
            for k in range(1, n + 1):
                expected = 1.0 - math.comb(n - c, k) / math.comb(n, k)
                got = core.pass_at_k(n, c, k)
                assert float(np.asarray(got).reshape(-1)[0]) == pytest.approx(expected, abs=1e-12), (n, c, k)


def test_pass_at_k_by_hand_and_vectorised():
    # n=5, c=2, k=1: 2/5; k=2: 1 - C(3,2)/C(5,2) = 1 - 3/10 = .7; n=4 c=0 -> 0; n=4 c=4 -> 1
    got = core.pass_at_k([5, 5, 4, 4, 10], [2, 2, 0, 4, 9], 2)
    assert np.allclose(got, [0.7, 0.7, 0.0, 1.0, 1.0])
    assert float(np.asarray(core.pass_at_k(5, 2, 1)).reshape(-1)[0]) == pytest.approx(0.4)
    # large n: no overflow; 1 - C(900,10)/C(1000,10)
    expected = 1 - math.comb(900, 10) / math.comb(1000, 10)
    assert float(np.asarray(core.pass_at_k(1000, 100, 10)).reshape(-1)[0]) == pytest.approx(
        expected, rel=1e-12
    )


@pytest.mark.parametrize(("n", "c", "k"), [(3, 1, 4), (0, 0, 1), (5, 1, 0), (5, 6, 2), (5, -1, 2)])
def test_pass_at_k_errors(n, c, k):
    with pytest.raises(ValueError):
        core.pass_at_k(n, c, k)


# ---------------------------------------------------------------------------------------------
# Rule 7: loss
# ---------------------------------------------------------------------------------------------

NO_KL = {"kl_coef": 0.0}


def lp_pair(ratios):
    """(logprobs, old_logprobs) with the given ratios, logprobs requiring grad."""
    old = torch.full((1, len(ratios)), -1.0, dtype=torch.float64)
    lp = (old + torch.log(torch.tensor([ratios], dtype=torch.float64))).requires_grad_(True)
    return lp, old


def test_ppo_clip_by_hand():
    # clip_low .2, clip_high .28 -> clip range [.8, 1.28]
    #  t0 A=+1 ρ=1.5: max(-1.5, -1.28) = -1.28   (clipped above, grad 0)
    #  t1 A=+1 ρ=0.5: max(-0.5, -0.8)  = -0.5    (grad -ρ·A = -.5)
    #  t2 A=-1 ρ=1.5: max( 1.5,  1.28) =  1.5    (grad 1.5)
    #  t3 A=-1 ρ=0.5: max( 0.5,  0.8)  =  0.8    (clipped below, grad 0)
    #  t4 A=+2 ρ=1.1: max(-2.2, -2.2)  = -2.2    (inside, grad -2.2)
    #  t5 masked out (A=100, ρ=3)
    # loss = (-1.28 - .5 + 1.5 + .8 - 2.2) / 5 = -1.68 / 5 = -.336
    lp, old = lp_pair([1.5, 0.5, 1.5, 0.5, 1.1, 3.0])
    a = torch.tensor([[1.0, 1.0, -1.0, -1.0, 2.0, 100.0]], dtype=torch.float64)
    mask = torch.tensor([[True, True, True, True, True, False]])
    loss, metrics = core.policy_loss(lp, old, a, mask, core.LossConfig(clip_low=0.2, clip_high=0.28, **NO_KL))
    assert loss.item() == pytest.approx(-0.336, abs=1e-9)
    loss.backward()
    assert lp.grad.tolist()[0] == pytest.approx([0.0, -0.5 / 5, 1.5 / 5, 0.0, -2.2 / 5, 0.0], abs=1e-9)
    assert metrics["pg_loss"].item() == pytest.approx(-0.336, abs=1e-9)
    assert metrics["kl_penalty"].item() == 0.0


def test_clip_is_asymmetric():
    # ρ = 1.25: inside [.8, 1.28] with clip_high .28, but clipped with a symmetric .2
    lp, old = lp_pair([1.25])
    a = torch.ones(1, 1, dtype=torch.float64)
    mask = torch.ones(1, 1, dtype=torch.bool)
    loss, _ = core.policy_loss(lp, old, a, mask, core.LossConfig(clip_low=0.2, clip_high=0.28, **NO_KL))
    assert loss.item() == pytest.approx(-1.25)
    loss, _ = core.policy_loss(lp, old, a, mask, core.LossConfig(clip_low=0.2, clip_high=0.2, **NO_KL))
    assert loss.item() == pytest.approx(-1.2)
    # ρ = .75 with A < 0: clip_low .2 -> clipped to .8 (pg = .8); clip_low .3 -> inside (pg = .75)
    lp, old = lp_pair([0.75])
    loss, _ = core.policy_loss(lp, old, -a, mask, core.LossConfig(clip_low=0.2, clip_high=0.0, **NO_KL))
    assert loss.item() == pytest.approx(0.8)
    loss, _ = core.policy_loss(lp, old, -a, mask, core.LossConfig(clip_low=0.3, clip_high=0.0, **NO_KL))
    assert loss.item() == pytest.approx(0.75)


def test_dual_clip_by_hand():
    # c = 3, clip [.8, 1.28]
    #  A=-1 ρ=5:   max(5, 1.28) = 5 -> min(5, 3) = 3     (dual-clipped, grad 0)
    #  A=-1 ρ=2:   2 (< 3, unchanged)                    (grad 2)
    #  A=+1 ρ=5:   max(-5, -1.28) = -1.28 (no dual clip for A > 0)
    #  A=-2 ρ=.1:  max(.2, 1.6) = 1.6 (< 6)
    # loss = (3 + 2 - 1.28 + 1.6) / 4 = 5.32 / 4 = 1.33
    lp, old = lp_pair([5.0, 2.0, 5.0, 0.1])
    a = torch.tensor([[-1.0, -1.0, 1.0, -2.0]], dtype=torch.float64)
    mask = torch.ones(1, 4, dtype=torch.bool)
    cfg = core.LossConfig(clip_low=0.2, clip_high=0.28, dual_clip=3.0, **NO_KL)
    loss, metrics = core.policy_loss(lp, old, a, mask, cfg)
    assert loss.item() == pytest.approx(1.33, abs=1e-9)
    assert metrics["dual_clip_fraction"].item() == pytest.approx(0.25)
    loss.backward()
    assert lp.grad.tolist()[0] == pytest.approx([0.0, 2.0 / 4, 0.0, 0.0], abs=1e-9)
    # without dual clip the first token costs 5: (5 + 2 - 1.28 + 1.6) / 4 = 1.83
    lp2, _ = lp_pair([5.0, 2.0, 5.0, 0.1])
    loss, _ = core.policy_loss(lp2, old, a, mask, core.LossConfig(clip_low=0.2, clip_high=0.28, **NO_KL))
    assert loss.item() == pytest.approx(1.83, abs=1e-9)


# d = ref - logp = [.5, -1, 2]; A = 0 and ρ = 1 so pg = 0; β = .5
KL_LP = [[-1.0, -0.5, -2.0]]
KL_REF = [[-0.5, -1.5, 0.0]]


@pytest.mark.parametrize(
    ("kl_type", "in_clamp", "out_clamp", "per_token"),
    [
        # k1 = -d
        ("k1", None, None, [-0.5, 1.0, -2.0]),
        # k2 = d²/2
        ("k2", None, None, [0.125, 0.5, 2.0]),
        # k3 = e^d - d - 1: e^.5 - 1.5, e^-1, e^2 - 3
        ("k3", None, None, [0.1487212707001282, 0.36787944117144233, 4.38905609893065]),
        # input clamp 1: d -> [.5, -1, 1]; k3(1) = e - 2
        ("k3", 1.0, None, [0.1487212707001282, 0.36787944117144233, 0.7182818284590451]),
        # output clamp .3
        ("k3", None, 0.3, [0.1487212707001282, 0.3, 0.3]),
        ("k1", None, 0.3, [-0.3, 0.3, -0.3]),
        # both: d -> [.5, -.75, .75] with input clamp .75; k2 -> [.125, .28125, .28125] then <= .2
        ("k2", 0.75, 0.2, [0.125, 0.2, 0.2]),
        # defaults (20 / 10): k3(2) = 4.389 is below 10, unchanged
        ("k3", 20.0, 10.0, [0.1487212707001282, 0.36787944117144233, 4.38905609893065]),
    ],
)
def test_kl_estimators_and_clamps(kl_type, in_clamp, out_clamp, per_token):
    lp = torch.tensor(KL_LP, dtype=torch.float64)
    ref = torch.tensor(KL_REF, dtype=torch.float64)
    cfg = core.LossConfig(
        kl_coef=0.5, kl_type=kl_type, kl_input_clamp=in_clamp, kl_output_clamp=out_clamp, dual_clip=None
    )
    assert core.kl_estimate(lp, ref, cfg).tolist()[0] == pytest.approx(per_token, abs=1e-12)
    loss, metrics = core.policy_loss(
        lp, lp.clone(), torch.zeros_like(lp), torch.ones_like(lp, dtype=torch.bool), cfg, ref
    )
    assert loss.item() == pytest.approx(0.5 * sum(per_token) / 3, abs=1e-12)
    assert metrics["kl_penalty"].item() == pytest.approx(sum(per_token) / 3, abs=1e-12)


def test_kl_gradients_by_hand():
    # d = ref - logp -> dd/dlogp = -1. k1 = -d: grad +1; k2 = d²/2: grad -d; k3: grad -(e^d - 1)
    # β = .5, N = 3 -> grad = .5 * g / 3; clamped tokens get 0
    d = [0.5, -1.0, 2.0]
    cases = {
        ("k1", None): [1.0, 1.0, 1.0],
        ("k2", None): [-x for x in d],
        ("k3", None): [-(math.exp(x) - 1) for x in d],
        ("k3", 1.0): [-(math.exp(0.5) - 1), -(math.exp(-1.0) - 1), 0.0],  # d = 2 clamped at 1
    }
    for (kl_type, in_clamp), g in cases.items():
        lp = torch.tensor(KL_LP, dtype=torch.float64, requires_grad=True)
        ref = torch.tensor(KL_REF, dtype=torch.float64)
        cfg = core.LossConfig(kl_coef=0.5, kl_type=kl_type, kl_input_clamp=in_clamp, kl_output_clamp=None)
        loss, _ = core.policy_loss(
            lp, lp.detach().clone(), torch.zeros_like(lp), torch.ones(1, 3, dtype=torch.bool), cfg, ref
        )
        loss.backward()
        assert lp.grad.tolist()[0] == pytest.approx([0.5 * x / 3 for x in g], abs=1e-12), kl_type


def test_kl_needs_reference():
    lp = torch.zeros(1, 2)
    with pytest.raises(ValueError):
        core.policy_loss(lp, lp, lp, torch.ones(1, 2, dtype=torch.bool), core.LossConfig(kl_coef=0.1))


def test_micro_batches_with_global_num_tokens_sum_to_full_loss():
    gen = torch.Generator().manual_seed(0)
    r, s = 6, 7
    lp = (-torch.rand(r, s, generator=gen, dtype=torch.float64) * 2).requires_grad_(True)
    old = lp.detach() + 0.3 * torch.randn(r, s, generator=gen, dtype=torch.float64)
    ref = lp.detach() + 0.5 * torch.randn(r, s, generator=gen, dtype=torch.float64)
    adv = torch.randn(r, s, generator=gen, dtype=torch.float64)
    mask = torch.rand(r, s, generator=gen) < 0.6
    mask[0] = False  # a micro-batch row with no loss token at all
    mask[2, 0] = True
    cfg = core.LossConfig(dual_clip=3.0, kl_coef=0.1)
    full, _ = core.policy_loss(lp, old, adv, mask, cfg, ref)
    (g_full,) = torch.autograd.grad(full, lp)
    total = int(mask.sum())
    parts = [
        core.policy_loss(lp[i:j], old[i:j], adv[i:j], mask[i:j], cfg, ref[i:j], num_tokens=total)[0]
        for i, j in ((0, 2), (2, 3), (3, 6))
    ]
    summed = sum(parts)
    (g_sum,) = torch.autograd.grad(summed, lp)
    assert summed.item() == pytest.approx(full.item(), abs=1e-12)
    assert torch.allclose(g_sum, g_full, atol=1e-12)
    # and the default num_tokens is the local mask sum (per-micro-batch mean, not the same thing)
    local = core.policy_loss(lp[2:3], old[2:3], adv[2:3], mask[2:3], cfg, ref[2:3])[0]
    assert local.item() == pytest.approx(parts[1].item() * total / int(mask[2:3].sum()), abs=1e-12)


def test_non_finite_values_outside_the_mask_do_not_leak_into_the_loss():
    # row 0: A = [1, -1], ratios 1.5 / .5 -> pg = max(-1.5, -1.28) = -1.28, max(.5, .8) = .8
    # row 1 had NaN logprobs (a failed rollout) and was dropped with row_mask -> mask False
    lp = torch.tensor([[math.log(1.5) - 1.0, math.log(0.5) - 1.0], [math.nan, -1.0]], dtype=torch.float64)
    lp.requires_grad_(True)
    old = torch.tensor([[-1.0, -1.0], [math.nan, -math.inf]], dtype=torch.float64)
    ref = torch.tensor([[-1.0, -1.0], [math.nan, -1.0]], dtype=torch.float64)
    adv = torch.tensor([[1.0, -1.0], [0.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[True, True], [False, False]])
    loss, _ = core.policy_loss(lp, old, adv, mask, core.LossConfig(kl_coef=0.0), ref)
    assert loss.item() == pytest.approx((-1.28 + 0.8) / 2)
    loss.backward()
    assert torch.isfinite(lp.grad).all()
    assert lp.grad.tolist() == [[0.0, 0.0], [0.0, 0.0]]  # both row-0 tokens clipped, row 1 out


def test_loss_with_empty_mask_is_zero():
    lp = torch.zeros(2, 3, requires_grad=True)
    loss, _ = core.policy_loss(
        lp, lp.detach(), torch.ones(2, 3), torch.zeros(2, 3, dtype=torch.bool), core.LossConfig(kl_coef=0.0)
    )
    assert loss.item() == 0.0


# ---------------------------------------------------------------------------------------------
# Validation errors
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("factory", "kwargs", "field"),
    [
        (core.AXPOConfig, {"selection": "entropy"}, "selection"),
        (core.AXPOConfig, {"k": 0}, "k"),
        (core.AXPOConfig, {"r": -0.1}, "r"),
        (core.AXPOConfig, {"r": float("nan")}, "r"),
        (core.AdvantageConfig, {"epsilon": 0.0}, "epsilon"),
        (core.LossConfig, {"clip_low": 1.0}, "clip_low"),
        (core.LossConfig, {"clip_low": -0.1}, "clip_low"),
        (core.LossConfig, {"clip_high": -0.1}, "clip_high"),
        (core.LossConfig, {"dual_clip": 1.0}, "dual_clip"),
        (core.LossConfig, {"kl_type": "k4"}, "kl_type"),
        (core.LossConfig, {"kl_coef": -1.0}, "kl_coef"),
        (core.LossConfig, {"kl_input_clamp": 0.0}, "kl_input_clamp"),
        (core.LossConfig, {"kl_output_clamp": -1.0}, "kl_output_clamp"),
    ],
)
def test_config_validation(factory, kwargs, field):
    with pytest.raises(ValueError, match=field):
        factory(**kwargs)


def test_config_defaults_are_valid():
    core.AXPOConfig(r=0.0)
    core.AXPOConfig(r=1.0, k=1, selection="random")
    core.LossConfig(dual_clip=None, kl_input_clamp=None, kl_output_clamp=None, kl_type="k1")
    assert core.AdvantageConfig().epsilon == 1e-6


def test_rollout_validation():
    ok = {
        "group": 0,
        "token_ids": [1, 2, 3, 4],
        "prompt_len": 2,
        "generated": [0, 0, 1, 1],
        "logprobs": [0, 0, -1, -1],
        "reward": 0.0,
        "correct": False,
    }
    core.Rollout(**ok)
    bad = [
        {"generated": [0, 0, 1]},  # mismatched lengths
        {"logprobs": [0, 0, -1, -1, -1]},
        {"prompt_len": 5},  # prompt longer than the sequence
        {"generated": [0, 1, 1, 1]},  # prompt token marked generated
        {"tool_calls": [core.ToolCallSpan(1, 3)]},  # span starts inside the prompt
        {"tool_calls": [core.ToolCallSpan(2, 5)]},  # span ends past the sequence
        {"tool_calls": [core.ToolCallSpan(3, 3)]},  # empty span
        {"source": 0, "prefix_len": 1},  # frozen prefix shorter than the prompt
        {"source": 0, "prefix_len": 5},  # frozen prefix longer than the sequence
    ]
    for change in bad:
        with pytest.raises(ValueError):
            core.Rollout(**{**ok, **change})


def test_rollout_batch_validation():
    orig = originals()
    cont = continuation(orig[0], 0, 1.0)
    with pytest.raises(ValueError):
        batch([cont, *orig])  # resampled before original
    with pytest.raises(ValueError):
        batch([*orig[:2], cont, *orig[2:]])
    with pytest.raises(ValueError):
        batch([*orig, continuation(orig[0], 8, 1.0)])  # source is not an original row
    stray = continuation(orig[0], 0, 1.0)
    stray.group = orig[0].group + 1
    with pytest.raises(ValueError, match="group differs"):
        batch([*orig, stray])  # a continuation must answer its source's question
    with pytest.raises(ValueError):
        core.RolloutBatch.from_rollouts([])
    good = batch(orig)
    fields = {name: getattr(good, name) for name in ("token_ids", "generated", "logprobs", *good._ROW_FIELDS)}
    with pytest.raises(ValueError):
        core.RolloutBatch(**{**fields, "generated": fields["generated"][:, :5]})
    with pytest.raises(ValueError):
        core.RolloutBatch(**{**fields, "reward": fields["reward"][:3]})
    with pytest.raises(ValueError):
        core.RolloutBatch(**{**fields, "generated": fields["generated"].long()})
    with pytest.raises(ValueError):
        core.RolloutBatch(**{**fields, "token_ids": fields["token_ids"][0]})
    # concat keeps the ordering check
    with pytest.raises(ValueError):
        batch([cont]).concat(good)


def test_batch_columns():
    b, _, _ = scenario()
    assert b.num_rows == 12 and b.num_originals == 8 and b.num_groups == 2
    assert b.call_start[:2].tolist() == [CALL_START, CALL_START]
    assert b.call_end[:2].tolist() == [CALL_END, CALL_END]
    assert b.call_start[2:4].tolist() == [-1, -1]
    assert b.source.tolist() == [-1] * 8 + [0, 0, 1, 1]
    assert b.prefix_len.tolist() == [0] * 8 + [PREFIX_LEN] * 4
    assert b.tool_using.tolist() == [True, True, False, False, True, True, True, True] + [True] * 4
    assert b.response_tokens().tolist() == [8, 8, 7, 7, 8, 8, 8, 8] + [8] * 4
    # logprobs of non-generated tokens are zeroed
    assert torch.equal(b.logprobs[~b.generated], torch.zeros(int((~b.generated).sum())))

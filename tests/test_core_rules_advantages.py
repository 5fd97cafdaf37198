"""Hand-computed examples for AXPO rule 6 (DESIGN.md §1): advantages, prefix credit, masks and every ablation switch.

Every expected number is worked out by hand in the comments next to it; the batches use the
standard rollout layouts and the two-group scenario of `core_helpers`.
"""

from __future__ import annotations

import math

import pytest
import torch
from core_helpers import (
    C0,
    C1,
    EPS,
    G1_ROWS,
    HI,
    J0,
    J1,
    LO,
    P4,
    PREFIX_LEN,
    S2,
    SCENARIO_MASK,
    TOOL_MASK,
    assert_close,
    batch,
    cont_row,
    continuation,
    no_tool_rollout,
    no_tool_row,
    originals,
    scenario,
    tool_rollout,
    tool_row,
)

from axpo_nemo import core

pytestmark = pytest.mark.numerics

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


def test_rows_left_out_of_the_loss_still_count_in_their_group_statistics():
    # row_mask drops a row from the loss (e.g. NaN logprobs) but its reward is valid: g0's
    # statistics keep row 2 (the only correct original, reward 1), so every other row's advantage
    # is exactly what it is without the mask. Dropping it from the statistics instead would make
    # g0 all wrong among the rest ([0, 0, 0] -> 0 advantages).
    b, plan, axpo = scenario()
    full = core.assemble_advantages(b, plan, axpo)
    keep = torch.ones(b.num_rows, dtype=torch.bool)
    keep[2] = False
    masked = core.assemble_advantages(b, plan, axpo, row_mask=keep)
    assert torch.equal(masked.row_advantage, full.row_advantage)
    assert torch.equal(masked.prefix_advantage, full.prefix_advantage)
    assert not masked.loss_mask[2].any() and not masked.advantages[2].any()
    assert torch.equal(masked.advantages[keep], full.advantages[keep])
    assert torch.equal(masked.loss_mask[keep], full.loss_mask[keep])


def test_assemble_rejects_inconsistent_plans():
    b, plan, axpo = scenario()
    with pytest.raises(ValueError):
        core.assemble_advantages(b)  # resampled rows but no plan
    orig = originals()
    bad = batch([*orig, continuation(orig[5], 5, 1.0)])  # row 5 was never selected
    with pytest.raises(ValueError):
        core.assemble_advantages(bad, plan, axpo)

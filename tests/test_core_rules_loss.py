"""Hand-computed examples for the loss (rule 7), the step metrics, pass@k and input validation.

Every expected number is worked out by hand in the comments next to it; the batches use the
standard rollout layouts and the two-group scenario of `core_helpers`.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from core_helpers import (
    CALL_END,
    CALL_START,
    PREFIX_LEN,
    batch,
    continuation,
    no_tool_rollout,
    originals,
    scenario,
    tool_rollout,
)

from axpo_nemo import core

pytestmark = pytest.mark.numerics

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

"""Property tests of the AXPO core against independent plain-Python references (DESIGN.md §1).

Hypothesis draws the shape of a step (B, N, K, r, selection mode, ablation flags, reward style)
and a seed; the seed fills in the token-level details (lengths, tool calls, logprobs, rewards)
with `random.Random`, which keeps examples cheap. References below are written from the spec
with Python loops and floats, never by calling the core's helpers.
"""

from __future__ import annotations

import math
import random
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from axpo_nemo import core

pytestmark = pytest.mark.numerics

EPS = 1e-6
SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# ---------------------------------------------------------------------------------------------
# Random steps
# ---------------------------------------------------------------------------------------------

DISCRETE_LP = [math.log(p) for p in (0.1, 0.3, 0.5, 0.9)]  # forces exact uncertainty ties


def _reward(rng: random.Random, correct: bool, style: str) -> float:
    if style == "binary":
        return float(correct)
    if style == "format":  # verifiable reward plus a format term
        return float(correct) + rng.choice([0.0, 0.0, 0.1, -0.2])
    return rng.choice([0.0, 0.25, 0.5, 1.0, 2.0])  # arbitrary, unrelated to correctness


def _random_tokens(rng, toks, gen, lps, n, generated, discrete):
    for _ in range(n):
        toks.append(rng.randint(2, 999))
        gen.append(generated)
        if not generated:
            lps.append(0.0)
        elif discrete:
            lps.append(rng.choice(DISCRETE_LP))
        else:
            lps.append(-rng.random() * 4.0)


def _random_call(rng, toks, gen, lps, discrete, turn, well_formed):
    """Marker, body, closing marker (or a cut-off call); returns its span."""
    start = len(toks)
    body = rng.randint(0, 3)
    closed = rng.random() > 0.15
    _random_tokens(rng, toks, gen, lps, 1 + body + int(closed), True, discrete)
    return core.ToolCallSpan(start, len(toks), turn, well_formed, "zoom" if well_formed else None)


def random_rollout(rng, group, p_tool, p_correct, style, discrete, fork=None) -> core.Rollout:
    """A random trajectory. With ``fork = (source rollout, source row, length)`` it is a resampled
    rollout that copies the source's first ``length`` tokens (a prefix ending in the
    ``<tool_call>`` marker, or just the prompt for a fresh rollout) and continues from there."""
    toks, gen, lps, spans = [], [], [], []
    if fork is None:
        prompt_len = rng.randint(1, 4)
        _random_tokens(rng, toks, gen, lps, prompt_len, False, discrete)
        _random_tokens(rng, toks, gen, lps, rng.randint(0, 3), True, discrete)  # thinking
        kind = rng.choices(["none", "good", "bad", "bad_then_good"], [1 - p_tool, 0.7 * p_tool, 0.15, 0.15])[
            0
        ]
    else:
        src, _, length = fork
        prompt_len = src.prompt_len
        toks += src.token_ids[:length].tolist()
        gen += src.generated[:length].tolist()
        lps += src.logprobs[:length].tolist()
        if length > prompt_len:  # forked right after a <tool_call> marker: finish that call
            start = length - 1
            _random_tokens(rng, toks, gen, lps, rng.randint(1, 3), True, discrete)
            spans.append(core.ToolCallSpan(start, len(toks), 0, True))
            _random_tokens(rng, toks, gen, lps, rng.randint(0, 2), False, discrete)
            kind = "continued"
        else:
            _random_tokens(rng, toks, gen, lps, rng.randint(0, 3), True, discrete)
            kind = rng.choice(["none", "good"])
    if kind in ("good", "bad", "bad_then_good"):
        spans.append(_random_call(rng, toks, gen, lps, discrete, 0, kind == "good"))
        _random_tokens(rng, toks, gen, lps, rng.randint(0, 3), False, discrete)  # observation
        if kind == "bad_then_good" or rng.random() < 0.3:
            spans.append(_random_call(rng, toks, gen, lps, discrete, 1, kind != "bad" or rng.random() < 0.5))
            _random_tokens(rng, toks, gen, lps, rng.randint(0, 2), False, discrete)
    _random_tokens(rng, toks, gen, lps, rng.randint(1, 3), True, discrete)  # answer
    correct = rng.random() < p_correct
    return core.Rollout(
        group=group,
        token_ids=toks,
        prompt_len=prompt_len,
        generated=gen,
        logprobs=lps,
        reward=_reward(rng, correct, style),
        correct=correct,
        tool_calls=spans,
        num_turns=1 + len(spans),
        source=None if fork is None else fork[1],
        prefix_len=0 if fork is None else fork[2],
    )


@dataclass
class Step:
    num_groups: int
    n: int
    k: int
    r_num: int
    r_den: int
    selection: str
    prefix_fixing: bool
    prefix_credit: bool
    separate_groups: bool
    normalize_std: bool
    seed: int
    style: str
    discrete: bool

    @property
    def r(self) -> float:
        return self.r_num / self.r_den

    def axpo(self) -> core.AXPOConfig:
        return core.AXPOConfig(
            r=self.r,
            k=self.k,
            selection=self.selection,
            prefix_fixing=self.prefix_fixing,
            prefix_credit=self.prefix_credit,
            separate_groups=self.separate_groups,
        )

    def adv_cfg(self) -> core.AdvantageConfig:
        return core.AdvantageConfig(normalize_std=self.normalize_std)


@st.composite
def steps(draw, paper: bool = False, r_zero: bool = False) -> Step:
    r_den = draw(st.sampled_from([1, 4, 10, 100, 1000]))
    return Step(
        num_groups=draw(st.integers(1, 6)),
        n=draw(st.integers(1, 6)),
        k=draw(st.integers(1, 4)),
        r_num=0 if r_zero else draw(st.integers(0, r_den)),
        r_den=r_den,
        selection=draw(st.sampled_from(["uncertainty", "confident", "random"])),
        prefix_fixing=True if paper else draw(st.booleans()),
        prefix_credit=True if paper else draw(st.booleans()),
        separate_groups=True if paper else draw(st.booleans()),
        normalize_std=True if paper else draw(st.booleans()),
        seed=draw(st.integers(0, 2**31 - 1)),
        style=draw(st.sampled_from(["binary", "format", "free"])),
        discrete=draw(st.booleans()),
    )


def make_originals(step: Step, rng: random.Random) -> list[core.Rollout]:
    rollouts = []
    for g in range(step.num_groups):
        p_tool = rng.choice([0.0, 0.5, 0.9, 1.0])
        p_correct = rng.choice([0.0, 0.0, 0.2, 0.5, 0.9])
        rollouts += [
            random_rollout(rng, g, p_tool, p_correct, step.style, step.discrete) for _ in range(step.n)
        ]
    return rollouts


def make_extra(step: Step, rng: random.Random, originals, plan) -> list[core.Rollout]:
    """K resampled rollouts for every prefix the plan selected (continuations or fresh)."""
    extra = []
    for j, row in enumerate(plan.selected.tolist()):
        src = originals[row]
        length = int(plan.prefix_len[j])  # the prompt length when prefix fixing is off
        assert length == src.tool_calls[0].start + 1 or not plan.prefix_fixing
        p_correct = rng.choice([0.0, 0.3, 0.8])
        for _ in range(plan.k):
            fork = (src, row, length)
            extra.append(random_rollout(rng, src.group, 0.5, p_correct, step.style, step.discrete, fork))
    return extra


def build(step: Step):
    """(originals, plan, all rollouts, full batch) for one random step."""
    rng = random.Random(step.seed)
    originals = make_originals(step, rng)
    orig_batch = core.RolloutBatch.from_rollouts(originals)
    plan = core.plan_resampling(orig_batch, step.axpo(), seed=step.seed)
    extra = make_extra(step, rng, originals, plan)
    everything = originals + extra
    full = orig_batch.concat(core.RolloutBatch.from_rollouts(extra)) if extra else orig_batch
    return originals, orig_batch, plan, everything, full


# ---------------------------------------------------------------------------------------------
# Plain-Python references
# ---------------------------------------------------------------------------------------------


def ref_tool_using(r: core.Rollout) -> bool:
    return any(s.well_formed for s in r.tool_calls)


def ref_triggered(originals) -> dict[int, bool]:
    tool_correct = defaultdict(list)
    groups = set()
    for r in originals:
        groups.add(r.group)
        if ref_tool_using(r):
            tool_correct[r.group].append(bool(r.correct))
    return {g: bool(tool_correct[g]) and not any(tool_correct[g]) for g in groups}


def ref_uncertainty(r: core.Rollout) -> float:
    span = r.tool_calls[0]
    probs = [math.exp(float(r.logprobs[t])) for t in range(span.start + 1, span.end) if bool(r.generated[t])]
    return sum(probs) / len(probs) if probs else 0.0


def ref_normalize(rewards: list[float], normalize_std: bool) -> list[float]:
    n = len(rewards)
    if n <= 1 or all(x == rewards[0] for x in rewards):
        return [0.0] * n
    mean = sum(rewards) / n
    if not normalize_std:
        return [x - mean for x in rewards]
    std = math.sqrt(sum((x - mean) ** 2 for x in rewards) / (n - 1))
    return [(x - mean) / (std + EPS) for x in rewards]


def f32(x: float) -> float:
    """The core stores rewards as float32; round the reference's inputs the same way."""
    return float(np.float32(x))


def ref_grpo(originals, normalize_std=True):
    """Plain GRPO: per-group advantages on every generated token."""
    width = max(len(r.token_ids) for r in originals)
    by_group = defaultdict(list)
    for i, r in enumerate(originals):
        by_group[r.group].append(i)
    row_adv = [0.0] * len(originals)
    for rows in by_group.values():
        for i, a in zip(
            rows, ref_normalize([f32(originals[i].reward) for i in rows], normalize_std), strict=True
        ):
            row_adv[i] = a
    adv = [[0.0] * width for _ in originals]
    mask = [[False] * width for _ in originals]
    for i, r in enumerate(originals):
        for t in range(len(r.token_ids)):
            if bool(r.generated[t]):
                mask[i][t] = True
                adv[i][t] = row_adv[i]
    return adv, mask, row_adv


def ref_axpo(rollouts, selected, step: Step):
    """DESIGN.md §1 step 6 with all ablation flags, in loops. Returns (adv, mask, row_adv,
    prefix_reward, prefix_adv)."""
    width = max(len(r.token_ids) for r in rollouts)
    sel_pos = {row: j for j, row in enumerate(selected)}
    own = step.prefix_fixing and step.separate_groups
    stat_groups = defaultdict(list)  # key -> member rows
    for i, r in enumerate(rollouts):
        if r.source is None:
            stat_groups[("q", r.group)].append(i)
        elif own:
            stat_groups[("s", sel_pos[r.source])].append(i)
        else:
            stat_groups[("q", rollouts[r.source].group)].append(i)
    row_adv = [0.0] * len(rollouts)
    for rows in stat_groups.values():
        for i, a in zip(
            rows, ref_normalize([f32(rollouts[i].reward) for i in rows], step.normalize_std), strict=True
        ):
            row_adv[i] = a

    prefix_reward = []
    for row in selected:
        conts = [r for r in rollouts if r.source == row]
        prefix_reward.append(1.0 if any(r.correct for r in conts) else 0.0)
    prefix_adv = [row_adv[row] for row in selected]
    credit = step.prefix_fixing and step.prefix_credit and len(selected) > 0
    if credit:
        for key, rows in stat_groups.items():
            if key[0] != "q":
                continue
            rewards = [prefix_reward[sel_pos[i]] if i in sel_pos else f32(rollouts[i].reward) for i in rows]
            for i, a in zip(rows, ref_normalize(rewards, step.normalize_std), strict=True):
                if i in sel_pos:
                    prefix_adv[sel_pos[i]] = a

    adv = [[0.0] * width for _ in rollouts]
    mask = [[False] * width for _ in rollouts]
    for i, r in enumerate(rollouts):
        frozen = r.prefix_len if r.source is not None else 0
        for t in range(len(r.token_ids)):
            if not bool(r.generated[t]) or t < frozen:
                continue
            mask[i][t] = True
            adv[i][t] = row_adv[i]
            if credit and i in sel_pos and t <= r.tool_calls[0].start:
                adv[i][t] = prefix_adv[sel_pos[i]]
    return adv, mask, row_adv, prefix_reward, prefix_adv


def ref_order(originals, candidates, u, mode, budget):
    """Breadth-first order for the deterministic modes, using the core's u values (float32)."""
    sign = 1.0 if mode == "uncertainty" else -1.0
    per_group = defaultdict(list)
    for row in candidates:
        per_group[originals[row].group].append(row)
    for rows in per_group.values():
        rows.sort(key=lambda i: (sign * u[i], i))
    order, depth = [], 0
    while any(len(rows) > depth for rows in per_group.values()):
        round_ = [rows[depth] for rows in per_group.values() if len(rows) > depth]
        order += sorted(round_, key=lambda i: (sign * u[i], i))
        depth += 1
    return order[:budget]


def ref_token_loss(lp, old, a, ref, cfg: core.LossConfig):
    """One token of DESIGN.md §1 step 7, written out with scalar torch ops (for autograd)."""
    ratio = torch.exp(lp - old)
    clipped = torch.clamp(ratio, 1.0 - cfg.clip_low, 1.0 + cfg.clip_high)
    unclipped_term, clipped_term = -a * ratio, -a * clipped
    pg = unclipped_term if unclipped_term >= clipped_term else clipped_term
    if cfg.dual_clip is not None and a < 0:
        cap = -a * cfg.dual_clip
        if pg > cap:
            pg = cap + 0.0 * lp
    if cfg.kl_coef == 0:
        return pg
    d = ref - lp
    if cfg.kl_input_clamp is not None:
        d = torch.clamp(d, -cfg.kl_input_clamp, cfg.kl_input_clamp)
    if cfg.kl_type == "k1":
        kl = -d
    elif cfg.kl_type == "k2":
        kl = d * d / 2
    else:
        kl = torch.exp(d) - d - 1
    if cfg.kl_output_clamp is not None:
        kl = torch.clamp(kl, -cfg.kl_output_clamp, cfg.kl_output_clamp)
    return pg + cfg.kl_coef * kl


def ref_loss(lp, old, adv, mask, cfg, ref, num_tokens=None):
    total = lp.new_zeros(())
    count = 0
    for i in range(lp.shape[0]):
        for t in range(lp.shape[1]):
            if bool(mask[i, t]):
                count += 1
                total = total + ref_token_loss(lp[i, t], old[i, t], float(adv[i, t]), ref[i, t], cfg)
    return total / max(num_tokens if num_tokens is not None else count, 1)


def as_tensor(rows, dtype=torch.float32):
    return torch.tensor(rows, dtype=dtype)


# ---------------------------------------------------------------------------------------------
# Selection properties
# ---------------------------------------------------------------------------------------------


@SETTINGS
@given(steps())
def test_selection_properties(step):
    originals, orig_batch, plan, _, _ = build(step)
    bn = step.num_groups * step.n
    budget = (step.r_num * bn) // (step.r_den * step.k)  # exact floor(r·B·N/K)
    assert plan.budget == budget == core.resample_budget(bn, step.r, step.k)

    triggered = ref_triggered(originals)
    assert plan.triggered.tolist() == [triggered[g] for g in range(step.num_groups)]
    candidates = [i for i, r in enumerate(originals) if ref_tool_using(r) and triggered[r.group]]
    assert plan.candidates.tolist() == candidates
    expected_u = [ref_uncertainty(originals[i]) for i in candidates]
    assert np.allclose(plan.candidate_uncertainty.tolist(), expected_u, atol=1e-6, rtol=0)

    selected = plan.selected.tolist()
    assert len(selected) == min(budget, len(candidates))
    assert len(set(selected)) == len(selected)
    assert set(selected) <= set(candidates)  # triggered groups, tool-using originals only
    for j, row in enumerate(selected):
        fork_at = originals[row].tool_calls[0].start + 1 if step.prefix_fixing else originals[row].prompt_len
        assert plan.prefix_len[j] == fork_at
    u = dict(zip(candidates, plan.candidate_uncertainty.tolist(), strict=True))
    assert plan.selected_uncertainty.tolist() == [u[i] for i in selected]

    # breadth-first in every mode: the pick's round never decreases along the order, and the
    # per-group counts are as balanced as possible
    available = defaultdict(int)
    for i in candidates:
        available[originals[i].group] += 1
    taken = defaultdict(int)
    rounds = []
    for row in selected:
        rounds.append(taken[originals[row].group])
        taken[originals[row].group] += 1
    assert rounds == sorted(rounds)
    for g, n_avail in available.items():
        if taken[g] < n_avail:  # g still had candidates: nobody may be 2 picks ahead of it
            assert all(taken[h] <= taken[g] + 1 for h in available)

    if step.selection in ("uncertainty", "confident"):
        assert selected == ref_order(originals, candidates, u, step.selection, budget)
    else:
        again = core.plan_resampling(orig_batch, step.axpo(), seed=step.seed)
        assert torch.equal(again.selected, plan.selected)


# ---------------------------------------------------------------------------------------------
# Advantage properties
# ---------------------------------------------------------------------------------------------


def assert_adv_equal(actual: core.StepAdvantages, adv, mask):
    assert torch.equal(actual.loss_mask, torch.tensor(mask))
    torch.testing.assert_close(actual.advantages, as_tensor(adv), atol=1e-5, rtol=1e-5)


@SETTINGS
@given(steps(), st.integers(0, 2**31 - 1))
def test_grpo_matches_reference_and_loss(step, loss_seed):
    originals, orig_batch, _, _, _ = build(step)
    got = core.assemble_advantages(orig_batch, None, step.axpo(), step.adv_cfg())
    adv, mask, row_adv = ref_grpo(originals, step.normalize_std)
    assert_adv_equal(got, adv, mask)
    torch.testing.assert_close(got.row_advantage, as_tensor(row_adv), atol=1e-5, rtol=1e-5)

    gen = torch.Generator().manual_seed(loss_seed)
    old = orig_batch.logprobs.double()
    lp = old + 0.3 * torch.randn(old.shape, generator=gen, dtype=torch.float64)
    ref = old + 0.3 * torch.randn(old.shape, generator=gen, dtype=torch.float64)
    cfg = core.LossConfig()
    loss, _ = core.policy_loss(lp, old, got.advantages.double(), got.loss_mask, cfg, ref)
    expected = ref_loss(lp, old, as_tensor(adv, torch.float64), torch.tensor(mask), cfg, ref)
    assert loss.item() == pytest.approx(expected.item(), abs=1e-6, rel=1e-6)


@SETTINGS
@given(steps(r_zero=True))
def test_axpo_with_empty_plan_is_grpo(step):
    _, orig_batch, plan, _, _ = build(step)
    assert plan.num_selected == 0
    grpo = core.assemble_advantages(orig_batch, None, step.axpo(), step.adv_cfg())
    axpo = core.assemble_advantages(orig_batch, plan, step.axpo(), step.adv_cfg())
    assert torch.equal(axpo.advantages, grpo.advantages)
    assert torch.equal(axpo.loss_mask, grpo.loss_mask)
    assert torch.equal(axpo.row_advantage, grpo.row_advantage)


@SETTINGS
@given(steps(paper=True))
def test_paper_mode_leaves_originals_alone(step):
    originals, orig_batch, plan, _, full = build(step)
    grpo = core.assemble_advantages(orig_batch)
    axpo = core.assemble_advantages(full, plan)
    rows, width = orig_batch.num_rows, orig_batch.token_ids.shape[1]
    assert torch.equal(axpo.row_advantage[:rows], grpo.row_advantage)
    assert torch.equal(axpo.loss_mask[:rows, :width], grpo.loss_mask)
    assert not axpo.loss_mask[:rows, width:].any()
    triggered = plan.triggered.tolist()
    selected = set(plan.selected.tolist())
    for i, r in enumerate(originals):
        if not triggered[r.group] or i not in selected:  # untouched rows, incl. whole groups
            assert torch.equal(axpo.advantages[i, :width], grpo.advantages[i]), i
        else:  # a credited source: only its first-turn tokens through the marker may differ
            cut = r.tool_calls[0].start + 1
            assert torch.equal(axpo.advantages[i, cut:width], grpo.advantages[i, cut:])


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps())
def test_assemble_matches_reference(step):
    """The strongest check: every mode and flag against the loop reference of §1 step 6."""
    _, _, plan, everything, full = build(step)
    got = core.assemble_advantages(full, plan, step.axpo(), step.adv_cfg())
    adv, mask, row_adv, prefix_reward, prefix_adv = ref_axpo(everything, plan.selected.tolist(), step)
    assert_adv_equal(got, adv, mask)
    torch.testing.assert_close(got.row_advantage, as_tensor(row_adv), atol=1e-5, rtol=1e-5)
    assert got.prefix_reward.tolist() == prefix_reward
    torch.testing.assert_close(got.prefix_advantage, as_tensor(prefix_adv), atol=1e-5, rtol=1e-5)
    # reusable output buffers (bigger than needed, full of stale values) give the same result
    size = full.token_ids.numel() + 7
    out = (torch.full((size,), math.nan), torch.ones(size, dtype=torch.bool))
    again = core.assemble_advantages(full, plan, step.axpo(), step.adv_cfg(), out=out)
    assert torch.equal(again.advantages, got.advantages)
    assert torch.equal(again.loss_mask, got.loss_mask)


@SETTINGS
@given(steps())
def test_step_metrics_match_reference(step):
    originals, _, plan, everything, full = build(step)
    m = core.step_metrics(full, plan)
    n = len(originals)
    tool = [ref_tool_using(r) for r in originals]
    correct = [bool(r.correct) for r in originals]
    triggered = ref_triggered(originals)
    groups_with_tool = {r.group for r, t in zip(originals, tool, strict=True) if t}
    selected = plan.selected.tolist()
    recovered = [any(r.correct for r in everything if r.source == row) for row in selected]

    def ratio(a, b):
        return a / b if b else math.nan

    expected = {
        "tool_use_rate": ratio(sum(tool), n),
        "tool_subgroup_all_wrong_rate": ratio(sum(triggered.values()), len(groups_with_tool)),
        "triggered_groups": float(sum(triggered.values())),
        "prefixes_selected": float(len(selected)),
        "resample_recovery_rate": ratio(sum(recovered), len(selected)),
        "extra_rollout_fraction": ratio(len(everything) - n, n),
        "accuracy": ratio(sum(correct), n),
        "accuracy_tool": ratio(sum(c for c, t in zip(correct, tool, strict=True) if t), sum(tool)),
        "accuracy_no_tool": ratio(sum(c for c, t in zip(correct, tool, strict=True) if not t), n - sum(tool)),
        "mean_turns": ratio(sum(r.num_turns for r in originals), n),
        "mean_response_tokens": ratio(sum(int(r.generated.sum()) for r in originals), n),
        "prefix_uncertainty_mean": ratio(sum(ref_uncertainty(originals[i]) for i in selected), len(selected)),
    }
    assert set(m) == set(expected)
    for name, value in expected.items():
        if math.isnan(value):
            assert math.isnan(m[name]), name
        else:
            assert m[name] == pytest.approx(value, abs=1e-6), name


# ---------------------------------------------------------------------------------------------
# Loss properties
# ---------------------------------------------------------------------------------------------


@st.composite
def loss_configs(draw) -> core.LossConfig:
    return core.LossConfig(
        clip_low=draw(st.floats(0.0, 0.5)),
        clip_high=draw(st.floats(0.0, 0.6)),
        dual_clip=draw(st.one_of(st.none(), st.floats(1.5, 4.0))),
        kl_coef=draw(st.sampled_from([0.0, 0.01, 0.3])),
        kl_type=draw(st.sampled_from(["k1", "k2", "k3"])),
        kl_input_clamp=draw(st.sampled_from([None, 0.5, 20.0])),
        kl_output_clamp=draw(st.sampled_from([None, 0.4, 10.0])),
    )


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(loss_configs(), st.integers(1, 4), st.integers(1, 6), st.integers(0, 2**31 - 1), st.booleans())
def test_loss_and_gradient_match_per_token_reference(cfg, rows, width, seed, global_tokens):
    gen = torch.Generator().manual_seed(seed)
    old = -torch.rand(rows, width, generator=gen, dtype=torch.float64) * 3
    lp = (old + 0.6 * torch.randn(rows, width, generator=gen, dtype=torch.float64)).requires_grad_(True)
    ref = old + 0.8 * torch.randn(rows, width, generator=gen, dtype=torch.float64)
    adv = torch.randn(rows, width, generator=gen, dtype=torch.float64)
    adv[torch.rand(rows, width, generator=gen) < 0.2] = 0.0
    mask = torch.rand(rows, width, generator=gen) < 0.7
    num_tokens = int(mask.sum()) + 3 if global_tokens else None

    loss, _ = core.policy_loss(lp, old, adv * mask, mask, cfg, ref, num_tokens=num_tokens)
    (grad,) = torch.autograd.grad(loss, lp)
    lp_ref = lp.detach().clone().requires_grad_(True)
    expected = ref_loss(lp_ref, old, adv * mask, mask, cfg, ref, num_tokens)
    if expected.requires_grad:
        (grad_ref,) = torch.autograd.grad(expected, lp_ref)
    else:
        grad_ref = torch.zeros_like(lp_ref)
    assert loss.item() == pytest.approx(expected.item(), abs=1e-9, rel=1e-9)
    torch.testing.assert_close(grad, grad_ref, atol=1e-9, rtol=1e-9)


@settings(max_examples=60, deadline=None)
@given(loss_configs(), st.integers(2, 6), st.integers(1, 6), st.integers(0, 2**31 - 1), st.data())
def test_micro_batches_sum_to_full_batch(cfg, rows, width, seed, data):
    gen = torch.Generator().manual_seed(seed)
    old = -torch.rand(rows, width, generator=gen, dtype=torch.float64) * 3
    lp = old + 0.6 * torch.randn(rows, width, generator=gen, dtype=torch.float64)
    ref = old + 0.8 * torch.randn(rows, width, generator=gen, dtype=torch.float64)
    adv = torch.randn(rows, width, generator=gen, dtype=torch.float64)
    mask = torch.rand(rows, width, generator=gen) < 0.7
    cut = data.draw(st.integers(1, rows - 1))
    full, _ = core.policy_loss(lp, old, adv, mask, cfg, ref)
    total = int(mask.sum())
    parts = [
        core.policy_loss(lp[a:b], old[a:b], adv[a:b], mask[a:b], cfg, ref[a:b], num_tokens=total)[0]
        for a, b in ((0, cut), (cut, rows))
    ]
    assert (parts[0] + parts[1]).item() == pytest.approx(full.item(), abs=1e-12)


# ---------------------------------------------------------------------------------------------
# pass@k
# ---------------------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 60).flatmap(lambda n: st.tuples(st.just(n), st.integers(0, n), st.integers(1, n))))
def test_pass_at_k_equals_comb_formula(nck):
    n, c, k = nck
    expected = 1.0 - math.comb(n - c, k) / math.comb(n, k)
    got = float(np.asarray(core.pass_at_k(n, c, k)).reshape(-1)[0])
    assert got == pytest.approx(expected, abs=1e-12, rel=1e-9)
    assert 0.0 <= got <= 1.0

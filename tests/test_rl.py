"""Tests for the local AXPO/GRPO trainer on the tiny Qwen3-VL (B=2, N=2, K=2, a few tokens per turn).

The tiny random model never writes a tool call on its own, so `ScriptedCalls` scripts the first
turn of fresh rollouts as an ``image_zoom_in`` call; everything after it (the forks' call bodies
included) is sampled by the model. Guarantees checked: a step runs for both algorithms and
reports every metric; triggered groups are really forked and the forks' frozen prefixes carry no
loss; prefix fixing off resamples fresh rollouts; non-finite rows are dropped; GRPO equals AXPO
with r = 0; a resumed run reproduces the uninterrupted run's metrics exactly.
"""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from PIL import Image

from axpo_nemo.agent.loop import AgentLoopConfig, Continuation, SamplingParams
from axpo_nemo.agent.protocol import ChatProtocol, format_assistant_turn
from axpo_nemo.agent.sample import Sample
from axpo_nemo.agent.tools.base import ToolResult
from axpo_nemo.core import STEP_METRIC_NAMES, AdvantageConfig, AXPOConfig, LossConfig
from axpo_nemo.local import LocalGenerator
from axpo_nemo.local.rl import LOSS_METRIC_NAMES, RLConfig, RLTrainer
from axpo_nemo.models import build_tiny_qwen3vl

TIMING = ("rollout_s", "resample_s", "logprob_s", "train_s", "step_s")
CALL = format_assistant_turn("Zoom in.", tool_calls=[("image_zoom_in", {"bbox_2d": [0, 0, 500, 500]})])


class SmallZoom:
    """A zoom stand-in with a one-line schema (short prompts keep the tests fast)."""

    name = "image_zoom_in"

    def schema(self):
        return {"type": "function", "function": {"name": self.name, "parameters": {"type": "object"}}}

    def __call__(self, arguments, context):
        return ToolResult(text="zoomed", images=[context.images[0].crop((0, 0, 64, 64))])


class ScriptedCalls:
    """Fresh rollouts open with a scripted tool call (all, or those with an even seed)."""

    def __init__(self, inner: LocalGenerator, tokenizer, every: int = 1):
        self.inner, self.every = inner, every
        self.ids = tokenizer(CALL, add_special_tokens=False)["input_ids"]

    def generate(self, states, params):
        params = [params] * len(states) if isinstance(params, SamplingParams) else list(params)
        out: list = [None] * len(states)
        rest = []
        for i, s in enumerate(states):
            if s.num_turns == 0 and s.open_turn_tokens == 0 and s.seed % self.every == 0:
                out[i] = Continuation(list(self.ids), [-0.5] * len(self.ids), "stop", "</tool_call>")
            else:
                rest.append(i)
        if rest:
            for i, c in zip(
                rest, self.inner.generate([states[i] for i in rest], [params[i] for i in rest]), strict=True
            ):
                out[i] = c
        return out


pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.numerics]


@pytest.fixture(scope="module")
def base():
    return build_tiny_qwen3vl(seed=0)


@pytest.fixture(scope="module")
def questions(tmp_path_factory):
    root = tmp_path_factory.mktemp("rl")
    samples = []
    for i in range(3):
        Image.new("RGB", (96, 96), (80 * i, 120, 200)).save(root / f"{i}.png")
        samples.append(Sample(id=f"q{i}", question=f"What is {i}?", answer=str(i), images=[f"{i}.png"]))
    return root, samples


def make(base, questions, *, every=1, reward_fn=None, bundle=None, axpo=None, loss=None, **rl) -> RLTrainer:
    bundle = bundle or copy.deepcopy(base)
    root, samples = questions
    loss = loss or LossConfig(kl_coef=0.0)
    reference = copy.deepcopy(base.model) if loss.kl_coef > 0 else None
    generator = ScriptedCalls(LocalGenerator.from_bundle(bundle), bundle.tokenizer, every)
    b = rl.pop("questions_per_step", 2)
    algorithm = rl.pop("algorithm", "axpo")
    cfg = RLConfig(**{"steps": 5, "lr": 1e-3, "micro_batch_size": 3, **rl})
    loop = AgentLoopConfig(max_turns=2, max_new_tokens=16, max_total_tokens=1024, seed=3)
    return RLTrainer(
        bundle, reference, samples, root, {"image_zoom_in": SmallZoom()}, ChatProtocol(bundle.processor),
        generator, axpo or AXPOConfig(r=1.0, k=2), AdvantageConfig(), loss, cfg, loop,
        questions_per_step=b, group_size=2, reward_fn=reward_fn, algorithm=algorithm,
    )  # fmt: skip


def mixed_reward(state, sample):
    """Every group gets one right and one wrong rollout: nonzero advantages and gradients."""
    ok = state.index % 2 == 0
    return float(ok), ok


def tools_fail_reward(state, sample):
    """Original tool rollouts always fail (their groups trigger); the rest is varied."""
    ok = (not state.tool_calls or state.source is not None) and state.index % 2 == 0
    return float(ok), ok


def through_disk(state: dict) -> dict:
    """A state dict after torch.save / torch.load(weights_only=True), as a checkpoint stores it."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def comparable(metrics: dict) -> dict:
    """Metrics without wall times, NaN made comparable."""
    return {
        k: ("nan" if isinstance(v, float) and math.isnan(v) else v)
        for k, v in metrics.items()
        if k not in TIMING
    }


@pytest.mark.parametrize("algorithm", ["axpo", "grpo"])
def test_step_runs_and_reports_every_metric(base, questions, algorithm):
    trainer = make(base, questions, every=2, algorithm=algorithm, loss=LossConfig(kl_coef=0.05))
    before = [p.detach().clone() for p in trainer.model.parameters()]
    metrics = trainer.step()
    for name in (
        *STEP_METRIC_NAMES,
        *LOSS_METRIC_NAMES,
        *TIMING,
        "reward_mean",
        "grad_norm",
        "lr",
        "loss_tokens",
    ):
        assert name in metrics, name
    assert math.isfinite(metrics["loss"]) and metrics["ratio_mean"] == pytest.approx(1.0, abs=1e-6)
    assert metrics["rows"] >= 4 and metrics["loss_tokens"] > 0 and metrics["step"] == 1
    if algorithm == "grpo":
        assert metrics["prefixes_selected"] == 0 and metrics["rows"] == 4 and trainer.last.plan is None
    changed = any(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters(), strict=True))
    assert changed == (metrics["grad_norm"] > 0)


def test_triggered_groups_are_forked_and_prefixes_carry_no_loss(base, questions):
    # Every rollout calls a tool and every original is wrong: both groups trigger. Forks alternate
    # right/wrong, so each resample group has nonzero advantages.
    def reward(state, sample):
        ok = state.source is not None and state.index % 2 == 0
        return float(ok), ok

    trainer = make(base, questions, reward_fn=reward)
    metrics = trainer.step()
    rec = trainer.last
    batch, plan, adv = rec.batch, rec.plan, rec.advantages
    assert metrics["triggered_groups"] == 2 and metrics["prefixes_selected"] == 2  # M = floor(1.0·4/2)
    assert metrics["extra_rollout_fraction"] == 1.0 and metrics["resample_recovery_rate"] == 1.0
    assert batch.num_rows == 8 and batch.source.tolist()[4:] == [
        s for s in plan.selected.tolist() for _ in range(2)
    ]
    for row in range(4, 8):
        src, cut = int(batch.source[row]), int(batch.prefix_len[row])
        assert cut == int(batch.call_start[src]) + 1
        assert torch.equal(batch.token_ids[row, :cut], batch.token_ids[src, :cut])
        assert not adv.loss_mask[row, :cut].any()  # the frozen prefix: no loss
        tail = batch.generated[row, cut:]
        assert tail.any() and torch.equal(adv.loss_mask[row, cut:], tail)
        assert (adv.advantages[row, cut:][tail] != 0).all()
        assert (
            rec.states[row].prefix_len == cut
            and rec.states[row].token_ids[cut - 1] == trainer.protocol.tool_call_open_id
        )
    # prefix credit: each source's first-turn tokens through <tool_call> carry the credited advantage
    for j, src in enumerate(plan.selected.tolist()):
        start, cut = int(batch.prompt_lens[src]), int(plan.prefix_len[j])
        assert torch.allclose(adv.advantages[src, start:cut], adv.prefix_advantage[j].expand(cut - start))
        assert float(adv.prefix_advantage[j]) > 0  # r_prefix = 1 against originals that all failed


def test_without_prefix_fixing_the_extra_rollouts_are_fresh(base, questions):
    trainer = make(base, questions, axpo=AXPOConfig(r=1.0, k=2, prefix_fixing=False))
    trainer.step()
    batch = trainer.last.batch
    resampled = batch.source >= 0
    assert int(resampled.sum()) == 4
    assert torch.equal(batch.prefix_len[resampled], batch.prompt_lens[resampled])
    for row in resampled.nonzero().flatten().tolist():
        assert trainer.last.states[row].num_turns >= 1
        assert torch.equal(trainer.last.advantages.loss_mask[row], batch.generated[row])


def test_several_ppo_epochs_and_mini_batches(base, questions):
    trainer = make(
        base, questions, every=2, reward_fn=mixed_reward, ppo_epochs=2, mini_batches=2, log_entropy=True
    )
    metrics = trainer.step()
    assert metrics["optimizer_steps"] == 4 and metrics["entropy"] > 0
    assert math.isfinite(metrics["loss"]) and metrics["ratio_mean"] != 1.0  # the second pass is off-policy


def test_non_finite_logprobs_drop_the_row(base, questions):
    trainer = make(base, questions, every=2, algorithm="grpo", reward_fn=mixed_reward)
    score = trainer._score

    def poisoned(model, states, needed, batches):
        out = score(model, states, needed, batches)
        out[1, needed[1].nonzero()[0, 0]] = float("nan")
        return out

    trainer._score = poisoned
    metrics = trainer.step()
    assert metrics["nonfinite_rows"] == 1 and trainer.counters["nonfinite_rows"] == 1
    assert metrics["zero_advantage_rows"] == 0
    assert not trainer.last.advantages.loss_mask[1].any() and not bool(trainer.last.row_mask[1])
    assert math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"])


def test_grpo_equals_axpo_without_budget(base, questions):
    axpo = make(
        base, questions, every=2, algorithm="axpo", axpo=AXPOConfig(r=0.0, k=2), reward_fn=mixed_reward
    )
    grpo = make(base, questions, every=2, algorithm="grpo", reward_fn=mixed_reward)
    metrics = axpo.step()
    assert metrics["grad_norm"] > 0 and metrics["tool_use_rate"] > 0 and axpo.last.plan is not None
    assert comparable(metrics) == comparable(grpo.step())
    for a, b in zip(axpo.model.parameters(), grpo.model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_scoring_originals_during_the_resample_wave_changes_nothing(base, questions):
    # The overlapped path scores the originals on a second thread while the forks generate, and
    # backpropagates the group without a selected prefix there; it must make the same update.
    kw = {"reward_fn": tools_fail_reward, "loss": LossConfig(kl_coef=0.05), "axpo": AXPOConfig(r=0.5, k=2)}
    kw["speculative_resampling"] = False  # with it, the whole wave ran before: nothing to overlap
    overlapped = make(base, questions, overlap_scoring=True, **kw)
    sequential = make(base, questions, overlap_scoring=False, **kw)
    a, b = overlapped.step(), sequential.step()
    assert a["prefixes_selected"] == b["prefixes_selected"] == 1
    mask = overlapped.last.advantages.loss_mask
    assert torch.equal(mask, sequential.last.advantages.loss_mask) and mask[:4].any()
    torch.testing.assert_close(
        overlapped.last.old_logprobs[mask], sequential.last.old_logprobs[mask], atol=1e-5, rtol=0
    )
    for name in ("loss", "pg_loss", "kl_penalty", "ratio_mean", "grad_norm", "loss_tokens", "rows"):
        assert a[name] == pytest.approx(b[name], rel=1e-4, abs=1e-6), name
    # the untriggered group's rows were backpropagated during the wave, and the update is the same
    assert sequential.last_early_micro_batches == 0
    for p, q in zip(overlapped.model.parameters(), sequential.model.parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=1e-4, rtol=0)  # Adam: float noise on ~0 gradients


def test_where_the_wave_cuts_the_early_work_changes_no_bit(base, questions, monkeypatch):
    # The wave may end before, during or after the early micro-batches: same update either way.
    import threading

    from axpo_nemo.local import resample_wave

    class Never(threading.Event):  # the wave "never ends": every early micro-batch runs early
        def is_set(self):
            return False

    class Always(threading.Event):  # the wave "ended at once": none runs early
        def is_set(self):
            return True

    kw = {"reward_fn": tools_fail_reward, "loss": LossConfig(kl_coef=0.05), "axpo": AXPOConfig(r=0.5, k=2)}
    runs = {}
    for name, event in (("never", Never), ("always", Always)):
        monkeypatch.setattr(resample_wave, "_wave_signal", event)
        trainer = make(base, questions, micro_batch_size=1, speculative_resampling=False, **kw)
        metrics = comparable(trainer.step())
        runs[name] = (metrics, trainer.last_early_micro_batches, [p.detach().clone() for p in trainer.model.parameters()])
    (a, na, pa), (b, nb, pb) = runs["never"], runs["always"]
    assert na == 2 and nb == 0
    assert a == b and all(torch.equal(x, y) for x, y in zip(pa, pb, strict=True))


def tool_group_zero_right(state, sample):
    """Group 0's original tool rollouts are right (not triggered), group 1's wrong; forks vary."""
    if state.source is not None:
        return float(state.index % 2 == 0), state.index % 2 == 0
    ok = state.group == 0
    return float(ok), ok


@pytest.mark.parametrize(
    ("reward_fn", "extra", "speculated", "hits", "selected"),
    [(tools_fail_reward, 0, 1, 1, 0), (tool_group_zero_right, 0, 1, 0, 2), (tool_group_zero_right, 1, 2, 1, 2)],
    ids=["guess-right", "guess-wrong", "guess-wrong-covered"],
)
def test_speculative_resampling_samples_the_same_wave(base, questions, reward_fn, extra, speculated, hits, selected):
    # Budget M = 1 of 2 groups: the guess (every tool group all wrong) takes group 0's prefix (a
    # tie on uncertainty, broken by row). Right when group 0 triggers; when its tool rollouts are
    # right the plan takes group 1's: without an extra prefix the speculated forks are discarded
    # and group 1's run after the originals; with one, group 1's were speculated too.
    kw = {"reward_fn": reward_fn, "loss": LossConfig(kl_coef=0.05), "axpo": AXPOConfig(r=0.5, k=2)}
    spec = make(base, questions, speculative_resampling=True, speculative_extra_prefixes=extra, **kw)
    plain = make(base, questions, speculative_resampling=False, **kw)
    a, b = spec.step(), plain.step()
    assert a["speculated_prefixes"] == speculated and b["speculated_prefixes"] == 0
    assert a["speculation_hits"] == hits and a["prefixes_selected"] == 1
    assert spec.last.plan.selected.tolist() == plain.last.plan.selected.tolist() == [selected]
    assert [s.token_ids for s in spec.last.states] == [s.token_ids for s in plain.last.states]
    assert [s.source for s in spec.last.states] == [s.source for s in plain.last.states]
    assert [s.index for s in spec.last.states] == list(range(6))
    mask = spec.last.advantages.loss_mask
    assert torch.equal(mask, plain.last.advantages.loss_mask) and mask[4:].any()
    torch.testing.assert_close(spec.last.old_logprobs[mask], plain.last.old_logprobs[mask], atol=1e-5, rtol=0)
    for name in ("loss", "pg_loss", "kl_penalty", "ratio_mean", "grad_norm", "loss_tokens", "rows", "reward_mean"):
        assert a[name] == pytest.approx(b[name], rel=1e-4, abs=1e-6), name
    for p, q in zip(spec.model.parameters(), plain.model.parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=1e-4, rtol=0)


def test_a_speculated_wave_nobody_uses_is_cancelled(base, questions):
    # Every rollout right: no group triggers, so the speculative wave is stopped, not awaited.
    trainer = make(base, questions, reward_fn=lambda s, q: (1.0, True), axpo=AXPOConfig(r=0.5, k=2))
    metrics = trainer.step()
    assert metrics["speculated_prefixes"] == 1 and metrics["speculation_hits"] == 0
    assert metrics["prefixes_selected"] == 0 and metrics["rows"] == 4


def test_an_error_during_the_step_leaves_no_speculating_thread(base, questions):
    import threading

    def broken(state, sample):
        raise RuntimeError("verifier crashed")

    trainer = make(base, questions, reward_fn=broken, axpo=AXPOConfig(r=0.5, k=2))
    with pytest.raises(RuntimeError, match="verifier crashed"):
        trainer.step()
    assert not [t for t in threading.enumerate() if t.name.startswith("axpo-speculate")]


def test_early_gradients_are_dropped_when_their_advantages_changed(base, questions):
    from axpo_nemo.local.resample_wave import EarlyUpdate, confirm_early

    trainer = make(base, questions, reward_fn=mixed_reward)
    trainer.step()
    adv = trainer.last.advantages
    r0 = 4  # the originals: 2 questions x 2 rollouts
    for p in trainer.model.parameters():
        p.grad = torch.ones_like(p)
    pre = EarlyUpdate([0, 1], [], 1, adv.advantages[:r0].clone(), adv.loss_mask[:r0].clone(), {})
    assert confirm_early(pre, adv, {0, 1, 2, 3}, trainer.optimizer) is pre  # unchanged: kept
    assert all(p.grad is not None for p in trainer.model.parameters())
    changed = adv.advantages.clone()
    changed[1][adv.loss_mask[1]] += 0.5
    moved = type(adv)(changed, adv.loss_mask, adv.row_advantage, adv.prefix_reward, adv.prefix_advantage)
    assert confirm_early(pre, moved, {0, 1, 2, 3}, trainer.optimizer) is None  # changed: recomputed
    assert all(p.grad is None for p in trainer.model.parameters())


def test_skipping_zero_advantage_rows_gives_the_same_update(base, questions):
    def one_group_signal(state, sample):  # group 0 mixed, group 1 all wrong: its rows are skipped
        ok = state.group == 0 and state.index % 2 == 0
        return float(ok), ok

    kw = {"every": 2, "algorithm": "grpo", "reward_fn": one_group_signal}
    fast = make(base, questions, **kw)
    full = make(base, questions, skip_zero_advantage=False, **kw)
    a, b = fast.step(), full.step()
    assert a["zero_advantage_rows"] == 2 and b["zero_advantage_rows"] == 0
    for name in ("loss", "pg_loss", "ratio_mean", "grad_norm", "loss_tokens"):
        assert a[name] == pytest.approx(b[name], rel=1e-5, abs=1e-7), name
    # Adam turns float noise in near-zero gradients into up to lr-sized steps: compare loosely.
    for p, q in zip(fast.model.parameters(), full.model.parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=1e-4, rtol=0)


def test_resume_reproduces_the_uninterrupted_run(base, questions):
    kw = {
        "every": 1,
        "reward_fn": tools_fail_reward,
        "loss": LossConfig(kl_coef=0.05),
        "axpo": AXPOConfig(r=0.5, k=2),
        "warmup_steps": 2,
    }
    first = make(base, questions, **kw)
    first.step()
    snapshot = through_disk(first.state_dict())
    expected = [comparable(first.step()) for _ in range(2)]  # the second crosses an epoch (3 questions)

    other = copy.deepcopy(base)
    with torch.no_grad():
        for p in other.model.parameters():
            p.add_(0.01)
    resumed = make(base, questions, bundle=other, **kw)
    resumed.load_state_dict(snapshot)
    got = [comparable(resumed.step()) for _ in range(2)]
    assert got == expected
    assert all(m["grad_norm"] > 0 and m["kl_penalty"] > 0 and m["prefixes_selected"] == 1 for m in expected)
    assert resumed.counters == first.counters and (resumed.epoch, resumed.position) == (
        first.epoch,
        first.position,
    )
    for a, b in zip(resumed.model.parameters(), first.model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_question_order_is_seeded_and_reshuffled_each_epoch(base, questions):
    trainer = make(base, questions, questions_per_step=3)
    epochs = [trainer.draw_questions() for _ in range(4)]
    assert all(sorted(e) == [0, 1, 2] for e in epochs)
    assert len({tuple(e) for e in epochs}) > 1
    again = make(base, questions, questions_per_step=3)
    assert [again.draw_questions() for _ in range(4)] == epochs
    with pytest.raises(ValueError, match="reference"):
        RLTrainer(
            base, None, questions[1], questions[0], {}, None, None, AXPOConfig(), AdvantageConfig(),
            LossConfig(kl_coef=0.1), RLConfig(), AgentLoopConfig(), questions_per_step=2, group_size=2,
        )  # fmt: skip

"""Tests for the local SFT trainer on the tiny Qwen3-VL with the real zoom tool.

Guarantees checked: samples are tokenized by replaying them through the agent loop (bad ones are
skipped and counted), the loss covers assistant tokens only, the model overfits a handful of
samples, a run resumed from a state dict continues bit-identically, and the data order and LR
schedule are pure functions of their inputs.
"""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from PIL import Image

from axpo_nemo.agent.loop import AgentLoopConfig
from axpo_nemo.agent.protocol import ChatProtocol, format_assistant_turn
from axpo_nemo.agent.sample import Sample
from axpo_nemo.agent.tools.base import ToolResult
from axpo_nemo.agent.tools.zoom import ImageZoomTool
from axpo_nemo.local.optim import WarmupCosineSchedule
from axpo_nemo.local.sft import SFTConfig, SFTTrainer, epoch_batches
from axpo_nemo.models import build_tiny_qwen3vl

LOOP = AgentLoopConfig(max_turns=3, max_total_tokens=2048)


class SmallZoom:
    """A zoom stand-in with a one-line schema: short prompts keep the training tests fast."""

    name = "image_zoom_in"

    def schema(self):
        return {"type": "function", "function": {"name": self.name, "parameters": {"type": "object"}}}

    def __call__(self, arguments, context):
        return ToolResult(text="zoomed", images=[context.images[0].crop((0, 0, 64, 64))])


pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.numerics]


@pytest.fixture(scope="module")
def base():
    return build_tiny_qwen3vl(seed=0)


@pytest.fixture
def bundle(base):
    return copy.deepcopy(base)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Four good samples (two with a zoom call), and three that must be skipped."""
    root = tmp_path_factory.mktemp("sft")
    samples = []
    for i in range(4):
        Image.new("RGB", (96 + 32 * i, 96), (50 * i, 120, 200)).save(root / f"{i}.png")
        turns = []
        if i % 2 == 0:
            call = [("image_zoom_in", {"bbox_2d": [0, 0, 500, 500]})]
            turns.append({"role": "assistant", "content": format_assistant_turn("Zoom in.", tool_calls=call)})
            turns.append({"role": "tool", "content": "(crop)", "images": []})
        turns.append({"role": "assistant", "content": format_assistant_turn(f"It shows {i}.", answer=str(i))})
        samples.append(
            Sample(
                id=f"s{i}", question=f"Which number {i}?", answer=str(i), images=[f"{i}.png"], messages=turns
            )
        )
    samples += [
        Sample(
            id="missing",
            question="q",
            answer="1",
            images=["nope.png"],
            messages=[{"role": "assistant", "content": "x"}],
        ),
        Sample(
            id="unanswered",
            question="q",
            answer="1",
            messages=[{"role": "assistant", "content": "no box here"}],
        ),
        Sample(id="empty", question="q", answer="1"),
    ]
    return root, samples


def make(bundle, data, tool=None, **overrides) -> SFTTrainer:
    root, samples = data
    cfg = SFTConfig(
        **{"steps": 6, "lr": 3e-3, "warmup_steps": 2, "batch_size": 2, "micro_batch_size": 1, **overrides}
    )
    tools = {"image_zoom_in": tool or ImageZoomTool()}
    return SFTTrainer(bundle, samples, root, tools, ChatProtocol(bundle.processor), cfg, LOOP)


def test_replay_tokenizes_and_bad_samples_are_counted(bundle, data):
    trainer = make(bundle, data)
    assert [e.sample_id for e in trainer.examples] == ["s0", "s1", "s2", "s3"]
    assert dict(trainer.skipped) == {"replay_error": 1, "no_answer": 1, "no_turns": 1}
    assert ("missing", "replay_error") in trainer.skipped_samples
    zoomed = trainer.examples[0].state
    assert zoomed.tool_calls[0].error is None and len(zoomed.images) == 2  # the tool really ran
    with pytest.raises(ValueError, match="no usable sample"):
        make(bundle, data, max_tokens=10)


def test_loss_mask_is_exactly_the_assistant_tokens(bundle, data):
    trainer = make(bundle, data)
    proto = ChatProtocol(bundle.processor)
    for example in trainer.examples:
        state = example.state
        mask = example.loss_mask
        assert mask.tolist() == state.generated
        assert not mask[: state.prompt_len].any()
        for turn in state.turns:  # each turn is trained on, its observation is not
            assert mask[turn.start : turn.end].all()
            assert not mask[turn.end : turn.end + turn.observation_len].any()
        text = proto.decode([t for t, m in zip(state.token_ids, mask.tolist(), strict=True) if m])
        assert (
            "<tool_response>" not in text and "<|vision_start|>" not in text and text.endswith("<|im_end|>")
        )
    observed = trainer.examples[0].state
    assert observed.turns[0].observation_len > 0


def test_loss_decreases_when_overfitting(bundle, data):
    trainer = make(
        bundle, data, SmallZoom(), steps=20, batch_size=4, micro_batch_size=4, lr=3e-3, warmup_steps=2
    )
    history = trainer.train()
    assert len(history) == 20 and trainer.done
    losses = [m["loss"] for m in history]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) / 3 < 0.5 * sum(losses[:3]) / 3
    assert history[0]["tokens"] == sum(int(e.loss_mask.sum()) for e in trainer.examples)
    assert history[0]["lr"] == pytest.approx(1.5e-3) and history[-1]["lr"] < history[2]["lr"]


def test_resume_is_bit_identical(base, data):
    first = make(copy.deepcopy(base), data, SmallZoom(), steps=7, bucket_batches=1)
    first.train(2)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)  # as a checkpoint stores it
    buffer.seek(0)
    snapshot = torch.load(buffer, weights_only=True)
    expected = [m["loss"] for m in first.train(4)]  # crosses an epoch boundary (2 batches/epoch)
    final = first.model.state_dict()

    other = copy.deepcopy(base)
    with torch.no_grad():  # different starting weights: everything must come from the snapshot
        for p in other.model.parameters():
            p.add_(0.01)
    resumed = make(other, data, SmallZoom(), steps=7, bucket_batches=1)
    resumed.load_state_dict(snapshot)
    got = [m["loss"] for m in resumed.train(4)]
    assert got == expected
    for name, value in resumed.model.state_dict().items():
        assert torch.equal(value, final[name]), name
    assert resumed.epoch == first.epoch and resumed.position == first.position


def test_epoch_batches_are_deterministic_and_bucketed():
    lengths = [10, 50, 20, 40, 30, 60, 70]
    a = epoch_batches(lengths, 2, seed=3, epoch=0, bucket_batches=2)
    assert a == epoch_batches(lengths, 2, seed=3, epoch=0, bucket_batches=2)
    assert a != epoch_batches(lengths, 2, seed=3, epoch=1, bucket_batches=2)
    assert sorted(i for b in a for i in b) == list(range(7)) and len(a) == 4
    for b in a:  # each batch comes from one sorted window: longest first
        assert [lengths[i] for i in b] == sorted((lengths[i] for i in b), reverse=True)
    plain = epoch_batches(lengths, 3, seed=3, epoch=0)
    assert sorted(i for b in plain for i in b) == list(range(7)) and [len(b) for b in plain] == [3, 3, 1]


def test_warmup_cosine_schedule():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = WarmupCosineSchedule(opt, warmup_steps=2, total_steps=6, min_lr_ratio=0.1)
    lrs = []
    for _ in range(7):
        lrs.append(sched.apply())
        sched.step()
    assert lrs[:3] == pytest.approx([0.5, 1.0, 1.0])
    assert lrs[4] == pytest.approx(0.1 + 0.9 * 0.5) and lrs[6] == pytest.approx(0.1)
    restored = WarmupCosineSchedule(opt, 0, 1)
    restored.load_state_dict(sched.state_dict())
    assert restored.apply() == pytest.approx(0.1)


def test_copy_batches_repeat_a_span_and_are_a_function_of_seed_and_step():
    from axpo_nemo.local.copy_warmup import copy_batch

    x = copy_batch(100, 4, 5, 3, seed=1, step=7)
    assert x.shape == (4, 13) and int(x.max()) < 100
    assert torch.equal(x[:, :5], x[:, -5:])
    assert torch.equal(x, copy_batch(100, 4, 5, 3, seed=1, step=7))
    assert not torch.equal(x, copy_batch(100, 4, 5, 3, seed=1, step=8))
    digits = torch.tensor([7, 8, 9])
    y = copy_batch(100, 4, 5, 3, seed=1, step=7, alphabet=digits)
    assert torch.equal(y[:, :5], y[:, -5:]) and torch.isin(y[1::2, :5], digits).all()
    assert torch.equal(y[0::2], x[0::2])  # the even rows keep their random-token spans


def test_warmups_run_first_then_sft_on_full_prompts(base, data):
    # copy warm-up steps, then short-context epochs (no tool schemas), then the SFT steps; a
    # resume in the middle of a warm-up continues exactly
    trainer = make(
        copy.deepcopy(base), data, SmallZoom(), steps=2, copy_warmup_steps=2, copy_warmup_batch=4,
        short_context_epochs=1, bucket_batches=1,
    )  # fmt: skip
    assert trainer.total_steps == 2 + 2 + 2  # 4 examples, batches of 2
    short, full = trainer.short_examples, trainer.examples
    assert [e.sample_id for e in short] == [e.sample_id for e in full]
    for s, f in zip(short, full, strict=True):  # the same trajectory, minus the system part
        assert len(s) < len(f) and s.state.token_ids[-20:] == f.state.token_ids[-20:]
        assert "<tools>" not in ChatProtocol(base.processor).decode(s.state.token_ids)
    trainer.train(3)
    snapshot = copy.deepcopy(trainer.state_dict())
    rest = trainer.train(3)
    assert [m["warmup"] for m in rest] == [2.0, 0.0, 0.0] and trainer.done
    resumed = make(
        copy.deepcopy(base), data, SmallZoom(), steps=2, copy_warmup_steps=2, copy_warmup_batch=4,
        short_context_epochs=1, bucket_batches=1,
    )  # fmt: skip
    resumed.load_state_dict(snapshot)
    assert [m["loss"] for m in resumed.train(3)] == [m["loss"] for m in rest]


def test_copy_rehearsal_adds_a_copy_batch_to_every_step_after_the_warmup(base, data):
    # SFT overwrote the copy circuit the warm-up grew (docs/results.md); rehearsal keeps training
    # it: every later step also backpropagates a copy batch, a function of (seed, step) as in the
    # warm-up, so a resume continues exactly
    kwargs = {"steps": 3, "copy_warmup_steps": 1, "copy_warmup_batch": 4, "bucket_batches": 1}
    plain = make(copy.deepcopy(base), data, SmallZoom(), **kwargs)
    rehearsed = make(copy.deepcopy(base), data, SmallZoom(), copy_rehearsal_batch=2, **kwargs)
    a, b = plain.train(2), rehearsed.train(2)
    assert math.isfinite(a[0]["copy_loss"]) and a[0]["copy_loss"] == b[0]["copy_loss"]  # the warm-up
    assert math.isnan(a[1]["copy_loss"]) and math.isfinite(b[1]["copy_loss"])
    assert a[1]["loss"] == b[1]["loss"]  # the same SFT batch, plus the copy batch's gradient
    weights = next(iter(rehearsed.model.parameters()))
    assert not torch.equal(next(iter(plain.model.parameters())), weights)
    snapshot = copy.deepcopy(rehearsed.state_dict())
    rest = rehearsed.train(2)
    resumed = make(copy.deepcopy(base), data, SmallZoom(), copy_rehearsal_batch=2, **kwargs)
    resumed.load_state_dict(snapshot)
    again = resumed.train(2)
    assert [(m["loss"], m["copy_loss"]) for m in again] == [(m["loss"], m["copy_loss"]) for m in rest]


def test_copy_warmup_teaches_a_fresh_model_to_copy(base):
    # the reason for the warm-up: after it, the repeat of a random span is predictable
    from axpo_nemo.local.copy_warmup import copy_batch, copy_loss

    model = copy.deepcopy(base).model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    held_out = copy_batch(1000, 16, 12, 8, seed=99, step=0)
    with torch.no_grad():
        before = float(copy_loss(model, held_out, 12))
    for step in range(150):
        opt.zero_grad()
        copy_loss(model, copy_batch(1000, 16, 12, 8, seed=0, step=step), 12).backward()
        opt.step()
    with torch.no_grad():
        after = float(copy_loss(model, held_out, 12))
    assert before > 5.0 and after < 1.0, (before, after)


def test_observation_weight_scales_the_loss_of_the_turns_after_a_tool_observation(base, data):
    # the tokens after an observation (the answer read from the tool's output) are weighted,
    # the rest are not, and the mean stays over the plain token count: loss(w) = A + (w - 1)·B
    trainer = make(copy.deepcopy(base), data, SmallZoom(), bucket_batches=1)
    for e in trainer.examples:
        after, mask = e.after_observation, e.loss_mask
        assert not (after & ~mask).any()
        if e.sample_id in ("s1", "s3"):  # no tool call: nothing follows an observation
            assert not after.any()
            continue
        first = int(after.nonzero()[0])
        assert after[first:].equal(mask[first:])  # from there on: the whole last turn
        assert mask[:first].any() and not mask[first - 1]  # the call turn, then the observation
    losses = {
        w: make(copy.deepcopy(base), data, SmallZoom(), batch_size=4, observation_weight=w).step()["loss"]
        for w in (1.0, 2.0, 3.0)
    }
    assert losses[2.0] > losses[1.0]
    assert losses[3.0] - losses[1.0] == pytest.approx(2 * (losses[2.0] - losses[1.0]), rel=1e-4)

"""Tests for `local.policy`: batched per-token logprobs of whole trajectories on the tiny Qwen3-VL.

Guarantees checked: recomputed logprobs equal the generator's behaviour logprobs (right-padded
batches, several micro-batches, tokens after an image observation), only the asked-for positions
are scored, the differentiable per-micro-batch path gives the same values and gradients, and the
micro-batch split respects its row and token limits.
"""

from __future__ import annotations

import pytest
import torch
from image_helpers import random_image as _image

from axpo_nemo.agent.loop import AgentLoopConfig, Continuation, SamplingParams, run_rollouts
from axpo_nemo.agent.protocol import ChatProtocol, format_assistant_turn
from axpo_nemo.agent.tools.base import ToolResult
from axpo_nemo.agent.trajectory import TrajectoryState
from axpo_nemo.local import LocalGenerator
from axpo_nemo.local.policy import (
    TokenSequence,
    as_sequences,
    iter_logprobs,
    micro_batches,
    plan_micro_batches,
    sequence_logprobs,
    shared_prefix_len,
)
from axpo_nemo.models import build_tiny_qwen3vl


class CropTool:
    """Returns a crop of the question image (an image observation)."""

    name = "crop"

    def schema(self):
        return {"type": "function", "function": {"name": "crop", "parameters": {"type": "object"}}}

    def __call__(self, arguments, context):
        return ToolResult(text="a crop", images=[context.images[0].crop((0, 0, 64, 48))])


CALL = format_assistant_turn("Look closer.", tool_calls=[("crop", {})])


class ScriptedFirstTurn:
    """Turn 0 of even-seeded fresh states is a scripted tool call; everything else is sampled."""

    def __init__(self, inner, tokenizer):
        self.inner = inner
        self.ids = tokenizer(CALL, add_special_tokens=False)["input_ids"]

    def generate(self, states, params):
        params = [params] * len(states) if isinstance(params, SamplingParams) else list(params)
        out: list = [None] * len(states)
        rest = [i for i, s in enumerate(states) if s.num_turns or s.open_turn_tokens or s.seed % 2]
        for i in set(range(len(states))) - set(rest):
            out[i] = Continuation(list(self.ids), [0.0] * len(self.ids), "stop", "</tool_call>")
        if rest:
            for i, c in zip(
                rest, self.inner.generate([states[i] for i in rest], [params[i] for i in rest]), strict=True
            ):
                out[i] = c
        return out


pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.numerics]


@pytest.fixture(scope="module")
def bundle():
    return build_tiny_qwen3vl(seed=0)


@pytest.fixture(scope="module")
def rollouts(bundle):
    """Four finished trajectories of different lengths; the even-seeded ones saw an image observation."""
    proto = ChatProtocol(bundle.processor)
    prompts = [
        proto.build_prompt("What is written here?", [_image(120, 90, 1)], [CropTool()]),
        proto.build_prompt("Hi", [], [CropTool()]),
    ]
    states = [TrajectoryState.from_prompt(prompts[i % 2], seed=i, index=i) for i in range(4)]
    states[1] = TrajectoryState.from_prompt(prompts[0], seed=1, index=1)
    gen = ScriptedFirstTurn(LocalGenerator.from_bundle(bundle), bundle.tokenizer)
    cfg = AgentLoopConfig(max_turns=2, max_new_tokens=20, max_total_tokens=1024, temperature=0.7, seed=5)
    run_rollouts(states, gen, [CropTool()], cfg, protocol=proto)
    return states


def sampled_mask(state: TrajectoryState) -> torch.Tensor:
    """Tokens the model itself sampled (not the scripted first turn)."""
    mask = torch.tensor(state.generated)
    if state.seed % 2 == 0:
        mask[: state.turns[0].end] = False
    return mask


def test_recomputed_logprobs_equal_the_generators(bundle, rollouts):
    assert len({len(s) for s in rollouts}) > 1  # padding is exercised
    assert len(rollouts[0].images) == 2 and rollouts[0].num_turns == 2  # an image observation
    lp = sequence_logprobs(bundle.model, rollouts, micro_batch_size=3, temperature=0.7)
    assert lp.dtype == torch.float32 and lp.shape == (4, max(len(s) for s in rollouts))
    after_image = 0
    for i, s in enumerate(rollouts):
        mask = sampled_mask(s)
        assert mask.any()
        torch.testing.assert_close(lp[i, : len(s)][mask], torch.tensor(s.logprobs)[mask], atol=1e-4, rtol=0)
        assert bool((lp[i, len(s) :] == 0).all()) and float(lp[i, 0]) == 0.0
        if len(s.images) > 1:
            after_image += int(mask[s.images[-1].end :].sum())
    assert after_image > 0


def test_only_needed_positions_are_scored(bundle, rollouts):
    needed = [s.generated for s in rollouts]
    full = sequence_logprobs(bundle.model, rollouts, micro_batch_size=4, temperature=0.7)
    part = sequence_logprobs(bundle.model, rollouts, micro_batch_size=1, temperature=0.7, needed=needed)
    for i, s in enumerate(rollouts):
        gen = torch.zeros(part.shape[1], dtype=torch.bool)
        gen[: len(s)] = torch.tensor(s.generated)
        assert bool((part[i][~gen] == 0).all())
        torch.testing.assert_close(part[i][gen], full[i][gen], atol=1e-5, rtol=0)


def test_differentiable_chunks_match_and_backpropagate(bundle, rollouts):
    model = bundle.model
    ref, ref_ent = sequence_logprobs(model, rollouts, micro_batch_size=2, entropy=True)
    model.zero_grad(set_to_none=True)
    seen = []
    for chunk in iter_logprobs(model, rollouts, micro_batch_size=2, entropy=True, chunk_tokens=7):
        assert chunk.logprobs.requires_grad
        w = chunk.logprobs.shape[1]
        torch.testing.assert_close(chunk.logprobs.detach(), ref[chunk.rows, :w], atol=1e-5, rtol=0)
        torch.testing.assert_close(chunk.entropy.detach(), ref_ent[chunk.rows, :w], atol=1e-5, rtol=0)
        chunk.logprobs.sum().backward()
        seen += chunk.rows
    assert sorted(seen) == [0, 1, 2, 3]
    grad_chunked = model.lm_head.weight.grad.clone()
    model.zero_grad(set_to_none=True)
    sequence_logprobs(model, rollouts, micro_batch_size=4, grad=True).sum().backward()
    torch.testing.assert_close(model.lm_head.weight.grad, grad_chunked, atol=1e-4, rtol=1e-4)
    model.zero_grad(set_to_none=True)
    # entropy of softmax(logits) at a scored position, by hand
    s = rollouts[1]
    with torch.no_grad():
        logits = model(**s.model_inputs()).logits[0].float()
    t = len(s) - 1
    probs = torch.softmax(logits[t - 1], dim=-1)
    torch.testing.assert_close(ref_ent[1, t], -(probs * probs.log()).sum(), atol=1e-4, rtol=0)


def test_shared_prefix_encoded_once_gives_the_same_logprobs_and_gradients(bundle, rollouts):
    model = bundle.model
    assert plan_micro_batches(rollouts, 4) == [[3, 0, 2, 1]]  # token order: prompts group together
    assert shared_prefix_len(rollouts[:3]) >= rollouts[0].prompt_len  # same question: whole prompt
    grads, values = [], []
    for share in (None, 1):
        model.zero_grad(set_to_none=True)
        lp = sequence_logprobs(model, rollouts, micro_batch_size=4, grad=True, min_shared_prefix=share)
        lp.sum().backward()
        values.append(lp.detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    model.zero_grad(set_to_none=True)
    torch.testing.assert_close(values[0], values[1], atol=1e-5, rtol=0)
    assert grads[0].keys() == grads[1].keys() and any("visual" in n for n in grads[0])
    for name, g in grads[0].items():
        # float32 sums in another order: the error scales with the tensor's magnitude, not 1
        # (1 element of 132,736 was 1.5e-5 off on some CPUs); a missing term would be O(max |g|)
        scale = float(g.abs().max())
        torch.testing.assert_close(grads[1][name], g, atol=max(2e-4 * scale, 1e-7), rtol=1e-3)


def test_shared_prefix_stops_at_a_differing_image(bundle):
    proto = ChatProtocol(bundle.processor)
    a = proto.build_prompt("Same words", [_image(64, 64, 1)], [CropTool()])
    b = proto.build_prompt("Same words", [_image(64, 64, 2)], [CropTool()])
    assert a.token_ids == b.token_ids
    rows = [TokenSequence(a.token_ids, a.images), TokenSequence(b.token_ids, b.images)]
    assert shared_prefix_len(rows) == a.images[0].start  # the pads differ in content: not shared
    same = TokenSequence(a.token_ids, [type(s)(copy_image(s.image), s.start) for s in a.images])
    assert shared_prefix_len([rows[0], same]) == len(a.token_ids) - 1
    # different images are still scored correctly when the prefix stops before them
    lp = sequence_logprobs(bundle.model, rows, micro_batch_size=2, min_shared_prefix=1)
    alone = sequence_logprobs(bundle.model, rows, micro_batch_size=1, min_shared_prefix=None)
    torch.testing.assert_close(lp, alone, atol=1e-5, rtol=0)


def copy_image(image):
    """An equal image in a distinct object (compared by content, not identity)."""
    return type(image)(image.image, image.pixel_values.clone(), image.grid_thw.clone(), image.num_tokens)


def test_a_sampled_image_pad_token_is_an_ordinary_token(bundle, rollouts):
    proto = ChatProtocol(bundle.processor)
    s = rollouts[0]
    pad = proto.image_pad_id
    odd = TokenSequence([*s.token_ids, pad, 7, pad], list(s.images))  # pads the model sampled
    lp = sequence_logprobs(bundle.model, [odd, s], micro_batch_size=2)
    assert lp.isfinite().all()
    ref = sequence_logprobs(bundle.model, [s], micro_batch_size=1)
    torch.testing.assert_close(lp[0, : len(s)], ref[0, : len(s)], atol=1e-5, rtol=0)


def test_text_only_token_batches(bundle):
    ids = torch.tensor([[5, 6, 7, 8, 9], [10, 11, 12, 0, 0]])
    seqs = as_sequences(ids, torch.tensor([5, 3]))
    lp = sequence_logprobs(bundle.model, seqs, micro_batch_size=2)
    with torch.no_grad():
        logits = bundle.model(input_ids=ids[1:, :3]).logits[0].float()
    expected = torch.log_softmax(logits[:-1], dim=-1).gather(1, ids[1, 1:3, None])[:, 0]
    torch.testing.assert_close(lp[1, 1:3], expected, atol=1e-5, rtol=0)
    assert lp.shape == (2, 5) and float(lp[1, 3:].abs().sum()) == 0.0


def test_micro_batches_sort_by_length_and_respect_limits():
    lengths = [5, 9, 3, 9, 7]
    assert micro_batches(lengths, 2) == [[1, 3], [4, 0], [2]]
    assert micro_batches(lengths, 4, max_tokens=20) == [[1, 3], [4, 0], [2]]
    assert micro_batches(lengths, 4, max_tokens=8) == [[1], [3], [4], [0], [2]]  # a long row still goes alone
    assert micro_batches([], 3) == []
    with pytest.raises(ValueError):
        micro_batches(lengths, 0)

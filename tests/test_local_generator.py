"""Tests for the local KV-cached Qwen3-VL generator on the tiny model.

Guarantees checked: behaviour logprobs equal a fresh full forward's log_softmax(logits / T) (also
after an image observation and under left padding), forks prefill their shared prefix once and
sample exactly what from-scratch sampling samples, and the loop runs end to end on the model.
"""

from __future__ import annotations

import copy

import pytest
import torch
from image_helpers import random_image as _image
from PIL import Image

from axpo_nemo.agent.loop import AgentLoopConfig, Continuation, Generator, SamplingParams, run_rollouts
from axpo_nemo.agent.protocol import ChatProtocol, ToolResponse, format_assistant_turn
from axpo_nemo.agent.tools.base import ToolResult
from axpo_nemo.agent.trajectory import TrajectoryState, fork_at_tool_call, to_rollouts
from axpo_nemo.core.rollout import RolloutBatch
from axpo_nemo.local import LocalGenerator, mrope_positions
from axpo_nemo.models import build_tiny_qwen3vl


class EchoTool:
    """Echoes its arguments and returns a crop of the question image."""

    name = "echo"

    def schema(self):
        return {"type": "function", "function": {"name": "echo", "parameters": {"type": "object"}}}

    def __call__(self, arguments, context):
        return ToolResult(text=f"echo {arguments}", images=[context.images[0].crop((0, 0, 64, 64))])


CALL = format_assistant_turn("Let me zoom in.", tool_calls=[("echo", {"text": "hi"})])


class ForcedFirstTurn:
    """Turn 0 of a fresh state is a scripted tool call; everything else comes from ``inner``."""

    def __init__(self, inner, tokenizer, text=CALL):
        self.inner = inner
        self.ids = tokenizer(text, add_special_tokens=False)["input_ids"]

    def generate(self, states, params):
        out: list[Continuation | None] = [None] * len(states)
        rest = [i for i, s in enumerate(states) if s.num_turns or s.open_turn_tokens]
        for i, _s in enumerate(states):
            if i not in rest:
                out[i] = Continuation(list(self.ids), [0.0] * len(self.ids), "stop", "</tool_call>")
        if rest:
            params = params if isinstance(params, SamplingParams) else [params[i] for i in rest]
            for i, c in zip(rest, self.inner.generate([states[i] for i in rest], params), strict=True):
                out[i] = c
        return out


pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.numerics]


@pytest.fixture(scope="module")
def bundle():
    return build_tiny_qwen3vl(seed=0)


@pytest.fixture(scope="module")
def proto(bundle):
    return ChatProtocol(bundle.processor)


@pytest.fixture(scope="module")
def prompt(proto):
    return proto.build_prompt("What does the sign say?", [_image(120, 90, 1)], [EchoTool()])


def full_forward_logprobs(model, state: TrajectoryState, temperature: float) -> torch.Tensor:
    """log_softmax(logits / T) of every token given its prefix, from one uncached forward."""
    inputs = state.model_inputs()
    with torch.no_grad():
        logits = model(**inputs).logits[0, :-1].float()
    logp = torch.log_softmax(logits / temperature, dim=-1)
    return torch.cat([torch.zeros(1), logp.gather(1, inputs["input_ids"][0, 1:, None])[:, 0]])


def state_with_image_observation(proto, prompt, seed=0) -> TrajectoryState:
    """prompt, a scripted tool-call turn, then an observation holding an image."""
    state = TrajectoryState.from_prompt(prompt, seed=seed, index=seed)
    ids = proto.tokenizer(CALL, add_special_tokens=False)["input_ids"]
    state.append_generated(ids, [0.0] * len(ids))
    state.close_turn("stop", "</tool_call>", proto.parse_turn(CALL))
    crop = proto.process_image(_image(80, 64, 7))
    state.append_observation(proto.render_observation([ToolResponse("a crop", [crop])]))
    return state


def test_mrope_positions_match_transformers(bundle, proto, prompt):
    state = state_with_image_observation(proto, prompt)
    inputs = state.model_inputs()
    ref, _ = bundle.model.model.get_rope_index(
        inputs["input_ids"],
        mm_token_type_ids=inputs["mm_token_type_ids"],
        image_grid_thw=inputs["image_grid_thw"],
    )
    assert len(state.images) == 2
    assert torch.equal(mrope_positions(len(state), state.images, 2), ref[:, 0])


def test_logprobs_equal_full_forward_in_a_padded_batch(bundle, proto, prompt):
    """Three contexts of different lengths (so left padding), one after an image observation."""
    after_image = state_with_image_observation(proto, prompt, seed=0)
    fresh = TrajectoryState.from_prompt(prompt, seed=1)
    text_only = TrajectoryState.from_prompt(proto.build_prompt("Hi", [], [EchoTool()]), seed=2)
    states = [after_image, fresh, text_only]
    gen = LocalGenerator.from_bundle(bundle)
    params = SamplingParams(max_new_tokens=12, temperature=0.7, top_p=0.9, seed=3)
    for s, c in zip(states, gen.generate(states, params), strict=True):
        n = len(c.token_ids)
        assert 1 <= n <= 12 and len(c.logprobs) == n
        s.append_generated(c.token_ids, c.logprobs)
        ref = full_forward_logprobs(bundle.model, s, temperature=0.7)[-n:]
        torch.testing.assert_close(torch.tensor(c.logprobs), ref, atol=1e-4, rtol=0)
    assert gen.stats.prefill_sequences == 3 and gen.stats.shared_rows == 0


def test_samples_do_not_depend_on_batch_composition(bundle, proto, prompt):
    target = state_with_image_observation(proto, prompt, seed=5)
    others = [TrajectoryState.from_prompt(prompt, seed=i) for i in range(3)]
    params = SamplingParams(max_new_tokens=10, seed=1, ignore_eos=True, stop_token_texts=())
    gen = LocalGenerator.from_bundle(bundle)
    (alone,) = gen.generate([target], params)
    batched = gen.generate([others[0], target, *others[1:]], params)[1]
    assert alone.token_ids == batched.token_ids
    torch.testing.assert_close(
        torch.tensor(alone.logprobs), torch.tensor(batched.logprobs), atol=1e-4, rtol=0
    )
    chunked = LocalGenerator.from_bundle(bundle, max_batch_size=2, prefill_batch_size=1)
    assert chunked.generate([*others, target], params)[3].token_ids == alone.token_ids
    assert chunked.stats.prefill_calls == 3  # batches {o, o} and {o, target}: 1 + 2 one-row prefills
    (again,) = gen.generate([target], params)
    assert again.token_ids == alone.token_ids  # deterministic
    (other_seed,) = gen.generate([target], SamplingParams(max_new_tokens=10, seed=2, ignore_eos=True))
    assert other_seed.token_ids != alone.token_ids


def test_two_threads_may_generate_at_once(bundle, prompt):
    # The trainer's speculative wave samples on a second thread while the originals decode.
    import threading

    params = SamplingParams(max_new_tokens=12, seed=1, ignore_eos=True, stop_token_texts=())
    gen = LocalGenerator.from_bundle(bundle)
    first = [TrajectoryState.from_prompt(prompt, seed=i) for i in range(3)]
    second = [TrajectoryState.from_prompt(prompt, seed=10 + i) for i in range(2)]
    solo = [c.token_ids for c in gen.generate(first + second, params)]
    solo_steps = gen.last_call_stats.decode_steps
    gen.stats.reset()
    results, work = {}, {}

    def run(name, states):
        results[name] = [c.token_ids for c in gen.generate(states, params)]
        work[name] = gen.last_call_stats  # this thread's own call
    threads = [threading.Thread(target=run, args=a) for a in (("a", first), ("b", second))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results["a"] + results["b"] == solo
    assert work["a"].sampled_tokens == 36 and work["b"].sampled_tokens == 24
    assert work["a"].decode_steps == work["b"].decode_steps == solo_steps == 11
    assert gen.stats.generate_calls == 2 and gen.stats.sampled_tokens == 60 and gen.stats.decode_steps == 22


def test_forks_prefill_the_prefix_once_and_match_scratch(bundle, proto, prompt):
    source = TrajectoryState.from_prompt(prompt, seed=0, index=0)
    gen = LocalGenerator.from_bundle(bundle)
    run_rollouts(
        [source],
        ForcedFirstTurn(gen, proto.tokenizer),
        [EchoTool()],
        AgentLoopConfig(max_turns=1),
        protocol=proto,
    )
    assert source.finish_reason == "max_turns"
    k = 4
    forks = fork_at_tool_call(source, k)
    scratch = [copy.deepcopy(f) for f in forks]  # same tokens / seeds, separate image objects
    params = SamplingParams(max_new_tokens=16, temperature=1.0, seed=11)

    gen.stats.reset()
    shared = gen.generate(forks, params)
    assert (
        gen.stats.prefill_calls == 1 and gen.stats.prefill_sequences == 1 and gen.stats.shared_rows == k - 1
    )
    assert gen.stats.prefill_tokens == forks[0].prefix_len

    alone = LocalGenerator.from_bundle(bundle, share_prefixes=False)
    separate = [alone.generate([s], params)[0] for s in scratch]
    assert alone.stats.prefill_sequences == k and alone.stats.prefill_tokens == k * forks[0].prefix_len
    for a, b in zip(shared, separate, strict=True):
        assert a.token_ids == b.token_ids
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-4, rtol=0)
    assert len({tuple(c.token_ids) for c in shared}) > 1  # different seeds, different samples


def test_stop_tokens_and_per_state_budgets(bundle, prompt):
    gen = LocalGenerator.from_bundle(bundle)
    state = TrajectoryState.from_prompt(prompt)
    greedy = SamplingParams(max_new_tokens=6, temperature=0.0, stop_token_texts=(), ignore_eos=True)
    (c,) = gen.generate([state], greedy)
    assert c.stop_reason == "length" and len(c.token_ids) == 6
    stop_text = bundle.tokenizer.convert_ids_to_tokens(c.token_ids[2])
    stopping = SamplingParams(
        max_new_tokens=6, temperature=0.0, stop_token_texts=(stop_text,), ignore_eos=True
    )
    short, stopped = gen.generate(
        [state, state], [SamplingParams(max_new_tokens=2, temperature=0.0), stopping]
    )
    first = c.token_ids.index(c.token_ids[2])
    assert stopped.token_ids == c.token_ids[: first + 1]
    assert (stopped.stop_reason, stopped.stop_token) == ("stop", stop_text)
    assert short.token_ids == c.token_ids[:2] and short.stop_reason == "length"
    (empty,) = gen.generate([state], SamplingParams(max_new_tokens=0))
    assert empty == Continuation([], [], "length")
    assert isinstance(gen, Generator)


def test_end_to_end_loop_on_the_tiny_model(bundle, proto, prompt):
    other = proto.build_prompt("How many cats?", [_image(64, 64, 2)], [EchoTool()])
    states = [
        TrajectoryState.from_prompt(p, group=g, seed=10 * g + i, index=2 * g + i)
        for g, p in enumerate([prompt, other])
        for i in range(2)
    ]
    gen = LocalGenerator.from_bundle(bundle)
    cfg = AgentLoopConfig(max_turns=3, max_new_tokens=24, max_total_tokens=1024, seed=7)
    run_rollouts(states, ForcedFirstTurn(gen, proto.tokenizer), [EchoTool()], cfg, protocol=proto)
    assert all(s.finished for s in states)
    assert gen.stats.shared_rows >= 2  # the two rollouts of each question share turn 1's context
    for s in states:
        assert s.tool_calls[0].error is None and s.tool_calls[0].num_images == 1
        assert 2 <= s.num_turns <= 3 and len(s.images) >= 2
    # the model's own tokens (turn 1 on) carry its behaviour logprobs, after the image observation
    s = states[0]
    ref = full_forward_logprobs(bundle.model, s, temperature=1.0)
    model_tokens = torch.zeros(len(s), dtype=torch.bool)
    model_tokens[s.turns[1].start :] = torch.tensor(s.generated[s.turns[1].start :])
    torch.testing.assert_close(torch.tensor(s.logprobs)[model_tokens], ref[model_tokens], atol=1e-4, rtol=0)

    forks = fork_at_tool_call(states[0], 2)
    run_rollouts(forks, gen, [EchoTool()], cfg, protocol=proto)
    rollouts = to_rollouts(states) + to_rollouts(forks, lambda s: (1.0, True))
    batch = RolloutBatch.from_rollouts(rollouts, pad_id=bundle.tokenizer.pad_token_id)
    assert batch.num_rows == 6 and batch.tool_using[:4].all()
    assert batch.source.tolist() == [-1, -1, -1, -1, 0, 0]


def test_a_sampled_image_pad_token_does_not_break_the_next_prefill():
    # The policy can sample <|image_pad|>; image features must follow the slots, not the token id.
    bundle = build_tiny_qwen3vl(seed=0)
    proto = ChatProtocol(bundle.processor)
    state = TrajectoryState.from_prompt(proto.build_prompt("hi", [Image.new("RGB", (64, 64))], []))
    pad = proto.token_id("<|image_pad|>")
    state.append_generated([pad, pad], [0.0, 0.0])
    (out,) = LocalGenerator.from_bundle(bundle).generate([state], SamplingParams(4, 1.0, 1.0, ("<|im_end|>",), 0))
    assert 1 <= len(out.token_ids) <= 4

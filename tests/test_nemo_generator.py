"""Tests for the vLLM generator's pure logic: requests for frozen prefixes, per-sample stops, logprob checks.

vLLM itself does not run here; the engine below answers requests the way ``vllm.LLM.generate``
does (sampled token ids with per-token logprob entries), so `VllmGenerator` and the agent loop
run unchanged on top of it.
"""

from __future__ import annotations

import math

import pytest
import torch
from image_helpers import random_image as _image

from axpo_nemo.agent.loop import AgentLoopConfig, SamplingParams, run_rollouts
from axpo_nemo.agent.protocol import IM_END, TOOL_CALL_CLOSE, ChatProtocol, format_assistant_turn
from axpo_nemo.agent.tools.base import ToolResult
from axpo_nemo.agent.trajectory import TrajectoryState, fork_at_tool_call
from axpo_nemo.core.rollout import RolloutBatch
from axpo_nemo.models import build_tiny_processor, build_tiny_tokenizer
from axpo_nemo.nemo.generator import (
    NemoVllmEngine,
    RawOutput,
    VllmGenerator,
    build_request,
    check_logprobs,
    collapse_image_pads,
    cut_continuation,
    invalid_logprob_rows,
    stop_token_map,
)


class CropTool:
    """Returns one image, so a trajectory holds a tool-result image after its first call."""

    name = "crop"

    def schema(self):
        return {"type": "function", "function": {"name": self.name, "parameters": {"type": "object"}}}

    def __call__(self, arguments, context):
        return ToolResult(text="a crop", images=[_image(64, 64, seed=7)])


class ScriptEngine:
    """Answers like ``vllm.LLM.generate``: turn t of a request gets ``scripts[t]`` plus junk after it.

    The turn is the number of ``</tool_call>`` tokens already in the prompt beyond ``base`` (the
    system prompt's tool instructions hold some). ``bad`` maps a turn to
    logprob entries to corrupt (None: missing, or a float such as NaN).
    """

    def __init__(self, tokenizer, scripts, close_id, bad=None, base=0):
        self.tokenizer, self.scripts, self.close_id, self.base = tokenizer, scripts, close_id, base
        self.bad = bad or {}
        self.requests = []

    def run(self, requests):
        out = []
        for r in requests:
            self.requests.append(r)
            turn = r.prompt_token_ids.count(self.close_id) - self.base
            ids = self.tokenizer(self.scripts[turn], add_special_tokens=False)["input_ids"]
            ids = ids + self.tokenizer(" trailing junk", add_special_tokens=False)["input_ids"]
            logprobs = [-0.5] * len(ids)
            for pos, value in self.bad.get(turn, {}).items():
                logprobs[pos] = value
            out.append(RawOutput(ids, logprobs, "stop"))
        return out


@pytest.fixture(scope="module")
def proto():
    return ChatProtocol(build_tiny_processor(build_tiny_tokenizer()))


@pytest.fixture(scope="module")
def prompt(proto):
    return proto.build_prompt("What is in the image?", [_image(96, 64)], [CropTool()])


def _base(prompt, proto):
    return prompt.token_ids.count(proto.tool_call_close_id)


def _call():
    return format_assistant_turn("Zoom first.", tool_calls=[("crop", {"box": [0, 0, 10, 10]})])


def _answer(value):
    return format_assistant_turn("Done.", answer=value) + IM_END


def _loop_cfg(**kw):
    return AgentLoopConfig(**{"max_new_tokens": 96, "max_total_tokens": 4096, "tool_timeout_s": 5.0, **kw})


def _generator(proto, engine, **kw):
    eos = [proto.tokenizer.eos_token_id] if proto.tokenizer.eos_token_id is not None else []
    return VllmGenerator(engine, proto.tokenizer, eos_ids=eos, **kw)


def test_request_for_a_frozen_prefix_holds_its_tokens_and_images(proto, prompt):
    engine = ScriptEngine(
        proto.tokenizer, [_call(), _answer("x")], proto.tool_call_close_id, base=_base(prompt, proto)
    )
    source = TrajectoryState.from_prompt(prompt, seed=3, index=0)
    run_rollouts([source], _generator(proto, engine), [CropTool()], _loop_cfg(), protocol=proto)
    assert source.finish_reason == "answer" and len(source.images) == 2  # question + crop

    # Turn 1's request is the whole trajectory so far, with both images in token order, each
    # image's pad run collapsed to one <|image_pad|> (vLLM expands it again from the image)
    second = engine.requests[1]
    so_far = source.token_ids[: source.turns[1].start]
    assert second.prompt_token_ids == collapse_image_pads(so_far, source.images)
    pad = proto.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert second.prompt_token_ids.count(pad) == 2 and so_far.count(pad) == sum(
        s.image.num_tokens for s in source.images
    )
    assert [t for t in second.prompt_token_ids if t != pad] == [t for t in so_far if t != pad]
    assert second.expected_prompt_len == len(so_far)
    assert [id(i) for i in second.images] == [id(s.image.image) for s in source.images]

    fork = fork_at_tool_call(source, 2)[0]
    params = SamplingParams(max_new_tokens=40, temperature=0.7, top_p=0.9, seed=5)
    stops = stop_token_map(proto.tokenizer, params.stop_token_texts, [proto.im_end_id])
    request = build_request(fork, params, stops, max_tokens_cap=32, max_model_len=len(fork) + 100)
    cut = source.tool_calls[0].start + 1
    # continued token for token (the image's pad run collapsed on the wire)
    assert request.prompt_token_ids == collapse_image_pads(source.token_ids[:cut], source.images[:1])
    assert request.prompt_token_ids[-1] == proto.tool_call_open_id
    assert [id(i) for i in request.images] == [id(source.images[0].image.image)]  # crop is past the cut
    assert set(request.stop_token_ids) == {proto.tool_call_close_id, proto.im_end_id}
    assert request.max_tokens == 32 and (request.temperature, request.top_p) == (0.7, 0.9)
    wire = request.to_wire()
    assert wire["prompt"]["prompt_token_ids"] == request.prompt_token_ids
    assert wire["prompt"]["multi_modal_data"]["image"] == request.images
    assert wire["sampling"]["logprobs"] == 0 and wire["sampling"]["max_tokens"] == 32
    assert sorted(wire["sampling"]["stop_token_ids"]) == sorted(request.stop_token_ids)

    # The context length bounds the budget; no room means no request.
    assert build_request(fork, params, stops, max_model_len=len(fork) + 3).max_tokens == 3
    assert build_request(fork, params, stops, max_model_len=len(fork)) is None
    # Seeds: a function of (params.seed, state.seed, length), different per fork.
    forks = fork_at_tool_call(source, 2)
    seeds = [build_request(f, params, stops).seed for f in forks]
    assert seeds[0] != seeds[1] and seeds[0] == build_request(forks[0], params, stops).seed


def test_per_sample_stops_are_cut_after_generation(proto):
    tok = proto.tokenizer
    text = "a<tool_call>\n{}\n</tool_call>b<|im_end|>c"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    raw = RawOutput(ids, [-0.1] * len(ids), "length")
    close_at = ids.index(proto.tool_call_close_id)
    end_at = ids.index(proto.im_end_id)

    both = stop_token_map(tok, (TOOL_CALL_CLOSE, IM_END))
    cont, cut = cut_continuation(raw, both, 100)
    assert cont.token_ids == ids[: close_at + 1] and cont.stop_reason == "stop"
    assert cont.stop_token == TOOL_CALL_CLOSE and cut == len(ids) - close_at - 1

    only_end = stop_token_map(tok, (IM_END,))
    cont, _ = cut_continuation(raw, only_end, 100)
    assert cont.token_ids == ids[: end_at + 1] and cont.stop_token == IM_END

    cont, cut = cut_continuation(raw, both, 2)
    assert cont.token_ids == ids[:2] and cont.stop_reason == "length" and cont.stop_token is None

    with pytest.raises(ValueError, match="not a single token"):
        stop_token_map(tok, ("two tokens",))
    with pytest.raises(ValueError, match="logprob entries"):
        cut_continuation(RawOutput(ids, [-0.1]), both, 10)

    # In one generate call, each state gets its own stop set.
    class Echo:
        def run(self, requests):
            return [raw for _ in requests]

    gen = _generator(proto, Echo())
    state = TrajectoryState(token_ids=[1, 2], prompt_len=2, generated=[False] * 2, logprobs=[0.0] * 2)
    a = SamplingParams(max_new_tokens=50, stop_token_texts=(TOOL_CALL_CLOSE, IM_END))
    b = SamplingParams(max_new_tokens=50, stop_token_texts=(IM_END,))
    out = gen.generate([state, state], [a, b])
    assert [c.stop_token for c in out] == [TOOL_CALL_CLOSE, IM_END]
    assert len(out[0].token_ids) == close_at + 1 and len(out[1].token_ids) == end_at + 1
    assert gen.stats.cut_tokens == (len(ids) - close_at - 1) + (len(ids) - end_at - 1)


def test_missing_or_nan_logprobs_exclude_the_sample_and_are_counted(proto, prompt):
    values, bad = check_logprobs([-0.5, None, math.nan, 0.25, -math.inf, 0.0])
    assert bad == 4 and values[0] == -0.5 and values[5] == 0.0
    assert all(math.isnan(v) for v in values[1:5])

    scripts = [_call(), _answer("x")]
    engine = ScriptEngine(proto.tokenizer, scripts, proto.tool_call_close_id, base=_base(prompt, proto))
    broken = ScriptEngine(
        proto.tokenizer,
        scripts,
        proto.tool_call_close_id,
        bad={1: {0: None, 2: math.nan}},
        base=_base(prompt, proto),
    )

    class Mixed:  # row 0 from the clean engine, row 1 from the broken one
        def run(self, requests):
            return engine.run(requests[:1]) + broken.run(requests[1:])

    gen = _generator(proto, Mixed())
    states = [TrajectoryState.from_prompt(prompt, seed=i, index=i) for i in range(2)]
    run_rollouts(states, gen, [CropTool()], _loop_cfg(), protocol=proto)
    assert gen.stats.invalid_logprob_samples == 1 and gen.stats.invalid_logprob_tokens == 2
    assert all(s.finish_reason == "answer" for s in states)

    batch = RolloutBatch.from_rollouts([s.to_rollout() for s in states])
    # RolloutBatch zeroes non-generated positions but keeps NaN on generated ones.
    assert invalid_logprob_rows(batch.generated, batch.logprobs).tolist() == [False, True]
    assert torch.isfinite(batch.logprobs[0]).all()


def test_nemo_engine_requires_the_synchronous_vllm_engine():
    class Generation:
        def __init__(self):
            self.cfg = {"vllm_cfg": {"async_engine": True}}

    with pytest.raises(ValueError, match="async_engine: false"):
        NemoVllmEngine(Generation())


def test_a_prompt_length_vllm_reports_otherwise_raises(proto, prompt):
    # vLLM re-expands each collapsed placeholder from the image; if its processor makes another
    # number of pads (other min/max pixels), the policy would sample from another context than the
    # trainer scores: that must stop the run, not pass silently
    class LengthEngine(ScriptEngine):
        def __init__(self, *args, reported, **kw):
            super().__init__(*args, **kw)
            self.reported = reported

        def run(self, requests):
            out = super().run(requests)
            for r, o in zip(requests, out, strict=True):
                o.prompt_len = r.expected_prompt_len + self.reported
            return out

    base = _base(prompt, proto)
    for offset, ok in ((0, True), (3, False)):
        engine = LengthEngine(proto.tokenizer, [_answer("x")], proto.tool_call_close_id, base=base, reported=offset)
        state = TrajectoryState.from_prompt(prompt, seed=1, index=0)
        gen = _generator(proto, engine)
        if ok:
            run_rollouts([state], gen, [CropTool()], _loop_cfg(), protocol=proto)
            assert state.finish_reason == "answer"
        else:
            with pytest.raises(RuntimeError, match=r"expanded a prompt to \d+ tokens, the trajectory has"):
                gen.generate([state], SamplingParams(max_new_tokens=8))


def test_the_remote_side_reports_the_prompt_length_vllm_processed():
    from types import SimpleNamespace

    from axpo_nemo.nemo._vllm_remote import _extract

    logprob = SimpleNamespace(logprob=-0.25)
    out = SimpleNamespace(
        prompt_token_ids=list(range(17)),  # the placeholders as vLLM expanded them
        outputs=[SimpleNamespace(token_ids=[5, 6], logprobs=[{5: logprob}, {}], finish_reason="stop")],
    )
    assert _extract(out) == {"token_ids": [5, 6], "logprobs": [-0.25, None], "finish_reason": "stop", "prompt_len": 17}
    assert RawOutput.from_wire(_extract(out)).prompt_len == 17

"""Tests for the agent loop, trajectory state and forking, with a scripted generator and fake tools."""

from __future__ import annotations

import threading
import time

import pytest
from image_helpers import random_image as _image

from axpo_nemo.agent.loop import (
    AgentLoopConfig,
    Continuation,
    Generator,
    SamplingParams,
    ToolRunner,
    per_state_params,
    run_rollouts,
)
from axpo_nemo.agent.protocol import ChatProtocol, format_assistant_turn, format_tool_call
from axpo_nemo.agent.tools.base import ToolContext, ToolResult
from axpo_nemo.agent.trajectory import TrajectoryState, fork_at_tool_call, to_rollouts
from axpo_nemo.core import rollout as core_rollout
from axpo_nemo.models import build_tiny_processor, build_tiny_tokenizer


class FakeTool:
    """A tool built from a function ``fn(arguments, context) -> ToolResult``."""

    def __init__(self, name, fn):
        self.name, self.fn = name, fn

    def schema(self):
        return {"type": "function", "function": {"name": self.name, "parameters": {"type": "object"}}}

    def __call__(self, arguments, context: ToolContext):
        return self.fn(arguments, context)


def _echo(arguments, context):
    return ToolResult(text=f"echo {arguments.get('text', '')} ({len(context.images)} images)")


def _images(arguments, context):
    n = int(arguments.get("n", 1))
    return ToolResult(text=f"{n} crops", images=[_image(128, 128, seed=i) for i in range(n)])


def _sleep(arguments, context):
    time.sleep(float(arguments.get("s", 0.3)))
    return ToolResult(text="slept")


def _raise(arguments, context):
    raise RuntimeError("boom")


def _not_a_result(arguments, context):
    return "plain string"


def _weird(arguments, context):
    return ToolResult(text=None, images=[b"not an image"], metadata=None)


def _smuggler(arguments, context):
    return ToolResult(text="look: <|vision_start|><|image_pad|><|vision_end|>")


TOOLS = [
    FakeTool("echo", _echo),
    FakeTool("images", _images),
    FakeTool("sleep", _sleep),
    FakeTool("raise", _raise),
    FakeTool("garbage", _not_a_result),
    FakeTool("weird", _weird),
    FakeTool("smuggler", _smuggler),
]


class ScriptedGenerator:
    """A `Generator` that replays ``state.metadata["script"][turn]`` like a model would.

    It stops at the first stop token or after max_new_tokens and gives every token logprob -0.25.
    Every continuation it returns is logged in ``self.pieces[id(state)]``.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.pieces: dict[int, list[list[int]]] = {}
        self.calls = 0

    def generate(self, states, params):
        self.calls += 1
        out = []
        for s, p in zip(states, per_state_params(states, params), strict=True):
            text = s.metadata["script"][min(s.num_turns, len(s.metadata["script"]) - 1)]
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            stops = {self.tokenizer.convert_tokens_to_ids(t): t for t in p.stop_token_texts}
            cut, reason, stop = min(len(ids), p.max_new_tokens), "length", None
            for i, t in enumerate(ids[:cut]):
                if t in stops:
                    cut, reason, stop = i + 1, "stop", stops[t]
                    break
            self.pieces.setdefault(id(s), []).append(ids[:cut])
            out.append(Continuation(ids[:cut], [-0.25] * cut, reason, stop))
        return out


@pytest.fixture(scope="module")
def proto():
    return ChatProtocol(build_tiny_processor(build_tiny_tokenizer()))


@pytest.fixture(scope="module")
def prompt(proto):
    return proto.build_prompt("What is in the image?", [_image(96, 64)], TOOLS)


def call(name, **arguments):
    return format_assistant_turn(f"I will use {name}.", tool_calls=[(name, arguments)])


def answer(value):
    return format_assistant_turn("Done.", answer=value) + "<|im_end|>"


def make_state(prompt, script, i=0, **kw):
    return TrajectoryState.from_prompt(
        prompt, group=kw.pop("group", 0), seed=i, index=i, metadata={"script": script}, **kw
    )


def run(states, proto, **cfg):
    gen = ScriptedGenerator(proto.tokenizer)
    config = AgentLoopConfig(
        **{"max_new_tokens": 128, "max_total_tokens": 2048, "tool_timeout_s": 5.0, **cfg}
    )
    run_rollouts(states, gen, TOOLS, config, protocol=proto)
    return gen


def assert_images_intact(state, proto):
    vs, ve = proto.ids["<|vision_start|>"], proto.ids["<|vision_end|>"]
    ids = state.token_ids
    assert ids.count(vs) == ids.count(ve) == len(state.images)
    assert ids.count(proto.image_pad_id) == sum(s.image.num_tokens for s in state.images)
    for slot in state.images:
        assert ids[slot.start - 1] == vs and ids[slot.end] == ve
        assert set(ids[slot.start : slot.end]) == {proto.image_pad_id}


def assert_renders_back(state, proto):
    """messages() rendered by the chat template and processor give back the state's tokens."""
    text = proto.render(state.messages(proto), state.tool_schemas)
    images = [s.image.image for s in state.images] or None
    ref = proto.processor(text=[text], images=images, return_tensors="pt")["input_ids"][0].tolist()
    assert ref[: len(state)] == state.token_ids
    assert len(ref) - len(state) == (2 if state.token_ids[-1] == proto.tool_call_close_id else 1)
    # parsing the rendered assistant turns gives the recorded calls back
    names = {t.name for t in TOOLS}
    calls = [
        c
        for m in state.messages(proto)
        if m["role"] == "assistant"
        for c in proto.parse_turn(m["content"].removeprefix(proto.assistant_prefix), names).tool_calls
    ]
    assert [(c.name, c.arguments, c.error) for c in calls] == [
        (r.name, r.arguments, r.parse_error) for r in state.tool_calls
    ]


def test_tokens_are_prompt_plus_turns_plus_observations(proto, prompt):
    state = make_state(prompt, [call("images", n=1), answer("cat")])
    gen = run([state], proto)
    assert state.finished and state.finish_reason == "answer" and state.answer == "cat"
    turn0, turn1 = gen.pieces[id(state)]
    obs_len = state.turns[0].observation_len
    obs = state.token_ids[len(prompt.token_ids) + len(turn0) :][:obs_len]
    assert state.token_ids == prompt.token_ids + turn0 + obs + turn1  # nothing re-tokenised
    assert proto.decode(obs).startswith("<|im_end|>\n<|im_start|>user\n<tool_response>\n1 crops")
    gen_mask = [False] * len(prompt.token_ids) + [True] * len(turn0) + [False] * obs_len + [True] * len(turn1)
    assert state.generated == gen_mask
    assert state.logprobs == [-0.25 if g else 0.0 for g in gen_mask]
    (rec,) = state.tool_calls
    assert (
        state.token_ids[rec.start] == proto.tool_call_open_id
        and state.token_ids[rec.end - 1] == proto.tool_call_close_id
    )
    assert (rec.name, rec.arguments, rec.error, rec.num_images, rec.turn) == ("images", {"n": 1}, None, 1, 0)
    assert len(state.images) == 2
    assert_images_intact(state, proto)
    assert [t.tool_names for t in state.turns] == [["images"], []]

    # Re-rendering the recorded conversation through the chat template gives the same tokens.
    messages = state.messages(proto)
    assert [m["role"] for m in messages] == ["user", "assistant", "tool", "assistant"]
    assert messages[1]["content"] == proto.assistant_prefix + proto.decode(turn0)
    assert_renders_back(state, proto)

    rollout = state.to_rollout(lambda s: (1.0, s.answer == "cat"))
    assert rollout.correct and rollout.reward == 1.0 and rollout.num_turns == 2
    assert rollout.tool_calls[0] == core_rollout.ToolCallSpan(rec.start, rec.end, 0, True, "images")


def test_max_turns_is_respected(proto, prompt):
    state = make_state(prompt, [call("echo", text="again")])
    run([state], proto, max_turns=3)
    assert state.finish_reason == "max_turns" and state.num_turns == 3
    assert [r.response_text is not None for r in state.tool_calls] == [True, True, False]
    assert state.token_ids[-1] == proto.tool_call_close_id  # the last call is not executed
    assert_renders_back(state, proto)


def test_bad_calls_become_error_observations(proto, prompt):
    bad_json = format_assistant_turn("x") + '<tool_call>\n{"name": "echo", "arguments": \n</tool_call>'
    scripts = {
        "malformed_json": bad_json,
        "unknown_tool": call("teleport", to="mars"),
        "crashed": call("raise"),
        "timeout": call("sleep", s=3.0),
        "garbage": call("garbage"),
    }
    states = [make_state(prompt, [s, answer("42")], i) for i, s in enumerate(scripts.values())]
    t0 = time.monotonic()
    run(states, proto, tool_timeout_s=0.3)
    assert time.monotonic() - t0 < 2.5  # the hanging tool did not hold the loop
    for kind, state in zip(scripts, states, strict=True):
        (rec,) = state.tool_calls
        expected = "crashed" if kind == "garbage" else kind
        assert rec.error == expected, kind
        assert rec.well_formed == (kind in ("crashed", "timeout", "garbage"))
        assert rec.response_text.startswith("Error:")
        assert state.finish_reason == "answer" and state.num_turns == 2
        assert state.turns[0].errors == [expected]
        assert f"<tool_response>\n{rec.response_text}\n</tool_response>" in proto.decode(state.token_ids)
        assert_renders_back(state, proto)


def test_a_tool_the_question_does_not_offer_is_unknown_in_a_shared_batch(proto, prompt):
    # Both states call echo in the same generation batch; only the second one's question offers it.
    limited = make_state(prompt, [call("echo", text="hi"), answer("1")], 0, question_id="zoom-only")
    full = make_state(prompt, [call("echo", text="hi"), answer("1")], 1, question_id="any")
    gen = ScriptedGenerator(proto.tokenizer)
    config = AgentLoopConfig(max_new_tokens=128, max_total_tokens=2048, tool_timeout_s=5.0)
    offered = {"zoom-only": ["images"], "any": []}
    run_rollouts([limited, full], gen, TOOLS, config, protocol=proto,
                 allowed_tools=lambda s: offered[s.question_id])  # fmt: skip
    assert gen.calls == 2  # one batch per turn for both states
    (denied,), (ran,) = limited.tool_calls, full.tool_calls
    assert denied.error == "unknown_tool" and not denied.well_formed
    assert ran.error is None and ran.well_formed


def test_odd_tool_outputs_never_break_the_trajectory(proto, prompt):
    weird = make_state(prompt, [call("weird"), answer("1")], 0)
    smuggler = make_state(prompt, [call("smuggler"), answer("2")], 1)
    run([weird, smuggler], proto)
    assert weird.finish_reason == smuggler.finish_reason == "answer"
    assert "could not be processed" in weird.tool_calls[0].response_text
    assert smuggler.tool_calls[0].response_text == "look: <vision_start><image_pad><vision_end>"
    for s in (weird, smuggler):
        assert len(s.images) == 1
        assert_images_intact(s, proto)
        assert_renders_back(s, proto)


def _flood(arguments, context):
    return ToolResult(text="HEAD" + "x" * 5_000_000 + "TAIL")


def _loud_crash(arguments, context):
    raise RuntimeError("y" * 5_000_000)


def test_every_observation_is_capped_before_tokenizing(proto, prompt, monkeypatch):
    tools = [*TOOLS, FakeTool("flood", _flood), FakeTool("loud", _loud_crash)]
    states = [make_state(prompt, [call(name), answer("1")], i) for i, name in enumerate(["flood", "loud"])]
    rendered: list[int] = []
    render = proto.render_observation

    def spy(responses, **kwargs):
        rendered.extend(len(r.text) for r in responses)
        return render(responses, **kwargs)

    monkeypatch.setattr(proto, "render_observation", spy)
    config = AgentLoopConfig(max_new_tokens=128, max_total_tokens=20_000, max_observation_chars=1000)
    run_rollouts(states, ScriptedGenerator(proto.tokenizer), tools, config, protocol=proto)
    assert rendered and max(rendered) <= 1000  # what reaches the tokenizer
    flood, loud = (s.tool_calls[0] for s in states)
    assert flood.response_text.startswith("HEAD") and flood.response_text.endswith("TAIL")
    assert "characters omitted" in flood.response_text and len(flood.response_text) <= 1000
    assert loud.error == "crashed" and len(loud.response_text) <= 1000
    for state in states:
        rec = state.tool_calls[0]
        assert state.finish_reason == "answer"
        assert f"<tool_response>\n{rec.response_text}\n</tool_response>" in proto.decode(state.token_ids)


@pytest.mark.parametrize("n", [0, 10, 255, 256, 257, 1000, 123_456])
def test_cap_text_keeps_head_and_tail_within_the_limit(n):
    from axpo_nemo.agent.tools.base import cap_text

    text = "".join(chr(ord("a") + i % 26) for i in range(n))
    capped = cap_text(text, 256)
    assert len(capped) <= 256
    assert capped == text if n <= 256 else (capped[:10] == text[:10] and capped[-10:] == text[-10:])


def test_images_per_trajectory_are_capped(proto, prompt):
    state = make_state(prompt, [call("images", n=3), call("images", n=1), answer("x")])
    run([state], proto, max_images=2)
    first, second = state.tool_calls
    assert (first.num_images, second.num_images) == (1, 0)
    assert "2 image(s) not shown" in first.response_text and "1 image(s) not shown" in second.response_text
    assert len(state.images) == 2
    assert_images_intact(state, proto)
    assert_renders_back(state, proto)


def test_truncation_never_cuts_an_image(proto, prompt):
    script = [call("images", n=3), answer("x")]
    base = make_state(prompt, script)
    run([base], proto)
    obs_len = base.turns[0].observation_len
    upto_call = base.turns[0].end
    assert sum(s.image.num_tokens for s in base.images[1:]) == 48
    # Room for the observation without its images, not with them: they are replaced by a note.
    state = make_state(prompt, script)
    run([state], proto, max_total_tokens=upto_call + obs_len)
    assert state.tool_calls[0].num_images == 0 and "token budget" in state.tool_calls[0].response_text
    assert len(state.images) == 1 and len(state) <= upto_call + obs_len
    # No room even for the text: the trajectory ends at the call, nothing partial appended.
    tight = make_state(prompt, script)
    run([tight], proto, max_total_tokens=upto_call + 8)
    assert tight.finish_reason == "max_total_tokens" and tight.token_ids[-1] == proto.tool_call_close_id
    assert len(tight) == upto_call
    for s in (state, tight):
        assert_images_intact(s, proto)
    # A budget that ends mid-turn cuts generation, never an observation.
    short = make_state(prompt, [call("images", n=1), answer("x")])
    run([short], proto, max_total_tokens=len(prompt.token_ids) + 5)
    assert len(short) == len(prompt.token_ids) + 5 and short.finished
    assert_images_intact(short, proto)


def test_tool_calls_of_a_batch_run_concurrently(proto, prompt):
    states = [make_state(prompt, [call("sleep", s=0.3), answer("z")], i) for i in range(8)]
    t0 = time.monotonic()
    run(states, proto, tool_workers=8)
    elapsed = time.monotonic() - t0
    assert all(s.finish_reason == "answer" for s in states)
    assert elapsed < 8 * 0.3 / 2, elapsed


def test_tool_runner_outcomes():
    runner = ToolRunner(max_workers=1, timeout_s=0.2)
    hung = threading.Event()

    def hang():
        hung.wait(5)
        return "late"

    jobs = [hang, lambda: "ok", lambda: 1 / 0]
    t0 = time.monotonic()
    out = runner.run(jobs, on_timeout=lambda i: f"timeout {i}", on_error=lambda i, e: type(e).__name__)
    hung.set()
    assert out == ["timeout 0", "ok", "ZeroDivisionError"]  # a replacement worker ran the queue
    assert time.monotonic() - t0 < 1.5


def test_turn_limits_and_finish_reasons(proto, prompt):
    rambling = make_state(prompt, ["word " * 200])
    no_answer = make_state(prompt, [format_assistant_turn("hmm", text="I don't know.") + "<|im_end|>"], 1)
    too_long = make_state(prompt, [answer("1")], 2)
    run([rambling], proto, max_new_tokens=16)
    run([no_answer], proto)
    run([too_long], proto, max_total_tokens=len(prompt.token_ids))
    assert (rambling.finish_reason, len(rambling) - rambling.prompt_len) == ("length", 16)
    assert no_answer.finish_reason == "no_answer" and no_answer.answer is None
    assert too_long.finish_reason == "prompt_too_long" and too_long.num_turns == 0


def test_several_calls_in_one_turn(proto, prompt):
    two = (
        format_assistant_turn("both", tool_calls=[("echo", {"text": "a"}), ("images", {"n": 1})])
        + "<|im_end|>"
    )
    state = make_state(prompt, [two, answer("y")])
    run([state], proto, stop_on_tool_call=False)
    assert [r.response_text.split(" ")[0] for r in state.tool_calls] == ["echo", "1"]
    text = proto.decode(state.token_ids)
    assert "</tool_call><|im_end|>\n<|im_start|>user\n<tool_response>\necho a" in text
    assert "<|im_end|><|im_end|>" not in text and state.finish_reason == "answer"
    assert_images_intact(state, proto)
    assert_renders_back(state, proto)


def test_fork_at_tool_call_continues_like_an_original(proto, prompt):
    originals = [
        make_state(prompt, [call("images", n=1), call("echo", text="b"), answer("no")], 0),
        make_state(prompt, [answer("yes")], 1),
    ]
    run(originals, proto)
    source = originals[0]
    first = source.tool_calls[0]
    forks = fork_at_tool_call(source, 3)
    for f in forks:  # continuations of the open call, then an answer
        f.metadata["script"] = [
            '\n{"name": "echo", "arguments": {"text": "fork"}}\n</tool_call>',
            answer("yes"),
        ]
        assert f.token_ids == source.token_ids[: first.start + 1] and f.prefix_len == first.start + 1
        assert f.source == 0 and len(f.images) == 1 and f.images[0] is source.images[0]
        assert f.generated == source.generated[: f.prefix_len] and f.num_turns == 0
    assert len({f.seed for f in forks}) == 3
    gen = run(forks, proto)
    for f in forks:
        assert f.finish_reason == "answer" and f.num_turns == 2
        (rec, *_) = f.tool_calls
        assert rec.start == first.start and rec.arguments == {"text": "fork"} and rec.turn == 0
        assert f.token_ids[: f.prefix_len] + gen.pieces[id(f)][0] == f.token_ids[: f.turns[0].end]
        assert_renders_back(f, proto)
    rollouts = to_rollouts(originals, lambda s: (float(s.answer == "yes"), s.answer == "yes"))
    rollouts += to_rollouts(forks, lambda s: (1.0, True))
    batch = core_rollout.RolloutBatch.from_rollouts(rollouts)
    assert batch.source.tolist() == [-1, -1, 0, 0, 0]
    assert batch.prefix_len.tolist()[2:] == [first.start + 1] * 3
    assert batch.call_start.tolist() == [first.start, -1, first.start, first.start, first.start]
    with pytest.raises(ValueError):
        fork_at_tool_call(originals[1], 2)


def test_on_round_end_follows_each_round(proto, prompt):
    states = [
        make_state(prompt, [call("echo", text="a"), answer("x")], 0),
        make_state(prompt, [answer("y")], 1),
    ]
    seen = []

    def on_round_end(r):  # after round 0 every first turn is closed, the observation appended
        seen.append((r, [s.num_turns for s in states], [s.finished for s in states]))

    gen = ScriptedGenerator(proto.tokenizer)
    config = AgentLoopConfig(max_new_tokens=128, max_total_tokens=2048, tool_timeout_s=5.0)
    run_rollouts(states, gen, TOOLS, config, protocol=proto, on_round_end=on_round_end)
    assert seen == [(0, [1, 1], [False, True]), (1, [2, 1], [True, True])]


def test_continuations_are_keyed_by_source_whenever_they_are_made(proto, prompt):
    import torch

    from axpo_nemo.agent.groups import continuation_states, resample_states
    from axpo_nemo.core import ResamplePlan

    states = [make_state(prompt, [call("echo", text=t), answer("no")], i) for i, t in enumerate("ab")]
    run(states, proto)

    def plan(order):
        n = len(order)
        return ResamplePlan(
            triggered=torch.tensor([True]), candidates=torch.tensor([0, 1]),
            candidate_uncertainty=torch.zeros(2), selected=torch.tensor(order),
            selected_uncertainty=torch.zeros(n), prefix_len=torch.zeros(n, dtype=torch.long), budget=2, k=2,
        )  # fmt: skip

    kw = {"seed": 5, "step": 3}
    forward = resample_states(plan([0, 1]), states, [prompt], **kw)
    backward = resample_states(plan([1, 0]), states, [prompt], **kw)
    assert [(f.source, f.seed) for f in forward] == sorted((f.source, f.seed) for f in backward)
    assert [f.index for f in backward] == [2, 3, 4, 5] and [f.source for f in backward] == [1, 1, 0, 0]
    early = continuation_states(1, states, [prompt], k=2, prefix_fixing=True, **kw)
    assert [f.seed for f in early] == [f.seed for f in forward[2:]]
    made = resample_states(plan([1, 0]), states, [prompt], made={1: early}, **kw)
    assert made[0] is early[0] and made[1] is early[1] and [f.index for f in made] == [2, 3, 4, 5]
    assert [f.seed for f in made] == [f.seed for f in backward]


def test_config_and_protocol_objects():
    assert isinstance(ScriptedGenerator(None), Generator)
    with pytest.raises(ValueError, match="max_turns"):
        AgentLoopConfig(max_turns=0)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)

    class Rollout:
        max_turns, max_new_tokens, temperature = 2, 64, 0.7

    cfg = AgentLoopConfig.from_rollout_config(Rollout(), seed=5)
    assert (cfg.max_turns, cfg.max_new_tokens, cfg.temperature, cfg.seed) == (2, 64, 0.7, 5)
    Rollout.max_observation_chars = 4096
    assert AgentLoopConfig.from_rollout_config(Rollout()).max_observation_chars == 4096
    assert cfg.sampling_params(10).stop_token_texts == ("</tool_call>", "<|im_end|>")
    assert format_tool_call("a", {}) == '<tool_call>\n{"name": "a", "arguments": {}}\n</tool_call>'

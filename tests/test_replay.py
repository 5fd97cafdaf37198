"""Replaying scripted turns through the real loop gives the tokens RL would produce."""

from __future__ import annotations

from PIL import Image

from axpo_nemo.agent.loop import AgentLoopConfig
from axpo_nemo.agent.protocol import ChatProtocol, format_assistant_turn
from axpo_nemo.agent.replay import replay
from axpo_nemo.agent.tools.zoom import ImageZoomTool
from axpo_nemo.models import build_tiny_processor, build_tiny_tokenizer


def test_replay_runs_tools_and_marks_only_assistant_tokens_generated():
    protocol = ChatProtocol(build_tiny_processor(build_tiny_tokenizer()))
    tools = {"image_zoom_in": ImageZoomTool()}
    turns = [
        format_assistant_turn("The digit is tiny; zoom in.", tool_calls=[("image_zoom_in", {"bbox_2d": [0, 0, 250, 250]})]),
        format_assistant_turn("It is a 7.", answer="7"),
    ]
    cfg = AgentLoopConfig(max_turns=3, max_total_tokens=8192)
    state = replay(protocol, tools, "Which digit is in the corner?", [Image.new("RGB", (400, 400))], turns, cfg)

    assert state.finished and state.finish_reason == "answer" and state.answer == "7"
    assert [c.name for c in state.tool_calls] == ["image_zoom_in"] and state.tool_calls[0].error is None
    assert len(state.images) == 2  # the question's image and the crop
    generated = [t for t, g in zip(state.token_ids, state.generated, strict=True) if g]
    text = protocol.decode(generated)
    assert text.count("<tool_call>") == 1 and "\\boxed{7}" in text and text.endswith("<|im_end|>")
    assert "<tool_response>" not in text  # observations are never marked generated
    rollout = state.to_rollout()
    assert rollout.tool_using and rollout.num_turns == 2

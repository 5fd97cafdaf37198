"""Replay scripted assistant turns through the real agent loop.

A `ScriptedGenerator` emits fixed assistant texts instead of sampling, so the loop parses them,
executes their tool calls with the real tools and appends the real observation tokens. SFT uses it
to turn a conversation into exactly the tokens RL would produce for it; ``axpo tools run`` uses it
to show one call's observation.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from PIL import Image

from axpo_nemo.agent.loop import AgentLoopConfig, Continuation, run_rollouts
from axpo_nemo.agent.protocol import IM_END, TOOL_CALL_CLOSE, ChatProtocol
from axpo_nemo.agent.tools.base import Tool
from axpo_nemo.agent.trajectory import TrajectoryState

SCRIPT_KEY = "script"


class ScriptedGenerator:
    """Emits ``state.metadata["script"][turn]`` as each turn's generated text.

    A turn whose text ends with ``</tool_call>`` stops there (as sampling would at the stop
    string); any other turn is closed with ``<|im_end|>``. Logprobs are 0 (no policy sampled them).
    Past the end of its script a state gets an immediate ``<|im_end|>``.
    """

    def __init__(self, protocol: ChatProtocol) -> None:
        self.protocol = protocol
        self.im_end = protocol.token_id(IM_END)

    def generate(self, states: Sequence[TrajectoryState], params: Any) -> list[Continuation]:
        """One scripted turn for each state."""
        out = []
        for state in states:
            script = state.metadata.get(SCRIPT_KEY, [])
            text = script[state.num_turns] if state.num_turns < len(script) else ""
            ids = list(self.protocol.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []
            if text.rstrip().endswith(TOOL_CALL_CLOSE):
                out.append(Continuation(ids, [0.0] * len(ids), "stop", TOOL_CALL_CLOSE))
            else:
                ids.append(self.im_end)
                out.append(Continuation(ids, [0.0] * len(ids), "stop", IM_END))
        return out


def replay(
    protocol: ChatProtocol,
    tools: Mapping[str, Tool],
    question: str,
    images: Sequence[Image.Image],
    turns: Sequence[str],
    cfg: AgentLoopConfig,
    *,
    declare_tools: bool = True,
    **state_kwargs: Any,
) -> TrajectoryState:
    """The trajectory of ``question`` whose assistant turns are exactly ``turns``.

    Each turn is the text generated after the generation prompt (``<think>\\n``): thinking, then a
    tool call or the final answer. Tool calls run for real. ``cfg`` bounds turns and tokens like
    training does; ``state_kwargs`` go to `TrajectoryState.from_prompt` (group, seed, metadata…).
    With ``declare_tools`` False the prompt has no system part (no tool schemas); the calls still
    run, so observations are unchanged.
    """
    prompt = protocol.build_prompt(question, list(images), list(tools.values()) if declare_tools else [])
    metadata = {**state_kwargs.pop("metadata", {}), SCRIPT_KEY: list(turns)}
    state = TrajectoryState.from_prompt(prompt, metadata=metadata, **state_kwargs)
    run_rollouts([state], ScriptedGenerator(protocol), tools, cfg, protocol=protocol)
    return state

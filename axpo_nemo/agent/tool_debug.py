"""Run one tool call exactly as training would, for debugging tools (``axpo tools run``).

The requested ``<tool_call>`` is replayed as the assistant's first turn through the real agent
loop, which parses it, executes it under the loop's timeout and renders the observation tokens.
What comes back is what the model would see.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from axpo_nemo.agent.loop import AgentLoopConfig
from axpo_nemo.agent.protocol import ChatProtocol
from axpo_nemo.agent.replay import replay
from axpo_nemo.agent.tools.base import Tool


@dataclass
class ToolCallReport:
    """The outcome of one debug tool call.

    Attributes:
        call_text: the assistant text that made the call.
        error: the call's error kind (None on success).
        duration_s: wall time of the tool.
        observation: the observation exactly as the model sees it (decoded tokens).
        observation_tokens: how many tokens the observation takes.
        images: images the tool returned (as shown to the model).
        fits_budget: prompt, call and observation fit the configured ``max_total_tokens``; in
            training an observation that does not fit ends the trajectory instead.
    """

    call_text: str
    error: str | None
    duration_s: float
    observation: str
    observation_tokens: int
    images: list[Image.Image] = field(default_factory=list)
    fits_budget: bool = True


def run_tool_call(
    protocol: ChatProtocol,
    tools: dict[str, Tool],
    name: str,
    arguments: str,
    images: list[Image.Image],
    cfg: AgentLoopConfig,
) -> ToolCallReport:
    """Call tool ``name`` with ``arguments`` (JSON text, used verbatim) on ``images``.

    The arguments are not validated here: malformed JSON reaches the parser as the model's
    would, and comes back as the same error observation.
    """
    call_text = f'<tool_call>\n{{"name": {json.dumps(name)}, "arguments": {arguments}}}\n</tool_call>'
    # No token budget here: the point is to see the whole observation (`fits_budget` reports it).
    loop_cfg = AgentLoopConfig(
        max_turns=2,
        max_new_tokens=max(cfg.max_new_tokens, 4096),
        max_total_tokens=1 << 30,
        max_images=cfg.max_images,
        max_observation_chars=cfg.max_observation_chars,
        tool_timeout_s=cfg.tool_timeout_s,
        tool_workers=1,
    )
    state = replay(protocol, tools, "Debug a tool call.", images, [call_text], loop_cfg)
    turn = state.turns[0]
    obs_ids = state.token_ids[turn.end : turn.end + turn.observation_len]
    shown = [slot.image.image for slot in state.images if turn.end <= slot.start < turn.end + turn.observation_len]
    record = state.tool_calls[0] if state.tool_calls else None
    return ToolCallReport(
        call_text=call_text,
        error=record.error if record else "not_called",
        duration_s=record.duration_s if record else 0.0,
        observation=protocol.decode(obs_ids),
        observation_tokens=len(obs_ids),
        images=shown,
        fits_budget=len(state.token_ids) <= cfg.max_total_tokens,
    )


def save_images(images: list[Image.Image], out_dir: str | Path) -> list[Path]:
    """Write images as PNG files ``observation_<i>.png``; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, img in enumerate(images):
        path = out / f"observation_{i}.png"
        img.save(path)
        paths.append(path)
    return paths

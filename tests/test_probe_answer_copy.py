"""tools/probe_answer_copy.py: it scores the answer's first token after a tool observation, and
only that token, for tool trajectories only."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from PIL import Image
from script_loader import load_script

from axpo_nemo.agent.loop import AgentLoopConfig
from axpo_nemo.agent.protocol import ChatProtocol, format_assistant_turn
from axpo_nemo.agent.sample import Sample
from axpo_nemo.agent.sft_examples import tokenize_samples
from axpo_nemo.agent.tools.zoom import ImageZoomTool
from axpo_nemo.local.policy import sequence_logprobs
from axpo_nemo.models import build_tiny_qwen3vl

SCRIPT = Path(__file__).resolve().parents[1] / "tools" / "probe_answer_copy.py"
pytestmark = [pytest.mark.usefixtures("one_thread")]


@pytest.fixture(scope="module")
def tool():
    return load_script(SCRIPT)


def test_the_probe_scores_the_boxed_answer_after_the_observation(tool, tmp_path):
    bundle = build_tiny_qwen3vl(seed=0)
    samples = []
    for i in range(3):
        Image.new("RGB", (96, 96), (60 * i, 120, 200)).save(tmp_path / f"{i}.png")
        turns = []
        if i < 2:  # two tool trajectories, one without a tool
            call = [("image_zoom_in", {"bbox_2d": [0, 0, 500, 500]})]
            turns.append({"role": "assistant", "content": format_assistant_turn("Zoom.", tool_calls=call)})
            turns.append({"role": "tool", "content": "(crop)", "images": []})
        turns.append({"role": "assistant", "content": format_assistant_turn("Read it.", answer=f"{7 + i}5")})
        samples.append(
            Sample(id=f"s{i}", question=f"Q{i}?", answer=f"{7 + i}5", images=[f"{i}.png"], messages=turns)
        )
    loop = AgentLoopConfig(max_turns=3, max_total_tokens=2048)
    examples, _, _ = tokenize_samples(
        samples, tmp_path, {"image_zoom_in": ImageZoomTool()}, ChatProtocol(bundle.processor), loop, 4096
    )
    box = bundle.tokenizer.encode(tool.BOX, add_special_tokens=False)
    positions = [tool.answer_position(e, box) for e in examples]
    assert positions[2] is None  # no observation: nothing to copy
    for e, p, digit in zip(examples[:2], positions[:2], "78", strict=True):
        assert bundle.tokenizer.decode([e.token_ids[p]]) == digit
    result = tool.probe(bundle.model.eval(), examples, ["zoom", "zoom", "plain"], box, 0)
    assert list(result) == ["zoom"] and result["zoom"]["n"] == 2
    with torch.no_grad():
        full = sequence_logprobs(bundle.model, examples[:2], micro_batch_size=2)
    want = -sum(float(full[j, p]) for j, p in enumerate(positions[:2])) / 2
    assert math.isfinite(want) and result["zoom"]["nll"] == pytest.approx(want, rel=1e-4)

"""Scoring a finished trajectory: its final answer checked against the question's reference.

One definition for training rewards (both backends) and evaluation, so a rollout earns in
training exactly what it scores in Pass@k.
"""

from __future__ import annotations

from axpo_nemo.agent.protocol import ChatProtocol
from axpo_nemo.agent.rewards import RewardConfig, RewardResult, score_answer
from axpo_nemo.agent.sample import Sample
from axpo_nemo.agent.trajectory import TrajectoryState

__all__ = ["final_assistant_text", "score_trajectory"]


def final_assistant_text(state: TrajectoryState, protocol: ChatProtocol) -> str:
    """The text of a trajectory's last assistant turn, as the model wrote it.

    The generation prompt's pre-filled part (``<think>\\n`` for Qwen3-VL-Thinking) is put back in
    front, so an answer inside an unclosed thinking block is not mistaken for a final answer;
    the closing ``<|im_end|>`` is dropped. Empty when the trajectory has no turn.
    """
    if not state.turns:
        return ""
    turn = state.turns[-1]
    ids = state.token_ids[turn.start : turn.end]
    if ids and ids[-1] == protocol.im_end_id:
        ids = ids[:-1]
    return protocol.assistant_prefix + protocol.decode(ids)


def score_trajectory(
    state: TrajectoryState, sample: Sample, protocol: ChatProtocol, cfg: RewardConfig | None = None
) -> RewardResult:
    """Reward and correctness of ``state``'s final answer against ``sample``'s reference."""
    return score_answer(
        final_assistant_text(state, protocol), sample.answer, sample.answer_type,
        candidates=sample.candidates, options=sample.options, cfg=cfg,
    )  # fmt: skip

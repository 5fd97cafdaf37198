"""SFT samples as the token sequences the policy learns: each sample's assistant turns replayed
through the real agent loop (tools run, observations tokenized as in RL), so SFT and RL see the
same tokens. Every backend's SFT uses this."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from axpo_nemo.agent.loop import AgentLoopConfig
from axpo_nemo.agent.protocol import ChatProtocol
from axpo_nemo.agent.replay import replay
from axpo_nemo.agent.sample import Sample
from axpo_nemo.agent.tools.base import Tool
from axpo_nemo.agent.trajectory import TrajectoryState

__all__ = ["SFTExample", "assistant_turns", "tokenize_samples"]

logger = logging.getLogger(__name__)


@dataclass
class SFTExample:
    """One tokenized training sequence.

    Attributes:
        sample_id: the `Sample` it came from.
        state: the replayed trajectory (tokens, images, generated mask).
    """

    sample_id: str
    state: TrajectoryState

    @property
    def token_ids(self) -> list[int]:
        """The sequence's tokens."""
        return self.state.token_ids

    @property
    def images(self):
        """The sequence's image slots."""
        return self.state.images

    @property
    def loss_mask(self) -> torch.Tensor:
        """[len] bool: the tokens that carry loss — exactly the assistant-generated ones."""
        return torch.tensor(self.state.generated, dtype=torch.bool)

    @property
    def after_observation(self) -> torch.Tensor:
        """[len] bool: the loss tokens that follow a tool observation (the turns that read a
        tool's output: e.g. the answer copied from it)."""
        mask = self.loss_mask
        ends = torch.zeros_like(mask)
        ends[1:] = mask[:-1] & ~mask[1:]  # a generated run ends here: what follows is observed
        return mask & (torch.cumsum(ends.long(), 0) > 0)

    def __len__(self) -> int:
        return len(self.state.token_ids)


def assistant_turns(sample: Sample, protocol: ChatProtocol) -> list[str]:
    """The texts of ``sample.messages``' assistant turns, as the model generates them.

    A turn that repeats the generation prompt's opening (``<think>\\n``) has it removed, since the
    prompt already ends with it. List contents keep their text parts.
    """
    turns = []
    for message in sample.messages:
        if message.get("role") != "assistant":
            continue
        content = message.get("content", "")
        if isinstance(content, list):
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        prefix = protocol.assistant_prefix
        if prefix and content.startswith(prefix):
            content = content[len(prefix) :]
        turns.append(str(content))
    return turns


def tokenize_samples(
    samples: Sequence[Sample],
    data_root: str | Path,
    tools: Mapping[str, Tool],
    protocol: ChatProtocol,
    loop_cfg: AgentLoopConfig,
    max_tokens: int,
    *,
    declare_tools: bool = True,
) -> tuple[list[SFTExample], Counter, list[tuple[str, str]]]:
    """Replay every sample; returns (examples, skip counts by reason, (sample id, reason) list).

    ``declare_tools`` False leaves the tool schemas (the system part) out of the prompts.

    A sample is skipped when it has no assistant turn (``no_turns``), its replay raises
    (``replay_error``), the replay does not end with a boxed answer (``no_answer``; e.g. the turn
    or token limit cut it), or it is longer than ``max_tokens`` (``too_long``).
    """
    examples, skipped, reasons = [], Counter(), []
    for sample in samples:
        reason = None
        turns = assistant_turns(sample, protocol)
        if not turns:
            reason = "no_turns"
        else:
            try:
                images = sample.load_images(data_root)
                enabled = {
                    n: t for n, t in tools.items() if not sample.allowed_tools or n in sample.allowed_tools
                }
                state = replay(
                    protocol, enabled, sample.question, images, turns, loop_cfg,
                    declare_tools=declare_tools, question_id=sample.id,
                )  # fmt: skip
            except Exception as exc:
                logger.warning("SFT sample %s: replay failed (%s: %s)", sample.id, type(exc).__name__, exc)
                reason = "replay_error"
            else:
                if state.finish_reason != "answer" or state.num_turns != len(turns):
                    reason = "no_answer"
                elif len(state) > max_tokens:
                    reason = "too_long"
        if reason is None:
            examples.append(SFTExample(sample.id, state))
        else:
            skipped[reason] += 1
            reasons.append((sample.id, reason))
    if skipped:
        logger.warning(
            "SFT: skipped %d of %d samples (%s)", sum(skipped.values()), len(samples), dict(skipped)
        )
    return examples, skipped, reasons

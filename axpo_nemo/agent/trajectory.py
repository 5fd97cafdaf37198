"""Token-level trajectory state: what the agent loop grows and a generator reads.

A `TrajectoryState` is the single source of truth of one rollout while it is being generated: its
token ids (prompt, generated turns, observations), which tokens the policy generated and their
behaviour logprobs, where its images sit (with their processed pixels), its tool calls and turns.
History is never re-rendered: a turn's prompt is exactly the state's tokens.

`fork_at_tool_call` is AXPO's frozen-prefix resampling primitive, and `TrajectoryState.to_rollout`
converts a finished state into the `core.Rollout` the algorithm works on.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from axpo_nemo.agent.protocol import ChatProtocol, ImageSlot, Observation, ParsedTurn, Prompt
from axpo_nemo.core.rollout import Rollout, ToolCallSpan

__all__ = [
    "ToolCallRecord",
    "TrajectoryState",
    "TurnRecord",
    "derive_seed",
    "fork_at_tool_call",
    "to_rollouts",
]

#: ``reward_fn(state) -> (reward, correct)``.
RewardFn = Callable[["TrajectoryState"], tuple[float, bool]]


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed that depends only on ``parts`` (stable across processes, unlike ``hash``)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


@dataclass
class ToolCallRecord:
    """One tool call of a trajectory.

    Attributes:
        start: index of its ``<tool_call>`` token.
        end: one past its ``</tool_call>`` token (past the turn's end when cut off).
        turn: the assistant turn it was generated in.
        name: tool name when it parsed, else None.
        arguments: parsed arguments, else None.
        parse_error: why the call did not parse (None when well formed).
        parse_message: the explanation shown to the model for ``parse_error``.
        error: the call's outcome error: ``parse_error``, or the tool's own error kind
            (``timeout``, ``crashed``, ``bad_arguments``, …); None on success.
        response_text: the text the model was shown for it (None until executed).
        num_images: images shown with that response.
        duration_s: wall time of the tool call.
        metadata: the tool's `ToolResult.metadata`.
    """

    start: int
    end: int
    turn: int
    name: str | None
    arguments: dict[str, Any] | None
    parse_error: str | None = None
    parse_message: str = ""
    error: str | None = None
    response_text: str | None = None
    num_images: int = 0
    duration_s: float = 0.0
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def well_formed(self) -> bool:
        """The call parsed into a known tool with a JSON-object argument."""
        return self.parse_error is None

    def span(self) -> ToolCallSpan:
        """The call as a `core.ToolCallSpan`."""
        return ToolCallSpan(self.start, self.end, self.turn, self.well_formed, self.name)


@dataclass
class TurnRecord:
    """Per-turn metadata.

    Attributes:
        index: 0-based assistant turn.
        start: first generated token of the turn (for a forked state: of the source's turn).
        end: one past the turn's last generated token.
        stop_reason: the generator's reason (``stop``/``length``) for the turn's last piece.
        stop_token: the stop token's text when ``stop_reason == "stop"``.
        tool_names: names of the turn's tool calls (None for a call whose name did not parse).
        errors: error kind of each call (None for a success), filled in after execution.
        answer: the boxed answer the turn gave, if any.
        observation_len: tokens of the observation appended after the turn (0 if none).
    """

    index: int
    start: int
    end: int
    stop_reason: str
    stop_token: str | None = None
    tool_names: list[str | None] = field(default_factory=list)
    errors: list[str | None] = field(default_factory=list)
    answer: str | None = None
    observation_len: int = 0


@dataclass
class TrajectoryState:
    """One rollout in progress, token in / token out.

    Attributes:
        token_ids: every token so far.
        prompt_len: leading prompt tokens.
        generated: per token, whether the policy sampled it.
        logprobs: per token, the behaviour logprob (0.0 where not generated).
        images: every image shown so far (question first), with its pad run.
        group: the question's index in the step.
        seed: the trajectory's sampling seed (generators derive per-turn streams from it).
        question_id: identifier of the question, for tools and logs.
        metadata: free-form data for the caller (e.g. the reference answer for the reward).
        prompt_messages / tool_schemas: what the prompt was rendered from.
        turns: completed assistant turns.
        tool_calls: every tool call so far.
        turn_start: index where the open (current) turn's generated tokens begin.
        finished / finish_reason: whether the rollout is over and why (``answer``, ``no_answer``,
            ``length``, ``max_turns``, ``max_total_tokens``, ``prompt_too_long``).
        answer: the final boxed answer, if any.
        index: this state's row in the step's batch (what a fork records as ``source``).
        source / prefix_len: for a forked state, the source row and the frozen prefix length.
    """

    token_ids: list[int]
    prompt_len: int
    generated: list[bool]
    logprobs: list[float]
    images: list[ImageSlot] = field(default_factory=list)
    group: int = 0
    seed: int = 0
    question_id: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    prompt_messages: list[dict[str, Any]] = field(default_factory=list)
    tool_schemas: list[dict[str, Any]] = field(default_factory=list)
    turns: list[TurnRecord] = field(default_factory=list)
    tool_calls: list[ToolCallRecord] = field(default_factory=list)
    turn_start: int = 0
    finished: bool = False
    finish_reason: str | None = None
    answer: str | None = None
    index: int | None = None
    source: int | None = None
    prefix_len: int = 0

    @classmethod
    def from_prompt(
        cls,
        prompt: Prompt,
        *,
        group: int = 0,
        seed: int = 0,
        question_id: str | None = None,
        metadata: dict[str, Any] | None = None,
        index: int | None = None,
    ) -> TrajectoryState:
        """A fresh trajectory at the start of turn 0. Images are shared, not copied.

        Give each rollout of a question its own ``seed``: generators derive the sampling stream
        from it, so equal seeds on equal prompts sample equal tokens.
        """
        n = len(prompt.token_ids)
        return cls(
            token_ids=list(prompt.token_ids),
            prompt_len=n,
            generated=[False] * n,
            logprobs=[0.0] * n,
            images=list(prompt.images),
            group=group,
            seed=seed,
            question_id=question_id,
            metadata=dict(metadata or {}),
            prompt_messages=prompt.messages,
            tool_schemas=prompt.tool_schemas,
            turn_start=n,
            index=index,
        )

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def num_turns(self) -> int:
        """Completed assistant turns."""
        return len(self.turns)

    @property
    def open_turn_tokens(self) -> int:
        """Tokens generated so far in the open turn (a fork starts with its prefix's share)."""
        return len(self.token_ids) - self.turn_start

    def append_generated(self, token_ids: Sequence[int], logprobs: Sequence[float]) -> None:
        """Append sampled tokens and their behaviour logprobs."""
        if len(token_ids) != len(logprobs):
            raise ValueError(f"{len(token_ids)} tokens but {len(logprobs)} logprobs")
        self.token_ids.extend(int(t) for t in token_ids)
        self.generated.extend([True] * len(token_ids))
        self.logprobs.extend(float(x) for x in logprobs)

    def close_turn(self, stop_reason: str, stop_token: str | None, parsed: ParsedTurn) -> TurnRecord:
        """Record the open turn as complete (its tokens are already appended)."""
        turn = TurnRecord(
            index=len(self.turns),
            start=self.turn_start,
            end=len(self.token_ids),
            stop_reason=stop_reason,
            stop_token=stop_token,
            tool_names=[c.name for c in parsed.tool_calls],
            answer=parsed.answer,
        )
        self.turns.append(turn)
        return turn

    def append_observation(self, observation: Observation) -> None:
        """Append an observation's tokens and images, and open the next turn after them."""
        offset = len(self.token_ids)
        n = len(observation.token_ids)
        self.token_ids.extend(observation.token_ids)
        self.generated.extend([False] * n)
        self.logprobs.extend([0.0] * n)
        self.images.extend(slot.shifted(offset) for slot in observation.images)
        if self.turns:
            self.turns[-1].observation_len = n
        self.turn_start = len(self.token_ids)

    def finish(self, reason: str) -> None:
        """Mark the trajectory finished (the first reason given sticks)."""
        if not self.finished:
            self.finished, self.finish_reason = True, reason

    def to_rollout(
        self, reward_fn: RewardFn | None = None, *, reward: float = 0.0, correct: bool = False
    ) -> Rollout:
        """This trajectory as a `core.Rollout`.

        Reward and correctness come from ``reward_fn(state)`` when given, else from ``reward`` /
        ``correct`` (placeholders to fill in later).
        """
        if reward_fn is not None:
            reward, correct = reward_fn(self)
        return Rollout(
            group=self.group,
            token_ids=self.token_ids,
            prompt_len=self.prompt_len,
            generated=self.generated,
            logprobs=self.logprobs,
            reward=float(reward),
            correct=bool(correct),
            tool_calls=tuple(c.span() for c in self.tool_calls),
            num_turns=self.num_turns,
            source=self.source,
            prefix_len=self.prefix_len if self.source is not None else 0,
        )

    def messages(self, protocol: ChatProtocol) -> list[dict[str, Any]]:
        """The trajectory as chat messages (prompt, assistant turns, tool responses).

        Rendering them with the chat template (``protocol.render(messages, state.tool_schemas)``)
        and the processor (images: ``[slot.image.image for slot in state.images]``) gives back
        ``token_ids``, plus the template's closing ``<|im_end|>\n`` of the last turn. Used for
        SFT export and to check that the loop never drifts from the template.
        """
        out = copy.deepcopy(self.prompt_messages)
        for turn in self.turns:
            ids = self.token_ids[turn.start : turn.end]
            if ids and ids[-1] == protocol.im_end_id:
                ids = ids[:-1]
            out.append({"role": "assistant", "content": protocol.assistant_prefix + protocol.decode(ids)})
            if turn.observation_len:
                for rec in self.tool_calls:
                    if rec.turn == turn.index:
                        out.append(protocol.tool_message(rec.response_text or "", rec.num_images))
        return out

    def mm_token_type_ids(self) -> torch.Tensor:
        """[len] long: 1 on image-pad tokens, 0 elsewhere (what Qwen3-VL's forward expects)."""
        types = torch.zeros(len(self.token_ids), dtype=torch.long)
        for slot in self.images:
            types[slot.start : slot.end] = 1
        return types

    def model_inputs(self) -> dict[str, torch.Tensor]:
        """Unbatched-as-batch-of-one forward inputs of the whole trajectory (for scoring)."""
        inputs = {
            "input_ids": torch.tensor([self.token_ids], dtype=torch.long),
            "mm_token_type_ids": self.mm_token_type_ids()[None],
        }
        if self.images:
            inputs["pixel_values"] = torch.cat([s.image.pixel_values for s in self.images])
            inputs["image_grid_thw"] = torch.stack([s.image.grid_thw for s in self.images])
        return inputs


def to_rollouts(states: Sequence[TrajectoryState], reward_fn: RewardFn | None = None) -> list[Rollout]:
    """Convert finished states to rollouts (in order; originals must come before forks)."""
    return [s.to_rollout(reward_fn) for s in states]


def fork_at_tool_call(
    state: TrajectoryState,
    k: int,
    *,
    source: int | None = None,
    seeds: Sequence[int] | None = None,
) -> list[TrajectoryState]:
    """K copies of ``state`` cut right after its first ``<tool_call>`` marker, ready to continue.

    Each fork holds the source's tokens through the marker (``prefix_len = call.start + 1``) with
    their generated mask and logprobs (the trainer masks them by ``prefix_len``), only the images
    inside that prefix (for a first-turn call: the question's), and an open turn that continues
    the source's turn right after ``<tool_call>``; `run_rollouts` continues it like any other state.

    Args:
        state: a trajectory with at least one tool call.
        k: number of forks.
        source: the source's row index in the step's batch; defaults to ``state.index`` (one of
            the two is required, since a `core.Rollout` fork must name its source row).
        seeds: per-fork sampling seeds; default: derived from the source's seed and fork index.
    """
    if not state.tool_calls:
        raise ValueError("fork_at_tool_call: the trajectory has no tool call")
    if k < 1:
        raise ValueError(f"fork_at_tool_call: k must be >= 1 (got {k})")
    if seeds is not None and len(seeds) != k:
        raise ValueError(f"fork_at_tool_call: {len(seeds)} seeds for k={k}")
    call = state.tool_calls[0]
    cut = call.start + 1
    turn = next(t for t in state.turns if t.start <= call.start < t.end)
    src = state.index if source is None else source
    if src is None:
        raise ValueError("fork_at_tool_call: pass source= (the source's batch row) or set state.index")
    forks = []
    for i in range(k):
        forks.append(
            TrajectoryState(
                token_ids=state.token_ids[:cut],
                prompt_len=state.prompt_len,
                generated=state.generated[:cut],
                logprobs=state.logprobs[:cut],
                images=[s for s in state.images if s.end <= cut],
                group=state.group,
                seed=seeds[i] if seeds is not None else derive_seed("fork", state.seed, cut, i),
                question_id=state.question_id,
                metadata=copy.deepcopy(state.metadata),
                prompt_messages=state.prompt_messages,
                tool_schemas=state.tool_schemas,
                turns=[copy.deepcopy(t) for t in state.turns if t.index < turn.index],
                turn_start=turn.start,
                source=src,
                prefix_len=cut,
            )
        )
    return forks

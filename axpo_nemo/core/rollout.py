"""The token-level rollout data model AXPO works on.

Two views of the same data:

* `Rollout` — one trajectory as the agent loop builds it: the full token sequence (prompt,
  generated turns, tool observations), which tokens the policy generated, their behaviour
  logprobs, where its tool calls are, reward and correctness; for a resampled rollout, the
  source rollout and how many leading tokens were frozen.
* `RolloutBatch` — a step's rollouts packed into right-padded [R, S] tensors plus per-row
  columns. All AXPO math (triggers, selection, advantages, metrics) runs vectorised on it.

Indexing convention: every per-token tensor is aligned with ``token_ids``; position t describes
token t (its logprob is log π(token_t | tokens_<t)). Trainers whose logprobs are shifted by one
(``[:, 1:]``) slice the same way.

Rows in a batch: originals first (``source == -1``), then resampled rows whose ``source`` is the
row index of the original they were forked from.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class ToolCallSpan:
    """Where one tool call sits in a rollout's tokens.

    Attributes:
        start: index of the ``<tool_call>`` opening-marker token.
        end: one past the ``</tool_call>`` closing-marker token (or past the turn's last token
            if generation was cut off inside the call).
        turn: 0-based assistant turn the call was generated in.
        well_formed: the call parsed into a known tool with valid JSON arguments.
        name: the tool's name when it parsed, else None.
    """

    start: int
    end: int
    turn: int = 0
    well_formed: bool = True
    name: str | None = None


@dataclass
class Rollout:
    """One trajectory at token level.

    Attributes:
        group: the question this rollout answers (0..B-1 within the step).
        token_ids: the whole sequence: prompt, generated turns and observations.
        prompt_len: number of leading prompt tokens.
        generated: per token, True where the policy sampled it.
        logprobs: per token, the behaviour policy's logprob of that token (0 where not generated).
        reward: scalar reward (verifiable: 1 correct, 0 wrong, plus any format term).
        correct: whether the final answer is right.
        tool_calls: the rollout's tool calls in order.
        num_turns: assistant turns taken.
        source: for a resampled rollout, the batch row index of the original whose prefix was
            frozen; None for an original.
        prefix_len: for a resampled rollout, the number of leading tokens taken unchanged from the
            source (prompt + first-turn tokens through the ``<tool_call>`` marker; just the prompt
            for a fresh rollout when prefix fixing is off). These tokens never carry loss.
    """

    group: int
    token_ids: Sequence[int] | torch.Tensor
    prompt_len: int
    generated: Sequence[bool] | torch.Tensor
    logprobs: Sequence[float] | torch.Tensor
    reward: float
    correct: bool
    tool_calls: Sequence[ToolCallSpan] = field(default_factory=tuple)
    num_turns: int = 1
    source: int | None = None
    prefix_len: int = 0

    def __post_init__(self) -> None:
        self.token_ids = torch.as_tensor(self.token_ids, dtype=torch.long).reshape(-1)
        self.generated = torch.as_tensor(self.generated, dtype=torch.bool).reshape(-1)
        self.logprobs = torch.as_tensor(self.logprobs, dtype=torch.float32).reshape(-1)
        n = self.token_ids.numel()
        if self.generated.numel() != n or self.logprobs.numel() != n:
            raise ValueError(
                f"Rollout(group={self.group}): token_ids has {n} tokens but generated has "
                f"{self.generated.numel()} and logprobs {self.logprobs.numel()}"
            )
        if not 0 <= self.prompt_len <= n:
            raise ValueError(f"Rollout(group={self.group}): prompt_len {self.prompt_len} outside [0, {n}]")
        if bool(self.generated[: self.prompt_len].any()):
            raise ValueError(f"Rollout(group={self.group}): prompt tokens are marked generated")
        for span in self.tool_calls:
            if not (self.prompt_len <= span.start < span.end <= n):
                raise ValueError(
                    f"Rollout(group={self.group}): tool call span [{span.start}, {span.end}) "
                    f"is not inside the response [{self.prompt_len}, {n})"
                )
        if self.source is not None and not (self.prompt_len <= self.prefix_len <= n):
            raise ValueError(
                f"Rollout(group={self.group}): prefix_len {self.prefix_len} outside "
                f"[prompt_len={self.prompt_len}, {n}]"
            )

    @property
    def tool_using(self) -> bool:
        """True when the rollout made at least one well-formed tool call."""
        return any(s.well_formed for s in self.tool_calls)

    def first_call_prefix_len(self) -> int | None:
        """Length of the candidate prefix: tokens through the first ``<tool_call>`` marker."""
        return self.tool_calls[0].start + 1 if self.tool_calls else None


def _column(values: Sequence, dtype: torch.dtype) -> torch.Tensor:
    return torch.tensor(list(values), dtype=dtype)


@dataclass
class RolloutBatch:
    """A step's rollouts as packed tensors (R rows, right-padded to S tokens).

    Per-token ([R, S]): ``token_ids`` (long), ``generated`` (bool; False on padding),
    ``logprobs`` (float32; behaviour policy, 0 where not generated).
    Per-row ([R]): ``lengths``, ``prompt_lens``, ``group``, ``reward``, ``correct``,
    ``tool_using``, ``num_tool_calls``, ``call_start`` / ``call_end`` (the first tool call's
    span; -1 when there is none), ``num_turns``, ``source`` (-1 for originals) and
    ``prefix_len`` (0 for originals).

    Build it with `from_rollouts`, or directly from tensors when a backend already holds them.
    """

    token_ids: torch.Tensor
    generated: torch.Tensor
    logprobs: torch.Tensor
    lengths: torch.Tensor
    prompt_lens: torch.Tensor
    group: torch.Tensor
    reward: torch.Tensor
    correct: torch.Tensor
    tool_using: torch.Tensor
    num_tool_calls: torch.Tensor
    call_start: torch.Tensor
    call_end: torch.Tensor
    num_turns: torch.Tensor
    source: torch.Tensor
    prefix_len: torch.Tensor

    def __post_init__(self) -> None:
        if self.token_ids.dim() != 2:
            raise ValueError(f"RolloutBatch: token_ids must be [R, S], got shape {tuple(self.token_ids.shape)}")
        rows, width = self.token_ids.shape
        for name in ("generated", "logprobs"):
            if tuple(getattr(self, name).shape) != (rows, width):
                raise ValueError(
                    f"RolloutBatch: {name} has shape {tuple(getattr(self, name).shape)}, "
                    f"expected {(rows, width)} like token_ids"
                )
        for name in self._ROW_FIELDS:
            if tuple(getattr(self, name).shape) != (rows,):
                raise ValueError(
                    f"RolloutBatch: {name} has shape {tuple(getattr(self, name).shape)}, expected ({rows},)"
                )
        if self.generated.dtype != torch.bool:
            raise ValueError("RolloutBatch: generated must be a bool tensor")
        resampled = self.source >= 0
        num_originals = rows - int(resampled.sum())
        # A batch of only resampled rows is a legal intermediate (before `concat`).
        if num_originals and bool((self.source[resampled] >= num_originals).any()):
            raise ValueError("RolloutBatch: a resampled row's source is not an original row")
        if num_originals and bool((self.group[resampled] != self.group[self.source[resampled]]).any()):
            raise ValueError("RolloutBatch: a resampled row's group differs from its source's group")
        if rows and bool(resampled.any()) and bool((~resampled)[int(resampled.nonzero()[0]) :].any()):
            raise ValueError("RolloutBatch: original rows must come before resampled rows")

    _ROW_FIELDS = (
        "lengths",
        "prompt_lens",
        "group",
        "reward",
        "correct",
        "tool_using",
        "num_tool_calls",
        "call_start",
        "call_end",
        "num_turns",
        "source",
        "prefix_len",
    )

    @property
    def num_rows(self) -> int:
        """Number of rollouts R (originals and resampled)."""
        return self.token_ids.shape[0]

    @property
    def is_original(self) -> torch.Tensor:
        """[R] bool: True for the step's original rollouts."""
        return self.source < 0

    @property
    def num_originals(self) -> int:
        """Number of original rollouts (B·N)."""
        return int(self.is_original.sum())

    @property
    def num_groups(self) -> int:
        """Number of questions B (group ids are 0..B-1)."""
        return int(self.group.max()) + 1 if self.num_rows else 0

    @classmethod
    def from_rollouts(cls, rollouts: Sequence[Rollout], pad_id: int = 0) -> RolloutBatch:
        """Pack rollouts into one batch; originals must precede resampled rollouts."""
        if not rollouts:
            raise ValueError("RolloutBatch.from_rollouts: no rollouts given")
        width = max(r.token_ids.numel() for r in rollouts)
        rows = len(rollouts)
        token_ids = torch.full((rows, width), pad_id, dtype=torch.long)
        generated = torch.zeros((rows, width), dtype=torch.bool)
        logprobs = torch.zeros((rows, width), dtype=torch.float32)
        for i, r in enumerate(rollouts):
            n = r.token_ids.numel()
            token_ids[i, :n] = r.token_ids
            generated[i, :n] = r.generated
            logprobs[i, :n] = torch.where(r.generated, r.logprobs, 0.0)
        first = [r.tool_calls[0] if r.tool_calls else None for r in rollouts]
        return cls(
            token_ids=token_ids,
            generated=generated,
            logprobs=logprobs,
            lengths=_column((r.token_ids.numel() for r in rollouts), torch.long),
            prompt_lens=_column((r.prompt_len for r in rollouts), torch.long),
            group=_column((r.group for r in rollouts), torch.long),
            reward=_column((r.reward for r in rollouts), torch.float32),
            correct=_column((r.correct for r in rollouts), torch.bool),
            tool_using=_column((r.tool_using for r in rollouts), torch.bool),
            num_tool_calls=_column((len(r.tool_calls) for r in rollouts), torch.long),
            call_start=_column((s.start if s else -1 for s in first), torch.long),
            call_end=_column((s.end if s else -1 for s in first), torch.long),
            num_turns=_column((r.num_turns for r in rollouts), torch.long),
            source=_column((-1 if r.source is None else r.source for r in rollouts), torch.long),
            prefix_len=_column((r.prefix_len if r.source is not None else 0 for r in rollouts), torch.long),
        )

    def concat(self, other: RolloutBatch, pad_id: int = 0) -> RolloutBatch:
        """Append ``other``'s rows (e.g. resampled rollouts) after this batch's rows."""
        width = max(self.token_ids.shape[1], other.token_ids.shape[1])

        def pad(t: torch.Tensor, value) -> torch.Tensor:
            return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value)

        return RolloutBatch(
            token_ids=torch.cat([pad(self.token_ids, pad_id), pad(other.token_ids, pad_id)]),
            generated=torch.cat([pad(self.generated, False), pad(other.generated, False)]),
            logprobs=torch.cat([pad(self.logprobs, 0.0), pad(other.logprobs, 0.0)]),
            **{name: torch.cat([getattr(self, name), getattr(other, name)]) for name in self._ROW_FIELDS},
        )

    def response_tokens(self) -> torch.Tensor:
        """[R] number of policy-generated tokens per row."""
        return self.generated.sum(dim=1)

"""The multi-turn agent loop, token in / token out (DESIGN.md §2).

`run_rollouts` drives a batch of `TrajectoryState`\\ s to the end: each round asks the `Generator`
for one assistant turn of every unfinished trajectory (in one batch), parses the turns, runs every
tool call of the batch concurrently (`ToolRunner`: per-call timeout; a tool that raises, hangs or
returns garbage becomes an error observation) and appends the observation tokens and images. A turn
without a tool call ends its trajectory; so do the turn limit and the token budget.

A backend implements only `Generator.generate(states, params) -> list[Continuation]`. It may also
offer ``rollout_session()``, a context manager that `run_rollouts` holds open around its rounds on
the calling thread: state kept inside it (the local generator's per-trajectory KV caches) lives no
longer than the call.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol, TypeVar, runtime_checkable

from axpo_nemo.agent.protocol import (
    IM_END,
    TOOL_CALL_CLOSE,
    ChatProtocol,
    Observation,
    ProcessedImage,
    ToolResponse,
)
from axpo_nemo.agent.tools.base import MAX_OBSERVATION_CHARS, Tool, ToolContext, ToolResult, cap_text
from axpo_nemo.agent.trajectory import ToolCallRecord, TrajectoryState
from axpo_nemo.core.config import field_errors, setting

__all__ = [
    "AgentLoopConfig",
    "Continuation",
    "Generator",
    "SamplingParams",
    "ToolRunner",
    "WorkCounters",
    "per_state_params",
    "run_rollouts",
]

T = TypeVar("T")


@dataclass(frozen=True)
class SamplingParams:
    """How a generator samples one assistant turn."""

    max_new_tokens: int = setting(1024, "Tokens to sample at most.", ge=0)
    temperature: float = setting(
        1.0, "Softmax temperature T; 0 means greedy (logprobs are then those of T = 1).", ge=0.0
    )
    top_p: float = setting(1.0, "Nucleus mass kept before sampling.", gt=0.0, le=1.0)
    stop_token_texts: tuple[str, ...] = setting(
        (TOOL_CALL_CLOSE, IM_END), "Single-token texts that end the turn (the token is kept)."
    )
    seed: int = setting(0, "Base seed, mixed with each trajectory's own seed.")
    ignore_eos: bool = setting(False, "Do not stop on the tokenizer's EOS tokens (benchmarks).")

    def __post_init__(self) -> None:
        errors = field_errors(self)
        if errors:
            raise ValueError("SamplingParams: " + "; ".join(errors))


@dataclass
class WorkCounters:
    """Base of a generator's cumulative integer work counters (dataclass fields)."""

    def reset(self) -> None:
        """Zero every counter."""
        for name in asdict(self):
            setattr(self, name, 0)

    def as_dict(self) -> dict[str, int]:
        """The counters as a dict."""
        return asdict(self)


@dataclass
class Continuation:
    """What a generator sampled for one trajectory.

    Attributes:
        token_ids: the sampled tokens, the stop token included.
        logprobs: the behaviour logprob of each sampled token.
        stop_reason: ``stop`` (a stop/EOS token was sampled) or ``length`` (max_new_tokens).
        stop_token: the stop token's text when ``stop_reason == "stop"``.
    """

    token_ids: list[int]
    logprobs: list[float]
    stop_reason: str
    stop_token: str | None = None


@runtime_checkable
class Generator(Protocol):
    """A sampling backend: continue each state's tokens by one assistant turn, as a batch."""

    def generate(
        self, states: Sequence[TrajectoryState], params: SamplingParams | Sequence[SamplingParams]
    ) -> list[Continuation]:
        """One continuation per state; ``params`` is shared or given per state."""
        ...


def per_state_params(
    states: Sequence[TrajectoryState], params: SamplingParams | Sequence[SamplingParams]
) -> list[SamplingParams]:
    """Broadcast shared params to one per state (generators call this first)."""
    if isinstance(params, SamplingParams):
        return [params] * len(states)
    params = list(params)
    if len(params) != len(states):
        raise ValueError(f"{len(params)} sampling params for {len(states)} states")
    return params


@dataclass
class AgentLoopConfig:
    """Limits and sampling settings of the agent loop (field names follow `RolloutConfig`)."""

    max_turns: int = setting(3, "Assistant turns per trajectory at most.", ge=1)
    max_new_tokens: int = setting(1024, "Tokens generated per assistant turn at most.", ge=1)
    max_total_tokens: int = setting(
        8192, "Tokens per trajectory (prompt, turns, observations) at most.", ge=2
    )
    max_images: int = setting(8, "Images per trajectory (question and tool results) at most.", ge=0)
    max_observation_chars: int = setting(
        MAX_OBSERVATION_CHARS,
        "Characters of one tool response at most, whatever the tool returns: the middle is elided "
        "before anything is tokenized.",
        ge=256,
    )
    temperature: float = setting(1.0, "Sampling temperature (0: greedy).", ge=0.0)
    top_p: float = setting(1.0, "Nucleus sampling mass.", gt=0.0, le=1.0)
    seed: int = setting(0, "Base sampling seed (mixed with each trajectory's seed).")
    tool_timeout_s: float = setting(30.0, "Wall-clock limit of one tool call.", gt=0.0)
    tool_workers: int = setting(16, "Tool calls run at the same time at most.", ge=1)
    stop_on_tool_call: bool = setting(
        True, "End a turn at </tool_call> (one call per turn); False: only at <|im_end|>."
    )

    def __post_init__(self) -> None:
        errors = field_errors(self)
        if errors:
            raise ValueError("AgentLoopConfig: " + "; ".join(errors))

    @classmethod
    def from_rollout_config(cls, rollout: Any, **overrides: Any) -> AgentLoopConfig:
        """Take the shared fields from a `RolloutConfig`-like object, then apply ``overrides``."""
        names = (
            "max_turns", "max_new_tokens", "max_total_tokens", "max_images", "max_observation_chars",
            "temperature", "top_p",
        )  # fmt: skip
        values = {n: getattr(rollout, n) for n in names if hasattr(rollout, n)}
        return cls(**{**values, **overrides})

    def sampling_params(self, max_new_tokens: int) -> SamplingParams:
        """Sampling params of one turn with the given token budget."""
        stops = (TOOL_CALL_CLOSE, IM_END) if self.stop_on_tool_call else (IM_END,)
        return SamplingParams(max_new_tokens, self.temperature, self.top_p, stops, self.seed)


class ToolRunner:
    """Runs jobs concurrently on daemon threads with a per-job timeout; never raises.

    Daemon threads rather than a ThreadPoolExecutor: a tool that hangs forever is abandoned (its
    thread is replaced so the pool keeps its width) and cannot block interpreter exit, which an
    executor's non-daemon workers would. A job's timeout counts from when it starts running.
    """

    def __init__(self, max_workers: int = 16, timeout_s: float = 30.0) -> None:
        self.max_workers = max_workers
        self.timeout_s = timeout_s

    def run(
        self,
        jobs: Sequence[Callable[[], T]],
        *,
        on_timeout: Callable[[int], T],
        on_error: Callable[[int, BaseException], T],
    ) -> list[T]:
        """Run every job; job i's result, or ``on_timeout(i)`` / ``on_error(i, exc)``."""
        n = len(jobs)
        results: list[Any] = [None] * n
        done = [False] * n
        abandoned = [False] * n
        started: list[float | None] = [None] * n
        cond = threading.Condition()
        next_job = 0

        def worker() -> None:
            nonlocal next_job
            while True:
                with cond:
                    if next_job >= n:
                        return
                    i, next_job = next_job, next_job + 1
                    started[i] = time.monotonic()
                try:
                    out = jobs[i]()
                except BaseException as exc:  # a tool may even call sys.exit
                    out = on_error(i, exc)
                with cond:
                    if not done[i]:
                        results[i], done[i] = out, True
                        cond.notify_all()
                    if abandoned[i]:  # a replacement worker took this one's place
                        return

        def spawn() -> None:
            threading.Thread(target=worker, name="axpo-tool", daemon=True).start()

        for _ in range(min(n, self.max_workers)):
            spawn()
        with cond:
            while not all(done):
                now = time.monotonic()
                deadlines = []
                for i in range(n):
                    if done[i] or started[i] is None:
                        continue
                    if now - started[i] >= self.timeout_s:
                        results[i], done[i], abandoned[i] = on_timeout(i), True, True
                        spawn()
                    else:
                        deadlines.append(started[i] + self.timeout_s)
                wait = min(deadlines) - now if deadlines else self.timeout_s
                cond.wait(timeout=max(wait, 1e-3))
        return results


@dataclass
class _Outcome:
    """A tool call's result with its images already processed."""

    result: ToolResult
    images: list[ProcessedImage]
    duration_s: float


def _tool_registry(tools: Sequence[Tool] | Mapping[str, Tool]) -> dict[str, Tool]:
    if isinstance(tools, Mapping):
        return dict(tools)
    return {t.name: t for t in tools}


def _make_job(
    tool: Tool, arguments: dict[str, Any], context: ToolContext, protocol: ChatProtocol, max_chars: int
) -> Callable[[], _Outcome]:
    """A job that runs the tool and processes the images it returns (off the main thread); the
    text is cut to ``max_chars`` first."""

    def job() -> _Outcome:
        t0 = time.monotonic()
        result = tool(arguments, context)
        if not isinstance(result, ToolResult):
            result = ToolResult.failure("crashed", f"the tool returned {type(result).__name__}, not a result")
        images, notes = [], []
        for img in list(result.images or []):
            try:
                images.append(protocol.process_image(img))
            except Exception as exc:
                notes.append(f"[an image could not be processed: {type(exc).__name__}]")
        text = protocol.sanitize_tool_text("\n".join([cap_text(str(result.text), max_chars), *notes]))
        error = None if result.error is None else str(result.error)
        metadata = dict(result.metadata) if isinstance(result.metadata, dict) else {}
        return _Outcome(ToolResult(text, [], error, metadata), images, time.monotonic() - t0)

    return job


def _run_jobs(runner: ToolRunner, jobs, names: list[str | None], timeout_s: float) -> list[_Outcome]:
    """Run the batch's tool jobs; a job that hangs or raises becomes an error outcome."""

    def on_timeout(j: int) -> _Outcome:
        msg = f"the tool {names[j]!r} did not finish within {timeout_s:g} s"
        return _Outcome(ToolResult.failure("timeout", msg), [], timeout_s)

    def on_error(j: int, exc: BaseException) -> _Outcome:
        msg = f"the tool {names[j]!r} crashed ({type(exc).__name__}: {exc})"
        return _Outcome(ToolResult.failure("crashed", msg), [], 0.0)

    return runner.run(jobs, on_timeout=on_timeout, on_error=on_error)


def _end_turn(state: TrajectoryState, cont: Continuation, protocol: ChatProtocol, names, cfg) -> bool:
    """Parse and record the turn just generated; finish the state or return True to run its calls."""
    parsed, spans = protocol.parse_turn_tokens(state.token_ids[state.turn_start :], names)
    turn = state.close_turn(cont.stop_reason, cont.stop_token, parsed)
    for call, (a, b) in zip(parsed.tool_calls, spans, strict=True):
        state.tool_calls.append(
            ToolCallRecord(
                start=turn.start + a,
                end=turn.start + b,
                turn=turn.index,
                name=call.name,
                arguments=call.arguments,
                parse_error=call.error,
                parse_message=call.message,
                error=call.error,
            )
        )
    turn.errors = [call.error for call in parsed.tool_calls]
    if not parsed.tool_calls:
        state.answer = parsed.answer
        if cont.stop_reason == "length":
            state.finish("max_total_tokens" if len(state) >= cfg.max_total_tokens else "length")
        else:
            state.finish("answer" if parsed.answer is not None else "no_answer")
        return False
    if turn.index + 1 >= cfg.max_turns:
        state.finish("max_turns")
        return False
    if len(state) >= cfg.max_total_tokens - 1:
        state.finish("max_total_tokens")
        return False
    return True


def _observe(
    state: TrajectoryState,
    records: list[ToolCallRecord],
    outcomes: list[_Outcome],
    protocol: ChatProtocol,
    cfg: AgentLoopConfig,
) -> None:
    """Cap images and text, render the observation, fit it into the token budget and append it."""
    remaining = cfg.max_images - len(state.images)
    responses = []
    for out in outcomes:
        keep = out.images[: max(remaining, 0)]
        remaining -= len(keep)
        text = out.result.text
        if len(out.images) > len(keep):
            dropped = len(out.images) - len(keep)
            text += f"\n[{dropped} image(s) not shown: at most {cfg.max_images} images per trajectory]"
        responses.append(ToolResponse(cap_text(text, cfg.max_observation_chars), keep))
    turn_closed = state.turns[-1].stop_token == IM_END
    obs: Observation = protocol.render_observation(responses, turn_closed=turn_closed)
    room = cfg.max_total_tokens - len(state) - 1  # leave room to generate at least one token
    if len(obs.token_ids) > room and obs.images:
        note = "\n[image(s) not shown: the trajectory's token budget is exhausted]"
        responses = [ToolResponse(r.text + note if r.images else r.text) for r in responses]
        obs = protocol.render_observation(responses, turn_closed=turn_closed)
    if len(obs.token_ids) > room:
        state.finish("max_total_tokens")  # nothing appended: never a partial observation
        for rec, out in zip(records, outcomes, strict=True):
            rec.error, rec.duration_s, rec.metadata = (
                rec.error or out.result.error,
                out.duration_s,
                out.result.metadata,
            )
        return
    state.append_observation(obs)
    for rec, out, resp in zip(records, outcomes, responses, strict=True):
        rec.error = rec.parse_error or out.result.error
        rec.response_text = resp.text
        rec.num_images = len(resp.images)
        rec.duration_s = out.duration_s
        rec.metadata = dict(out.result.metadata)
    state.turns[-1].errors = [rec.error for rec in records]


def run_rollouts(
    states: Sequence[TrajectoryState],
    generator: Generator,
    tools: Sequence[Tool] | Mapping[str, Tool],
    cfg: AgentLoopConfig,
    *,
    protocol: ChatProtocol,
    allowed_tools: Callable[[TrajectoryState], Collection[str]] | None = None,
    on_round_end: Callable[[int], None] | None = None,
) -> list[TrajectoryState]:
    """Run every unfinished state to the end; returns the same states (updated in place).

    Each round generates one turn for all unfinished states in a single ``generator.generate``
    call, then executes all their tool calls concurrently. Forked states (from
    `fork_at_tool_call`) continue their open turn exactly like originals. ``allowed_tools(state)``
    names the tools a state's question offers (empty: all of ``tools``); a call to any other tool
    is an ``unknown_tool`` error observation, as if the tool did not exist, while every state
    still shares one generation batch per turn. ``on_round_end(r)`` is called after round r
    (0-based) has appended its observations: e.g. after round 0 every state's first turn is final.
    """
    registry = _tool_registry(tools)
    all_names = frozenset(registry)

    def names_for(state: TrajectoryState) -> frozenset[str]:
        allowed = allowed_tools(state) if allowed_tools is not None else None
        return all_names & frozenset(allowed) if allowed else all_names
    for s in states:
        if not s.finished and len(s) >= cfg.max_total_tokens:
            s.finish("prompt_too_long" if len(s) == s.prompt_len else "max_total_tokens")
    session = getattr(generator, "rollout_session", None)
    with session() if callable(session) else contextlib.nullcontext():
        _run_rounds(states, generator, registry, names_for, cfg, protocol, on_round_end)
    return list(states)


def _run_rounds(
    states: Sequence[TrajectoryState],
    generator: Generator,
    registry: dict[str, Tool],
    names_for: Callable[[TrajectoryState], frozenset[str]],
    cfg: AgentLoopConfig,
    protocol: ChatProtocol,
    on_round_end: Callable[[int], None] | None,
) -> None:
    """`run_rollouts`' rounds, until no state is left unfinished."""
    runner = ToolRunner(cfg.tool_workers, cfg.tool_timeout_s)
    for round_index in itertools.count():
        batch, params = [], []
        for s in states:
            if s.finished:
                continue
            budget = min(cfg.max_new_tokens - s.open_turn_tokens, cfg.max_total_tokens - len(s))
            if budget <= 0:  # a fork whose prefix already used up its turn: close it as cut off
                _end_turn(s, Continuation([], [], "length"), protocol, names_for(s), cfg)
                s.finish("length")
                continue
            batch.append(s)
            params.append(cfg.sampling_params(budget))
        if not batch:
            return
        continuations = generator.generate(batch, params)
        if len(continuations) != len(batch):
            raise RuntimeError(
                f"generator returned {len(continuations)} continuations for {len(batch)} states"
            )

        jobs, owners = [], []  # owners[j]: the record of job j
        calling = []
        for s, cont in zip(batch, continuations, strict=True):
            s.append_generated(cont.token_ids, cont.logprobs)
            if not _end_turn(s, cont, protocol, names_for(s), cfg):
                continue
            records = [r for r in s.tool_calls if r.turn == s.turns[-1].index]
            calling.append((s, records))
            context = ToolContext(
                images=[slot.image.image for slot in s.images],
                question_id=s.question_id,
                timeout_s=cfg.tool_timeout_s,
            )
            for rec in records:
                if rec.parse_error is None:
                    job = _make_job(registry[rec.name], rec.arguments, context, protocol, cfg.max_observation_chars)
                    jobs.append(job)
                    owners.append(rec)

        results = _run_jobs(runner, jobs, [rec.name for rec in owners], cfg.tool_timeout_s)
        by_record = {id(rec): out for rec, out in zip(owners, results, strict=True)}
        for s, records in calling:
            outcomes = []
            for rec in records:
                if rec.parse_error is not None:
                    failure = ToolResult.failure(rec.parse_error, rec.parse_message)
                    outcomes.append(_Outcome(failure, [], 0.0))
                else:
                    outcomes.append(by_record[id(rec)])
            _observe(s, records, outcomes, protocol, cfg)
        if on_round_end is not None:
            on_round_end(round_index)
    raise AssertionError("unreachable")

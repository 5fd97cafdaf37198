"""Speculative resampling: AXPO's resample wave starts while the original rollouts still run.

The resample wave depends on the originals only through two things: *which* prefixes the plan
selects, and those prefixes' tokens. Both are known early. Every rollout's first tool call is in
its first turn (a turn without a call ends the trajectory), so once the agent loop's first round
is done the candidates, their uncertainty and their prefixes are final; only correctness, which
decides whether a group is triggered, is still missing. `core.speculative_plan` guesses the plan
from that (every group with a tool-using rollout assumed all wrong), and `SpeculativeWave` rolls
the guessed prefixes' continuations out on a second thread while the main thread decodes the
originals' later turns, then computes their old and reference logprobs (the weights do not change
before the update).

Continuations are seeded by their source row (`agent.groups.continuation_states`), so a
speculated continuation is the one the real wave would have sampled; the trainer uses those the
final plan selects and discards the others, and rolls out selected prefixes nobody guessed after
the originals. The set speculated on is a function of the first round's tokens and always runs to
the end, so results never depend on thread timing. On a CPU, decoding runs on one core: the
wave uses the one it leaves idle.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from axpo_nemo.agent.trajectory import TrajectoryState

__all__ = ["SharedTasks", "SpeculativeResult", "SpeculativeWave", "continuation_positions"]


class _Cancelled(Exception):
    """Raised between two rounds of a cancelled wave."""


@dataclass
class SpeculativeResult:
    """A finished speculative wave.

    Attributes:
        forks: the rolled-out continuations of each speculated source row.
        old, ref: ``[F, S]`` logprobs of the continuations in ``forks``' order (flattened), at
            their generated positions after the prefix (None when not scored; ``ref`` None
            without a reference model).
    """

    forks: dict[int, list[TrajectoryState]]
    old: torch.Tensor | None
    ref: torch.Tensor | None

    def rows_of(self, states: Sequence[TrajectoryState]) -> list[tuple[int, int]]:
        """(position in ``old``, index) of each continuation that appears in ``states``."""
        wanted = {id(s) for s in states}
        flat = [f for fs in self.forks.values() for f in fs]
        return [(i, f.index) for i, f in enumerate(flat) if id(f) in wanted and f.index is not None]


class SpeculativeWave:
    """Runs speculated continuations on a second thread (see the module docstring).

    Args:
        rollout: ``rollout(states, on_round_end)`` rolls the states out to the end (the agent
            loop; no rewards, which are computed on the main thread).
        score: ``score(states, needed) -> (old, ref)`` logprobs at the ``needed`` [F, S]
            positions; None skips scoring.
    """

    def __init__(
        self,
        rollout: Callable[[list[TrajectoryState], Callable[[int], None]], object],
        score: Callable[[list[TrajectoryState], torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]] | None,
    ) -> None:
        self._rollout, self._score = rollout, score
        self._pool: ThreadPoolExecutor | None = None
        self._future: Future | None = None
        self.forks: dict[int, list[TrajectoryState]] = {}
        self._cancelled = threading.Event()
        self.tasks = SharedTasks()

    @property
    def started(self) -> bool:
        """Whether `start` launched a wave."""
        return self._future is not None

    def start(self, forks: Mapping[int, Sequence[TrajectoryState]]) -> None:
        """Roll ``forks`` (continuations by source row) out, then score them, on a second thread."""
        if self._future is not None:
            raise RuntimeError("SpeculativeWave.start: a wave was already started")
        self.forks = {src: list(fs) for src, fs in forks.items()}
        flat = [f for fs in self.forks.values() for f in fs]
        if not flat:
            return

        def work() -> tuple[torch.Tensor | None, torch.Tensor | None]:
            torch.set_num_threads(1)  # per thread: the main thread keeps its own setting
            try:
                self._rollout(flat, self._stop_if_cancelled)
            except _Cancelled:
                return None, None
            scores = (None, None)
            if self._score is not None and not self._cancelled.is_set():
                scores = self._score(flat, continuation_positions(flat))
            self.tasks.run()  # then help the main thread with whatever it shares
            return scores

        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="axpo-speculate")
        self._future = self._pool.submit(work)

    def result(self) -> SpeculativeResult:
        """Wait for the wave (re-raising its error) and return it; an empty result if none ran.

        Closes ``tasks`` first: the wave's thread ends once the tasks already shared are done.
        """
        self.tasks.put_all([])
        if self._future is None:
            return SpeculativeResult(self.forks, None, None)
        old, ref = self._future.result()
        return SpeculativeResult(self.forks, old, ref)

    def cancel(self) -> None:
        """Stop the wave after its current round (only when none of its results will be used)."""
        self._cancelled.set()

    def _stop_if_cancelled(self, round_index: int) -> None:
        if self._cancelled.is_set():
            raise _Cancelled

    def close(self) -> None:
        """Wait for a running wave to end and free the thread (safe to call more than once)."""
        self.tasks.put_all([])  # releases a wave waiting for tasks that will not come
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


class SharedTasks:
    """Independent tasks that several threads take one at a time until none is left.

    `run` blocks until `put_all` has been called (a helper thread may start waiting early), then
    runs tasks until the list is empty. Each task runs exactly once, on whichever thread took it.
    """

    def __init__(self) -> None:
        self._items: deque[Callable[[], object]] = deque()
        self._posted = False
        self._cond = threading.Condition()

    def put_all(self, tasks: Sequence[Callable[[], object]]) -> None:
        """Post every task at once (later calls are ignored: the list is closed)."""
        with self._cond:
            if self._posted:
                return
            self._items.extend(tasks)
            self._posted = True
            self._cond.notify_all()

    def run(self) -> None:
        """Take and run tasks until none is left (after waiting for them to be posted)."""
        while True:
            with self._cond:
                while not self._posted:
                    self._cond.wait()
                if not self._items:
                    return
                task = self._items.popleft()
            task()


def continuation_positions(states: Sequence[TrajectoryState]) -> torch.Tensor:
    """``[F, S]`` bool: each state's generated positions at or after its ``prefix_len``."""
    width = max((len(s.token_ids) for s in states), default=0)
    out = torch.zeros((len(states), width), dtype=torch.bool)
    for i, s in enumerate(states):
        n = len(s.token_ids)
        out[i, :n] = torch.tensor(s.generated, dtype=torch.bool)
        out[i, : s.prefix_len] = False
    return out

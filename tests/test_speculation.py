"""The speculative wave's thread plumbing: shared tasks, cancellation, joining (no model)."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from axpo_nemo.local.speculation import SharedTasks, SpeculativeWave, continuation_positions

pytestmark = pytest.mark.numerics


class Row:
    """A trajectory stand-in: what `continuation_positions` reads."""

    def __init__(self, n, prefix_len):
        self.token_ids, self.generated, self.prefix_len = [0] * n, [i >= 2 for i in range(n)], prefix_len


def test_shared_tasks_run_once_each_and_wait_to_be_posted():
    tasks, done, lock = SharedTasks(), [], threading.Lock()

    def task(i):
        time.sleep(0.002)
        with lock:
            done.append((i, threading.current_thread().name))

    helper = threading.Thread(target=tasks.run, name="helper")
    helper.start()  # waits: nothing posted yet
    time.sleep(0.05)
    assert helper.is_alive() and not done
    tasks.put_all([lambda i=i: task(i) for i in range(40)])
    tasks.put_all([lambda: task(99)])  # closed: ignored
    tasks.run()
    helper.join(timeout=5)
    assert sorted(i for i, _ in done) == list(range(40))
    assert {name for _, name in done} <= {"helper", threading.current_thread().name}


def test_a_wave_rolls_out_scores_then_helps():
    order = []

    def rollout(states, on_round_end):
        order.append("rollout")
        on_round_end(0)

    def score(states, needed):
        order.append("score")
        assert needed.tolist() == [[False, False, False, True], [False, False, True, False]]
        return torch.ones(needed.shape), None

    wave = SpeculativeWave(rollout, score)
    forks = {3: [Row(4, 3)], 5: [Row(3, 2)]}
    wave.start(forks)
    wave.tasks.put_all([lambda: order.append("task")])
    result = wave.result()
    wave.close()
    assert order == ["rollout", "score", "task"]
    assert result.forks == forks and result.old.shape == (2, 4) and result.ref is None


def test_result_without_shared_tasks_does_not_wait_for_them():
    wave = SpeculativeWave(lambda states, on_round_end: None, lambda states, needed: (torch.zeros(needed.shape), None))
    wave.start({0: [Row(3, 1)]})
    assert wave.result().old.shape == (1, 3)  # nobody posted tasks: the wave's thread must not wait
    wave.close()


def test_a_cancelled_wave_stops_between_rounds_and_close_releases_it():
    rounds, release = [], threading.Event()

    def rollout(states, on_round_end):
        for r in range(100):
            release.wait(timeout=5)
            rounds.append(r)
            on_round_end(r)

    wave = SpeculativeWave(rollout, lambda states, needed: pytest.fail("a cancelled wave is not scored"))
    wave.start({0: [Row(3, 1)]})
    wave.cancel()
    release.set()
    wave.close()  # no tasks were ever posted: close must not hang
    assert rounds == [0]
    assert wave.result().old is None


def test_an_error_in_the_wave_reaches_the_caller():
    def rollout(states, on_round_end):
        raise RuntimeError("generator broke")

    wave = SpeculativeWave(rollout, None)
    wave.start({0: [Row(3, 1)]})
    with pytest.raises(RuntimeError, match="generator broke"):
        wave.result()
    wave.close()


def test_continuation_positions_exclude_the_prefix():
    mask = continuation_positions([Row(5, 3), Row(2, 2)])
    assert mask.tolist() == [[False, False, False, True, True], [False, False, False, False, False]]

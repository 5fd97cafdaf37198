"""Checkpoints: atomic saves, pruning, corrupt-checkpoint fallback, RNG round trips, stop signals."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from axpo_nemo.run.checkpoint import (
    MARKER,
    CheckpointConfig,
    CheckpointError,
    CheckpointManager,
    resolve_resume,
)
from axpo_nemo.run.data_cursor import DataCursor
from axpo_nemo.run.rng import capture_rng_state, restore_rng_state
from axpo_nemo.run.stop import GracefulStop


def _state(step: int) -> dict:
    torch.manual_seed(step)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    return {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "rng": capture_rng_state(),
        "trainer": {"step": step, "data": DataCursor(1, step).state_dict("abc"), "counters": [step, 2.5]},
    }


def _assert_equal(a, b):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _assert_equal(a[k], b[k])
    elif isinstance(a, list | tuple):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            _assert_equal(x, y)
    else:
        assert a == b


def _names(d: Path) -> set[str]:
    return {p.name for p in d.iterdir()}


def test_save_load_round_trip_and_layout(tmp_path):
    mgr = CheckpointManager(tmp_path / "ck", keep_last=3)
    state = _state(7)
    path = mgr.save(7, state)
    assert path == tmp_path / "ck" / "step_000007"
    assert _names(tmp_path / "ck") == {"step_000007"}  # no temporary left behind
    assert _names(path) == {"model.pt", "optimizer.pt", "rng.pt", "trainer.pt", MARKER}
    manifest = json.loads((path / MARKER).read_text())
    assert manifest["step"] == 7 and manifest["time"]
    for name, info in manifest["files"].items():
        assert info["size"] == (path / name).stat().st_size and len(info["sha256"]) == 64
    step, loaded = mgr.load_latest()
    assert step == 7
    _assert_equal(state, loaded)


def test_interrupted_saves_are_ignored_then_cleaned(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=5)
    mgr.save(2, {"trainer": {"step": 2}})
    # A save killed while writing (temporary folder of a dead pid) and one without its marker.
    dead = tmp_path / ".tmp-step_000003-999999999"
    dead.mkdir()
    (dead / "model.pt").write_bytes(b"partial")
    no_marker = tmp_path / "step_000004"
    no_marker.mkdir()
    torch.save({"w": torch.ones(2)}, no_marker / "model.pt")
    step, state = mgr.load_latest()
    assert step == 2 and state["trainer"] == {"step": 2}
    assert [s for s, _ in mgr.checkpoints()] == [2]
    mgr.save(3, {"trainer": {"step": 3}})
    # The dead temporary is deleted; the marker-less step folder is moved aside, never deleted.
    names = _names(tmp_path)
    assert {n for n in names if n.startswith("step_")} == {"step_000002", "step_000003"}
    (aside,) = [n for n in names if not n.startswith("step_")]
    assert aside.startswith("invalid-step_000004-") and (tmp_path / aside / "model.pt").is_file()


def test_keep_last_prunes_oldest(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=2)
    for step in range(1, 6):
        mgr.save(step * 10, {"trainer": {"step": step}})
    assert _names(tmp_path) == {"step_000040", "step_000050"}
    mgr1 = CheckpointManager(tmp_path, keep_last=1)
    mgr1.save(60, {"trainer": {"step": 6}})
    assert _names(tmp_path) == {"step_000060"}


def _truncate(path: Path) -> None:
    f = path / "model.pt"
    f.write_bytes(f.read_bytes()[:-40])


def _flip(path: Path) -> None:
    f = path / "model.pt"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))


def _unloadable(path: Path) -> None:
    # Garbage whose size and checksum the manifest agrees with: only torch.load can tell.
    f = path / "model.pt"
    f.write_bytes(b"not a torch file")
    manifest = json.loads((path / MARKER).read_text())
    manifest["files"]["model.pt"] = {
        "size": f.stat().st_size,
        "sha256": hashlib.sha256(f.read_bytes()).hexdigest(),
    }
    (path / MARKER).write_text(json.dumps(manifest))


CORRUPTIONS = {
    "truncated": (_truncate, "bytes"),
    "flipped": (_flip, "sha256"),
    "no_marker": (lambda p: (p / MARKER).unlink(), "no COMPLETE marker"),
    "garbled_marker": (lambda p: (p / MARKER).write_text("{not json"), "not a valid manifest"),
    "missing_file": (lambda p: (p / "model.pt").unlink(), "missing"),
    "unloadable": (_unloadable, "cannot be loaded"),
}


@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_corrupt_latest_falls_back_with_warning(tmp_path, caplog, kind):
    corrupt, reason = CORRUPTIONS[kind]
    mgr = CheckpointManager(tmp_path, keep_last=3)
    mgr.save(1, {"model": {"w": torch.arange(100.0)}, "trainer": {"step": 1}})
    latest = mgr.save(2, {"model": {"w": torch.arange(100.0) * 2}, "trainer": {"step": 2}})
    corrupt(latest)
    with caplog.at_level(logging.WARNING, logger="axpo_nemo.run.checkpoint"):
        step, state = mgr.load_latest()
    assert step == 1 and torch.equal(state["model"]["w"], torch.arange(100.0))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "step_000002" in warnings[0] and reason in warnings[0]
    with pytest.raises(CheckpointError, match=reason):
        mgr.load(latest)


def test_all_corrupt_or_empty_gives_none(tmp_path):
    mgr = CheckpointManager(tmp_path / "none", keep_last=2)
    assert mgr.load_latest() is None
    _flip(mgr.save(1, {"model": {"w": torch.ones(50)}}))
    assert mgr.load_latest() is None


def test_all_invalid_checkpoints_stop_the_resume_and_are_never_deleted(tmp_path):
    """Every marker garbled, weights intact: 'auto' refuses (no silent restart), saves move aside."""
    mgr = CheckpointManager(tmp_path / "ck", keep_last=2)
    for step in (1, 2):
        mgr.save(step, {"model": {"w": torch.full((8,), float(step))}})
    for _, path in mgr.step_folders():
        (path / "COMPLETE").write_text("garbled")
    weights = {p.name: (p / "model.pt").read_bytes() for _, p in mgr.step_folders()}
    with pytest.raises(CheckpointError, match=r"none of its 2 checkpoint\(s\) is valid.*step_000002"):
        resolve_resume("auto", mgr)
    assert {p.name: (p / "model.pt").read_bytes() for _, p in mgr.step_folders()} == weights

    # A save next to folders with a damaged marker moves them aside with their weights, never deletes.
    mgr.save(3, {"model": {"w": torch.zeros(8)}})
    aside = sorted(n for n in _names(tmp_path / "ck") if n.startswith("invalid-"))
    assert [n.split("-")[1] for n in aside] == ["step_000001", "step_000002"]
    for name in aside:
        assert (tmp_path / "ck" / name / "model.pt").read_bytes() == weights[name.split("-")[1]]
    assert resolve_resume("auto", mgr)[0] == 3


def test_same_step_is_replaced_and_later_steps_moved_aside(tmp_path, caplog):
    mgr = CheckpointManager(tmp_path, keep_last=5)
    for step in (1, 2, 3):
        mgr.save(step, {"trainer": {"v": step}})
    mgr.save(2, {"trainer": {"v": 22}})  # resumed from 1 (say): step 3 belongs to an abandoned timeline
    assert [s for s, _ in mgr.checkpoints()] == [1, 2]
    assert any(n.startswith("superseded-step_000003") for n in _names(tmp_path))
    assert mgr.load_latest() == (2, {"trainer": {"v": 22}})
    assert not [n for n in _names(tmp_path) if n.startswith(".")]


def test_unsupported_state_types_fail_before_writing(tmp_path):
    mgr = CheckpointManager(tmp_path / "ck")
    with pytest.raises(TypeError, match=r"state\['trainer'\]\['pos'\].*numpy.*tolist"):
        mgr.save(1, {"trainer": {"pos": np.arange(3)}})
    with pytest.raises(ValueError, match="key"):
        mgr.save(1, {"bad/key": 1})
    assert not (tmp_path / "ck").exists()


def _draws(gens):
    return (
        random.random(),
        np.random.rand(3).tolist(),
        torch.rand(3).tolist(),
        gens["py"].random(),
        gens["np"].random(2).tolist(),
        torch.rand(2, generator=gens["torch"]).tolist(),
    )


def test_rng_states_round_trip_exactly_through_a_checkpoint(tmp_path):
    gens = {
        "py": random.Random(1),
        "np": np.random.default_rng(2),
        "torch": torch.Generator().manual_seed(3),
    }
    random.seed(4)
    np.random.seed(5)
    torch.manual_seed(6)
    np.random.randn()  # leaves a cached gaussian in the legacy numpy state
    _draws(gens)
    mgr = CheckpointManager(tmp_path)
    mgr.save(1, {"rng": capture_rng_state(gens)})
    expected = [_draws(gens) for _ in range(3)]
    _, state = mgr.load_latest()
    restore_rng_state(state["rng"], gens)
    assert [_draws(gens) for _ in range(3)] == expected


def test_config_and_resolve_resume(tmp_path):
    cfg = CheckpointConfig()
    assert cfg.resolve_dir("runs/x") == Path("runs/x/checkpoints")
    assert CheckpointConfig(dir="/ck").resolve_dir("runs/x") == Path("/ck")
    assert [s for s in range(1, 120) if cfg.due(s)] == [50, 100]
    assert not CheckpointConfig(every=0).due(50)
    with pytest.raises(ValueError, match="keep_last"):
        CheckpointConfig(keep_last=0)

    mgr = CheckpointManager(tmp_path / "ck", keep_last=3)
    assert resolve_resume("auto", mgr) is None
    assert resolve_resume("never", mgr) is None
    first = mgr.save(1, {"trainer": {"v": 1}})
    mgr.save(2, {"trainer": {"v": 2}})
    assert resolve_resume("auto", mgr)[0] == 2
    with pytest.raises(FileExistsError, match=r"checkpoint\.resume=auto"):
        resolve_resume("never", mgr)
    assert resolve_resume(str(first), mgr)[0] == 1
    assert resolve_resume(str(tmp_path / "ck"), CheckpointManager(tmp_path / "other"))[0] == 2
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve_resume(str(tmp_path / "nowhere"), mgr)
    (first / MARKER).unlink()
    with pytest.raises(CheckpointError, match="marker"):
        resolve_resume(str(first), mgr)  # named explicitly: an error, no silent fallback


def test_data_cursor_epoch_boundary_and_dataset_change(caplog):
    c = DataCursor()
    c.advance(6, 10)
    c.advance(4, 10)  # exactly at the epoch end
    assert (c.epoch, c.offset) == (1, 0)
    c.advance(13, 10)
    assert (c.epoch, c.offset) == (2, 3)
    state = c.state_dict("fp1", 10)
    assert DataCursor.from_state_dict(state, "fp1", 10) == DataCursor(2, 3)
    assert DataCursor.from_state_dict({"epoch": 0, "offset": 10}, "", 10) == DataCursor(1, 0)
    with caplog.at_level(logging.WARNING):
        assert DataCursor.from_state_dict(state, "fp2", 10) == DataCursor(2, 0)
    assert "dataset changed" in caplog.text


def test_graceful_stop_sets_flag_and_restores_handlers():
    before = signal.getsignal(signal.SIGUSR1)
    with GracefulStop() as stop:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.requested and stop.signal_name == "SIGUSR1"
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.signal_name == "SIGUSR1"  # the first signal is the reason
    assert signal.getsignal(signal.SIGUSR1) is before


TRAIN_UNTIL_SIGNAL = """
import sys, time, torch
from axpo_nemo.run.checkpoint import CheckpointManager
from axpo_nemo.run.stop import GracefulStop
mgr = CheckpointManager(sys.argv[1], keep_last=2)
w = torch.zeros(4)
with GracefulStop() as stop:
    for step in range(1, 100000):
        w += 1
        time.sleep(0.01)
        if step == 3:
            mgr.save(step, {"model": {"w": w}, "trainer": {"step": step, "signal": None}})
            print("ready", flush=True)
        if stop.requested:
            mgr.save(step, {"model": {"w": w}, "trainer": {"step": step, "signal": stop.signal_name}})
            sys.exit(0)
sys.exit(3)
"""

KILLED_MID_SAVE = """
import sys, time, torch
from axpo_nemo.run.checkpoint import CheckpointManager

class Stalling(CheckpointManager):
    block = False
    def _write_file(self, path, value):
        info = super()._write_file(path, value)
        if self.block:
            print("midsave", flush=True)
            time.sleep(600)
        return info

mgr = Stalling(sys.argv[1], keep_last=2)
mgr.save(1, {"model": {"w": torch.ones(8)}, "trainer": {"step": 1}})
mgr.block = True
mgr.save(2, {"model": {"w": torch.ones(8) * 2}, "trainer": {"step": 2}})
"""


def _spawn(tmp_path: Path, code: str, ck: Path, wait_for: str) -> subprocess.Popen:
    script = tmp_path / "child.py"
    script.write_text(textwrap.dedent(code))
    proc = subprocess.Popen(
        [sys.executable, str(script), str(ck)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    line = proc.stdout.readline()
    if line.strip() != wait_for:
        proc.kill()
        _, err = proc.communicate()
        raise AssertionError(f"child said {line!r}; stderr: {err}")
    return proc


def test_sigterm_during_training_checkpoints_and_exits_zero(tmp_path):
    ck = tmp_path / "ck"
    proc = _spawn(tmp_path, TRAIN_UNTIL_SIGNAL, ck, "ready")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    step, state = CheckpointManager(ck).load_latest()
    assert step >= 3 and state["trainer"] == {"step": step, "signal": "SIGTERM"}
    assert torch.equal(state["model"]["w"], torch.full((4,), float(step)))


def test_sigkill_mid_save_leaves_previous_checkpoint_loadable(tmp_path):
    ck = tmp_path / "ck"
    proc = _spawn(tmp_path, KILLED_MID_SAVE, ck, "midsave")
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)  # reaps it (a zombie would still look alive) and closes the pipes
    assert proc.returncode == -signal.SIGKILL
    assert _names(ck) == {"step_000001", f".tmp-step_000002-{proc.pid}"}
    mgr = CheckpointManager(ck, keep_last=2)
    step, state = mgr.load_latest()
    assert step == 1 and torch.equal(state["model"]["w"], torch.ones(8))
    mgr.save(2, {"trainer": {"step": 2}})  # the resumed run's next save cleans the dead temporary
    assert _names(ck) == {"step_000001", "step_000002"}

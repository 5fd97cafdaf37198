"""Metrics logging: the JSONL record, resume truncation, optional backends, console progress."""

from __future__ import annotations

import io
import json
import logging
import math
import sys
import types
from typing import ClassVar

import numpy as np
import pytest
import torch
from rich.table import Table

from axpo_nemo.config.logs import LoggingConfig
from axpo_nemo.run.metrics_log import (
    MetricsLogger,
    ProgressDisplay,
    read_metrics,
    require_backends,
    truncate_jsonl,
)


def _strict(line: str) -> dict:
    def reject(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(line, parse_constant=reject)


def test_jsonl_round_trip_with_nan_and_tensor_values(tmp_path):
    with MetricsLogger(tmp_path) as log:
        log.log(
            1,
            {
                "accuracy": 0.5,
                "loss": torch.tensor(1.25),
                "tool_use_rate": np.float32(0.25),
                "triggered_groups": 3,
                "resample_recovery_rate": math.nan,
                "grad_norm": math.inf,
                "note": "warmup",
                "per_tool": {"python": 2, "zoom": math.nan},
            },
        )
        log.log(2, {"accuracy": 0.75}, phase="eval")
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2
    first = _strict(lines[0])  # valid strict JSON: NaN and inf were written as null
    assert first["resample_recovery_rate"] is None and first["grad_norm"] is None
    assert first["step"] == 1 and first["phase"] == "rl" and isinstance(first["time"], float)

    recs = read_metrics(tmp_path)  # a run folder works as well as the file
    assert [(r["step"], r["phase"]) for r in recs] == [(1, "rl"), (2, "eval")]
    r = recs[0]
    assert r["accuracy"] == 0.5 and r["loss"] == 1.25 and r["tool_use_rate"] == 0.25
    assert r["triggered_groups"] == 3 and r["note"] == "warmup"
    assert math.isnan(r["resample_recovery_rate"]) and math.isnan(r["grad_norm"])
    assert r["per_tool"] == {"python": 2, "zoom": None}
    assert [x["step"] for x in read_metrics(tmp_path / "metrics.jsonl", phase="eval")] == [2]


def test_each_line_is_flushed_while_open(tmp_path):
    log = MetricsLogger(tmp_path)
    for step in range(1, 4):
        log.log(step, {"accuracy": step / 10})
        assert [r["step"] for r in read_metrics(tmp_path)] == list(range(1, step + 1))
    log.close()
    log.close()  # idempotent


def test_bad_records_are_refused(tmp_path):
    with MetricsLogger(tmp_path) as log:
        with pytest.raises(ValueError, match="phase"):
            log.log(1, {"accuracy": 1.0}, phase="train")
        with pytest.raises(ValueError, match="reserved"):
            log.log(1, {"step": 3})
        with pytest.raises(TypeError, match="not loggable"):
            log.log(1, {"obj": object()})


def _run(path, steps, resume_step=None):
    """Log SFT 1..4, then RL and eval steps; returns records without times."""
    with MetricsLogger(path, resume_step=resume_step) as log:
        if resume_step is None:
            for s in range(1, 5):
                log.log(s, {"loss": 1 / s}, phase="sft")
        for s in steps:
            log.log(s, {"accuracy": s / 10})
            if s % 2 == 0:
                log.log(s, {"accuracy": s / 20}, phase="eval")
    return [{k: v for k, v in r.items() if k != "time"} for r in read_metrics(path)]


def test_resume_truncates_so_the_log_equals_an_uninterrupted_one(tmp_path):
    reference = _run(tmp_path / "ref", range(1, 7))
    # Interrupted run: logged up to step 5, but its last checkpoint is step 3.
    _run(tmp_path / "res", range(1, 6))
    resumed = _run(tmp_path / "res", range(4, 7), resume_step=3)
    assert resumed == reference
    assert sum(r["phase"] == "sft" for r in resumed) == 4  # SFT steps > 3 kept: another counter


def test_truncate_after_method_and_function(tmp_path):
    log = MetricsLogger(tmp_path)
    for s in range(1, 6):
        log.log(s, {"accuracy": 0.1})
        log.log(s, {"loss": 0.1}, phase="sft")
    assert log.truncate_after(2, "sft") == 3
    log.log(3, {"loss": 0.2}, phase="sft")  # the file is open again for appending
    log.close()
    recs = read_metrics(tmp_path)
    assert [r["step"] for r in recs if r["phase"] == "sft"] == [1, 2, 3]
    assert [r["step"] for r in recs if r["phase"] == "rl"] == [1, 2, 3, 4, 5]
    assert truncate_jsonl(tmp_path / "metrics.jsonl", 1, phase=None) == 6
    assert {r["step"] for r in read_metrics(tmp_path)} == {1}
    assert truncate_jsonl(tmp_path / "missing.jsonl", 1) == 0


def test_partial_last_line_of_a_killed_run_is_repaired(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "phase": "rl", "time": 0, "accuracy": 0.5}\n{"step": 2, "pha')
    with caplog.at_level(logging.WARNING):
        assert [r["step"] for r in read_metrics(path)] == [1]
    assert "not JSON" in caplog.text
    with MetricsLogger(tmp_path) as log:
        log.log(2, {"accuracy": 0.6})
    assert [_strict(line)["step"] for line in path.read_text().splitlines()] == [1, 2]


def test_backends_are_off_by_default(tmp_path):
    cfg = LoggingConfig()
    assert not cfg.tensorboard and not cfg.wandb and cfg.wandb_mode == "offline"
    with MetricsLogger(tmp_path, cfg) as log:
        log.log(1, {"accuracy": 1.0})
    assert {p.name for p in tmp_path.iterdir()} == {"metrics.jsonl"}
    with pytest.raises(ValueError, match="wandb_mode"):
        LoggingConfig(wandb_mode="cloud")
    with pytest.raises(ValueError, match="console_every"):
        LoggingConfig(console_every=0)


@pytest.mark.parametrize("backend", ["tensorboard", "wandb"])
def test_enabled_backend_without_its_package_fails_clearly(tmp_path, monkeypatch, backend):
    monkeypatch.setitem(sys.modules, backend, None)  # makes `import <backend>` raise ImportError
    cfg = LoggingConfig(**{backend: True})
    message = rf"logging\.{backend} is true .*pip install {backend}"
    with pytest.raises(ImportError, match=message):
        require_backends(cfg)
    with pytest.raises(ImportError, match=message):
        MetricsLogger(tmp_path, cfg)


class _FakeWriter:
    instances: ClassVar[list[_FakeWriter]] = []

    def __init__(self, log_dir, purge_step=None):
        self.log_dir, self.purge_step, self.scalars, self.closed = log_dir, purge_step, [], False
        _FakeWriter.instances.append(self)

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))

    def flush(self):
        pass

    def close(self):
        self.closed = True


class _FakeRun:
    def __init__(self, **kwargs):
        self.kwargs, self.id, self.logged, self.defined, self.finished = kwargs, "run123", [], [], False

    def log(self, data):
        self.logged.append(data)

    def define_metric(self, name, step_metric):
        self.defined.append((name, step_metric))

    def finish(self):
        self.finished = True


def test_enabled_backends_receive_the_scalars(tmp_path, monkeypatch):
    tb = types.ModuleType("torch.utils.tensorboard")
    tb.SummaryWriter = _FakeWriter
    monkeypatch.setitem(sys.modules, "tensorboard", types.ModuleType("tensorboard"))
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", tb)
    runs = []
    wandb = types.ModuleType("wandb")
    wandb.init = lambda **kw: runs.append(_FakeRun(**kw)) or runs[-1]
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    _FakeWriter.instances.clear()

    cfg = LoggingConfig(tensorboard=True, wandb=True, wandb_project="p")
    with MetricsLogger(tmp_path, cfg, resume_step=7, run_config={"seed": 1}) as log:
        log.log(8, {"accuracy": 0.5, "note": "x", "nan_metric": math.nan, "done": True})
        log.log(1, {"loss": 2.0}, phase="sft")
        log.truncate_after(5, "rl")  # a resume decided after opening: the rl writer reopens purging
        log.log(6, {"accuracy": 0.4})
    rl, sft, rl2 = _FakeWriter.instances
    assert rl.log_dir.endswith("tensorboard/rl") and rl.purge_step == 8 and sft.purge_step is None
    assert rl.scalars == [("accuracy", 0.5, 8)] and rl.closed  # strings, NaN (null) and bools skipped
    assert rl2.purge_step == 6 and rl2.scalars == [("accuracy", 0.4, 6)] and rl2.closed and sft.closed
    run = runs[0]
    assert (
        run.kwargs["mode"] == "offline"
        and run.kwargs["project"] == "p"
        and run.kwargs["config"] == {"seed": 1}
    )
    assert run.logged[0] == {"rl/accuracy": 0.5, "rl/step": 8}
    assert ("sft/*", "sft/step") in run.defined and run.finished
    assert (tmp_path / "wandb_run_id").read_text() == "run123"
    with MetricsLogger(tmp_path, LoggingConfig(wandb=True)):
        pass
    assert runs[1].kwargs["id"] == "run123" and runs[1].kwargs["resume"] == "allow"


def test_progress_plain_mode_prints_lines_every_n_steps():
    out = io.StringIO()  # not a terminal: plain lines
    with ProgressDisplay(console_every=2, file=out) as progress:
        assert progress.plain
        progress.add_phase("rl", total=5)
        for step in range(1, 6):
            progress.start_rollouts(8)
            progress.advance_rollouts(8)
            progress.update("rl", step, {"loss": 0.5, "accuracy": 0.25, "tool_use_rate": math.nan})
        progress.print("[done] " + "x" * 100)  # not markup, not wrapped
        table = Table("metric", "end")
        table.add_row("accuracy", "0.500")
        progress.print(table)
    lines = out.getvalue().splitlines()
    assert [line.split(" |")[0] for line in lines[:3]] == ["[rl] step 2/5", "[rl] step 4/5", "[rl] step 5/5"]
    assert "loss 0.5 acc 0.25 tool nan" in lines[0] and "s/step" in lines[0]
    assert lines[3] == "[done] " + "x" * 100
    assert any("accuracy" in line and "0.500" in line for line in lines[4:])
    assert "\x1b[" not in out.getvalue()  # no terminal escapes in a log file


def test_progress_rich_mode_renders_bars():
    out = io.StringIO()
    with ProgressDisplay(file=out, plain=False) as progress:
        progress.add_phase("sft", total=2)
        progress.update("sft", 2, {"loss": 0.125})
        progress.add_phase("rl", total=3, completed=1)
        progress.start_rollouts(4)
        progress.advance_rollouts(4)
        progress.update("rl", 2, {"accuracy": 0.5})
        progress.print("hello")
    text = out.getvalue()
    assert "SFT loss 0.125" in text and "RL acc 0.5" in text and "rollouts" in text and "hello" in text


def test_progress_counts_other_units_and_unknown_totals():
    out = io.StringIO()
    with ProgressDisplay(file=out, min_interval_s=3600.0) as progress:
        progress.add_phase("eval", total=3, unit="question")
        progress.add_phase("convert", total=None, unit="row")
        for done in range(1, 4):
            progress.update("eval", done)
            progress.update("convert", done * 10)
        progress.finish("eval")  # already printed at its total: not again
        progress.finish("convert")
    lines = out.getvalue().splitlines()
    # The first count of each phase and its last; nothing in between at most one line an hour.
    assert [line.split(" |")[0] for line in lines] == [
        "[eval] question 1/3", "[convert] row 10", "[eval] question 3/3", "[convert] row 30",
    ]  # fmt: skip
    assert "s/question" in lines[2] and "s/row" in lines[3]
    out = io.StringIO()
    with ProgressDisplay(file=out, plain=False) as progress:
        progress.add_phase("convert", total=None, unit="row")
        progress.update("convert", 7)
        progress.finish("convert")
    assert "CONVERT" in out.getvalue() and "7/7" in out.getvalue()

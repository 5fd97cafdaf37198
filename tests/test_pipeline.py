"""End-to-end tests of the local training pipeline (`axpo train`, axpo_nemo.local.pipeline).

Slow tests (``-m slow``) run the real command as a subprocess on a shortened demo config:

* the whole pipeline (data → sft → rl → eval → export → plots) writes every artefact, logs every
  per-step metric, and its Hugging Face export reloads with ``AutoModelForImageTextToText`` and
  gives the RL checkpoint's logits on an input with an image;
* a run SIGKILLed right after its RL step-2 checkpoint and rerun with the same command ends with
  exactly the metrics and the checkpoint of an uninterrupted run; a garbled newest checkpoint
  falls back to the previous one with a WARNING;
* SIGTERM during RL finishes the step, checkpoints it and exits with ``EXIT_STOPPED`` (75).

The SFT model of the full run (module fixture ``demo_run``) seeds the other runs (its ``data/``
and ``sft/`` folders are copied in, so those runs skip SFT exactly as a rerun would); that keeps
the slow tests at about two minutes on two CPU cores. Subprocesses run with one intra-op thread:
on a small, shared CPU machine OpenMP threads spin-waiting for each other make every step several
times slower.

Cheap tests run `Pipeline` in-process: the data stage alone, and the refusals of inconsistent
configs.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from axpo_nemo.config import load_config
from axpo_nemo.core import STEP_METRIC_NAMES
from axpo_nemo.local.pipeline import Pipeline
from axpo_nemo.run.checkpoint import CheckpointManager
from axpo_nemo.run.metrics_log import read_metrics
from axpo_nemo.run.run_folder import bundle_from_run
from axpo_nemo.run.stop import EXIT_STOPPED, GracefulStop

#: Settings shared by every run here: small enough for seconds per RL step on a CPU, with enough
#: SFT (32 steps) that RL sees some reward (answer fallback and the format term help), so its
#: updates are not all zero; weight decay makes every RL step change the weights regardless.
COMMON = (
    "data.synth.num_sft=64",
    "data.synth.num_rl=8",
    "data.synth.num_eval=4",
    "sft.epochs=4",
    "model.tiny.num_layers=2",  # the 2 x 128 model: the pipeline, not the demo's learning, is tested here
    "model.tiny.hidden_size=128",
    "model.tiny.head_dim=32",
    "model.tiny.intermediate_size=256",
    "sft.copy_warmup_steps=0",  # the warm-ups have their own tests (test_sft.py)
    "sft.short_context_epochs=0",
    "sft.batch_size=8",
    "sft.micro_batch_size=8",
    "rollout.questions_per_step=2",
    "rollout.group_size=4",
    "rollout.max_new_tokens=48",
    "reward.format_weight=0.5",
    "reward.answer_fallback=true",
    "rl.weight_decay=0.01",
    "eval.samples_per_question=4",
    "eval.ks=[1,4]",
    "tools.enabled=[image_zoom_in,python,search]",
    "checkpoint.keep_last=2",
    "logging.console_every=1",
)
DEMO_RL_STEPS = 3
STOP_HINT = "run the same command again to continue"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _command(out: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "axpo_nemo.cli", "train", f"output_dir={out}", *COMMON, *overrides]


def _start(out: Path, *overrides: str) -> tuple[subprocess.Popen, Path]:
    """Start `axpo train` in the background; stdout and stderr go to ``<out>.log``."""
    log = out.with_name(out.name + ".log")
    with open(log, "w") as f:
        proc = subprocess.Popen(
            _command(out, *overrides), stdout=f, stderr=subprocess.STDOUT, env=ENV, cwd=out.parent
        )
    return proc, log


def _train(out: Path, *overrides: str, timeout: float = 170) -> tuple[int, str]:
    """Run `axpo train` to its end: (exit code, stdout+stderr)."""
    proc, log = _start(out, *overrides)
    try:
        rc = proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return rc, log.read_text()


def _tail(text: str, n: int = 3000) -> str:
    return text[-n:]


def _proc_stat(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name (state, ppid, ...), or None."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _descendants(pid: int) -> set[tuple[int, str]]:
    """``(pid, start time)`` of every live descendant of ``pid`` (the start time tells a reused pid)."""
    children: dict[int, list[tuple[int, str]]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := _proc_stat(int(entry.name))) is not None:
            children.setdefault(int(stat[1]), []).append((int(entry.name), stat[19]))
    out, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.add(child)
            todo.append(child[0])
    return out


def _alive(proc: tuple[int, str]) -> bool:
    """Whether that process still runs (not a zombie, not a reused pid)."""
    stat = _proc_stat(proc[0])
    return stat is not None and stat[19] == proc[1] and stat[0] != "Z"


def _seed_from(run: Path, out: Path) -> Path:
    """A fresh run folder holding ``run``'s dataset and SFT model (so its SFT stage is skipped)."""
    out.mkdir(parents=True)
    shutil.copytree(run / "data", out / "data")
    shutil.copytree(run / "sft", out / "sft")
    return out


def _timing(key: str) -> bool:
    return key == "time" or key.endswith("_s")


def _same(a, b) -> bool:
    """Exact equality of metric values or checkpoint states (NaN equals NaN; tensors bitwise)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and torch.equal(a, b)
        )
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return type(a) is type(b) and a == b


def _untimed(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not _timing(k)} for r in records]


def _image_inputs(processor):
    from PIL import Image

    pixels = torch.randint(
        0, 256, (96, 128, 3), generator=torch.Generator().manual_seed(1), dtype=torch.uint8
    )
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many apples?"}]}
    ]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return processor(text=[text], images=[Image.fromarray(pixels.numpy())], return_tensors="pt")


@pytest.fixture
def one_thread():
    """One intra-op thread for in-process model work (see the module docstring)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ------------------------------------------------------------------------------ the whole demo


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> tuple[Path, int, str]:
    """The shortened demo, every stage: (run folder, exit code, output)."""
    out = tmp_path_factory.mktemp("demo") / "run"
    t0 = time.monotonic()
    rc, text = _train(out, f"rl.steps={DEMO_RL_STEPS}", "checkpoint.every=1")
    print(f"demo run: {time.monotonic() - t0:.1f} s")
    return out, rc, text


@pytest.mark.slow
def test_shortened_demo_end_to_end(demo_run, one_thread):
    from transformers import AutoModelForImageTextToText

    out, rc, text = demo_run
    assert rc == 0, _tail(text)
    assert f"run folder: {out}" in text

    sft = read_metrics(out / "metrics.jsonl", "sft")
    assert [r["step"] for r in sft] == list(range(1, 33))  # 64 samples x 4 epochs / batch 8
    assert all(math.isfinite(r["loss"]) for r in sft)
    rl = read_metrics(out / "metrics.jsonl", "rl")
    assert [r["step"] for r in rl] == list(range(1, DEMO_RL_STEPS + 1))
    for r in rl:
        missing = [name for name in STEP_METRIC_NAMES if name not in r]
        assert not missing, f"rl step {r['step']} lacks {missing}"
    evals = read_metrics(out / "metrics.jsonl", "eval")
    assert len(evals) == 1 and evals[0]["step"] == DEMO_RL_STEPS
    assert 0.0 <= evals[0]["pass@1"] <= evals[0]["pass@4"] <= 1.0

    assert (out / "config.yaml").is_file() and (out / "train.log").is_file()
    assert (out / "data" / "manifest.json").is_file()
    assert (out / "sft" / "final.pt").is_file()
    rl_ckpts = CheckpointManager(out / "rl" / "checkpoints").checkpoints()
    assert [s for s, _ in rl_ckpts] == [DEMO_RL_STEPS - 1, DEMO_RL_STEPS]  # every=1, keep_last=2
    for name in ("report.md", "report.json", "results.jsonl"):
        assert (out / "eval" / name).is_file(), name
    assert "pass@4" in (out / "eval" / "report.md").read_text()
    export = out / "export"
    names = {p.name for p in export.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    assert {"chat_template.jinja", "chat_template.json"} & names
    assert (out / "plots" / "curves.png").stat().st_size > 0

    # The export is the final RL policy: same logits as the newest RL checkpoint's model.
    cfg = load_config(out / "config.yaml")
    bundle = bundle_from_run(out, cfg)
    bundle.model.eval()
    sft_weights = torch.load(out / "sft" / "final.pt", map_location="cpu", weights_only=True)
    rl_weights = bundle.model.state_dict()
    assert any(not torch.equal(sft_weights[k], v) for k, v in rl_weights.items()), "RL changed nothing"
    reloaded = AutoModelForImageTextToText.from_pretrained(export, local_files_only=True).eval()
    assert type(reloaded) is type(bundle.model)
    inputs = _image_inputs(bundle.processor)
    assert "pixel_values" in inputs
    with torch.no_grad():
        got, want = reloaded(**inputs).logits, bundle.model(**inputs).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------ resume after SIGKILL

RESUME = ("train.stages=[data,sft,rl]", "rl.steps=4", "checkpoint.every=1")


@pytest.mark.slow
def test_resume_after_sigkill_matches_the_uninterrupted_run(demo_run, tmp_path, caplog):
    seed = demo_run[0]
    assert (seed / "sft" / "final.pt").is_file(), _tail(demo_run[2])

    run_a = _seed_from(seed, tmp_path / "a")
    rc, text = _train(run_a, *RESUME)
    assert rc == 0, _tail(text)
    want = read_metrics(run_a, "rl")
    assert [r["step"] for r in want] == [1, 2, 3, 4]

    # Run B: SIGKILL as soon as the step-2 checkpoint is complete (the rename makes it appear whole).
    run_b = _seed_from(seed, tmp_path / "b")
    ckpts = run_b / "rl" / "checkpoints"
    proc, log = _start(run_b, *RESUME)
    family: set[tuple[int, str]] = set()
    try:
        deadline = time.monotonic() + 150
        while proc.poll() is None and time.monotonic() < deadline:
            family.update(_descendants(proc.pid))
            if (ckpts / "step_000002" / "COMPLETE").exists():
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.02)
        rc = proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert rc == -signal.SIGKILL, f"run B was not killed (exit {rc}):\n{_tail(log.read_text())}"
    at_kill = [s for s, _ in CheckpointManager(ckpts).checkpoints()]
    assert at_kill and 2 <= max(at_kill) < 4, at_kill
    killed_lines = read_metrics(run_b, "rl")
    assert 2 <= len(killed_lines) <= 3, "expected to stop in RL steps 2-3"
    _, killed_state = CheckpointManager(ckpts).load_latest()

    # The sandbox processes of the killed run must go away on their own (their control socket closes).
    deadline = time.monotonic() + 10
    while (left := [p for p in family if _alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid, _start_time in left:  # clean up (processes this test started) before failing
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert not left, f"processes of the killed run still alive: {left}"

    rc, text = _train(run_b, *RESUME)
    assert rc == 0, _tail(text)
    assert "rl: resumed from step" in (run_b / "train.log").read_text()
    got = read_metrics(run_b, "rl")
    assert [r["step"] for r in got] == [1, 2, 3, 4]
    for a, b in zip(_untimed(want), _untimed(got), strict=True):
        diff = sorted(k for k in a.keys() | b.keys() if not _same(a.get(k), b.get(k)))
        assert not diff, f"rl step {a['step']}: {[(k, a.get(k), b.get(k)) for k in diff]}"

    # The final checkpoints are identical: weights, optimizer, schedule, data position, counters.
    step_a, state_a = CheckpointManager(run_a / "rl" / "checkpoints").load_latest()
    step_b, state_b = CheckpointManager(ckpts).load_latest()
    assert step_a == step_b == 4
    assert state_a.keys() == state_b.keys()
    assert _same(state_a["model"], state_b["model"])
    different = [k for k in state_a if k != "rng" and not _same(state_a[k], state_b[k])]
    assert not different, f"checkpoint parts differ: {different}"
    # The global RNGs are not seeded by the pipeline (Python's, numpy's and torch's differ from one
    # process to the next) and RL draws nothing from them (every random choice derives from
    # (seed, step, ...)), so runs A and B hold different ones. What resume must do is carry on
    # B's own: the resumed process, which started with fresh random states, ends with the ones
    # of the checkpoint it resumed from.
    assert _same(state_b["rng"], killed_state["rng"])

    # A garbled newest checkpoint: resuming falls back to the previous one, with a WARNING.
    copy = tmp_path / "garbled"
    shutil.copytree(ckpts, copy)
    manager = CheckpointManager(copy, keep_last=2)
    steps = [s for s, _ in manager.checkpoints()]
    assert steps == [3, 4]
    weights = copy / "step_000004" / "model.pt"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = bytes(64)  # same size: only the checksum can tell
    weights.write_bytes(bytes(data))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="axpo_nemo.run.checkpoint"):
        step, state = manager.load_latest()
    assert step == 3
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert any("step_000004" in r.getMessage() and "sha256" in r.getMessage() for r in warnings), [
        r.getMessage() for r in warnings
    ]
    _, state_3 = CheckpointManager(ckpts).load(ckpts / "step_000003")
    assert _same(state["model"], state_3["model"])


# ------------------------------------------------------------------------------ SIGTERM


@pytest.mark.slow
def test_sigterm_checkpoints_and_exits_75(demo_run, tmp_path):
    seed = demo_run[0]
    assert (seed / "sft" / "final.pt").is_file(), _tail(demo_run[2])
    out = _seed_from(seed, tmp_path / "run")
    # every=0: only the end of the stage or a stop signal writes a checkpoint.
    proc, log = _start(out, "train.stages=[data,sft,rl]", "rl.steps=50", "checkpoint.every=0")
    try:
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline:
            if read_metrics(out / "metrics.jsonl", "rl"):
                proc.send_signal(signal.SIGTERM)
                break
            time.sleep(0.05)
        rc = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log.read_text()
    assert rc == EXIT_STOPPED, f"exit {rc}:\n{_tail(text)}"
    steps = [r["step"] for r in read_metrics(out / "metrics.jsonl", "rl")]
    assert steps == list(range(1, len(steps) + 1)) and len(steps) < 50
    last = steps[-1]
    assert [s for s, _ in CheckpointManager(out / "rl" / "checkpoints").checkpoints()] == [last]
    assert CheckpointManager(out / "rl" / "checkpoints").load_latest()[0] == last
    assert STOP_HINT in text and f"exit {EXIT_STOPPED}" in text
    assert f"stopping on SIGTERM after step {last}" in (out / "train.log").read_text()


# ------------------------------------------------------------------------------ cheap, in-process


def _config(out: Path, *overrides: str):
    return load_config(None, [f"output_dir={out}", *COMMON, *overrides])


def test_data_stage_alone_writes_only_the_dataset(tmp_path, one_thread):
    out = tmp_path / "run"
    cfg = _config(out, "train.stages=[data]", "tools.enabled=[image_zoom_in]")
    result = Pipeline(cfg).run(GracefulStop())
    assert not result.stopped
    assert result.paths == {"data": out / "data"}
    data = out / "data"
    for name in ("manifest.json", "sft.jsonl", "rl.jsonl", "eval.jsonl", "corpus.jsonl"):
        assert (data / name).is_file(), name
    assert sum(1 for _ in (data / "sft.jsonl").open()) == 64
    assert {p.name for p in out.iterdir()} <= {"data", "metrics.jsonl"}
    assert read_metrics(out) == []


def test_the_algorithm_is_one_field(tmp_path, capsys):
    """`algorithm` decides for every backend; the old `rl.algorithm` is an unknown key, named."""
    from axpo_nemo.cli import main

    assert _config(tmp_path / "run", "algorithm=grpo").algorithm == "grpo"
    assert main(["train", f"output_dir={tmp_path / 'run'}", "rl.algorithm=grpo"]) == 2
    err = capsys.readouterr().err
    assert "rl.algorithm" in err and err.count("\n") == 1
    assert not (tmp_path / "run").exists()


def test_search_without_corpus_or_data_stage_names_the_key(tmp_path, one_thread):
    out = tmp_path / "run"
    cfg = _config(out, "train.stages=[sft,rl]", "tools.enabled=[search]")
    assert cfg.tools.search.corpus_path is None and cfg.tools.search.backend == "bm25"
    with pytest.raises(ValueError, match=r"tools\.search\.corpus_path") as info:
        Pipeline(cfg).run(GracefulStop())
    assert str(out / "data" / "corpus.jsonl") in str(info.value)
    assert not (out / "sft").exists() and not (out / "rl").exists()


def test_rerun_logs_the_evaluation_once(tmp_path, one_thread):
    out = tmp_path / "run"
    cfg = _config(
        out,
        "train.stages=[data,eval]",
        "tools.enabled=[image_zoom_in]",
        "data.synth.num_eval=2",
        "rollout.max_turns=1",
        "rollout.max_new_tokens=8",
    )
    for _ in range(2):  # the second run is a rerun of a finished one: nothing new to do
        Pipeline(cfg).run(GracefulStop())
    assert len(read_metrics(out, "eval")) == 1


def test_resume_refuses_all_invalid_checkpoints_and_a_changed_shape(tmp_path, one_thread, capsys, caplog):
    """No silent restart over damaged checkpoints; a changed batch shape is refused, an lr warned."""
    from axpo_nemo.cli import main
    from axpo_nemo.config import ConfigError

    out = tmp_path / "run"
    base = (
        "train.stages=[data,rl]",
        "checkpoint.every=1",
        "tools.enabled=[image_zoom_in]",
        "data.synth.num_rl=4",
        "rollout.max_turns=2",
        "rollout.max_new_tokens=16",
    )
    Pipeline(_config(out, *base, "rl.steps=1")).run(GracefulStop())
    ckpts = CheckpointManager(out / "rl" / "checkpoints")

    with pytest.raises(ConfigError, match=r"rollout.group_size is 2 but the rl checkpoint .*step_000001 was made with 4"):
        Pipeline(_config(out, *base, "rl.steps=2", "rollout.group_size=2")).run(GracefulStop())
    assert [s for s, _ in ckpts.checkpoints()] == [1]

    with caplog.at_level(logging.WARNING, logger="axpo_nemo.run.resume_settings"):
        Pipeline(_config(out, *base, "rl.steps=2", "rl.lr=1e-4")).run(GracefulStop())
    assert any("rl.lr changed since the checkpoint" in r.getMessage() for r in caplog.records)
    assert [r["step"] for r in read_metrics(out, "rl")] == [1, 2]

    for _, path in ckpts.step_folders():
        (path / "COMPLETE").write_text("garbled")
    weights = {p.name: (p / "model.pt").read_bytes() for _, p in ckpts.step_folders()}
    rc = main(["train", f"output_dir={out}", *COMMON, *base, "rl.steps=3", "rl.lr=1e-4"])
    err = capsys.readouterr().err.strip()
    assert rc != 0 and len(err.splitlines()) == 1, err
    assert "none of its 2 checkpoint(s) is valid" in err and "COMPLETE" in err
    assert {p.name: (p / "model.pt").read_bytes() for _, p in ckpts.step_folders()} == weights
    assert [r["step"] for r in read_metrics(out, "rl")] == [1, 2]


def test_a_fresh_start_never_logs_a_step_twice(tmp_path, one_thread):
    """Killed before its first checkpoint, a rerun starts at step 1: the earlier lines are replaced."""
    out = tmp_path / "run"
    cfg = _config(out, "train.stages=[data,rl]", "rl.steps=1", "tools.enabled=[image_zoom_in]",
                  "data.synth.num_rl=4", "rollout.max_turns=2", "rollout.max_new_tokens=16")  # fmt: skip
    Pipeline(cfg).run(GracefulStop())
    shutil.rmtree(out / "rl" / "checkpoints")  # as if killed after logging step 1, before saving it
    Pipeline(cfg).run(GracefulStop())
    assert [r["step"] for r in read_metrics(out, "rl")] == [1]

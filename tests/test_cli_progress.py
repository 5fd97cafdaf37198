"""Long commands show progress (rich bars on a terminal, plain lines in a log), and
`axpo data convert` reports each bad row once."""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys

from PIL import Image

from axpo_nemo.agent.sample import Sample, write_samples
from axpo_nemo.cli import main
from axpo_nemo.data.shards import ShardConfig, ShardWriter


def _jpeg() -> str:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(buf, "JPEG")
    return base64.b64encode(buf.getvalue()).decode()


def _fvqa_row(i: int, truth: str) -> dict:
    return {
        "prompt": [{"content": f"Which country is shown {i}?", "role": "user"}],
        "images": [{"bytes": _jpeg(), "path": None}],
        "reward_model": {"candidate_answers": "[]", "ground_truth": truth, "style": "rule"},
        "data_id": f"fvqa_{i}",
        "category": "search_free",
    }


def test_data_convert_reports_each_bad_row_once_with_progress(tmp_path):
    rows = [json.dumps(_fvqa_row(0, "Malta")), '{"prompt": [', json.dumps(_fvqa_row(2, "")), json.dumps(_fvqa_row(3, "Chad"))]
    (tmp_path / "fvqa.jsonl").write_text("\n".join(rows) + "\n")
    # A process of its own: the bad rows went to stderr once from the CLI and once through logging.
    done = subprocess.run(
        [sys.executable, "-m", "axpo_nemo.cli", "data", "convert", "--format", "fvqa", "fvqa.jsonl", "out"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    bad = done.stderr.splitlines()
    assert len(bad) == 2, done.stderr
    assert bad[0].startswith("  bad row 1: BadRow: not valid JSON") and bad[1].startswith("  bad row 2: ")
    assert "[convert] row 4/4 | " in done.stdout  # not a terminal: a plain line, at least the last
    assert "4 rows -> 2 samples" in done.stdout


def _shards(folder, n: int) -> None:
    with ShardWriter(folder, ShardConfig(max_samples=2)) as writer:
        for i in range(n):
            writer.write(Sample(f"q{i}", f"What is {i}?", str(i), "math"))


def test_filter_sft_and_prune_show_progress(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _shards(tmp_path / "pool", 5)
    assert main(["data", "filter-sft", "pool", "sft"]) == 0
    out = capsys.readouterr().out
    assert "[filter-sft] trajectory 5/5 | " in out and "5 trajectories" in out
    (tmp_path / "results.jsonl").write_text("")
    assert main(["data", "prune", "pool", "rl", "--sft-results", "results.jsonl", "--teacher-results", "results.jsonl"]) == 0
    out = capsys.readouterr().out
    assert "[prune] question 5/5 | " in out and "5 questions: kept 5" in out


def test_eval_shows_progress(tmp_path, capsys, monkeypatch, one_thread):
    monkeypatch.chdir(tmp_path)
    write_samples([Sample(f"q{i}", f"What is {i}?", str(i), "math") for i in range(3)], tmp_path / "q.jsonl")
    overrides = ["tools.enabled=[image_zoom_in]", "rollout.max_new_tokens=2", "rollout.max_turns=1",
                 "eval.samples_per_question=1", "eval.ks=[1]"]  # fmt: skip
    assert main(["eval", "--questions", "q.jsonl", "--out", "ev", *overrides]) == 0
    out = capsys.readouterr().out
    assert "[eval] question 3/3 | " in out and "report.md" in out

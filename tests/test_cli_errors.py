"""User errors end an `axpo` command with exactly one line on stderr and exit code 2; `--debug`
or AXPO_DEBUG=1 shows the traceback, and a bug always keeps it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from axpo_nemo.agent.sample import Sample
from axpo_nemo.cli import main
from axpo_nemo.data.shards import ShardConfig, ShardWriter


@pytest.fixture(autouse=True)
def fresh_dir(tmp_path, monkeypatch):
    """Run every command in an empty working directory, without AXPO_DEBUG."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("AXPO_DEBUG", raising=False)
    return tmp_path


def one_line(capsys, argv: list[str], *needles: str) -> str:
    """Run ``axpo argv``; it must fail with exit code 2 and one stderr line holding ``needles``."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("axpo: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, err
    return err


def shards(folder: Path, n: int = 5) -> Path:
    """A shard folder of ``n`` text-only questions, two per shard."""
    with ShardWriter(folder, ShardConfig(max_samples=2)) as writer:
        for i in range(n):
            writer.write(Sample(f"q{i}", f"What is {i}?", str(i), "math"))
    return folder


def test_missing_run_folders(capsys):
    one_line(capsys, ["compare", "/no/such/run"], "/no/such/run")
    one_line(capsys, ["eval", "--run", "/no/such/run"], "/no/such/run", "no such run folder")


def test_missing_files_and_an_existing_output(fresh_dir, capsys):
    one_line(capsys, ["data", "convert", "--format", "fvqa", "missing.jsonl", "out"], "missing.jsonl")
    assert not (fresh_dir / "out").exists()  # nothing written for a missing input
    one_line(capsys, ["data", "filter-sft", "missing.jsonl", "out"], "missing.jsonl")
    one_line(capsys, ["data", "prune", "missing", "out", "--sft-results", "a.jsonl", "--teacher-results", "a.jsonl"], "missing")
    one_line(capsys, ["tools", "run", "search", "--args", "{}", "tools.search.corpus_path=nope.jsonl"], "tools.search.corpus_path")
    shards(fresh_dir / "pool")
    one_line(capsys, ["data", "filter-sft", "pool", "pool"], "pool already holds a dataset", "--overwrite")


def test_corrupt_shards(fresh_dir, capsys):
    pool = shards(fresh_dir / "pool")
    second = sorted(pool.glob("*.tar"))[1]
    second.write_bytes(b"\0garbage" * 128 + second.read_bytes()[1024:])
    one_line(capsys, ["data", "filter-sft", "pool", "out"], second.name, "not a tar record")
    (pool / "index.json").write_text("{")
    one_line(capsys, ["data", "filter-sft", "pool", "out2"], "index.json", "not valid JSON")


def test_a_failed_data_command_leaves_no_output_that_reads_as_valid(fresh_dir, capsys):
    """prune stopping on a truncated shard: no `out`, the partial work kept as `out.incomplete`,
    which readers refuse unless asked."""
    pool = shards(fresh_dir / "pool")
    third = sorted(pool.glob("*.tar"))[2]  # q4: the first four samples are read and written first
    third.write_bytes(third.read_bytes()[:700])
    (fresh_dir / "r.jsonl").write_text("")
    prune = ["data", "prune", "--sft-results", "r.jsonl", "--teacher-results", "r.jsonl"]
    one_line(capsys, [*prune, "pool", "out"], third.name, "(bytes 0-", "shorter")
    assert not (fresh_dir / "out").exists()
    partial = fresh_dir / "out.incomplete"
    assert (partial / "index.json").is_file() and not list(fresh_dir.glob(".out.tmp-*"))
    one_line(capsys, ["data", "filter-sft", "out.incomplete", "sft"], "out.incomplete", "unfinished", "--allow-incomplete")
    assert not (fresh_dir / "sft").exists()

    # Asked for explicitly, the finished part (the four whole questions) is read.
    assert main([*prune, "out.incomplete", "again", "--allow-incomplete"]) == 0
    assert "4 questions: kept 4" in capsys.readouterr().out


def test_jsonl_summaries_count_skipped_lines(fresh_dir, capsys):
    lines = [Sample(f"q{i}", f"What is {i}?", str(i), "math").to_dict() for i in range(3)]
    import json

    text = "\n".join([json.dumps(lines[0]), "{not json", json.dumps(lines[1]), '{"id": 3}', json.dumps(lines[2])])
    (fresh_dir / "pool.jsonl").write_text(text + "\n")
    (fresh_dir / "r.jsonl").write_text("")
    assert main(["data", "prune", "pool.jsonl", "pruned", "--sft-results", "r.jsonl", "--teacher-results", "r.jsonl"]) == 0
    out = capsys.readouterr().out
    assert "3 questions" in out and "skipped 2 unreadable pool lines" in out
    assert json.loads((fresh_dir / "pruned" / "prune_report.json").read_text())["skipped_lines"] == 2
    assert main(["data", "filter-sft", "pool.jsonl", "sft"]) == 0
    assert "skipped 2 unreadable input lines" in capsys.readouterr().out


def test_bad_configs(fresh_dir, capsys):
    (fresh_dir / "bad.yaml").write_text("rollout: [1, 2\n")
    one_line(capsys, ["config", "show", "--config", "bad.yaml"], "config error", "bad.yaml", "not valid YAML")
    (fresh_dir / "typo.yaml").write_text("rollout:\n  grup_size: 4\n")
    one_line(capsys, ["config", "show", "--config", "typo.yaml"], "rollout.grup_size", "rollout.group_size")
    one_line(capsys, ["config", "show", "--config", "/no/such.yaml"], "config file not found: /no/such.yaml")
    one_line(capsys, ["tools", "list", "rollout.group_size=many"], "rollout.group_size")
    one_line(capsys, ["tools", "list", "tools.enabled=[telescope]"], "tools.enabled", "telescope")


def test_debug_flag_or_environment_shows_the_traceback(monkeypatch):
    with pytest.raises(FileNotFoundError, match="/no/such/run"):
        main(["--debug", "compare", "/no/such/run"])
    with pytest.raises(FileNotFoundError):
        main(["compare", "/no/such/run", "--debug"])
    monkeypatch.setenv("AXPO_DEBUG", "1")
    with pytest.raises(FileNotFoundError):
        main(["compare", "/no/such/run"])


def test_a_bug_keeps_its_traceback(monkeypatch):
    import axpo_nemo.local.plots as plots

    def broken(*args, **kwargs):
        raise KeyError("a bug")

    monkeypatch.setattr(plots, "compare_runs", broken)
    with pytest.raises(KeyError):
        main(["compare", "/no/such/run"])


def test_the_console_script_prints_one_line():
    done = subprocess.run(
        [sys.executable, "-m", "axpo_nemo.cli", "compare", "/no/such/run"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2
    assert done.stderr == "axpo: /no/such/run: no metrics.jsonl (is this a run folder?)\n"

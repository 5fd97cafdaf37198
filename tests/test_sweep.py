"""tools/sweep.py (grid → sbatch submissions) and tools/collect.py (runs → CSV and Markdown table).

The sweep is checked through its dry run and, with a stand-in ``sbatch`` on PATH that records its
arguments, through a real submission (manifest, job ids, array task files). The collect tests
build run folders with the project's own writers (MetricsLogger for ``metrics.jsonl``,
EvalReport for ``eval/report.json``), so a format change breaks them.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from script_loader import load_script

from axpo_nemo.eval.passk import EvalReport
from axpo_nemo.run.metrics_log import MetricsLogger

ROOT = Path(__file__).resolve().parents[1]
SWEEP = ROOT / "tools" / "sweep.py"
COLLECT = ROOT / "tools" / "collect.py"


sweep = load_script(SWEEP, "tools_sweep")
collect = load_script(COLLECT, "tools_collect")


def _run(script: Path, *args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(script), *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=60
    )


# ------------------------------------------------------------------------------ sweep


def test_dry_run_of_a_2x3_grid_prints_six_submissions(tmp_path):
    proc = _run(
        SWEEP, str(ROOT / "slurm" / "axpo_8b.sh"), "--name", "rn", "--grid", "axpo.r=0.25,0.5",
        "rollout.group_size=4,8,16", "--set", "rl.steps=100", "--sbatch=--nodes=2", "--dry-run", cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 6
    seen = set()
    for i, line in enumerate(lines):
        argv = shlex.split(line)
        assert argv[:3] == ["sbatch", "--parsable", f"--job-name=rn-{i}"]
        assert argv[3] == "--nodes=2" and argv[4] == str(ROOT / "slurm" / "axpo_8b.sh")
        overrides = argv[5:]
        assert overrides[0] == "rl.steps=100"
        r = next(o.split("=", 1)[1] for o in overrides if o.startswith("axpo.r="))
        n = next(o.split("=", 1)[1] for o in overrides if o.startswith("rollout.group_size="))
        assert overrides[-1] == f"output_dir=runs/rn/r-{r}_group_size-{n}"
        seen.add((r, n))
    # Every combination exactly once, the last key varying fastest.
    assert seen == {(r, n) for r in ("0.25", "0.5") for n in ("4", "8", "16")}
    assert "axpo.r=0.25" in lines[2] and "rollout.group_size=16" in lines[2]
    assert not (tmp_path / "runs").exists(), "a dry run writes nothing"


def test_values_split_at_top_level_commas_only():
    assert sweep.split_values("0.25,0.5") == ["0.25", "0.5"]
    assert sweep.split_values("[1,4],[1,8]") == ["[1,4]", "[1,8]"]
    assert sweep.split_values("'a,b',c") == ["'a,b'", "c"]
    with pytest.raises(ValueError, match="unbalanced"):
        sweep.split_values("[1,4")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--grid", "axpo.r"], "expected KEY=V1,V2"),
        (["--grid", "axpo.r=0.25,"], "empty value"),
        (["--grid", "axpo.r=1,1"], "repeated value"),
        (["--grid", "axpo.r=1", "+axpo.r=2"], "appears twice"),
        (["--grid", "axpo.r=1", "--set", "axpo.r=3"], "swept or set by the sweep"),
        (["--grid", "axpo.r=1", "--set", "output_dir=x"], "swept or set by the sweep"),
        (["--grid", "axpo.r=1", "--set", "novalue"], "expected KEY=VALUE"),
        (["--grid", "axpo.r=1", "--name", "a/b"], "--name"),
    ],
)
def test_bad_sweeps_are_refused_naming_the_input(tmp_path, args, message):
    proc = _run(SWEEP, str(ROOT / "slurm" / "axpo_8b.sh"), *args, "--dry-run", cwd=tmp_path)
    assert proc.returncode == 2
    assert message in proc.stderr


def test_every_point_loads_and_plans_before_anything_is_submitted(tmp_path):
    # a point that fails `axpo plan` (TP 3 does not divide 8B's attention heads) or has a bad value
    # stops the whole sweep, in a dry run too, naming the point; the good points are not submitted
    env = _fake_sbatch(tmp_path)
    script = str(ROOT / "slurm" / "axpo_8b.sh")
    proc = _run(SWEEP, script, "--grid", "nemo.megatron.tensor_parallel=2,3", "--dry-run", cwd=tmp_path)
    assert proc.returncode == 2 and "point tensor_parallel-3: axpo plan fails: " in proc.stderr
    assert "TP=3 does not divide the 32 attention heads" in proc.stderr
    assert "1 of 2 points would fail; nothing submitted" in proc.stderr and proc.stdout == ""
    proc = _run(SWEEP, script, "--grid", "axpo.r=0.25,-1", cwd=tmp_path, env=env)
    assert proc.returncode == 2 and "point r--1: " in proc.stderr and "axpo.r" in proc.stderr
    assert not (tmp_path / "calls.jsonl").exists() and not (tmp_path / "runs").exists()
    assert sweep.script_config(script) == "cluster/axpo_8b"


def test_a_missing_job_script_is_refused(tmp_path):
    proc = _run(SWEEP, "slurm/nope.sh", "--grid", "seed=1,2", "--dry-run", cwd=tmp_path)
    assert proc.returncode == 2 and "slurm/nope.sh does not exist" in proc.stderr


def _fake_sbatch(tmp_path: Path) -> dict[str, str]:
    """A stand-in ``sbatch`` that appends its argv (and AXPO_ARRAY_ARGS) to calls.jsonl."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "sbatch"
    fake.write_text(
        f"#!{sys.executable}\n"
        "import json, os, sys\n"
        f"log = {str(tmp_path / 'calls.jsonl')!r}\n"
        "n = sum(1 for _ in open(log)) if os.path.exists(log) else 0\n"
        "open(log, 'a').write(json.dumps({'argv': sys.argv[1:], 'array': os.environ.get('AXPO_ARRAY_ARGS')}) + '\\n')\n"
        "print(f'{100 + n};cluster')\n"
    )
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}


def test_submission_records_job_ids_in_the_manifest(tmp_path):
    env = _fake_sbatch(tmp_path)
    script = ROOT / "slurm" / "cpu_demo.sh"
    proc = _run(
        SWEEP, str(script), "--name", "s", "--grid", "seed=0,1", "axpo.r=0.25,0.5", cwd=tmp_path, env=env
    )
    assert proc.returncode == 0, proc.stderr
    calls = [json.loads(x) for x in (tmp_path / "calls.jsonl").read_text().splitlines()]
    assert len(calls) == 4 and all(c["array"] is None for c in calls)
    manifest = json.loads((tmp_path / "runs" / "s" / "sweep.json").read_text())
    assert [p["job_id"] for p in manifest["points"]] == ["100", "101", "102", "103"]
    assert manifest["points"][1]["values"] == {"seed": "0", "axpo.r": "0.5"}
    assert manifest["points"][1]["output_dir"] == "runs/s/seed-0_r-0.5"
    assert calls[1]["argv"][-3:] == ["seed=0", "axpo.r=0.5", "output_dir=runs/s/seed-0_r-0.5"]


def test_array_submission_writes_one_argument_file_per_task(tmp_path):
    env = _fake_sbatch(tmp_path)
    script = ROOT / "slurm" / "cpu_demo.sh"
    proc = _run(
        SWEEP, str(script), "--name", "a", "--grid", "eval.ks=[1,2],[1,4]", "seed=3,4", "--array",
        "--max-parallel", "2", cwd=tmp_path, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    (call,) = [json.loads(x) for x in (tmp_path / "calls.jsonl").read_text().splitlines()]
    assert call["argv"] == ["--parsable", "--job-name=a", "--array=0-3%2", str(script)]
    tasks = tmp_path / "runs" / "a" / "tasks"
    assert call["array"] == str(tasks.resolve())
    assert (tasks / "1.args").read_text().splitlines() == [
        "eval.ks=[1,2]",
        "seed=4",
        "output_dir=runs/a/ks-_1_2__seed-4",
    ]
    manifest = json.loads((tmp_path / "runs" / "a" / "sweep.json").read_text())
    assert [p["job_id"] for p in manifest["points"]] == ["100_0", "100_1", "100_2", "100_3"]


# ------------------------------------------------------------------------------ collect


def _records(n_questions: int, correct: list[int], samples: int = 4) -> list[dict]:
    return [
        {"id": f"q{i}", "category": "synthetic", "n": samples, "correct": c, "tool_using": 1,
         "correct_tool": min(c, 1), "tool_calls": 2, "tool_call_errors": 0, "turns": 2 * samples}
        for i, c in zip(range(n_questions), correct, strict=True)
    ]  # fmt: skip


def _make_run(folder: Path, accuracies: list[float], correct: list[int] | None, *, r: float = 0.25) -> None:
    """A finished run folder in the real on-disk format: metrics.jsonl, config.yaml, eval/report.json."""
    logger = MetricsLogger(folder)
    logger.log(1, {"loss": 2.0}, phase="sft")
    logger.log(2, {"loss": 1.5}, phase="sft")
    for step, acc in enumerate(accuracies, 1):
        logger.log(
            step,
            {"accuracy": acc, "tool_use_rate": 0.5, "tool_subgroup_all_wrong_rate": math.nan},
            phase="rl",
        )
    logger.close()
    (folder / "config.yaml").write_text(
        f"algorithm: axpo\naxpo:\n  r: {r}\nrl:\n  steps: {len(accuracies)}\n"
    )
    if correct is not None:
        (folder / "eval").mkdir()
        report = EvalReport.from_records(_records(len(correct), correct), ks=[1, 4])
        (folder / "eval" / "report.json").write_text(report.to_json())


def test_collect_builds_the_table_from_a_sweep(tmp_path):
    root = tmp_path / "runs" / "s"
    points = []
    for i, (r, correct) in enumerate([(0.25, [4, 0]), (0.5, [2, 2])]):
        name = f"r-{r}"
        _make_run(root / name, [0.1, 0.3, 0.5 + i / 10], correct, r=r)
        points.append(
            {"index": i, "name": name, "values": {"axpo.r": str(r)}, "output_dir": f"runs/s/{name}"}
        )
    _make_run(root / "unfinished", [0.2], None)
    (root / "sweep.json").write_text(json.dumps({"name": "s", "points": points}))

    out, md = tmp_path / "t.csv", tmp_path / "t.md"
    proc = _run(
        COLLECT,
        str(root),
        "--out",
        str(out),
        "--md",
        str(md),
        "--last",
        "2",
        "--keys",
        "rl.steps",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    rows = list(csv.DictReader(out.open()))
    assert [Path(r["run"]).name for r in rows] == ["r-0.25", "r-0.5", "unfinished"]
    a, b, unfinished = rows
    assert a["axpo.r"] == "0.25" and b["axpo.r"] == "0.5" and unfinished["axpo.r"] == ""
    assert a["rl.steps"] == "3" and unfinished["rl.steps"] == "1"
    assert a["rl_steps"] == "3" and a["sft_steps"] == "2" and float(a["sft/loss"]) == 1.5
    assert float(a["rl/accuracy"]) == pytest.approx((0.3 + 0.5) / 2)  # the last 2 steps
    assert float(b["rl/accuracy"]) == pytest.approx((0.3 + 0.6) / 2)
    assert a["rl/tool_subgroup_all_wrong_rate"] == ""  # NaN throughout
    # Pass@k from the report: q0 4/4 correct, q1 0/4 → pass@1 = pass@4 = 0.5; 2/4 and 2/4 → 0.5 and 1.
    assert float(a["eval/pass@1"]) == pytest.approx(0.5) and float(a["eval/pass@4"]) == pytest.approx(0.5)
    assert float(b["eval/pass@1"]) == pytest.approx(0.5) and float(b["eval/pass@4"]) == pytest.approx(1.0)
    assert unfinished["eval/pass@1"] == ""
    header = list(rows[0])
    assert header.index("eval/pass@1") < header.index("eval/pass@4") < header.index("eval/accuracy")

    table = md.read_text().splitlines()
    assert table[0].startswith("| run | axpo.r | rl.steps |") and len(table) == 2 + 3
    assert "| 0.5 | 1 |" in table[3] and table[4].count("–") >= 3
    assert proc.stdout.startswith(table[0])


def test_collect_reads_eval_records_when_there_is_no_report(tmp_path):
    run = tmp_path / "run"
    _make_run(run, [0.5], None)
    logger = MetricsLogger(run)
    logger.log(1, {"pass@1": 0.25, "pass@4": 0.75, "synthetic/pass@1": 0.25}, phase="eval")
    logger.close()
    rows = collect.collect([run], [], ["accuracy"], 1)
    assert rows[0]["eval/pass@1"] == 0.25 and rows[0]["eval/pass@4"] == 0.75
    assert "eval/synthetic/pass@1" not in rows[0]


def test_collect_with_no_runs_fails_clearly(tmp_path):
    (tmp_path / "empty").mkdir()
    proc = _run(COLLECT, str(tmp_path / "empty"), cwd=tmp_path)
    assert proc.returncode == 1 and "no runs" in proc.stderr
    proc = _run(COLLECT, str(tmp_path / "missing"), cwd=tmp_path)
    assert proc.returncode == 2 and "no such folder" in proc.stderr

"""RL pool pruning from rollout result files, and the SFT correctness filter."""

from __future__ import annotations

import json

import pytest

from axpo_nemo.agent.sample import Sample, write_samples
from axpo_nemo.cli import main
from axpo_nemo.data.prune import PruneConfig, prune_pool, read_results
from axpo_nemo.data.sft_filter import SFTFilterReport, filter_sft, filter_trajectories
from axpo_nemo.data.shards import ShardReader


def _results(path, records, torn=False):
    lines = [json.dumps({"type": "header", "fingerprint": "f", "config": {}})]
    lines += [
        json.dumps({"type": "question", "id": q, "n": n, "correct": c, "samples": []}) for q, n, c in records
    ]
    text = "\n".join(lines) + "\n"
    if torn:
        text += '{"type": "question", "id": "q0", "n'
    path.write_text(text)
    return path


@pytest.fixture
def pool(tmp_path):
    samples = [Sample(f"q{i}", f"question {i}", str(i), "math") for i in range(8)]
    write_samples(samples, tmp_path / "rl.jsonl")
    sft = _results(
        tmp_path / "sft.jsonl",
        # q0 solved 4/4; q1 3/4; q2 solved 4/4 (and teacher fails); q5 only 2 rollouts; q7 8/8
        [("q0", 4, 4), ("q1", 4, 3), ("q2", 4, 4), ("q3", 4, 0), ("q5", 2, 2), ("q7", 8, 8), ("zz", 4, 4)],
        torn=True,
    )
    teacher = _results(tmp_path / "teacher.jsonl", [("q1", 4, 2), ("q2", 4, 0), ("q3", 4, 0), ("q4", 4, 1)])
    return tmp_path, sft, teacher


def test_read_results_skips_header_torn_line_and_bad_records(tmp_path):
    path = _results(tmp_path / "r.jsonl", [("a", 4, 1), ("a", 4, 3), ("b", 2, 5)], torn=True)
    assert read_results([path]) == {"a": {"n": 4, "correct": 3}}  # later record wins; correct > n dropped


def test_prune_drops_each_rule_and_reports_counts(pool):
    tmp, sft, teacher = pool
    report = prune_pool(tmp / "rl.jsonl", tmp / "out", [sft], [teacher], PruneConfig(k=4))
    kept = [s.id for s in ShardReader(tmp / "out")]
    assert kept == ["q1", "q4", "q5", "q6"]
    assert (report.total, report.kept, report.dropped) == (8, 4, 4)
    assert (report.sft_solved, report.teacher_failed, report.both) == (3, 2, 1)  # q0 q2 q7 / q2 q3 / q2
    assert (report.missing_sft, report.missing_teacher, report.too_few_sft, report.unknown_ids) == (
        2,
        4,
        1,
        1,
    )
    pruned = {
        json.loads(x)["id"]: json.loads(x)["reasons"]
        for x in (tmp / "out" / "pruned.jsonl").read_text().splitlines()
    }
    assert pruned == {"q0": ["sft_solved"], "q2": ["sft_solved", "teacher_failed"], "q3": ["teacher_failed"],
                      "q7": ["sft_solved"]}  # fmt: skip
    assert json.loads((tmp / "out" / "prune_report.json").read_text())["kept"] == 4


def test_prune_rule_switches_and_missing_policy(pool):
    tmp, sft, teacher = pool
    only_teacher = prune_pool(
        tmp / "rl.jsonl", tmp / "a", [sft], [teacher], PruneConfig(drop_sft_solved=False)
    )
    assert only_teacher.dropped == 2
    strict = prune_pool(
        tmp / "rl.jsonl", tmp / "b", [sft], [teacher], PruneConfig(missing="drop"), output="jsonl"
    )
    kept = [json.loads(x)["id"] for x in (tmp / "b" / "samples.jsonl").read_text().splitlines()]
    # q0, q5, q7 lack a teacher record, q4 an SFT one, q6 both (q0 and q7 are also solved)
    assert kept == ["q1"] and strict.dropped_missing == 5


def test_cli_prune(pool, capsys):
    tmp, sft, teacher = pool
    code = main(["data", "prune", str(tmp / "rl.jsonl"), str(tmp / "c"), "--sft-results", str(sft),
                 "--teacher-results", str(teacher), "-k", "4"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0 and "kept 4, dropped 4" in out and "SFT model solves 4/4: 3" in out


def _trajectory(i, final, tool=False, answer="12", answer_type="math", **kw):
    messages = []
    if tool:
        messages += [
            {
                "role": "assistant",
                "content": '<think>let me compute</think><tool_call>{"name": "python"}</tool_call>',
            },
            {"role": "tool", "content": "12", "images": []},
        ]
    if final is not None:
        messages.append({"role": "assistant", "content": final})
    return Sample(f"t{i}", "What is 3 * 4?", answer, answer_type, messages=messages, source="distill", **kw)


def test_sft_filter_keeps_only_verified_trajectories(tmp_path):
    samples = [
        _trajectory(0, "<think>3*4</think>The answer is \\boxed{12}."),
        _trajectory(1, "<think>hmm</think>\\boxed{13}"),
        _trajectory(2, "<think>ok</think>\\boxed{\\frac{24}{2}}", tool=True),  # math-verify equivalence
        _trajectory(3, None),  # no assistant turn
        _trajectory(
            4,
            "<think>B is 12</think>\\boxed{B}",
            answer="B",
            answer_type="multiple_choice",
            options={"A": "7", "B": "12"},
        ),
        _trajectory(
            5, "<think>the answer is \\boxed{12}</think> I am not sure."
        ),  # boxed only inside thinking
        _trajectory(
            6, "\\boxed{Malta}", answer="Republic of Malta", answer_type="short_answer", candidates=["Malta"]
        ),
    ]
    report = SFTFilterReport()
    kept = [s.id for s in filter_trajectories(samples, report)]
    assert kept == ["t0", "t2", "t4", "t6"]
    assert (report.total, report.kept, report.wrong, report.no_trajectory) == (7, 4, 2, 1)
    assert report.kept_tool_using == 1 and report.tool_share == 0.25
    write_samples(samples, tmp_path / "traj.jsonl")
    out = filter_sft(tmp_path / "traj.jsonl", tmp_path / "sft")
    assert out.kept == 4 and [s.id for s in ShardReader(tmp_path / "sft")] == kept
    assert json.loads((tmp_path / "sft" / "sft_filter_report.json").read_text())["tool_share"] == 0.25

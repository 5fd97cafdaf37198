"""Running the benchmark suite (axpo_nemo.eval.suite.runner) and `axpo eval --suite`.

Guarantees checked: with a scripted generator over small files of three benchmarks (two groups),
the per-benchmark, per-group and average Pass@1/Pass@4 and the tool-use rate equal their hand
computation and are written as Markdown (paper layout), CSV and JSON; a run interrupted after
some questions resumes without regenerating them and ends with the uninterrupted result; a second
model adds a row to the tables; n < max k is refused; vLLM without NeMo-RL fails clearly; the
tiny model runs the whole command end to end.
"""

from __future__ import annotations

import csv
import io
import json
from collections import Counter

import pytest
from test_suite_loaders import build_dynamath, build_fvqa, build_hrbench

from axpo_nemo.agent.loop import AgentLoopConfig, Continuation
from axpo_nemo.agent.protocol import ChatProtocol, format_assistant_turn
from axpo_nemo.agent.tools.registry import ToolsConfig, build_tools
from axpo_nemo.cli import main
from axpo_nemo.engines import EngineUnavailable, vllm_engine
from axpo_nemo.eval.passk import EvalConfig
from axpo_nemo.eval.suite import resolve_suite, run_suite
from axpo_nemo.models import build_tiny_processor, build_tiny_tokenizer

LOOP = AgentLoopConfig(max_turns=2, max_new_tokens=64, max_total_tokens=4096)
CFG = EvalConfig(samples_per_question=4, ks=[1, 4], batch_size=8)
ZOOM = format_assistant_turn("Zoom first.", tool_calls=[("image_zoom_in", {"bbox_2d": [0, 0, 500, 500]})])

# How many of the 4 samples answer right, per (benchmark, question id).
RIGHT = {
    ("hrbench_4k", q): c for q, c in zip(map(str, range(8)), [4, 4, 2, 0, 1, 1, 1, 1], strict=True)
} | {
    ("dynamath", "1_v1"): 4, ("dynamath", "1_v2"): 2, ("dynamath", "2_v1"): 0, ("dynamath", "2_v2"): 3,
    ("fvqa", "100"): 1, ("fvqa", "101"): 0,
}  # fmt: skip
WRONG = {"hrbench_4k": "Z", "dynamath": "12345", "fvqa": "nobody"}


@pytest.fixture(scope="module")
def protocol():
    return ChatProtocol(build_tiny_processor(build_tiny_tokenizer()))


@pytest.fixture(scope="module")
def tools():
    with build_tools(ToolsConfig(enabled=["image_zoom_in"])) as box:
        yield box


@pytest.fixture
def data(tmp_path):
    root = tmp_path / "data"
    build_hrbench(root)
    build_dynamath(root)
    build_fvqa(root)
    return root


class Scripted:
    """Sample j of a question answers right iff j < RIGHT[...]; sample 0 of fvqa questions zooms first.

    Answers are looked up from the question's text (the benchmark is recognised by it); counts
    the rollouts started per question id.
    """

    def __init__(self, protocol, answers):
        self.protocol = protocol
        self.answers = answers  # (benchmark, id) -> right answer
        self.started: Counter[str] = Counter()

    def generate(self, states, params):
        out = []
        for s in states:
            bench, right = self.answers[s.question_id]
            j = s.metadata["sample"]
            self.started[f"{bench}/{s.question_id}"] += s.num_turns == 0
            if bench == "fvqa" and j == 0 and s.num_turns == 0:
                text, stop = ZOOM, "</tool_call>"
            else:
                answer = right if j < RIGHT[(bench, s.question_id)] else WRONG[bench]
                text, stop = format_assistant_turn("Thinking.", answer=answer) + "<|im_end|>", "<|im_end|>"
            ids = self.protocol.tokenizer(text, add_special_tokens=False)["input_ids"]
            out.append(Continuation(ids, [0.0] * len(ids), "stop", stop))
        return out


def answers_for(data, tmp_path):
    from axpo_nemo.eval.suite import BENCHMARKS, ImageStore

    out = {}
    for key in ("hrbench_4k", "dynamath", "fvqa"):
        for s in BENCHMARKS[key].load(data / key, ImageStore(tmp_path / "scratch" / key)):
            out[s.id] = (key, s.answer)
    return out


def run(gen, protocol, tools, data, out, label="model_a", **kwargs):
    benches = resolve_suite("hrbench_4k,dynamath,fvqa")
    return run_suite(
        gen, protocol, tools, benches, data, out, CFG, LOOP, label=label, model_id=label, **kwargs
    )


def test_scores_groups_and_reports(protocol, tools, data, tmp_path):
    out = tmp_path / "out"
    result = run(Scripted(protocol, answers_for(data, tmp_path)), protocol, tools, data, out)
    by_key = {b.key: b for b in result.benchmarks}
    hr, dyn, fv = by_key["hrbench_4k"], by_key["dynamath"], by_key["fvqa"]
    assert hr.pass_at_k[1] == pytest.approx(14 / 32) and hr.pass_at_k[4] == pytest.approx(7 / 8)
    assert hr.extra["all_cycles"][1] == pytest.approx(0.25**4 / 2)
    assert dyn.pass_at_k[1] == pytest.approx(9 / 16) and dyn.extra["worst_case"][1] == pytest.approx(0.25)
    assert fv.pass_at_k[1] == pytest.approx(1 / 8) and fv.pass_at_k[4] == pytest.approx(0.5)
    assert fv.tool_use_rate == pytest.approx(2 / 8) and hr.tool_use_rate == 0.0
    assert fv.num_questions == 2 and fv.num_rollouts == 8 and hr.num_rollouts == 32
    groups = result.group_scores()
    assert list(groups) == ["reasoning", "perception", "search"]
    assert groups["reasoning"][1] == pytest.approx(9 / 16) and groups["search"][4] == pytest.approx(0.5)
    assert result.average()[1] == pytest.approx((14 / 32 + 9 / 16 + 1 / 8) / 3)
    assert result.tool_use_rate() == pytest.approx(2 / 56)

    md = (out / "suite.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| Model"))
    assert header.index("DynaMath P@1") < header.index("Reasoning avg P@4") < header.index("HRBench-4K P@1")
    assert header.index("HRBench-4K P@4") < header.index("FVQA-test P@1") < header.index("Avg P@1")
    row = next(line for line in md.splitlines() if line.startswith("| model_a"))
    assert row.split(" | ")[1:3] == ["56.2", "75.0"]  # DynaMath P@1, P@4
    assert "worst_case P@1" in md and "all_cycles P@1" in md
    rows = list(csv.DictReader(io.StringIO((out / "suite.csv").read_text())))
    fvqa = next(r for r in rows if r["benchmark"] == "fvqa")
    assert float(fvqa["pass@4"]) == pytest.approx(0.5) and float(fvqa["tool_use_rate"]) == pytest.approx(0.25)
    overall = next(r for r in rows if r["group"] == "all")
    assert overall["questions"] == "14" and float(overall["pass@1"]) == pytest.approx(result.average()[1])
    data_json = json.loads((out / "suite.json").read_text())
    model = data_json["models"][0]
    assert data_json["ks"] == [1, 4] and model["label"] == "model_a"
    assert model["groups"]["search"]["pass_at_k"]["4"] == pytest.approx(0.5)
    assert (out / "model_a" / "dynamath" / "results.jsonl").exists()

    # another model into the same folder: a second row
    run(Scripted(protocol, answers_for(data, tmp_path)), protocol, tools, data, out, label="model_b")
    md = (out / "suite.md").read_text()
    assert "| model_a |" in md and "| model_b |" in md
    assert len(json.loads((out / "suite.json").read_text())["models"]) == 2


class Interrupt(Exception):
    pass


def test_interrupted_suite_resumes_without_regenerating(protocol, tools, data, tmp_path):
    answers = answers_for(data, tmp_path)
    full = run(Scripted(protocol, answers), protocol, tools, data, tmp_path / "full")

    out = tmp_path / "out"
    seen = []

    def stop_after_three(bench, done, total):
        seen.append((bench, done))
        if bench == "dynamath" and done == 3:
            raise KeyboardInterrupt

    first = Scripted(protocol, answers)
    with pytest.raises(KeyboardInterrupt):
        run(first, protocol, tools, data, out, progress=stop_after_three)
    assert not (out / "suite.md").exists()
    lines = (out / "model_a" / "dynamath" / "results.jsonl").read_text().splitlines()
    finished = [json.loads(x)["id"] for x in lines[1:]]
    assert len(finished) == 3  # dynamath is the first benchmark (registry order)

    again = Scripted(protocol, answers)
    result = run(again, protocol, tools, data, out)
    regenerated = {q for q in again.started if q.startswith("dynamath/")}
    assert regenerated.isdisjoint(f"dynamath/{q}" for q in finished)
    assert sum(again.started[f"dynamath/{q}"] for q in finished) == 0
    assert len(regenerated) == 1 and again.started[next(iter(regenerated))] == 4
    by_key = {b.key: b for b in result.benchmarks}
    assert by_key["dynamath"].reused_questions == 3
    for b, f in zip(result.benchmarks, full.benchmarks, strict=True):
        assert b.pass_at_k == pytest.approx(f.pass_at_k) and b.extra == f.extra

    done = Scripted(protocol, answers)
    run(done, protocol, tools, data, out)
    assert sum(done.started.values()) == 0  # everything finished: nothing is sampled


def test_n_below_max_k_is_refused():
    with pytest.raises(ValueError, match="exceeds samples_per_question"):
        EvalConfig(samples_per_question=2, ks=[1, 4])


def test_vllm_engine_fails_clearly_without_nemo_rl(tmp_path):
    from axpo_nemo.nemo.adapter import nemo_rl_available

    if nemo_rl_available():
        pytest.skip("NeMo-RL is importable here")
    from axpo_nemo.config import load_config

    cfg = load_config("demo")
    with pytest.raises(EngineUnavailable, match="Hugging Face model folder"):
        vllm_engine(cfg, "tiny")
    with pytest.raises(EngineUnavailable, match="NeMo-RL container"):
        vllm_engine(cfg, str(tmp_path))


def test_axpo_eval_suite_on_the_tiny_model(data, tmp_path, capsys, one_thread):
    out = tmp_path / "out"
    args = ["eval", "--suite", "hrbench_4k,dynamath,fvqa", "--data-dir", str(data), "--out", str(out)]
    overrides = ["eval.samples_per_question=4", "eval.ks=[1,4]", "eval.max_questions=2", "eval.batch_size=8",
                 "rollout.max_new_tokens=4", "rollout.max_turns=1", "tools.enabled=[image_zoom_in]"]  # fmt: skip
    assert main([*args, *overrides]) == 0
    printed = capsys.readouterr().out
    assert "| tiny |" in printed and "suite.md" in printed
    assert "[hrbench_4k] question 2/2 | " in printed  # progress (plain lines: not a terminal)
    model = json.loads((out / "suite.json").read_text())["models"][0]
    assert model["label"] == "tiny" and [b["key"] for b in model["benchmarks"]] == [
        "dynamath",
        "hrbench_4k",
        "fvqa",
    ]
    for b in model["benchmarks"]:
        assert b["num_questions"] == 2 and b["num_rollouts"] == 8
        assert 0.0 <= b["pass_at_k"]["1"] <= b["pass_at_k"]["4"] <= 1.0
    assert (out / "suite.csv").read_text().count("\ntiny,") == 3 + 3 + 1

    assert main([*args, "--engine", "vllm", *overrides]) == 2
    assert "Hugging Face model folder" in capsys.readouterr().err
    assert main([*args[:3], "--data-dir", str(tmp_path / "none"), *overrides]) == 2
    assert "--data-dir" in capsys.readouterr().err


def test_perception_suite_runs_on_the_default_config_without_a_search_corpus(data, tmp_path, capsys, monkeypatch, one_thread):
    # The demo config enables search with no corpus; perception benchmarks never search.
    monkeypatch.chdir(tmp_path)
    args = ["eval", "--suite", "hrbench_4k", "--data-dir", str(data), "--out", "out"]
    overrides = ["eval.samples_per_question=1", "eval.ks=[1]", "eval.max_questions=1", "rollout.max_new_tokens=2",
                 "rollout.max_turns=1"]  # fmt: skip
    assert main([*args, *overrides]) == 0, capsys.readouterr().err
    assert "| tiny |" in capsys.readouterr().out

"""Pass@k evaluation with tool metrics (axpo_nemo.eval.passk).

Guarantees checked: with scripted rollouts (known correct/incorrect and tool-use mixes) every
metric equals its hand computation, and Pass@k equals both the closed form 1 - C(n-c,k)/C(n,k)
and `core.pass_at_k`; per-category splits; an interrupted run resumes without regenerating
finished questions (a torn last line is tolerated) and ends with the uninterrupted run's report;
other settings are refused unless overwrite=True; results do not depend on batching; the tiny
Qwen3-VL runs end to end through the local generator with the zoom tool; the report renders.
"""

from __future__ import annotations

import json
import math
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from axpo_nemo.agent.loop import AgentLoopConfig, Continuation
from axpo_nemo.agent.protocol import ChatProtocol, format_assistant_turn
from axpo_nemo.agent.replay import ScriptedGenerator
from axpo_nemo.agent.sample import Sample, read_samples, write_samples
from axpo_nemo.agent.tools.registry import ToolsConfig, build_tools
from axpo_nemo.agent.trajectory import derive_seed
from axpo_nemo.core.metrics import pass_at_k
from axpo_nemo.eval import EvalConfig, EvalReport, ResultsMismatchError, evaluate, final_assistant_text
from axpo_nemo.local import LocalGenerator
from axpo_nemo.models import build_tiny_processor, build_tiny_qwen3vl, build_tiny_tokenizer

ZOOM = format_assistant_turn(
    "Too small; zoom in.", tool_calls=[("image_zoom_in", {"bbox_2d": [0, 0, 500, 500]})]
)
BAD = "I will call a tool.\n</think>\n\n<tool_call>\n{not json\n</tool_call>"


def ans(x: str) -> str:
    return format_assistant_turn("Let me think.", answer=x)


# Per question, the scripted turns of each of its n = 4 rollouts.
SCRIPTS = {
    "q1": [[ZOOM, ans("3")], [ans("4")], [ans("5")], [ZOOM, ans("2")]],  # c=1, tool 2 (1 correct)
    "q2": [[ans("12")]] * 4,  # c=4, no tools
    "q3": [[BAD, ans("A")], [ans("A")], [ans("C")], [ans("A")]],  # c=0, one malformed call
    "q4": [[ans("7")], [ZOOM, ans("7")], [ans("8")], [ans("9")]],  # c=2, tool 1 (correct)
}
CORRECT = {"q1": 1, "q2": 4, "q3": 0, "q4": 2}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: the tiny model gains nothing from more on a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Four questions in a JSONL file with their images beside it, read back as samples."""
    root = tmp_path_factory.mktemp("bench")
    (root / "img").mkdir()
    for i, color in enumerate(["red", "green", "blue", "white"]):
        img = Image.new("RGB", (160, 120), color)
        img.paste((0, 0, 0), (10 + 20 * i, 10, 40 + 20 * i, 40))
        img.save(root / "img" / f"{i}.png")
    samples = [
        Sample("q1", "How many apples are there?", "3", images=["img/0.png"], category="perception"),
        Sample("q2", "What is 5 + 7?", "12", "math", images=["img/1.png"], category="math"),
        Sample(
            "q3",
            "What color is the car?",
            "B",
            "multiple_choice",
            images=["img/2.png"],
            options={"A": "red", "B": "blue"},
            category="perception",
        ),
        Sample("q4", "Solve 2x = 14.", "7", "math", images=["img/3.png"], category="math"),
    ]
    write_samples(samples, root / "bench.jsonl")
    return root, list(read_samples(root / "bench.jsonl"))


@pytest.fixture(scope="module")
def protocol():
    return ChatProtocol(build_tiny_processor(build_tiny_tokenizer()))


@pytest.fixture(scope="module")
def tools():
    with build_tools(ToolsConfig(enabled=["image_zoom_in"])) as box:
        yield box


LOOP = AgentLoopConfig(max_turns=3, max_new_tokens=256, max_total_tokens=4096)


class ScriptByQuestion:
    """Plays ``SCRIPTS[question][sample]``; counts generate calls and rollouts started per question."""

    def __init__(self, protocol, fail_on_call: int | None = None):
        self.inner = ScriptedGenerator(protocol)
        self.fail_on_call = fail_on_call
        self.calls = 0
        self.rollouts: Counter[str] = Counter()

    def generate(self, states, params):
        self.calls += 1
        if self.calls == self.fail_on_call:
            raise RuntimeError("interrupted")
        for s in states:
            s.metadata["script"] = SCRIPTS[s.question_id][s.metadata["sample"]]
            self.rollouts[s.question_id] += s.num_turns == 0
        return self.inner.generate(states, params)


def _run(gen, protocol, tools, dataset, cfg=None, **kwargs):
    root, questions = dataset
    cfg = cfg or EvalConfig(samples_per_question=4, ks=[1, 2, 4], batch_size=4)
    return evaluate(gen, protocol, tools, questions, root, cfg, LOOP, **kwargs)


def closed_form(n: int, c: int, k: int) -> float:
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def test_scripted_metrics_match_hand_computation(protocol, tools, dataset):
    report = _run(ScriptByQuestion(protocol), protocol, tools, dataset)
    assert [r["id"] for r in report.records] == ["q1", "q2", "q3", "q4"]
    assert {r["id"]: r["correct"] for r in report.records} == CORRECT
    for k in (1, 2, 4):
        by_hand = np.mean([closed_form(4, c, k) for c in CORRECT.values()])
        core = float(np.mean(pass_at_k([4] * 4, list(CORRECT.values()), k)))
        assert report.overall.pass_at_k[k] == pytest.approx(by_hand) == core
    s = report.summary()
    assert s["pass@1"] == pytest.approx(7 / 16) and s["pass@2"] == pytest.approx((0.5 + 1 + 0 + 5 / 6) / 4)
    assert s["pass@4"] == pytest.approx(0.75)
    assert s["accuracy"] == pytest.approx(7 / 16)
    assert s["tool_use_rate"] == pytest.approx(3 / 16)  # the malformed call is not tool use
    assert s["tool_call_error_rate"] == pytest.approx(1 / 4)
    assert s["accuracy_tool"] == pytest.approx(2 / 3) and s["accuracy_no_tool"] == pytest.approx(5 / 13)
    assert s["mean_turns"] == pytest.approx(20 / 16) and s["num_rollouts"] == 16

    q1 = report.records[0]
    assert q1["tool_using"] == 2 and q1["correct_tool"] == 1 and q1["mean_turns"] == 1.5
    first = q1["samples"][0]
    assert first["correct"] and first["extracted"] == "3" and first["answer"] == "3"
    assert first["tool_calls"] == [
        {"name": "image_zoom_in", "arguments": {"bbox_2d": [0, 0, 500, 500]}, "error": None}
    ]
    assert first["seed"] == derive_seed("eval", 0, "q1", 0) and first["finish_reason"] == "answer"
    q3 = report.records[2]["samples"][0]
    assert q3["errors"] == ["malformed_json"] and not q3["tool_using"] and q3["turns"] == 2


def test_per_category_split(protocol, tools, dataset):
    report = _run(ScriptByQuestion(protocol), protocol, tools, dataset)
    assert set(report.per_category) == {"math", "perception"}
    math_ = report.per_category["math"]
    assert math_.num_questions == 2 and math_.pass_at_k[1] == pytest.approx((1 + 0.5) / 2)
    assert math_.pass_at_k[4] == 1.0 and math_.tool_use_rate == pytest.approx(1 / 8)
    perc = report.per_category["perception"]
    assert perc.pass_at_k[1] == pytest.approx(0.25 / 2) and perc.pass_at_k[4] == pytest.approx(0.5)
    assert perc.tool_call_error_rate == pytest.approx(1 / 3)
    assert report.summary()["math/pass@1"] == pytest.approx(0.75)


def test_report_renders(protocol, tools, dataset):
    report = _run(ScriptByQuestion(protocol), protocol, tools, dataset)
    md = report.to_markdown()
    lines = md.strip().splitlines()
    assert len(lines) == 2 + 3 and "pass@4" in lines[0] and lines[2].startswith("| **all** | 4 | 16 | 43.8 |")
    data = json.loads(report.to_json())
    assert data["overall"]["pass@4"] == 0.75 and set(data["per_category"]) == {"math", "perception"}
    assert len(data["questions"]) == 4 and data["config"]["ks"] == [1, 2, 4]


def test_resume_skips_finished_questions(protocol, tools, dataset, tmp_path):
    path = tmp_path / "results.jsonl"
    full = _run(ScriptByQuestion(protocol), protocol, tools, dataset)

    broken = ScriptByQuestion(protocol, fail_on_call=4)  # q1 takes calls 1-2, q2 call 3, q3 fails
    with pytest.raises(RuntimeError, match="interrupted"):
        _run(broken, protocol, tools, dataset, results_path=path)
    lines = path.read_text().splitlines()
    assert json.loads(lines[0])["type"] == "header"
    assert [json.loads(x)["id"] for x in lines[1:]] == ["q1", "q2"]
    with path.open("a") as f:
        f.write('{"type": "question", "id": "q3", "n": 4, "corr')  # torn write

    again = ScriptByQuestion(protocol)
    progress = []
    report = _run(
        again, protocol, tools, dataset, results_path=path, progress=lambda d, t: progress.append((d, t))
    )
    assert set(again.rollouts) == {"q3", "q4"} and sum(again.rollouts.values()) == 8
    assert report.reused_questions == 2 and progress == [(2, 4), (3, 4), (4, 4)]
    assert report.summary() == pytest.approx(full.summary(), nan_ok=True)

    finished = ScriptByQuestion(protocol)
    cfg = EvalConfig(samples_per_question=4, ks=[1, 3], batch_size=16)  # ks / batch size: no new work
    report = _run(finished, protocol, tools, dataset, cfg, results_path=path)
    assert finished.calls == 0 and report.reused_questions == 4
    assert report.overall.pass_at_k[3] == pytest.approx(
        np.mean([closed_form(4, c, 3) for c in CORRECT.values()])
    )
    records = [json.loads(x) for x in path.read_text().splitlines()[1:]]
    assert sorted(r["id"] for r in records) == ["q1", "q2", "q3", "q4"]


def test_more_questions_extend_a_finished_run(protocol, tools, dataset, tmp_path):
    path = tmp_path / "results.jsonl"
    first = ScriptByQuestion(protocol)
    cfg = EvalConfig(samples_per_question=4, ks=[1, 4], batch_size=8, max_questions=2)
    assert _run(first, protocol, tools, dataset, cfg, results_path=path).overall.num_questions == 2
    second = ScriptByQuestion(protocol)
    report = _run(second, protocol, tools, dataset, results_path=path)
    assert set(second.rollouts) == {"q3", "q4"} and report.overall.num_questions == 4


def test_other_settings_are_refused_or_overwritten(protocol, tools, dataset, tmp_path):
    path = tmp_path / "results.jsonl"
    _run(ScriptByQuestion(protocol), protocol, tools, dataset, results_path=path)
    other = EvalConfig(samples_per_question=4, ks=[1, 4], seed=1)
    with pytest.raises(ResultsMismatchError, match="seed: 0 -> 1"):
        _run(ScriptByQuestion(protocol), protocol, tools, dataset, other, results_path=path)
    with pytest.raises(ResultsMismatchError, match="model_id"):
        _run(ScriptByQuestion(protocol), protocol, tools, dataset, results_path=path, model_id="step_100")
    gen = ScriptByQuestion(protocol)
    _run(gen, protocol, tools, dataset, other, results_path=path, overwrite=True)
    assert sum(gen.rollouts.values()) == 16
    header = json.loads(path.read_text().splitlines()[0])
    assert header["config"]["seed"] == 1


class SeedAnswer:
    """Answers each rollout with a digit of its own seed: correctness depends only on the seed."""

    def __init__(self, protocol):
        self.protocol = protocol
        self.batch_sizes = []

    def generate(self, states, params):
        self.batch_sizes.append(len(states))
        out = []
        for s in states:
            text = ans(str(s.seed % 3)) + "<|im_end|>"
            ids = self.protocol.tokenizer(text, add_special_tokens=False)["input_ids"]
            out.append(Continuation(ids, [0.0] * len(ids), "stop", "<|im_end|>"))
        return out


def test_results_do_not_depend_on_batching(protocol, tools, dataset):
    root, questions = dataset
    questions = [Sample(q.id, q.question, "1", images=q.images, category=q.category) for q in questions]
    reports = []
    for batch_size in (1, 3, 16):
        gen = SeedAnswer(protocol)
        cfg = EvalConfig(samples_per_question=4, ks=[1, 4], batch_size=batch_size, seed=5)
        reports.append(evaluate(gen, protocol, tools, questions, root, cfg, LOOP))
        assert max(gen.batch_sizes) == min(batch_size, 16)
    expected = {q.id: sum(derive_seed("eval", 5, q.id, j) % 3 == 1 for j in range(4)) for q in questions}
    for report in reports:
        assert {r["id"]: r["correct"] for r in report.records} == expected
        assert [s["seed"] for r in report.records for s in r["samples"]] == [
            s["seed"] for r in reports[0].records for s in r["samples"]
        ]


def test_config_validation():
    with pytest.raises(ValueError, match="exceeds samples_per_question"):
        EvalConfig(samples_per_question=2, ks=[1, 4])
    with pytest.raises(ValueError, match="greedy"):
        EvalConfig(temperature=0.0)
    with pytest.raises(ValueError, match="ks"):
        EvalConfig(ks=[0, 1])
    cfg = EvalConfig(samples_per_question=1, ks=[1], temperature=0.0)
    assert cfg.ks == [1]
    with pytest.raises(ValueError, match="batch_size"):
        EvalConfig(batch_size=0)


def test_duplicate_ids_are_refused(protocol, tools, dataset):
    root, questions = dataset
    with pytest.raises(ValueError, match="unique"):
        evaluate(ScriptByQuestion(protocol), protocol, tools, [questions[0]] * 2, root, EvalConfig(), LOOP)


def test_report_from_records_without_rollouts():
    report = EvalReport.from_records([], [1])
    assert math.isnan(report.overall.pass_at_k[1]) and report.overall.num_rollouts == 0
    assert "| **all** | 0 | 0 | – |" in report.to_markdown()
    assert json.loads(report.to_json())["overall"]["pass@1"] is None


class ZoomFirst:
    """Rollout 0 of each question starts with a scripted zoom call; everything else is sampled."""

    def __init__(self, inner, tokenizer):
        self.inner = inner
        self.ids = tokenizer(ZOOM, add_special_tokens=False)["input_ids"]

    def generate(self, states, params):
        out = [None] * len(states)
        rest = []
        for i, s in enumerate(states):
            if s.num_turns == 0 and s.metadata["sample"] == 0:
                out[i] = Continuation(list(self.ids), [0.0] * len(self.ids), "stop", "</tool_call>")
            else:
                rest.append(i)
        if rest:
            sampled = self.inner.generate([states[i] for i in rest], [params[i] for i in rest])
            for i, c in zip(rest, sampled, strict=True):
                out[i] = c
        return out


def test_tiny_model_end_to_end(dataset, tools):
    root, questions = dataset
    bundle = build_tiny_qwen3vl(seed=0)
    protocol = ChatProtocol(bundle.processor)
    loop = AgentLoopConfig(max_turns=2, max_new_tokens=10, max_total_tokens=2048)
    questions = questions[:3]
    runs = []
    for batch_size in (12, 5):
        gen = ZoomFirst(LocalGenerator.from_bundle(bundle), bundle.tokenizer)
        cfg = EvalConfig(samples_per_question=4, ks=[1, 4], batch_size=batch_size, seed=7)
        runs.append(evaluate(gen, protocol, tools, questions, root, cfg, loop))
    report = runs[0]
    s = report.summary()
    assert s["num_questions"] == 3 and s["num_rollouts"] == 12
    assert s["tool_use_rate"] == pytest.approx(3 / 12) and s["tool_call_error_rate"] == 0.0
    assert 0.0 <= s["pass@1"] <= s["pass@4"] <= 1.0 and 0.0 <= s["accuracy"] <= 1.0
    assert 1.0 <= s["mean_turns"] <= 2.0
    for r in report.records:
        assert r["n"] == 4 and len(r["samples"]) == 4 and r["tool_using"] == 1
        assert r["samples"][0]["turns"] == 2 and r["samples"][0]["tool_calls"][0]["error"] is None
        assert all(x["response_tokens"] > 0 for x in r["samples"])
    # Same seeds, other batching: the very same samples.
    texts = [[x["text"] for x in r["samples"]] for r in report.records]
    assert texts == [[x["text"] for x in r["samples"]] for r in runs[1].records]
    assert "| **all** | 3 | 12 |" in report.to_markdown()


def test_final_assistant_text_restores_the_prefilled_think(protocol, tools):
    from axpo_nemo.agent.replay import replay

    state = replay(protocol, tools, "Q?", [Image.new("RGB", (64, 64))], [ans("5")], LOOP)
    text = final_assistant_text(state, protocol)
    assert text.startswith("<think>\n") and text.endswith("\\boxed{5}.") and "<|im_end|>" not in text


def test_an_edited_question_is_recomputed(protocol, tools, dataset, tmp_path):
    root, questions = dataset
    path = tmp_path / "results.jsonl"
    cfg = EvalConfig(samples_per_question=4, ks=[1, 4])
    evaluate(ScriptByQuestion(protocol), protocol, tools, questions, root, cfg, LOOP, results_path=path)
    edited = [Sample(**{**q.__dict__, "answer": "13"}) if q.id == "q2" else q for q in questions]
    gen = ScriptByQuestion(protocol)
    report = evaluate(gen, protocol, tools, edited, root, cfg, LOOP, results_path=path)
    assert set(gen.rollouts) == {"q2"} and report.records[1]["correct"] == 0

"""tools/diag_regime.py: the per-family failure table and the regime estimate, on a hand-made eval."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from script_loader import load_script

SCRIPT = Path(__file__).resolve().parents[1] / "tools" / "diag_regime.py"


@pytest.fixture(scope="module")
def diag():
    return load_script(SCRIPT)


REF = {"name": "python", "arguments": {"code": "print(6*7)"}}


def _sample(tool: bool, correct: bool, code: str = "print(6*7)", answer: str = "42") -> dict:
    calls = [{"name": "python", "arguments": {"code": code}, "error": None}] if tool else []
    return {"tool_using": tool, "correct": correct, "tool_calls": calls, "answer": answer if tool else "A"}


def _question(qid: str, category: str, samples: list[dict]) -> dict:
    return {
        "type": "question", "id": qid, "category": category, "n": len(samples),
        "correct": sum(s["correct"] for s in samples), "tool_using": sum(s["tool_using"] for s in samples),
        "correct_tool": sum(s["correct"] and s["tool_using"] for s in samples), "samples": samples,
    }  # fmt: skip


def test_families_separate_a_wrong_call_from_a_miscopied_answer(diag, tmp_path, capsys):
    mult = [
        _sample(True, True),  # reference call, copied
        _sample(True, False, answer="48"),  # reference call, the output miscopied
        _sample(True, False, code="print(6*8)", answer="48"),  # another call
        _sample(False, True),
    ]
    results = [_question("m", "python_multiply", mult), _question("c", "color_mc", [_sample(False, False)] * 2)]
    questions = {
        "m": {"id": "m", "question": "What is six times seven?", "answer": "A", "category": "python_multiply",
              "metadata": {"reference_call": REF, "value": "42"}},
        "c": {"id": "c", "question": "Which colour?", "answer": "B", "category": "color_mc", "metadata": {}},
    }  # fmt: skip
    rows = {r["family"]: r for r in diag.family_rows(results, {k: q["metadata"] for k, q in questions.items()})}
    m = rows["python_multiply"]
    assert (m["rollouts"], m["tool_use"], m["acc_no_tool"]) == (4, 0.75, 1.0)
    assert m["acc_tool"] == pytest.approx(1 / 3) and m["reference_calls"] == pytest.approx(2 / 3)
    assert m["copied_after_reference"] == 0.5
    assert rows["color_mc"]["reference_calls"] is None and rows["color_mc"]["acc_tool"] is None

    # the estimate: t = 3/4, p = 1/3 for the one question with tool use
    est = diag.regime(results, {"python_multiply"}, group_size=2, k=2)
    t, p = 0.75, 1 / 3
    trig, anyt = (1 - t * p) ** 2 - (1 - t) ** 2, 1 - (1 - t) ** 2
    assert est["all_wrong"] == pytest.approx(trig / anyt)
    assert est["recovery"] == pytest.approx(1 - (1 - p) ** 2)
    assert est["tool_accuracy"] == pytest.approx(1 / 3) and est["no_tool_accuracy"] == 1.0

    out = tmp_path / "eval"
    out.mkdir()
    (out / "results.jsonl").write_text("\n".join(json.dumps(r) for r in [{"type": "header"}, *results]) + "\n")
    (tmp_path / "q.jsonl").write_text("\n".join(json.dumps(q) for q in questions.values()) + "\n")
    diag.main([str(out), str(tmp_path / "q.jsonl"), "--group-size", "2", "--k", "2"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith(f"regime: all-wrong tool-subgroup rate {trig / anyt:.2f}, recovery ")


def test_no_tool_use_gives_nan_not_zero(diag):
    results = [_question("c", "color_mc", [_sample(False, True)])]
    est = diag.regime(results, set(), group_size=8, k=4)
    assert math.isnan(est["all_wrong"]) and math.isnan(est["recovery"]) and math.isnan(est["tool_accuracy"])

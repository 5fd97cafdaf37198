"""Converters from the public formats (ViRL39K, FVQA, PyVision-RL, MMFineReason), each on a small
file built here in that dataset's real layout; bad rows are reported by row number and skipped."""

from __future__ import annotations

import base64
import io
import json

import pytest
from PIL import Image

from axpo_nemo.cli import main
from axpo_nemo.data.converters import CONVERTERS, ConvertConfig, convert
from axpo_nemo.data.converters.common import infer_answer_type, parse_options
from axpo_nemo.data.shards import ShardReader, iter_samples


def _jpeg(shade: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (10, 8), (shade, 0, 0)).save(buf, "JPEG")
    return buf.getvalue()


def _parquet(path, rows):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def _read(out):
    return {s.id: s for s in ShardReader(out, decode="bytes")}


def test_registry_matches_cli_choices():
    assert sorted(CONVERTERS) == ["fvqa", "mmfinereason", "pyvision_rl", "virl39k"]


def test_virl39k_parquet_with_image_folder(tmp_path):
    (tmp_path / "images").mkdir()
    for i in range(2):
        (tmp_path / "images" / f"Processed-{i}-0.jpg").write_bytes(_jpeg(i * 50))
    base = {"PassRate_7BBase": None, "source": "MMK12", "category": "Math"}
    rows = [
        {**base, "qid": "a1", "question": "<image>Find x.", "answer": "\\boxed{17^\\circ}",
         "image": ["images/Processed-0-0.jpg"], "PassRate_32BTrained": 0.5},
        {**base, "qid": "a2", "question": "<image>Which?\nA. red\nB. blue", "answer": "\\boxed{B}",
         "image": ["images/Processed-1-0.jpg"], "PassRate_32BTrained": 0.25},
        {**base, "qid": "a3", "question": "<image>Lost", "answer": "\\boxed{1}",
         "image": ["images/missing.jpg"], "PassRate_32BTrained": 0.5},
        {**base, "qid": "a4", "question": "Easy", "answer": "\\boxed{2}", "image": [], "PassRate_32BTrained": 1.0},
    ]  # fmt: skip
    src = _parquet(tmp_path / "39Krelease.parquet", rows)
    report = convert("virl39k", src, tmp_path / "out", ConvertConfig(max_pass_rate=0.9))
    assert (report.rows, report.written, report.filtered, report.bad) == (4, 2, 1, 1)
    assert report.bad_examples[0]["row"] == 2 and "missing.jpg" in report.bad_examples[0]["error"]
    got = _read(tmp_path / "out")
    a1, a2 = got["virl39k-a1"], got["virl39k-a2"]
    assert (a1.question, a1.answer, a1.answer_type, a1.category) == ("Find x.", "17^\\circ", "math", "Math")
    assert (
        a1.image_data == [_jpeg(0)]
        and a1.metadata["pass_rate_32b"] == 0.5
        and a1.metadata["origin"] == "MMK12"
    )
    assert (a2.answer, a2.answer_type, a2.options) == ("B", "multiple_choice", {"A": "red", "B": "blue"})
    bad_log = [json.loads(x) for x in (tmp_path / "out" / "bad_rows.jsonl").read_text().splitlines()]
    assert [b["row"] for b in bad_log] == [2]


def _fvqa_rows():
    def row(i, truth, candidates, image):
        return {
            "prompt": [{"content": f"Which country is shown {i}?", "role": "user"}],
            "images": [{"bytes": image, "path": None}],
            "reward_model": {
                "candidate_answers": json.dumps(candidates),
                "ground_truth": truth,
                "style": "rule",
            },
            "data_source": "mmsearch_r1/fvqa_train",
            "image_urls": None,
            "data_id": f"fvqa_train_{i}",
            "category": "search_required" if i % 2 else "search_free",
        }

    return [
        row(0, "Malta", ["Malta", "mt", "Republic of Malta"], _jpeg(10)),
        row(1, "", [], _jpeg(20)),  # no ground truth: bad
        row(2, "namus", [], _jpeg(30)),
        row(3, "Hungary", ["HUN"], b"not an image"),  # corrupt image: bad
    ]


def test_fvqa_parquet_embedded_images(tmp_path):
    src = _parquet(tmp_path / "fvqa_train.parquet", _fvqa_rows())
    report = convert("fvqa", src, tmp_path / "out", ConvertConfig(allowed_tools=["search"]))
    assert (report.written, report.bad) == (2, 2)
    assert [b["row"] for b in report.bad_examples] == [1, 3]
    s = _read(tmp_path / "out")["fvqa-fvqa_train_0"]
    assert (s.question, s.answer, s.answer_type) == ("Which country is shown 0?", "Malta", "short_answer")
    assert s.candidates == ["mt", "Republic of Malta"] and s.category == "search_free"
    assert s.allowed_tools == ["search"] and s.image_data == [_jpeg(10)]


def test_fvqa_jsonl_with_base64_images_and_a_torn_line(tmp_path):
    lines = []
    for row in _fvqa_rows()[:1] + _fvqa_rows()[2:3]:
        row["images"] = [{"bytes": base64.b64encode(row["images"][0]["bytes"]).decode(), "path": None}]
        lines.append(json.dumps(row))
    lines.insert(1, '{"prompt": [')  # torn
    (tmp_path / "fvqa.jsonl").write_text("\n".join(lines) + "\n")
    report = convert("fvqa", tmp_path / "fvqa.jsonl", tmp_path / "out", ConvertConfig(output="jsonl"))
    assert (report.written, report.bad, report.bad_examples[0]["row"]) == (2, 1, 1)
    got = {s.id: s for s in iter_samples(tmp_path / "out" / "samples.jsonl")}
    assert got["fvqa-fvqa_train_2"].image_data == [_jpeg(30)]


def test_pyvision_rl_json_both_row_layouts(tmp_path):
    (tmp_path / "vstar").mkdir()
    (tmp_path / "vstar" / "sa_1.jpg").write_bytes(_jpeg(1))
    rows = [
        {"id": "0", "question": "What is the material of the glove?\n(A) rubber\n(B) cotton\n(C) kevlar\n"
         "Answer with the option's letter from the given choices directly.", "answer": "A",
         "ability": "visual_search", "data_source": "vstar", "image_path": "vstar/sa_1.jpg"},
        {"id": "1", "question": "How many birds?", "answer": "3", "ability": "counting", "data_source": "x",
         "image_path": str(tmp_path / "vstar" / "sa_1.jpg")},
        {"id": "2", "question": "Lost?", "answer": "yes", "ability": "a", "data_source": "x", "image_path": "nope.jpg"},
        {"prompt": [{"content": "<image>\n…", "role": "user"}], "data_source": "chart", "ability": "chart",
         "env_name": "pyvision_gym_w_image_hint", "reward_model": {"ground_truth": "Paris", "style": "model"},
         "extra_info": {"answer": "Paris", "index": 7, "question": "Which city?", "split": "train"},
         "mm_hint": {"hint_path": "vstar/sa_1.jpg", "hint_type": "image"}},
        "not an object",
    ]  # fmt: skip
    (tmp_path / "pyvision_image_rl_data.json").write_text(json.dumps(rows))
    report = convert("pyvision_rl", tmp_path / "pyvision_image_rl_data.json", tmp_path / "out")
    assert (report.written, report.bad) == (3, 2)
    assert [b["row"] for b in report.bad_examples] == [2, 4]
    got = _read(tmp_path / "out")
    mc = got["pyvision_rl-0"]
    assert mc.answer_type == "multiple_choice" and mc.options == {"A": "rubber", "B": "cotton", "C": "kevlar"}
    assert mc.category == "visual_search" and mc.image_data == [_jpeg(1)]
    assert got["pyvision_rl-1"].answer_type == "math"
    rl = got["pyvision_rl-7"]
    assert (rl.question, rl.answer, rl.answer_type, rl.category) == (
        "Which city?",
        "Paris",
        "short_answer",
        "chart",
    )


def test_mmfinereason_parquet_hard_subset_and_responses(tmp_path):
    def row(i, answer, pass_rate, image):
        return {
            "id": i, "question": "<image>\nCompute the area.", "answer": answer, "ori_question": "q",
            "original_answer": answer, "image": {"bytes": image, "path": f"{i}.jpg"},
            "caption": "a figure", "qwen3vl_235b_thinking_response": f"<think>…</think> \\boxed{{{answer}}}",
            "pass_rate": pass_rate, "is_consistent": True, "consistency_analysis": "", "source": "MMK12",
        }  # fmt: skip

    rows = [row(1, "12", 0.0, _jpeg(1)), row(2, "C", 0.0, _jpeg(2)), row(3, "5", 0.75, _jpeg(3)),
            row(4, "", 0.0, _jpeg(4)), row(5, "\\frac{1}{2}", 0.0, None)]  # fmt: skip
    rows[4]["image"] = {"bytes": None, "path": None}
    src = _parquet(tmp_path / "train-00000.parquet", rows)
    report = convert(
        "mmfinereason", src, tmp_path / "out", ConvertConfig(max_pass_rate=0.0, keep_responses=True)
    )
    assert (report.rows, report.written, report.filtered, report.bad) == (5, 2, 1, 2)
    assert [b["row"] for b in report.bad_examples] == [3, 4]
    got = _read(tmp_path / "out")
    s = got["mmfinereason-MMK12-1"]
    assert (s.question, s.answer, s.answer_type, s.category) == ("Compute the area.", "12", "math", "MMK12")
    assert s.messages == [{"role": "assistant", "content": "<think>…</think> \\boxed{12}"}]
    assert got["mmfinereason-MMK12-2"].answer_type == "multiple_choice"


def test_cli_convert_prints_summary_and_bad_rows(tmp_path, capsys):
    rows = [{"id": "0", "question": "q?", "answer": "B", "ability": "a", "data_source": "d", "image_path": "x.jpg"},
            {"id": "1", "question": "q?", "answer": "7", "ability": "a", "data_source": "d", "image_path": "y.jpg"}]  # fmt: skip
    (tmp_path / "x.jpg").write_bytes(_jpeg(5))
    (tmp_path / "rows.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    code = main(["data", "convert", "--format", "pyvision_rl", str(tmp_path / "rows.jsonl"), str(tmp_path / "o"),
                 "--shard-samples", "1"])  # fmt: skip
    out, err = capsys.readouterr()
    assert code == 0 and "2 rows -> 1 samples" in out and "1 bad rows skipped" in out
    assert "bad row 1:" in err and "y.jpg" in err
    report = json.loads((tmp_path / "o" / "convert_report.json").read_text())
    assert report["written"] == 1 and report["bad"] == 1


def test_answer_type_inference():
    assert infer_answer_type("(B)", "x", "math") == ("multiple_choice", "B", {})
    assert infer_answer_type("3.5", "x", "short_answer") == ("math", "3.5", {})
    assert infer_answer_type("Paris", "x", "short_answer") == ("short_answer", "Paris", {})
    assert parse_options("Q\nA: one\nC: three") == {}  # gap: not an option list

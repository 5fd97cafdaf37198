"""Benchmark loaders and scorers of the suite (axpo_nemo.eval.suite), on small files built here
in each benchmark's public format.

Guarantees checked: every loader reads its format (VLMEvalKit base64 TSV with image references,
Hugging Face JSONL/Parquet rows with image structs, official JSON/JSONL with image paths) into
samples with the right answer type, options, answer, images and tools; a malformed row is
reported and skipped; HRBench's score averages over option rotations and its all-rotations score
needs every rotation; DynaMath's worst case needs every variant; math answers are compared with
math-verify (DynaMath with its 0.001 tolerance); search answers accept any candidate.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import math
from pathlib import Path

import pytest
from PIL import Image

from axpo_nemo.agent.rewards import RewardConfig, score_answer
from axpo_nemo.core.metrics import pass_at_k
from axpo_nemo.eval.passk import EvalReport
from axpo_nemo.eval.suite import BENCHMARKS, BenchmarkScore, ImageStore, resolve_suite
from axpo_nemo.eval.suite.tables import BenchmarkFormatError, read_rows

COLORS = ["red", "green", "blue", "white", "black", "yellow"]


def png_bytes(color: str = "red", size: tuple[int, int] = (48, 32)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def b64(color: str = "red") -> str:
    return base64.b64encode(png_bytes(color)).decode()


def write_tsv(path: Path, header: list[str], rows: list[list[object]]) -> Path:
    """A VLMEvalKit-style TSV (what pandas ``to_csv(sep='\\t')`` writes)."""
    import csv

    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, delimiter="\t")
        writer.writerow(header)
        writer.writerows(rows)
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def hrbench_rows() -> list[list[object]]:
    """Two questions, each in 4 option rotations (cycle_category 0-3), as in hr_bench_4k.tsv."""
    rows = []
    options = ["27B", "37B", "27D", "27E"]
    for cycle in range(4):
        rot = options[-cycle:] + options[:-cycle] if cycle else list(options)
        letter = "ABCD"[rot.index("27B")]
        # rows 1-3 reference row 0's image by its index, as VLMEvalKit does for repeated images
        image = b64("red") if cycle == 0 else "0"
        rows.append([cycle, "What number is above the entrance?", letter, "single", *rot, cycle, image])
    colors = ["Blue", "Red", "Green", "Black"]
    for cycle in range(4):
        rot = colors[cycle:] + colors[:cycle]
        letter = "ABCD"[rot.index("Blue")]
        rows.append(
            [4 + cycle, "What is the color of the mailbox?", letter, "cross", *rot, cycle, b64("blue")]
        )
    return rows


HRBENCH_HEADER = ["index", "question", "answer", "category", "A", "B", "C", "D", "cycle_category", "image"]


def build_hrbench(root: Path, bad_row: bool = False) -> Path:
    rows = hrbench_rows()
    if bad_row:
        rows.append([99, "No options here", "A", "single", "", "", "", "", 0, b64("red")])
    return write_tsv(root / "hrbench_4k" / "hr_bench_4k.tsv", HRBENCH_HEADER, rows)


def build_dynamath(root: Path) -> Path:
    """Two seeds × 2 variants in the HF layout: one JSONL file per sample_variantK split."""
    folder = root / "dynamath"
    for variant in (1, 2):
        rows = [
            {"id": "1", "question": f"What is the area? (variant {variant})", "image": f"images/1_{variant}.png",
             "decoded_image": {"bytes": b64("green"), "path": None}, "ground_truth": f"{1.5 * variant:.3f}",
             "answer_type": "float", "subject": "PG", "knowledge_level": "high school"},
            {"id": "2", "question": "Which option is right?\nA: 1\nB: 2", "image": "images/2.png",
             "decoded_image": {"bytes": b64("white"), "path": None}, "ground_truth": "B",
             "answer_type": "multiple choice", "subject": "AL", "knowledge_level": "undergraduate"},
        ]  # fmt: skip
        write_jsonl(folder / f"sample_variant{variant}.jsonl", rows)
    return folder


def build_fvqa(root: Path) -> Path:
    """fvqa_test rows in the verl layout (prompt messages, image structs, reward_model)."""
    rows = [
        {"data_source": "mmsearch_r1/fvqa_test", "prompt": [{"role": "user", "content": "<image>Who designed this building?"}],
         "images": [{"bytes": b64("black")}], "reward_model": {"ground_truth": "Frank Gehry",
         "candidate_answers": ["Gehry", "Frank Owen Gehry"]}, "extra_info": {"index": 100}},
        {"data_source": "mmsearch_r1/fvqa_test", "prompt": [{"role": "user", "content": "Which country is this dish from?"}],
         "images": [{"bytes": b64("yellow")}], "reward_model": {"ground_truth": "Japan", "candidate_answers": []},
         "extra_info": {"index": 101}},
    ]  # fmt: skip
    return write_jsonl(root / "fvqa" / "fvqa_test.jsonl", rows)


def load(key: str, root: Path, tmp: Path):
    return BENCHMARKS[key].load(root / key, ImageStore(tmp / "_images" / key))


def record(qid: str, n: int, c: int, category: str = "") -> dict:
    """A per-question record as `evaluate` writes it (counts only)."""
    return {"id": qid, "category": category, "n": n, "correct": c, "tool_using": 0, "correct_tool": 0,
            "turns": n, "tool_calls": 0, "tool_call_errors": 0}  # fmt: skip


def score(key: str, text: str, sample) -> bool:
    cfg = RewardConfig(**BENCHMARKS[key].reward_overrides)
    result = score_answer(text, sample.answer, sample.answer_type, sample.candidates, sample.options, cfg)
    return result.correct


def boxed(x: str) -> str:
    return f"<think>\nfine\n</think>\n\nThe answer is \\boxed{{{x}}}."


# --------------------------------------------------------------------------- HRBench


def test_hrbench_tsv_rotations_groups_and_image_references(tmp_path):
    build_hrbench(tmp_path)
    samples = load("hrbench_4k", tmp_path, tmp_path)
    assert [s.id for s in samples] == [str(i) for i in range(8)]
    first = samples[0]
    assert first.answer_type == "multiple_choice" and first.options == {
        "A": "27B",
        "B": "37B",
        "C": "27D",
        "D": "27E",
    }
    assert "Options:\nA. 27B\nB. 37B" in first.question and "\\boxed{}" in first.question
    assert first.allowed_tools == ["image_zoom_in", "python"] and first.category == "single"
    # rows 1-3 reuse row 0's image through the index reference: one file, same path
    assert len({s.images[0] for s in samples[:4]}) == 1
    img = Image.open(tmp_path / "_images" / "hrbench_4k" / first.images[0])
    assert img.size == (48, 32) and img.convert("RGB").getpixel((0, 0)) == (255, 0, 0)
    assert {s.metadata["cycle"] for s in samples} == {"0", "1", "2", "3"}
    assert (
        len({s.metadata["group"] for s in samples[:4]}) == 1
        and samples[0].metadata["group"] != samples[4].metadata["group"]
    )
    # the correct letter moves with the rotation; the option text it names stays the same
    assert {s.options[s.answer] for s in samples[:4]} == {"27B"} and len({s.answer for s in samples[:4]}) == 4
    assert score("hrbench_4k", boxed(samples[1].answer), samples[1])
    assert score("hrbench_4k", boxed("27B"), samples[2])  # option text maps to its letter
    assert not score("hrbench_4k", boxed("A" if samples[3].answer != "A" else "B"), samples[3])


def test_hrbench_malformed_row_is_reported_and_skipped(tmp_path, caplog):
    build_hrbench(tmp_path, bad_row=True)
    with caplog.at_level(logging.WARNING):
        samples = load("hrbench_4k", tmp_path, tmp_path)
    assert len(samples) == 8
    assert "row 9 skipped" in caplog.text and "no option columns" in caplog.text


def test_hrbench_score_averages_rotations_and_all_cycles_needs_every_rotation(tmp_path):
    build_hrbench(tmp_path)
    samples = load("hrbench_4k", tmp_path, tmp_path)
    meta = {s.id: s.metadata for s in samples}
    # question 1: rotations right 4/4, 4/4, 2/4, 0/4 of n=4; question 2: 1/4 in every rotation
    correct = [4, 4, 2, 0, 1, 1, 1, 1]
    report = EvalReport.from_records([record(str(i), 4, c) for i, c in enumerate(correct)], [1, 4])
    result = BenchmarkScore.from_report(BENCHMARKS["hrbench_4k"], report, meta)
    by_cycle = [(correct[i] / 4 + correct[4 + i] / 4) / 2 for i in range(4)]
    assert result.pass_at_k[1] == pytest.approx(sum(by_cycle) / 4) == pytest.approx(sum(correct) / 32)
    # all rotations: question 1 has a rotation never right -> 0; question 2: (1/4)^4
    assert result.extra["all_cycles"][1] == pytest.approx((0 + 0.25**4) / 2)
    assert result.extra["all_cycles"][4] == pytest.approx((0 + 1.0) / 2)  # 1 right of 4, k = 4: pass@4 = 1
    assert result.pass_at_k[4] == pytest.approx((1 + 1 + 1 + 0 + 4) / 8)


def test_hrbench_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    rows = hrbench_rows()
    rows[1][-1] = rows[2][-1] = rows[3][-1] = rows[0][-1]  # parquet rows carry full images
    table = pa.table(
        {
            name: [str(r[i]) if name != "index" else r[i] for r in rows]
            for i, name in enumerate(HRBENCH_HEADER)
        }
    )
    (tmp_path / "hrbench_8k").mkdir()
    pq.write_table(table, tmp_path / "hrbench_8k" / "hr_bench_8k.parquet")
    samples = load("hrbench_8k", tmp_path, tmp_path)
    assert len(samples) == 8 and samples[4].options["A"] == "Blue" and samples[0].images


# --------------------------------------------------------------------------- DynaMath


def test_dynamath_hf_variant_files_and_worst_case(tmp_path):
    build_dynamath(tmp_path)
    samples = load("dynamath", tmp_path, tmp_path)
    assert sorted(s.id for s in samples) == ["1_v1", "1_v2", "2_v1", "2_v2"]
    by_id = {s.id: s for s in samples}
    assert by_id["1_v2"].answer == "3.000" and by_id["1_v2"].answer_type == "math"
    assert by_id["2_v1"].answer_type == "multiple_choice" and by_id["2_v1"].metadata == {
        "group": "2", "variant": "1", "level": "undergraduate"}  # fmt: skip
    # official float check: |pred - answer| <= 0.001 (math-verify plus the benchmark's tolerance)
    assert score("dynamath", boxed("3"), by_id["1_v2"]) and score("dynamath", boxed("3.0004"), by_id["1_v2"])
    assert not score("dynamath", boxed("3.01"), by_id["1_v2"])
    assert score("dynamath", boxed("B"), by_id["2_v2"]) and not score("dynamath", boxed("A"), by_id["2_v2"])

    meta = {s.id: s.metadata for s in samples}
    counts = {"1_v1": 4, "1_v2": 2, "2_v1": 0, "2_v2": 3}
    report = EvalReport.from_records([record(q, 4, c) for q, c in counts.items()], [1, 4])
    result = BenchmarkScore.from_report(BENCHMARKS["dynamath"], report, meta)
    assert result.pass_at_k[1] == pytest.approx((1 + 0.5 + 0 + 0.75) / 4)  # average case
    assert result.extra["worst_case"][1] == pytest.approx((1 * 0.5 + 0 * 0.75) / 2)
    assert result.extra["worst_case"][4] == pytest.approx((1.0 * 1.0 + 0.0) / 2)


def test_dynamath_vlmevalkit_tsv(tmp_path):
    header = [
        "index",
        "qid",
        "varid",
        "image",
        "question",
        "answer",
        "answer_type",
        "subject",
        "knowledge_level",
    ]
    rows = [
        [i, 7, i + 1, b64(COLORS[i]), "Name the set.", "empty set", "free form", "ST", "elementary"]
        for i in range(3)
    ]
    write_tsv(tmp_path / "dynamath" / "DynaMath.tsv", header, rows)
    samples = load("dynamath", tmp_path, tmp_path)
    assert [s.id for s in samples] == ["7_v1", "7_v2", "7_v3"] and {s.metadata["group"] for s in samples} == {
        "7"
    }
    assert samples[0].answer_type == "short_answer" and score("dynamath", boxed("the empty set"), samples[0])


# --------------------------------------------------------------------------- MATH-Vision, MathVerse, WeMath


MATHVISION_ROWS = [
    {"id": "1", "question": "<image1>\nWhich shape comes next?", "options": ["A", "B", "C", "D", "E"],
     "image": "images/1.jpg", "answer": "C", "solution": None, "level": 2, "subject": "logic"},
    {"id": "2", "question": "<image1>\nWhat fraction of the square is shaded?", "options": [],
     "image": "images/2.jpg", "answer": "\\frac{1}{2}", "solution": None, "level": 3, "subject": "arithmetic"},
]  # fmt: skip


def test_mathvision_jsonl_with_image_paths_and_math_equivalence(tmp_path):
    folder = tmp_path / "mathvision"
    (folder / "images").mkdir(parents=True)
    for i in (1, 2):
        (folder / "images" / f"{i}.jpg").write_bytes(png_bytes(COLORS[i]))
    write_jsonl(folder / "test.jsonl", MATHVISION_ROWS)
    mc, free = load("mathvision", tmp_path, tmp_path)
    assert mc.answer_type == "multiple_choice" and mc.options["C"] == "C" and "<image1>" not in mc.question
    assert free.answer_type == "math" and free.options == {} and free.category == "arithmetic"
    assert score("mathvision", boxed("0.5"), free) and score("mathvision", boxed("\\dfrac{2}{4}"), free)
    assert not score("mathvision", boxed("0.25"), free)
    assert score("mathvision", boxed("(C)"), mc) and not score("mathvision", boxed("D"), mc)


def test_mathvision_parquet_with_image_structs(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    rows = [
        {**r, "decoded_image": {"bytes": png_bytes("green"), "path": r["image"]}} for r in MATHVISION_ROWS
    ]
    (tmp_path / "mathvision").mkdir()
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "mathvision" / "test-00000-of-00001.parquet")
    samples = load("mathvision", tmp_path, tmp_path)
    assert [s.answer for s in samples] == ["C", "\\frac{1}{2}"] and all(len(s.images) == 1 for s in samples)


def test_mathverse_testmini_json(tmp_path):
    folder = tmp_path / "mathverse"
    (folder / "images_version_1-4").mkdir(parents=True)
    (folder / "images_version_1-4" / "image_1.png").write_bytes(png_bytes())
    rows = [
        {"sample_index": "1", "problem_index": "1", "problem_version": "Text Dominant",
         "question": "As shown in the figure, find angle BOC.\nChoices:\nA:40°\nB:50°", "image": "images_version_1-4/image_1.png",
         "answer": "B", "question_type": "multi-choice", "metadata": {"subject": "plane geometry"}},
        {"sample_index": "2", "problem_index": "2", "problem_version": "Text Only",
         "question": "A circle has radius 2. Find its area.", "image": "", "answer": "4\\pi",
         "question_type": "free-form", "metadata": {}},
    ]  # fmt: skip
    (folder / "testmini.json").write_text(json.dumps(rows))
    mc, free = load("mathverse", tmp_path, tmp_path)
    assert mc.answer_type == "multiple_choice" and len(mc.images) == 1 and mc.category == "Text Dominant"
    assert free.answer_type == "math" and free.images == []
    assert score("mathverse", boxed("4\\pi"), free) and score("mathverse", boxed("\\pi \\cdot 4"), free)
    assert score("mathverse", boxed("B"), mc)


def test_wemath_json_and_tsv(tmp_path):
    folder = tmp_path / "wemath"
    folder.mkdir()
    (folder / "q1.png").write_bytes(png_bytes())
    rows = [{"ID": "3steps_12", "split": "testmini", "knowledge concept": "Area of a circle",
             "question": "What is the area?", "option": "A. 3π; B. 4π; C. 5π; D. 6π", "answer": "B",
             "image_path": "q1.png", "key": "3steps_1", "question number": 12}]  # fmt: skip
    (folder / "testmini.json").write_text(json.dumps(rows))
    (sample,) = load("wemath", tmp_path, tmp_path)
    assert (
        sample.options == {"A": "3π", "B": "4π", "C": "5π", "D": "6π"} and sample.id == "3steps_12_3steps_1"
    )
    assert score("wemath", boxed("B"), sample) and score("wemath", boxed("4π"), sample)
    assert not score("wemath", boxed("C"), sample)

    (folder / "testmini.json").unlink()
    header = ["index", "image", "question", "A", "B", "C", "answer", "key", "ID"]
    write_tsv(
        folder / "WeMath.tsv", header, [[5, b64(), "Which is largest?", "1", "2", "3", "C", "1step", "9"]]
    )
    (sample,) = load("wemath", tmp_path, tmp_path)
    assert (
        sample.id == "5"
        and sample.options == {"A": "1", "B": "2", "C": "3"}
        and sample.metadata["key"] == "1step"
    )


# --------------------------------------------------------------------------- VisualProbe, V*


def test_visualprobe_val_json_per_difficulty(tmp_path):
    for level in ("Easy", "Hard"):
        folder = tmp_path / "visualprobe" / f"VisualProbe_{level}"
        (folder / "data").mkdir(parents=True)
        (folder / "data" / "a.jpg").write_bytes(png_bytes())
        rows = [{"images": ["data/a.jpg"], "problem": "<image>\nWhat is written on the small sign?",
                 "solution": "<answer>Open 24 hours</answer>", "doc_id": 3}]  # fmt: skip
        (folder / "val.json").write_text(json.dumps(rows))
    samples = load("visualprobe", tmp_path, tmp_path)
    assert sorted(s.id for s in samples) == ["VisualProbe_Easy/3", "VisualProbe_Hard/3"]
    assert {s.category for s in samples} == {"easy", "hard"}
    s = samples[0]
    assert s.answer == "Open 24 hours" and s.answer_type == "short_answer" and "<image>" not in s.question
    assert score("visualprobe", boxed("open 24 hours"), s) and not score("visualprobe", boxed("closed"), s)


def test_vstar_official_jsonl_and_tsv(tmp_path):
    folder = tmp_path / "vstar"
    (folder / "direct_attributes").mkdir(parents=True)
    (folder / "direct_attributes" / "sa_1.jpg").write_bytes(png_bytes("blue"))
    text = ("What is the color of the cup?\n(A) red\n(B) blue\n(C) green\n(D) white\n"
            "Answer with the option's letter from the given choices directly.")  # fmt: skip
    row = {"image": "direct_attributes/sa_1.jpg", "text": text, "category": "direct_attributes",
           "question_id": 7, "label": "B"}  # fmt: skip
    write_jsonl(folder / "test_questions.jsonl", [row])
    (sample,) = load("vstar", tmp_path, tmp_path)
    assert sample.id == "7" and sample.options == {"A": "red", "B": "blue", "C": "green", "D": "white"}
    assert (
        sample.question.startswith("What is the color of the cup?\nOptions:")
        and "directly" not in sample.question
    )
    assert score("vstar", boxed("B"), sample) and score("vstar", boxed("blue"), sample)

    (folder / "test_questions.jsonl").unlink()
    header = ["index", "question", "A", "B", "answer", "category", "image"]
    write_tsv(
        folder / "VStarBench.tsv",
        header,
        [[0, "Is the dog left of the car?", "yes", "no", "A", "relative_position", b64()]],
    )
    (sample,) = load("vstar", tmp_path, tmp_path)
    assert sample.options == {"A": "yes", "B": "no"} and sample.category == "relative_position"


# --------------------------------------------------------------------------- search benchmarks


def test_fvqa_verl_rows_and_candidate_answers(tmp_path):
    build_fvqa(tmp_path)
    gehry, japan = load("fvqa", tmp_path, tmp_path)
    assert gehry.answer == "Frank Gehry" and gehry.candidates == ["Gehry", "Frank Owen Gehry"]
    assert gehry.allowed_tools == ["image_zoom_in", "python", "search"] and "search" in gehry.question.lower()
    assert gehry.question.startswith("Who designed this building?") and len(gehry.images) == 1
    for text in ("Frank Gehry", "gehry", "Frank Owen Gehry", "It was Frank Gehry."):
        assert score("fvqa", boxed(text), gehry), text
    assert not score("fvqa", boxed("Zaha Hadid"), gehry)
    assert score("fvqa", boxed("japan"), japan) and not score("fvqa", boxed("China"), japan)


def test_fvqa_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    build_fvqa(tmp_path)
    rows = [json.loads(x) for x in (tmp_path / "fvqa" / "fvqa_test.jsonl").read_text().splitlines()]
    for r in rows:
        r["images"] = [{"bytes": base64.b64decode(i["bytes"])} for i in r["images"]]
    (tmp_path / "fvqa" / "fvqa_test.jsonl").unlink()
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "fvqa" / "fvqa_test.parquet")
    samples = load("fvqa", tmp_path, tmp_path)
    assert [s.answer for s in samples] == ["Frank Gehry", "Japan"] and samples[0].candidates[0] == "Gehry"


def test_hr_mmsearch_and_mmsearch(tmp_path):
    rows = [{"id": "a1", "query": "Which team won the match shown on the screen?", "ground_truth": "Arsenal",
             "difficulty": "hard", "category": "sports", "image": b64("green")}]  # fmt: skip
    write_jsonl(tmp_path / "hr_mmsearch" / "hr_mmsearch.jsonl", rows)
    (sample,) = load("hr_mmsearch", tmp_path, tmp_path)
    assert (
        sample.answer == "Arsenal"
        and sample.metadata["difficulty"] == "hard"
        and "search" in sample.allowed_tools
    )
    assert score("hr_mmsearch", boxed("arsenal"), sample)

    rows = [
        {"sample_id": "news_0", "query": "When was the phone in the image released?", "query_image": {"bytes": b64()},
         "area": "news", "subfield": "tech", "gt_answer": "September 2024", "alternative_gt_answers": ["Sep 2024"]},
        {"sample_id": "news_1", "query": "Who won the 2024 Tour de France?", "query_image": None,
         "area": "news", "subfield": "sports", "gt_answer": "Tadej Pogačar", "alternative_gt_answers": []},
    ]  # fmt: skip
    write_jsonl(tmp_path / "mmsearch" / "end2end.jsonl", rows)
    phone, tour = load("mmsearch", tmp_path, tmp_path)
    assert len(phone.images) == 1 and tour.images == [] and phone.candidates == ["Sep 2024"]
    assert score("mmsearch", boxed("Sep 2024"), phone) and score("mmsearch", boxed("Tadej Pogacar"), tour)


# --------------------------------------------------------------------------- registry and errors


def test_suite_names_groups_and_errors(tmp_path):
    assert [b.key for b in resolve_suite("perception")] == [
        "hrbench_4k",
        "hrbench_8k",
        "visualprobe",
        "vstar",
    ]
    assert [b.key for b in resolve_suite("fvqa, reasoning")] == [
        "mathvision",
        "dynamath",
        "mathverse",
        "wemath",
        "fvqa",
    ]
    assert len(resolve_suite("all")) == 11
    assert {b.group for b in resolve_suite("all")} == {"reasoning", "perception", "search"}
    with pytest.raises(ValueError, match=r"unknown benchmark or group 'mathvista'.*hrbench_4k"):
        resolve_suite("mathvista")
    with pytest.raises(FileNotFoundError, match=r"benchmark 'vstar'.*test_questions\.jsonl"):
        BENCHMARKS["vstar"].load(tmp_path / "vstar", ImageStore(tmp_path / "img"))
    (tmp_path / "vstar").mkdir()
    with pytest.raises(ValueError, match="no questions found"):
        BENCHMARKS["vstar"].load(tmp_path / "vstar", ImageStore(tmp_path / "img"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"a": 1}\n{not json\n')
    with pytest.raises(BenchmarkFormatError, match=r"bad\.jsonl:2"):
        list(read_rows(bad))
    with pytest.raises(BenchmarkFormatError, match=r"neither a file .* nor base64"):
        ImageStore(tmp_path / "img").add("missing.png", tmp_path, "row 1")


def test_pass_at_k_of_a_group_is_the_product_of_members():
    # the unbiased estimate for the "every member right" event: product of members' pass@k
    members = [(4, 3), (4, 1)]
    product = math.prod(pass_at_k(n, c, 2) for n, c in members)
    report = EvalReport.from_records([record("x_v1", 4, 3), record("x_v2", 4, 1)], [1, 2])
    meta = {"x_v1": {"group": "x"}, "x_v2": {"group": "x"}}
    result = BenchmarkScore.from_report(BENCHMARKS["dynamath"], report, meta)
    assert result.extra["worst_case"][2] == pytest.approx(product) == pytest.approx(1.0 * 0.5)

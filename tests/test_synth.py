"""The synthetic tool task: deterministic files, the right mix, held-out eval, and SFT trajectories
that replay through the real agent loop and tools to correct answers."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from axpo_nemo.agent.loop import AgentLoopConfig
from axpo_nemo.agent.protocol import ChatProtocol, parse_turn
from axpo_nemo.agent.replay import replay
from axpo_nemo.agent.rewards import score_answer
from axpo_nemo.agent.sample import read_samples
from axpo_nemo.agent.sandbox import SandboxConfig
from axpo_nemo.agent.tools.base import ToolContext
from axpo_nemo.agent.tools.registry import ToolsConfig, build_tools
from axpo_nemo.agent.tools.search import SearchConfig, SearchTool
from axpo_nemo.agent.tools.zoom import ImageZoomTool
from axpo_nemo.data.synth import (
    FAMILIES,
    NUMBER_WORDS,
    PALETTE,
    RELATIONS,
    SHARED_KEYS,
    FamilyWeights,
    SynthConfig,
    synthesize,
)
from axpo_nemo.models import build_tiny_processor, build_tiny_tokenizer

FILES = ("sft.jsonl", "rl.jsonl", "eval.jsonl", "corpus.jsonl", "manifest.json")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The default config's dataset, with its samples per split."""
    out = tmp_path_factory.mktemp("synth")
    result = synthesize(SynthConfig(guess_fraction=0.2), out)
    samples = {split: list(read_samples(out / f"{split}.jsonl")) for split in ("sft", "rl", "eval")}
    return result, samples


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_identical_bytes_and_other_seeds_differ(tmp_path, data):
    result, _ = data
    again = synthesize(SynthConfig(guess_fraction=0.2), tmp_path / "a")
    assert _tree(result.out_dir) == _tree(tmp_path / "a")
    assert again.content_hash == result.content_hash
    other = synthesize(SynthConfig(seed=1), tmp_path / "b")
    assert other.content_hash != result.content_hash
    for name in ("sft.jsonl", "rl.jsonl", "eval.jsonl", "corpus.jsonl"):
        assert (tmp_path / "a" / name).read_bytes() != (tmp_path / "b" / name).read_bytes()


def test_rerun_into_the_same_folder_removes_stale_images(tmp_path):
    synthesize(SynthConfig(num_sft=40, num_rl=10, num_eval=10), tmp_path)
    small = synthesize(SynthConfig(num_sft=10, num_rl=4, num_eval=4), tmp_path)
    assert len(list(small.images_dir.iterdir())) == small.num_images
    assert (
        small.content_hash
        == synthesize(SynthConfig(num_sft=10, num_rl=4, num_eval=4), tmp_path / "x").content_hash
    )


def test_counts_tool_fraction_and_manifest(data):
    result, samples = data
    cfg = SynthConfig()
    assert {k: len(v) for k, v in samples.items()} == {
        "sft": cfg.num_sft,
        "rl": cfg.num_rl,
        "eval": cfg.num_eval,
    }
    for split, rows in samples.items():
        assert Counter(s.category for s in rows) == +Counter(result.counts[split])
        assert len({s.id for s in rows}) == len(rows)
    with_tools = [s for s in samples["sft"] if "<tool_call>" in s.messages[0]["content"]]
    assert abs(len(with_tools) / cfg.num_sft - cfg.tool_fraction) <= 0.02
    assert result.sft_tool_fraction == pytest.approx(len(with_tools) / cfg.num_sft)
    assert all(FAMILIES[s.category].tool for s in with_tools)
    # RL and eval carry every family with a positive weight, tool families included
    active = {f for f, w in cfg.weights.as_dict().items() if w > 0}
    assert "zoom_digit" not in active  # off by default (docs/results.md)
    for split in ("rl", "eval"):
        assert {s.category for s in samples[split]} == active
    manifest = json.loads(result.manifest_path.read_text())
    assert manifest["seed"] == 0 and manifest["content_hash"] == result.content_hash
    assert manifest["counts"] == result.counts and manifest["config"]["tool_fraction"] == 0.25
    assert manifest["tools"] == ["python", "search"]
    assert result.elapsed_s > 0  # reported, not timed: a test on a loaded machine took 12 s


def test_tool_fraction_is_configurable(tmp_path):
    result = synthesize(SynthConfig(num_sft=40, num_rl=0, num_eval=0, tool_fraction=0.5), tmp_path)
    assert result.sft_tool_fraction == 0.5
    only = synthesize(
        SynthConfig(
            num_sft=8, num_rl=4, num_eval=4, tool_fraction=1.0,
            weights=FamilyWeights(arith_small=0, color_mc=0, python_area=0, search_fact=0, zoom_digit=0),
        ),
        tmp_path / "only",
    )  # fmt: skip
    assert all(n == 0 for f, n in only.counts["rl"].items() if f != "python_multiply")
    assert only.num_passages == 16 * 4  # the distractor countries only


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"multiply_min": 50, "multiply_max": 20}, "multiply_min"),
        ({"min_options": 4, "max_options": 3}, "min_options"),
        ({"tool_fraction": 1.5}, "tool_fraction"),
        ({"num_sft": -1}, "num_sft"),
        (
            {"weights": FamilyWeights(python_multiply=0, python_area=0, search_fact=0, zoom_digit=0)},
            "tool family",
        ),
        ({"weights": FamilyWeights(arith_small=0, color_mc=0)}, "no-tool family"),
        ({"weights": {"arith_small": -1}}, "arith_small"),
        ({"tool_fraction": 0.6, "guess_fraction": 0.5}, "guess_fraction"),
        (
            {
                "guess_fraction": 0.2,
                "weights": FamilyWeights(python_multiply=0, python_area=0, search_fact=0),
            },
            "tool family",
        ),
    ],
)
def test_bad_configs_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SynthConfig(**kwargs)


def test_samples_validate_and_their_images_exist(data):
    result, samples = data
    cfg = SynthConfig()
    for split, rows in samples.items():
        for s in rows:
            spec = FAMILIES[s.category]
            assert s.source == "synth" and s.answer_type == spec.answer_type
            assert s.allowed_tools == ([spec.tool] if spec.tool else [])
            assert len(s.question.split()) < 30, s.question
            if s.answer_type == "multiple_choice":
                assert s.answer in s.options and 2 <= len(s.options) <= 4
                assert all(f"{k}. {v}\n" in s.question for k, v in s.options.items())
            for img in s.load_images(result.out_dir):
                assert img.size == (cfg.image_size, cfg.image_size)
            assert bool(s.images) == (s.category in ("color_mc", "python_area", "zoom_digit"))
            if split == "sft":
                guess = bool(s.metadata.get("sft_guess"))
                assert not guess or spec.tool
                assert [m["role"] for m in s.messages] == ["assistant"] * (
                    2 if spec.tool and not guess else 1
                )
                for m in s.messages:
                    thinking = parse_turn(m["content"]).thinking
                    assert thinking and len(thinking.split()) < 20
            else:
                assert s.messages == []


def test_sft_turns_fit_the_demo_token_budget(data):
    tokenizer = build_tiny_tokenizer()
    _, samples = data
    longest = max(
        len(tokenizer(m["content"], add_special_tokens=False)["input_ids"])
        for s in samples["sft"]
        for m in s.messages
    )
    assert longest <= 85  # conf/demo.yaml: rollout.max_new_tokens 96


def _color_and_size(s):
    x0, y0, x1, y1 = s.metadata["rect_px"]
    return s.metadata["color"], x1 - x0, y1 - y0


def test_eval_is_disjoint_from_training(data):
    result, samples = data
    train = samples["sft"] + samples["rl"]

    def content(s):
        h = hashlib.sha256(s.question.encode())
        for rel in s.images:
            h.update(np.asarray(Image.open(result.out_dir / rel).convert("RGB")).tobytes())
        return h.hexdigest()

    partitioned = [s for s in samples["eval"] if s.category not in SHARED_KEYS]
    assert not {content(s) for s in partitioned} & {content(s) for s in train}
    # the one-digit table is knowledge, not held out: eval and training draw from all of it
    table = {s.question for split in samples.values() for s in split if s.category == "arith_small"}
    assert len(table) > 0.4 * 155
    train_sums = {s.question for s in train if s.category == "arith_small"}
    assert {s.question for s in samples["eval"] if s.category == "arith_small"} & train_sums

    # and beyond exact duplicates: no held-out operand pair, country or (colour, size) is trained on
    def keys(rows, family, key):
        return {key(s) for s in rows if s.category == family}

    for family, key in [
        ("search_fact", lambda s: s.metadata["entity"]),
        ("python_area", _color_and_size),
    ]:
        held = keys(samples["eval"], family, key)
        assert held and not held & keys(train, family, key), family


def test_tool_questions_hold_their_answer_only_as_one_of_several_options(data):
    # without the tool a rollout can only guess (right 1/k of the time); with it, it can know
    _, samples = data
    rows = [s for split in samples.values() for s in split]
    for s in rows:
        if FAMILIES[s.category].tool:
            assert s.answer_type == "multiple_choice" and 2 <= len(s.options) <= 4
            assert s.options[s.answer] == s.metadata["value"]
            assert (
                sum(s.metadata["value"] in v for v in s.options.values()) == 1
            )  # no option contains another
    # multiple-choice answers are spread over the letters, not a fixed position
    for family in ("python_multiply", "python_area", "search_fact", "color_mc"):
        letters = Counter(s.answer for s in rows if s.category == family)
        assert len(letters) >= 2 and max(letters.values()) < 0.75 * sum(letters.values()), (family, letters)
    # made-up facts: no fact's answer is guessable from the question's country name
    facts = [s for s in rows if s.category == "search_fact"]
    assert len({s.metadata["value"] for s in facts}) >= 0.9 * len(
        {(s.metadata["entity"], s.metadata["relation"]) for s in facts}
    )


def test_answers_are_right_by_construction(data):
    result, samples = data
    for s in (s for split in samples.values() for s in split):
        if s.category == "arith_small":
            a, op, b = re.fullmatch(r"What is (\d+) ([+-]) (\d+)\?", s.question).groups()
            assert int(s.answer) == (int(a) + int(b) if op == "+" else int(a) - int(b))
        elif s.category == "python_multiply":
            a, b = s.metadata["operands"]
            assert s.question.endswith(f"\nWhat is {a}*{b}?") and s.options[s.answer] == str(a * b)
        elif s.category in ("python_area", "color_mc"):
            pixels = np.asarray(s.load_images(result.out_dir)[0])
            color = s.metadata["color"]
            count = int((pixels == PALETTE[color]).all(-1).sum())
            if s.category == "python_area":
                assert str(count) == s.options[s.answer]
            else:
                assert count > 0.5 * pixels.shape[0] * pixels.shape[1] and s.options[s.answer] == color
        elif s.category == "zoom_digit":
            assert s.options[s.answer] == str(s.metadata["digit"])
            x0, y0, x1, y1 = s.metadata["label_box_px"]
            assert max(x1 - x0, y1 - y0) <= 16  # 8 px once the image is shrunk to 128 px
            crop = ImageZoomTool()(
                s.metadata["reference_call"]["arguments"], ToolContext(s.load_images(result.out_dir))
            )
            left, top, right, bottom = crop.metadata["pixel_box"]
            assert crop.ok and left <= x0 and top <= y0 and right >= x1 and bottom >= y1


def test_every_search_question_retrieves_its_fact_first(data):
    result, samples = data
    tool = SearchTool(cfg=SearchConfig(corpus_path=str(result.corpus_path)))
    corpus = [json.loads(line) for line in result.corpus_path.read_text().splitlines()]
    assert len({r["id"] for r in corpus}) == len(corpus) == result.num_passages
    for s in (s for split in samples.values() for s in split if s.category == "search_fact"):
        out = tool(s.metadata["reference_call"]["arguments"], ToolContext())
        assert out.ok and out.metadata["ids"][0] == s.metadata["passage_id"]
        assert s.metadata["value"] in out.text.split("\n\n")[0]


def _toolbox(result):
    """Every tool, searching ``result``'s corpus."""
    cfg = ToolsConfig(
        enabled=["image_zoom_in", "python", "search"],
        search=SearchConfig(corpus_path=str(result.corpus_path)),
        python=SandboxConfig(pool_size=2),
    )
    return build_tools(cfg)


@pytest.fixture(scope="module")
def toolbox(data):
    with _toolbox(data[0]) as tools:
        yield tools


def test_sft_trajectories_replay_to_correct_answers(data, toolbox):
    result, samples = data
    protocol = ChatProtocol(build_tiny_processor(build_tiny_tokenizer()))
    loop = AgentLoopConfig(max_turns=3, max_total_tokens=8192)
    per_family: dict[str, int] = Counter()
    subset = []
    for s in samples["sft"]:  # every tool trajectory, and a few of each no-tool family
        if FAMILIES[s.category].tool or per_family[s.category] < 3:
            per_family[s.category] += 1
            subset.append(s)
    assert set(per_family) == {f for f, w in FamilyWeights().as_dict().items() if w > 0}
    assert any(s.metadata.get("sft_guess") for s in subset)
    for s in subset:
        turns = [m["content"] for m in s.messages]
        state = replay(protocol, toolbox, s.question, s.load_images(result.out_dir), turns, loop)
        assert state.finish_reason == "answer", (s.id, state.finish_reason)
        assert len(state.turns) == len(turns)
        assert [c.error for c in state.tool_calls] == [None] * len(state.tool_calls), s.id
        guess = bool(s.metadata.get("sft_guess"))
        assert [c.name for c in state.tool_calls] == ([] if guess else s.allowed_tools)
        if s.category in ("python_multiply", "python_area", "search_fact") and not guess:
            assert s.metadata["value"] in state.tool_calls[0].response_text, (
                s.id,
                state.tool_calls[0].response_text,
            )
        if s.category == "zoom_digit":
            assert len(state.images) == 2  # the question's image and the crop
        last = state.turns[-1]
        final_text = protocol.decode(state.token_ids[last.start : last.end])
        score = score_answer(final_text, s.answer, s.answer_type, s.candidates, s.options)
        assert score.correct, (s.id, final_text, s.answer)


def _call_from_question(s) -> dict:
    """The call a policy has to learn, derived from the question's text alone by a fixed rule."""
    stem = s.question.split("\n")[-1]
    if s.category == "python_multiply":
        words = re.fullmatch(r"What is (\w+) times (\w+)\?", stem)
        if words:  # multiply_words: each word maps to its number
            a, b = (NUMBER_WORDS.index(w) for w in words.groups())
        else:
            a, b = re.fullmatch(r"What is (\d+)\*(\d+)\?", stem).groups()
        return {"name": "python", "arguments": {"code": f"print({a}*{b})"}}
    if s.category == "python_area":
        color = re.fullmatch(r"How many pixels does the (\w+) rectangle cover\?", stem).group(1)
        rgb = ",".join(map(str, PALETTE[color]))  # a six-way choice
        return {"name": "python", "arguments": {"code": f"print((np.array(image)==({rgb})).all(2).sum())"}}
    for relation, spec in RELATIONS.items():  # a four-way choice, plus the country's name copied
        m = re.fullmatch(re.escape(spec["question"]).replace(re.escape("{e}"), "(\\w+)"), stem)
        if m:
            return {"name": "search", "arguments": {"query": f"{relation} of {m.group(1)}"}}
    raise AssertionError(stem)


def _wrong_calls(s, call: dict) -> list[dict]:
    """Calls one choice away from the right one: an operand off by one, another colour or relation."""
    if s.category == "python_multiply":
        a, b = s.metadata["operands"]
        return [
            {"name": "python", "arguments": {"code": f"print({x}*{y})"}}
            for x, y in ((a + 1, b), (a, b - 1))
        ]
    if s.category == "python_area":
        return [
            {
                "name": "python",
                "arguments": {"code": f"print((np.array(image)==({','.join(map(str, rgb))})).all(2).sum())"},
            }
            for name, rgb in PALETTE.items()
            if name != s.metadata["color"]
        ][:2]
    entity = s.metadata["entity"]
    return [
        {"name": "search", "arguments": {"query": f"{r} of {entity}"}}
        for r in RELATIONS
        if r != s.metadata["relation"]
    ][:2]


def _copied_answer_scores(s, call: dict, toolbox, ctx) -> bool:
    """Run ``call``; does copying what it shows (the printed number, the named value) score?"""
    out = toolbox[call["name"]](call["arguments"], ctx)
    assert out.ok, out.text
    shown = out.text.split("\n\n")[0].rstrip(".").split()[-1]
    return score_answer(f"\\boxed{{{shown}}}", s.answer, s.answer_type, s.candidates, s.options).correct


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    """The demo config's dataset (its own task settings: operands as words, small rectangles)."""
    from axpo_nemo.config import load_config

    out = tmp_path_factory.mktemp("synth_demo")
    cfg = dataclasses.replace(load_config("demo").data.synth, num_sft=40, num_eval=8)
    result = synthesize(cfg, out)
    return result, {split: list(read_samples(out / f"{split}.jsonl")) for split in ("sft", "rl", "eval")}


@pytest.mark.parametrize("which", ["default", "demo"])
def test_each_tool_family_has_a_learnable_right_call_and_a_wrong_call_shows_no_answer(which, request):
    # The regime AXPO targets: a call's correctness is a small choice a policy can learn (copy
    # the operands, the colour's triple, the relation), the right call shows the answer, which the
    # policy then copies, and a call one choice off shows nothing that scores.
    result, samples = request.getfixturevalue("data" if which == "default" else "demo_data")
    with _toolbox(result) as toolbox:
        _check_tool_families(result, samples, toolbox)


@pytest.mark.parametrize("which", ["default", "demo"])
def test_a_numeric_answer_copied_from_a_tool_output_has_one_continuation_among_the_options(which, request):
    # A policy copies a tool's output into its answer digit by digit, and a small model finds
    # the next digit by what followed the current one earlier in the context: no other option
    # may start with the answer's first digit (42 beside 45 and 48 gave "4" three continuations).
    _, samples = request.getfixturevalue("data" if which == "default" else "demo_data")
    checked = 0
    for s in (s for split in samples.values() for s in split):
        if s.category not in ("python_multiply", "python_area"):
            continue
        value = s.metadata["value"]
        others = [v for k, v in s.options.items() if k != s.answer]
        assert s.options[s.answer] == value and others, s.id
        assert not [v for v in others if v[0] == value[0]], (s.id, value, others)
        checked += 1
    assert checked >= 10


def _check_tool_families(result, samples, toolbox) -> None:
    enabled = {f for f, n in result.counts["rl"].items() if n and FAMILIES[f].tool}
    per_family: dict[str, int] = Counter()
    for s in samples["rl"]:
        if not FAMILIES[s.category].tool or per_family[s.category] >= 4:
            continue
        per_family[s.category] += 1
        call = _call_from_question(s)
        assert call == s.metadata["reference_call"], s.id
        ctx = ToolContext(s.load_images(result.out_dir))
        assert _copied_answer_scores(s, call, toolbox, ctx), s.id
        for wrong in _wrong_calls(s, call):
            assert not _copied_answer_scores(s, wrong, toolbox, ctx), (s.id, wrong)
        guess = [
            score_answer(f"\\boxed{{{k}}}", s.answer, s.answer_type, s.candidates, s.options).correct
            for k in s.options
        ]
        assert sum(guess) == 1  # a blind guess is right 1/k of the time
    assert set(per_family) == enabled and {"python_multiply", "python_area"} <= enabled


def test_the_pipeline_reads_a_shard_folder_like_its_jsonl(tmp_path):
    # `axpo data convert` writes shard folders; data.rl_file etc. may name one instead of a JSONL.
    from axpo_nemo.config import load_config
    from axpo_nemo.data.shards import SampleSink, iter_samples
    from axpo_nemo.local.pipeline import Pipeline

    src = tmp_path / "data"
    synthesize(SynthConfig(num_sft=4, num_rl=6, num_eval=0), src)
    with SampleSink(src / "rl_shards") as sink:
        sink.write_all(iter_samples(src / "rl.jsonl"))
    cfg = load_config("demo", [f"data.dir={src}", f"output_dir={tmp_path / 'run'}"])
    pipeline = Pipeline(cfg)
    from_jsonl, from_shards = pipeline._samples("rl.jsonl"), pipeline._samples("rl_shards")
    assert [s.id for s in from_shards] == [s.id for s in from_jsonl] and len(from_jsonl) == 6
    first = next(i for i, s in enumerate(from_jsonl) if s.images)
    a = from_jsonl[first].load_images(src)
    b = from_shards[first].load_images(src / "rl_shards")
    assert [im.size for im in a] == [im.size for im in b] and a[0].tobytes() == b[0].tobytes()

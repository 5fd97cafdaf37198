"""Verifiable rewards: answer extraction, the three answer types, the format term, robustness."""

from __future__ import annotations

import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from axpo_nemo.agent.rewards import (
    AnswerType,
    RewardConfig,
    RewardResult,
    check_format,
    check_math,
    extract_answer,
    extract_boxed,
    extract_choice,
    normalize_answer,
    score_answer,
    strip_thinking,
)

# --------------------------------------------------------------------------- extraction

BOXED_CASES = [
    ("The answer is \\boxed{42}.", "42"),
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    ("\\boxed {x + 1}", "x + 1"),
    ("\\fbox{7}", "7"),
    ("first \\boxed{1} then \\boxed{2}", "2"),
    ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),  # escaped braces do not count
    ("\\boxed{a^{2^{3}}}", "a^{2^{3}}"),
    ("<think>maybe \\boxed{3}</think> final \\boxed{4}", "4"),
    ("<think>only thinking \\boxed{3}</think> no box", None),
    ("pre-filled thinking \\boxed{9}</think> so \\boxed{8}", "8"),
    ("\\boxed{5} <think>unfinished \\boxed{6}", "5"),
    ("no box here", None),
    ("\\boxed{12", None),  # truncated final box: no answer
    ("\\boxed{1} and then \\boxed{12", None),
    ("\\boxed{}", ""),
    ("\\boxed{\\boxed{3}}", "3"),
    ("turn 1 <think>a</think><tool_call>{}</tool_call> turn 2 <think>b</think> \\boxed{B}", "B"),
]


@pytest.mark.parametrize(("text", "expected"), BOXED_CASES)
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


def test_strip_thinking_variants():
    assert strip_thinking("<think>x</think>y") == "y"
    assert strip_thinking("x</think>y</think>z") == "z"
    assert strip_thinking("a<think>b") == "a"
    assert strip_thinking("a<think>b</think>c<think>d</think>e") == "ace"


def test_answer_fallback_in_scoring():
    text = "<think>hmm</think>The answer is Paris."
    assert not score_answer(text, "Paris", "short_answer").correct
    res = score_answer(text, "Paris", "short_answer", cfg=RewardConfig(answer_fallback=True))
    assert res.correct and res.extracted == "Paris" and res.details["extraction"] == "answer_is"


def test_strip_thinking_is_linear_on_adversarial_text():
    text = "<think>" * 20000 + "x" * 10000
    start = time.perf_counter()
    assert extract_boxed(text) is None
    extract_answer("<answer>" * 20000 + "x", fallback=True)
    assert time.perf_counter() - start < 1.0


def test_extract_answer_fallbacks():
    assert extract_answer("the answer is 5", fallback=False) == (None, "none")
    assert extract_answer("<answer> Paris </answer>", fallback=True) == ("Paris", "answer_tag")
    assert extract_answer("<think>x</think>The final answer is: 12.", fallback=True) == ("12", "answer_is")
    assert extract_answer("Reasoning...\nParis", fallback=True) == ("Paris", "last_line")
    assert extract_answer("\\boxed{3} and <answer>4</answer>", fallback=True) == ("3", "boxed")


# --------------------------------------------------------------------------- math

MATH_CASES = [
    # (boxed prediction, reference, correct)
    ("\\frac{1}{2}", "0.5", True),
    ("0.5", "\\frac{1}{2}", True),
    ("\\dfrac12", "1/2", True),
    ("2\\sqrt{2}", "\\sqrt{8}", True),
    ("[1, 2)", "[1,2)", True),
    ("(1, 2]", "[1,2)", False),
    ("\\{3, 2, 1\\}", "\\{1,2,3\\}", True),
    ("x = 3", "3", True),
    ("50\\%", "50", True),
    ("5\\text{ cm}", "5", True),
    ("30^\\circ", "30", True),
    ("1{,}000", "1000", True),
    ("1,000", "1000", True),
    ("10.0", "10", True),
    ("b + a", "a+b", True),
    ("\\pi", "\\pi", True),
    ("3.14159", "\\pi", False),
    ("3", "2", False),
    ("-2", "2", False),
    ("\\frac{2}{3}", "0.6667", False),
    ("\\text{yes}", "Yes", True),
    ("I don't know", "7", False),
]


@pytest.mark.parametrize(("pred", "gold", "correct"), MATH_CASES)
def test_math_answers(pred, gold, correct):
    res = score_answer(f"<think>work</think> so \\boxed{{{pred}}}", gold, "math")
    assert res.correct is correct, res.details
    assert res.reward == (1.0 if correct else 0.0)
    assert res.extracted == pred


def test_math_candidates_and_list_answers():
    assert score_answer("\\boxed{4}", "2", AnswerType.MATH, candidates=["4"]).correct
    assert score_answer("\\boxed{-2}", ["2", "-2"], "math").correct


def test_math_rel_tol_knob():
    text = "\\boxed{0.3333}"
    assert not score_answer(text, "1/3", "math").correct
    res = score_answer(text, "1/3", "math", cfg=RewardConfig(math_rel_tol=1e-3))
    assert res.correct and res.details["method"] == "rel_tol"


def test_math_timeout_counts_as_wrong_and_returns_quickly():
    cfg = RewardConfig(math_timeout_s=0.5)
    start = time.perf_counter()
    res = score_answer("\\boxed{9^{9^{9^{9}}}}", "1", "math", cfg=cfg)
    assert time.perf_counter() - start < 5.0
    assert not res.correct
    assert res.details["method"] == "timeout"


def test_math_timeout_restores_an_outer_timer():
    import signal

    fired = []
    old = signal.signal(signal.SIGALRM, lambda *_: fired.append(1))
    try:
        signal.setitimer(signal.ITIMER_REAL, 30.0)
        assert score_answer("\\boxed{2}", "2", "math").correct
        remaining, _ = signal.getitimer(signal.ITIMER_REAL)
        assert 20.0 < remaining <= 30.0
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert not fired


def test_math_in_a_worker_thread_uses_the_helper_process():
    cfg = RewardConfig(math_timeout_s=1.0)
    results: dict[str, object] = {}

    def work():
        results["ok"] = check_math(["0.5"], "\\frac{1}{2}", cfg)
        results["slow"] = check_math(["1"], "10^{10^{10}}", cfg)

    t = threading.Thread(target=work)
    start = time.perf_counter()
    t.start()
    t.join(60)
    assert not t.is_alive()
    assert results["ok"][0] is True
    assert results["slow"][0] is False and results["slow"][1]["method"] == "timeout"
    assert time.perf_counter() - start < 40


def test_too_long_answers_are_not_parsed():
    res = score_answer("\\boxed{" + "1+" * 1000 + "1}", "1001", "math")
    assert not res.correct and res.details["method"] == "too_long"


# --------------------------------------------------------------------------- multiple choice

OPTIONS = ["41", "42", "the Eiffel Tower", "none of these"]
MC_CASES = [
    # (boxed prediction, reference, options, correct)
    ("B", "B", None, True),
    ("(B)", "B", None, True),
    ("B.", "B", None, True),
    ("b", "B", None, True),
    ("[B]", "B", None, True),
    ("Option B", "B", None, True),
    ("The answer is (B)", "B", None, True),
    ("answer: b", "B", None, True),
    ("\\text{B}", "B", None, True),
    ("\\textbf{(B)}", "(B)", None, True),
    ("**B**", "B", None, True),
    ("B) 42", "B", OPTIONS, True),
    ("B. 42", "B", OPTIONS, True),
    ("C", "B", None, False),
    ("(C) 42", "B", OPTIONS, False),
    ("42", "B", OPTIONS, True),  # option text instead of the letter
    ("Eiffel Tower", "C", OPTIONS, True),
    ("It is the Eiffel Tower", "C", OPTIONS, True),
    ("41", "B", OPTIONS, False),
    ("dog", "A", {"A": "cat", "B": "dog"}, False),
    ("a cat", "A", {"A": "cat", "B": "dog"}, True),  # "a cat" is the option text, not letter A
    ("B", "42", OPTIONS, True),  # reference given as option text
    ("E", "B", OPTIONS, False),  # E is not an option: no letter
    ("B", "B", ["A. 41", "B. 42"], True),
]


@pytest.mark.parametrize(("pred", "gold", "options", "correct"), MC_CASES)
def test_multiple_choice(pred, gold, options, correct):
    res = score_answer(f"\\boxed{{{pred}}}", gold, "multiple_choice", options=options)
    assert res.correct is correct, res.details


def test_extract_choice_respects_valid_letters():
    assert extract_choice("D", valid=["A", "B", "C"]) is None
    assert extract_choice("Choice: C", valid=["A", "B", "C"]) == "C"
    assert extract_choice("A cat") is None
    assert extract_choice("I think so") is None


# --------------------------------------------------------------------------- short answer

SHORT_CASES = [
    # (boxed prediction, reference, candidates, correct)
    ("The Eiffel Tower", "Eiffel tower", None, True),
    ("eiffel-tower!", "Eiffel Tower", None, True),
    ("Café", "cafe", None, True),
    ("1,000", "1000", None, True),
    ("1,000,000 people", "1000000", None, True),
    ("3.50", "3.5", None, True),
    ("three", "3", None, True),
    ("Ｐａｒｉｓ", "Paris", None, True),  # fullwidth letters (NFKC)
    ("It is Paris, France", "Paris", None, True),  # contained as whole words in a short answer
    ("Parisian", "Paris", None, False),  # not a whole word
    ("NYC", "New York City", ["NYC", "New York"], True),
    ("London", "Paris", None, False),
    ("the", "the", None, False),  # nothing left after normalisation
    ("Paris " + "filler " * 20, "Paris", None, False),  # too long to count as containing it
    ("\\text{Paris}", "Paris", None, True),
    ("Obama's", "Obamas", None, True),
    ("-5", "5", None, False),
]


@pytest.mark.parametrize(("pred", "gold", "cands", "correct"), SHORT_CASES)
def test_short_answer(pred, gold, cands, correct):
    res = score_answer(f"\\boxed{{{pred}}}", gold, "short_answer", candidates=cands)
    assert res.correct is correct, res.details


def test_short_answer_exact_only_when_containment_disabled():
    cfg = RewardConfig(contain_max_words=0)
    assert not score_answer("\\boxed{It is Paris}", "Paris", "short_answer", cfg=cfg).correct
    assert score_answer("\\boxed{paris}", "Paris", "short_answer", cfg=cfg).correct


def test_normalize_answer():
    assert normalize_answer("  The  Quick, brown FOX! ") == "quick brown fox"
    assert normalize_answer("1,234.50 km") == "1234.5 km"
    assert normalize_answer("Ångström") == "angstrom"


# --------------------------------------------------------------------------- format term and result

FORMAT_CASES = [
    ("<think>reasoning</think> The answer is \\boxed{4}.", True),
    ("reasoning (opening tag pre-filled)</think>\\boxed{4}", True),
    ("<think></think>\\boxed{4}", False),  # empty thinking
    ("<think>reasoning</think> The answer is 4.", False),  # no box
    ("\\boxed{4}", False),  # no thinking
    ("<think>reasoning \\boxed{4}</think> done", False),  # box only inside thinking
    ("<think>a</think>\\boxed{4}<think>more", False),  # reopened thinking
    ("<think>a</think>\\boxed{}", False),  # empty box
]


@pytest.mark.parametrize(("text", "ok"), FORMAT_CASES)
def test_check_format(text, ok):
    assert check_format(text) is ok


def test_format_weight_adds_to_reward():
    cfg = RewardConfig(format_weight=0.1)
    good = score_answer("<think>r</think>\\boxed{4}", "4", "math", cfg=cfg)
    assert good.correct and good.format_ok and good.reward == pytest.approx(1.1)
    wrong_but_formatted = score_answer("<think>r</think>\\boxed{5}", "4", "math", cfg=cfg)
    assert not wrong_but_formatted.correct and wrong_but_formatted.reward == pytest.approx(0.1)
    right_unformatted = score_answer("\\boxed{4}", "4", "math", cfg=cfg)
    assert right_unformatted.correct and not right_unformatted.format_ok and right_unformatted.reward == 1.0
    assert score_answer("<think>r</think>\\boxed{4}", "4", "math").reward == 1.0  # default weight 0


def test_custom_reward_values_and_result_fields():
    cfg = RewardConfig(correct_reward=2.0, wrong_reward=-1.0)
    res = score_answer("nothing boxed", "4", "math", cfg=cfg)
    assert isinstance(res, RewardResult)
    assert res.reward == -1.0 and res.extracted is None and res.details["method"] == "no_answer"
    assert score_answer("\\boxed{4}", 4, "math", cfg=cfg).reward == 2.0  # numeric reference


def test_config_validation_and_bad_answer_type():
    with pytest.raises(ValueError, match="math_timeout_mode"):
        RewardConfig(math_timeout_mode="never")
    with pytest.raises(ValueError, match="format_weight"):
        RewardConfig(format_weight=-1.0)
    with pytest.raises(ValueError, match="answer_type"):
        score_answer("\\boxed{1}", "1", "essay")


def test_odd_inputs_do_not_raise():
    for text in (None, 123, "", "\\boxed{", "}}}{{{", "\x00\\boxed{\x00}"):
        for kind in ("math", "multiple_choice", "short_answer"):
            res = score_answer(text, "1", kind)  # type: ignore[arg-type]
            assert res.correct is False
    assert score_answer("\\boxed{1}", None, "math").details["method"] == "no_reference"


# --------------------------------------------------------------------------- fuzz

_PIECES = st.sampled_from(
    [
        "\\boxed{",
        "}",
        "{",
        "\\fbox",
        "<think>",
        "</think>",
        "\\frac",
        "\\sqrt",
        "^",
        "\\{",
        "\\}",
        "(",
        "B)",
        "$",
        "\\text{",
        "1,000",
        "=",
        "\\",
        "%",
    ]
)
_FUZZ_TEXT = st.lists(st.one_of(st.text(max_size=12), _PIECES), max_size=25).map("".join)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    text=_FUZZ_TEXT,
    gold=st.sampled_from(["\\frac{1}{2}", "B", "Paris", "[1,2)", "x^2", ""]),
    kind=st.sampled_from(["math", "multiple_choice", "short_answer"]),
)
def test_fuzz_never_raises(text, gold, kind):
    res = score_answer(
        text, gold, kind, options=["a", "b"], cfg=RewardConfig(math_timeout_s=1.0, format_weight=0.5)
    )
    assert isinstance(res.reward, float)
    assert res.reward in (0.0, 0.5, 1.0, 1.5)
    assert res.extracted is None or isinstance(res.extracted, str)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_fuzz_extractors_never_raise(text):
    extract_boxed(text)
    extract_answer(text, fallback=True)
    check_format(text)
    normalize_answer(text)
    extract_choice(text)

"""Verifiable rewards: extract the model's final answer and check it against the reference.

Three answer types are supported:

* ``math``: numeric or symbolic answers, compared with math-verify (LaTeX fractions, roots,
  intervals, sets, equations, percentages and units are handled by its normaliser). Every
  comparison runs under a wall-clock budget: a SIGALRM timer when called from the main thread,
  otherwise a persistent helper process that is killed if it overruns (math-verify's own timeout
  uses ``signal.alarm`` and cannot work in a worker thread).
* ``multiple_choice``: an option letter (``B``, ``(B)``, ``B.``, ``Option B``, ``\\text{B}``,
  ``B) 42``), falling back to matching the option's text when the model wrote that instead.
* ``short_answer``: SQuAD-style normalised exact match against the reference and any candidate
  answers, or a candidate contained as whole words in a short prediction.

The final answer is the content of the last ``\\boxed{...}`` outside ``<think>`` blocks. The
reward is ``correct_reward`` (or ``wrong_reward``) plus ``format_weight`` when the text has a
thinking block followed by a boxed answer. `score_answer` never raises on model output.
"""

from __future__ import annotations

import atexit
import contextlib
import enum
import json
import logging
import math
import os
import re
import select
import signal
import subprocess
import sys
import threading
import time
import unicodedata
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any

from axpo_nemo.core.config import ValidatedConfig, setting

logger = logging.getLogger(__name__)


class AnswerType(enum.StrEnum):
    """How a reference answer is checked."""

    MATH = "math"
    MULTIPLE_CHOICE = "multiple_choice"
    SHORT_ANSWER = "short_answer"


ANSWER_TYPES = tuple(t.value for t in AnswerType)
MATH_TIMEOUT_MODES = ("auto", "process", "none")


@dataclass
class RewardConfig(ValidatedConfig):
    """Settings of the verifiable reward."""

    correct_reward: float = setting(1.0, "Reward of a correct answer.")
    wrong_reward: float = setting(0.0, "Reward of a wrong or missing answer.")
    format_weight: float = setting(
        0.0,
        "Added to the reward when the final text has a <think>…</think> block followed by a "
        "non-empty \\boxed{} answer (0 disables the format term).",
        ge=0.0,
    )
    answer_fallback: bool = setting(
        False,
        "When the text has no \\boxed{} answer, fall back to an <answer>…</answer> tag, then a "
        "'the answer is X' phrase, then a short last line. False: no box means no answer.",
    )
    max_answer_chars: int = setting(
        1000, "Longer extracted answers are judged wrong without being parsed.", ge=1
    )
    math_timeout_s: float = setting(
        5.0, "Wall-clock budget of one math comparison (parsing and verifying).", gt=0.0
    )
    math_timeout_mode: str = setting(
        "auto",
        "How the math budget is enforced: 'auto' (SIGALRM timer in the main thread, a helper "
        "process elsewhere), 'process' (always the helper process) or 'none' (no limit).",
        choices=MATH_TIMEOUT_MODES,
    )
    math_float_rounding: int = setting(
        6, "Decimal places math-verify rounds floats to before comparing.", ge=0, le=15
    )
    math_rel_tol: float = setting(
        0.0,
        "Extra relative tolerance for answers that are plain numbers, tried when math-verify "
        "says no (0: math-verify's rounding only).",
        ge=0.0,
    )
    contain_max_words: int = setting(
        10,
        "short_answer: a prediction of at most this many (normalised) words is correct when it "
        "contains a candidate as whole words; 0 allows exact matches only.",
        ge=0,
    )


@dataclass
class RewardResult:
    """The outcome of checking one response.

    Attributes:
        reward: the scalar reward (correctness plus the weighted format term).
        correct: whether the extracted answer matches the reference.
        extracted: the final answer found in the text, or None.
        format_ok: whether the text has a thinking block followed by a boxed answer.
        details: per-sample information for logging (method, normalised forms, errors).
    """

    reward: float
    correct: bool
    extracted: str | None
    format_ok: bool
    details: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- extraction

_THINK_OPEN = "<think>"
_THINK_CLOSE = "</think>"
_BOX_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")


def strip_thinking(text: str) -> str:
    """The text outside ``<think>…</think>`` blocks, where the final answer lives.

    A ``</think>`` without an opening tag (the chat template pre-fills ``<think>``) ends thinking
    that started at the beginning of the text; an unclosed ``<think>`` runs to the end.
    Linear in the text's length.
    """
    parts: list[str] = []
    pos = 0
    while True:
        o = text.find(_THINK_OPEN, pos)
        c = text.find(_THINK_CLOSE, pos)
        if o == -1 and c == -1:
            parts.append(text[pos:])
            break
        if c != -1 and (o == -1 or c < o):
            parts = []  # stray close tag: everything so far was thinking
            pos = c + len(_THINK_CLOSE)
            continue
        parts.append(text[pos:o])
        if c == -1:
            break  # unclosed thinking block runs to the end
        pos = c + len(_THINK_CLOSE)
    return "".join(parts)


def _balanced_group(text: str, start: int) -> str | None:
    """The content of the brace group whose ``{`` is just before ``start``; None if unclosed."""
    depth = 1
    i = start
    n = len(text)
    while i < n:
        ch = text[i]
        if ch == "\\":
            i += 2  # escaped character, e.g. \{ or \}
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[start:i]
        i += 1
    return None


def extract_boxed(text: str) -> str | None:
    """The stripped content of the last ``\\boxed{…}`` (or ``\\fbox{…}``) outside thinking.

    Braces nest (``\\boxed{\\frac{1}{2}}``), escaped braces are skipped, and whitespace may precede
    the brace (``\\boxed {x}``). Returns None when there is no box, or when the last one is never
    closed (a truncated answer is no answer, even if an earlier box was complete).
    """
    if not isinstance(text, str):
        return None
    region = strip_thinking(text)
    last = None
    for last in _BOX_RE.finditer(region):  # noqa: B007 - we want the final match
        pass
    if last is None:
        return None
    content = _balanced_group(region, last.end())
    return None if content is None else content.strip()


_ANSWER_IS_RE = re.compile(r"(?i:(?:final\s+)?answer(?:\s+is)?\s*[:：]?\s*)(.+?)(?:\.\s*$|\n|$)", re.S)


def extract_answer(text: str, fallback: bool = False) -> tuple[str | None, str]:
    """The final answer and how it was found (``boxed``, ``answer_tag``, ``answer_is``, ``last_line``).

    Without ``fallback`` only a boxed answer counts. Returns ``(None, "none")`` when nothing is
    found.
    """
    boxed = extract_boxed(text)
    if boxed is not None or not fallback:
        return boxed, ("boxed" if boxed is not None else "none")
    region = strip_thinking(text)
    lower = region.lower()
    close = lower.rfind("</answer>")
    if close >= 0:
        open_ = lower.rfind("<answer>", 0, close)
        if open_ >= 0:
            return region[open_ + len("<answer>") : close].strip(), "answer_tag"
    matches = list(_ANSWER_IS_RE.finditer(region))
    if matches:
        return matches[-1].group(1).strip(), "answer_is"
    lines = [ln.strip() for ln in region.strip().splitlines() if ln.strip()]
    if lines and len(lines[-1]) <= 100:
        return lines[-1], "last_line"
    return None, "none"


def check_format(text: str) -> bool:
    """Whether the text has non-empty thinking closed by ``</think>``, then a non-empty boxed answer.

    The opening ``<think>`` may be absent (pre-filled by the chat template). Nothing after the
    last ``</think>`` may open a new thinking block.
    """
    if not isinstance(text, str):
        return False
    close = text.rfind(_THINK_CLOSE)
    if close < 0:
        return False
    before = text[:close]
    start = 0
    o = before.rfind(_THINK_OPEN)
    if o >= 0:
        start = o + len(_THINK_OPEN)
    c = before.rfind(_THINK_CLOSE)
    if c >= 0:
        start = max(start, c + len(_THINK_CLOSE))
    if not before[start:].strip():
        return False
    after = text[close + len(_THINK_CLOSE) :]
    if _THINK_OPEN in after:
        return False
    boxed = extract_boxed(after)
    return bool(boxed)


# --------------------------------------------------------------------------- normalisation

_LATEX_WRAPPERS_RE = re.compile(
    r"\\(?:text|textbf|textit|textrm|texttt|mathrm|mathbf|mathit|mathsf|mathtt|operatorname|mbox|emph)\s*\{([^{}]*)\}"
)
_ARTICLES = frozenset({"a", "an", "the"})
_NUMBER_WORDS = {
    w: str(i)
    for i, w in enumerate(
        [
            "zero",
            "one",
            "two",
            "three",
            "four",
            "five",
            "six",
            "seven",
            "eight",
            "nine",
            "ten",
            "eleven",
            "twelve",
            "thirteen",
            "fourteen",
            "fifteen",
            "sixteen",
            "seventeen",
            "eighteen",
            "nineteen",
            "twenty",
        ]
    )
}
_THOUSANDS_RE = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_TOKEN_RE = re.compile(r"(?<![\w.])-?\d+(?:\.\d+)?|\d+(?:\.\d+)?|[^\W\d_]+")


def clean_latex(s: str) -> str:
    """Drop math delimiters, ``\\text{…}``-style wrappers and markdown emphasis from an answer."""
    for _ in range(5):
        new = _LATEX_WRAPPERS_RE.sub(r"\1", s)
        if new == s:
            break
        s = new
    for token in ("\\(", "\\)", "\\[", "\\]", "$", "**", "__", "`", "\\left", "\\right"):
        s = s.replace(token, " " if token.startswith("\\") else "")
    s = s.replace("\\%", "%").replace("\\,", " ").replace("\\!", "").replace("~", " ")
    return s.strip()


def _canonical_number(tok: str) -> str:
    """``'1000.0'`` → ``'1000'``, ``'0.50'`` → ``'0.5'``, ``'-0'`` → ``'0'``; other tokens unchanged."""
    try:
        d = Decimal(tok)
    except InvalidOperation:
        return tok
    if not d.is_finite():
        return tok
    if d == 0:
        return "0"
    out = format(d.normalize(), "f")
    if "." in out:
        out = out.rstrip("0").rstrip(".")
    return out


def normalize_tokens(s: str) -> list[str]:
    """Normalised words of an answer: NFKC, accents folded, lowercase, punctuation and articles
    dropped, thousands separators removed, numbers canonical and number words as digits."""
    s = clean_latex(str(s))
    s = unicodedata.normalize("NFKC", s)
    s = "".join(ch for ch in unicodedata.normalize("NFKD", s) if not unicodedata.combining(ch))
    s = s.lower().replace("'", "").replace("\u2019", "")
    s = _THOUSANDS_RE.sub("", s)
    out = []
    for tok in _TOKEN_RE.findall(s):
        if tok in _ARTICLES:
            continue
        tok = _NUMBER_WORDS.get(tok, tok)
        if tok[0].isdigit() or tok[0] == "-":
            tok = _canonical_number(tok)
        out.append(tok)
    return out


def normalize_answer(s: str) -> str:
    """`normalize_tokens` joined with single spaces: the form short answers are compared in."""
    return " ".join(normalize_tokens(s))


def _contains(haystack: list[str], needle: list[str]) -> bool:
    """Whether ``needle`` occurs as a contiguous run of whole tokens in ``haystack``."""
    n = len(needle)
    if n == 0 or n > len(haystack):
        return False
    return any(haystack[i : i + n] == needle for i in range(len(haystack) - n + 1))


# --------------------------------------------------------------------------- short answer


def _check_short_answer(pred: str, golds: list[str], cfg: RewardConfig) -> tuple[bool, dict[str, Any]]:
    """Normalised exact match, else a candidate contained as whole words in a short prediction."""
    ptoks = normalize_tokens(pred)
    gtoks = [normalize_tokens(g) for g in golds]
    details: dict[str, Any] = {"pred_norm": " ".join(ptoks), "gold_norm": [" ".join(g) for g in gtoks]}
    if ptoks and any(ptoks == g for g in gtoks):
        return True, {**details, "method": "exact"}
    if 0 < len(ptoks) <= cfg.contain_max_words and any(_contains(ptoks, g) for g in gtoks):
        return True, {**details, "method": "contains"}
    return False, {**details, "method": "no_match"}


# --------------------------------------------------------------------------- multiple choice

_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_MC_PREFIX = r"^(?i:(?:the\s+)?(?:correct\s+|final\s+)?(?:answer|option|choice)(?:\s+is)?)\s*[:：\-]?\s*"
_MC_PATTERNS = (
    # a lone letter, possibly wrapped: B, (B), [B], B., b
    re.compile(r"^[\(\[\{]?\s*([A-Za-z])\s*[\)\]\}]?\s*[.:]?$"),
    # an explicit prefix: Option B, answer: b, The correct answer is B) 42
    re.compile(_MC_PREFIX + r"[\(\[]?\s*([A-Za-z])\s*[\)\]]?\s*[.:]?$"),
    re.compile(_MC_PREFIX + r"[\(\[]?\s*([A-Z])(?![A-Za-z])"),
    # a leading letter with a delimiter: (B) 42, B) 42, B. 42, B: 42
    re.compile(r"^[\(\[]\s*([A-Z])\s*[\)\]]"),
    re.compile(r"^([A-Z])\s*[.):](?:\s|$)"),
)


def _options_map(options: Sequence[Any] | Mapping[Any, Any] | None) -> dict[str, str]:
    """Options as ``{letter: text}``; list items get letters A, B, … in order."""
    if options is None:
        return {}
    if isinstance(options, Mapping):
        items = [(str(k).strip().upper(), v) for k, v in options.items()]
    elif isinstance(options, str):
        return {}
    else:
        items = list(zip(_LETTERS, options, strict=False))
    out = {}
    for letter, text in items:
        t = str(text).strip()
        # "A. cat" in a list of options: drop the redundant letter prefix
        m = re.match(rf"^[\(\[]?{re.escape(letter)}[\)\]]?[.:)]\s*(.*)$", t, re.S)
        out[letter] = m.group(1) if m else t
    return out


def extract_choice(text: str, valid: Sequence[str] | None = None) -> str | None:
    """The option letter an answer names (``B``, ``(B)``, ``Option B``, ``\\text{B}``, ``B) 42``).

    ``valid`` restricts the letters accepted (default A-Z). A lone lowercase letter counts; a
    letter followed by more text must be uppercase, so "a cat" is not option A.
    """
    s = clean_latex(unicodedata.normalize("NFKC", str(text))).strip()
    s = s.strip("*_ ").strip()
    allowed = {v.upper() for v in valid} if valid else set(_LETTERS)
    for pat in _MC_PATTERNS:
        m = pat.match(s)
        if m:
            letter = m.group(1).upper()
            if letter in allowed:
                return letter
    return None


def _check_multiple_choice(
    pred: str, golds: list[str], options: Mapping[str, str], cfg: RewardConfig
) -> tuple[bool, dict[str, Any]]:
    """Compare option letters; map option text to its letter on either side when needed."""
    valid = list(options) or None
    norm_opts = {k: normalize_tokens(v) for k, v in options.items()}

    def by_text(s: str, allow_contains: bool) -> str | None:
        """The one option whose text ``s`` equals (or, if allowed, contains as whole words)."""
        toks = normalize_tokens(s)
        if not toks:
            return None
        exact = [k for k, v in norm_opts.items() if v and v == toks]
        if len(exact) == 1:
            return exact[0]
        if allow_contains and len(toks) <= max(cfg.contain_max_words, 1):
            hits = [k for k, v in norm_opts.items() if v and _contains(toks, v)]
            if len(hits) == 1:
                return hits[0]
        return None

    gold_letters = set()
    for g in golds:
        letter = extract_choice(g, valid) or by_text(g, allow_contains=False)
        if letter:
            gold_letters.add(letter)
    details: dict[str, Any] = {"gold_letters": sorted(gold_letters)}
    letter = extract_choice(pred, valid)
    method = "letter"
    if letter is None and options:
        letter = by_text(pred, allow_contains=True)
        method = "option_text"
    details["pred_letter"] = letter
    if letter is not None and gold_letters:
        return letter in gold_letters, {**details, "method": method}
    if not gold_letters:
        # reference names no option (no options given, or text outside them): compare text
        ok, sub = _check_short_answer(pred, golds, cfg)
        return ok, {**details, **sub, "method": "text_" + sub["method"]}
    return False, {**details, "method": "no_letter"}


# --------------------------------------------------------------------------- math


class _MathTimeout(BaseException):
    """Raised by the SIGALRM handler; a BaseException so math-verify's handlers let it through."""


_mv_filter_installed = False


class _DropTimeoutDisabledWarning(logging.Filter):
    """Hide math-verify's 'timeout is disabled' warning: we enforce our own budget."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Keep every record but that warning."""
        return "Timeout is disabled" not in record.getMessage()


def _install_mv_filter() -> None:
    """Attach the warning filter to math-verify's loggers once."""
    global _mv_filter_installed
    if not _mv_filter_installed:
        for name in ("math_verify.parser", "math_verify.grader"):
            logging.getLogger(name).addFilter(_DropTimeoutDisabledWarning())
        _mv_filter_installed = True


def _as_float(x: Any) -> float | None:
    """A parsed math-verify value as a finite float when it is a plain number, else None."""
    try:
        import sympy

        if isinstance(x, sympy.Basic) and x.is_number and x.is_real:
            v = float(x)
            return v if math.isfinite(v) else None
    except Exception:
        return None
    return None


def _math_verify_check(
    golds: list[str], pred: str, float_rounding: int, rel_tol: float
) -> tuple[bool, dict[str, Any]]:
    """Parse and verify with math-verify, without any timeout of its own (the caller bounds it)."""
    from math_verify import parse, verify

    _install_mv_filter()
    pred_parsed = parse("\\boxed{" + pred + "}", parsing_timeout=None)
    details: dict[str, Any] = {"pred_parsed": [str(p)[:200] for p in pred_parsed[:1]]}
    if not pred_parsed:
        details["method"] = "unparsable_pred"
    gold_strings = []
    word_golds: list[str] = []
    for g in golds:
        g_text = g if "\\boxed" in g else "\\boxed{" + g + "}"
        gold_parsed = parse(g_text, parsing_timeout=None)
        gold_strings.append([str(x)[:200] for x in gold_parsed[:1]])
        if not gold_parsed:
            word_golds.append(g)  # not math: compared as normalised strings below
            continue
        if pred_parsed and verify(
            gold_parsed, pred_parsed, float_rounding=float_rounding, timeout_seconds=None
        ):
            return True, {**details, "gold_parsed": gold_strings, "method": "math_verify"}
        if rel_tol > 0 and pred_parsed:
            gv, pv = _as_float(gold_parsed[0]), _as_float(pred_parsed[0])
            if gv is not None and pv is not None and math.isclose(gv, pv, rel_tol=rel_tol):
                return True, {**details, "gold_parsed": gold_strings, "method": "rel_tol"}
    details["gold_parsed"] = gold_strings
    # references that are words, not math ("yes", "\\text{east}"): normalised string match
    pn = normalize_answer(pred)
    if pn and any(pn == normalize_answer(g) for g in word_golds):
        return True, {**details, "method": "string"}
    details.setdefault("method", "math_verify")
    return False, details


@contextlib.contextmanager
def _alarm(seconds: float) -> Iterator[None]:
    """Raise `_MathTimeout` in the main thread after ``seconds``; restores any outer timer."""

    def handler(signum: int, frame: Any) -> None:
        """Interrupt the running check."""
        raise _MathTimeout()

    old_handler = signal.signal(signal.SIGALRM, handler)
    prev_delay, prev_interval = signal.setitimer(signal.ITIMER_REAL, seconds)
    start = time.monotonic()
    try:
        yield
    finally:
        try:
            signal.setitimer(signal.ITIMER_REAL, 0)
        finally:
            signal.signal(signal.SIGALRM, old_handler)
            if prev_delay > 0:  # someone else's timer (e.g. pytest-timeout) was running
                remaining = max(prev_delay - (time.monotonic() - start), 1e-3)
                signal.setitimer(signal.ITIMER_REAL, remaining, prev_interval)


_math_ready = False


def _warm_up_math() -> None:
    """Import math-verify and sympy and parse once, so the first timed check does not pay for it."""
    global _math_ready
    if _math_ready:
        return
    from math_verify import parse, verify

    _install_mv_filter()
    verify(
        parse("\\boxed{\\frac{1}{2}}", parsing_timeout=None),
        parse("\\boxed{0.5}", parsing_timeout=None),
        timeout_seconds=None,
    )
    _math_ready = True


def _check_in_main_thread(
    golds: list[str], pred: str, cfg: RewardConfig, timeout_s: float | None
) -> tuple[bool, dict[str, Any]]:
    """Run `_math_verify_check` under a SIGALRM budget (``timeout_s`` None: unbounded)."""
    if timeout_s is None:
        return _math_verify_check(golds, pred, cfg.math_float_rounding, cfg.math_rel_tol)
    _warm_up_math()  # one-off import cost stays outside the budget
    try:
        with _alarm(timeout_s):
            return _math_verify_check(golds, pred, cfg.math_float_rounding, cfg.math_rel_tol)
    except _MathTimeout:
        return False, {"method": "timeout", "error": f"math check exceeded {timeout_s:g} s"}


class _MathWorker:
    """A helper Python process that runs math checks, so a stuck one can be killed."""

    def __init__(self) -> None:
        code = "from axpo_nemo.agent.rewards import _worker_main; _worker_main()"
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            bufsize=1,
        )

    def run(self, payload: dict[str, Any], timeout_s: float) -> dict[str, Any] | None:
        """Send one job; its result, or None when it did not answer within ``timeout_s``."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(payload) + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout_s)
        if not ready:
            return None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("math worker exited")
        return json.loads(line)

    def close(self) -> None:
        """Kill the process."""
        with contextlib.suppress(Exception):
            self.proc.kill()
            self.proc.wait(timeout=5)
        for stream in (self.proc.stdin, self.proc.stdout):
            with contextlib.suppress(Exception):
                stream.close()  # type: ignore[union-attr]


_POOL_LOCK = threading.Lock()
_IDLE_WORKERS: list[_MathWorker] = []
_MAX_IDLE_WORKERS = max(2, min(8, os.cpu_count() or 2))
# first use pays the interpreter start-up and imports; later jobs get only the budget
_WORKER_STARTUP_S = 30.0


def _close_idle_workers() -> None:
    """Terminate the idle helper processes (at interpreter exit)."""
    with _POOL_LOCK:
        workers = list(_IDLE_WORKERS)
        _IDLE_WORKERS.clear()
    for w in workers:
        w.close()


atexit.register(_close_idle_workers)


def _check_in_process(golds: list[str], pred: str, cfg: RewardConfig) -> tuple[bool, dict[str, Any]]:
    """Run the check in a helper process, killing it if it overruns the budget."""
    with _POOL_LOCK:
        worker = _IDLE_WORKERS.pop() if _IDLE_WORKERS else None
    fresh = worker is None
    worker = worker or _MathWorker()
    payload = {
        "golds": golds,
        "pred": pred,
        "float_rounding": cfg.math_float_rounding,
        "rel_tol": cfg.math_rel_tol,
        "timeout_s": cfg.math_timeout_s,
    }
    wait = cfg.math_timeout_s + 1.0 + (_WORKER_STARTUP_S if fresh else 0.0)
    try:
        out = worker.run(payload, wait)
    except Exception as e:
        worker.close()
        return False, {"method": "error", "error": f"math worker failed: {e!r}"}
    if out is None:
        worker.close()
        return False, {"method": "timeout", "error": f"math check exceeded {cfg.math_timeout_s:g} s"}
    with _POOL_LOCK:
        keep = len(_IDLE_WORKERS) < _MAX_IDLE_WORKERS
        if keep:
            _IDLE_WORKERS.append(worker)
    if not keep:
        worker.close()
    return bool(out.get("correct")), dict(out.get("details") or {})


def _worker_main() -> None:
    """Entry point of a helper process: JSON jobs on stdin, JSON results on stdout."""
    out = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    sys.stdout = sys.stderr  # nothing but results may reach the protocol stream
    logging.disable(logging.CRITICAL)
    _warm_up_math()
    cfg_cache: dict[tuple[int, float], RewardConfig] = {}
    for line in sys.stdin:
        try:
            job = json.loads(line)
            key = (int(job["float_rounding"]), float(job["rel_tol"]))
            if key not in cfg_cache:
                cfg_cache[key] = RewardConfig(math_float_rounding=key[0], math_rel_tol=key[1])
            correct, details = _check_in_main_thread(
                list(job["golds"]), str(job["pred"]), cfg_cache[key], float(job["timeout_s"])
            )
        except Exception as e:
            correct, details = False, {"method": "error", "error": repr(e)[:500]}
        out.write(json.dumps({"correct": correct, "details": _jsonable(details)}) + "\n")


def _jsonable(obj: Any) -> Any:
    """Details made JSON-safe (non-serialisable leaves become strings)."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    return str(obj)


def check_math(
    golds: Sequence[str], pred: str, cfg: RewardConfig | None = None
) -> tuple[bool, dict[str, Any]]:
    """Whether ``pred`` equals any of ``golds`` mathematically, within ``cfg.math_timeout_s``.

    Returns ``(correct, details)``; timeouts and math-verify errors count as wrong.
    """
    cfg = cfg or RewardConfig()
    golds = [str(g) for g in golds]
    in_main = threading.current_thread() is threading.main_thread() and hasattr(signal, "SIGALRM")
    mode = cfg.math_timeout_mode
    try:
        if mode == "none":
            return _check_in_main_thread(golds, pred, cfg, None)
        if mode == "auto" and in_main:
            return _check_in_main_thread(golds, pred, cfg, cfg.math_timeout_s)
        return _check_in_process(golds, pred, cfg)
    except _MathTimeout:
        return False, {"method": "timeout", "error": f"math check exceeded {cfg.math_timeout_s:g} s"}
    except Exception as e:
        return False, {"method": "error", "error": repr(e)[:500]}


# --------------------------------------------------------------------------- scoring


def _reference_list(answer: Any, candidates: Sequence[Any] | None) -> list[str]:
    """The reference answer plus any alternative candidates, as non-empty strings."""
    refs: list[Any] = []
    if isinstance(answer, list | tuple):
        refs.extend(answer)
    elif answer is not None:
        refs.append(answer)
    if candidates is not None and not isinstance(candidates, str):
        refs.extend(candidates)
    elif isinstance(candidates, str):
        refs.append(candidates)
    return [str(r) for r in refs if r is not None and str(r).strip()]


def score_answer(
    response_text: str,
    answer: Any,
    answer_type: AnswerType | str,
    candidates: Sequence[Any] | None = None,
    options: Sequence[Any] | Mapping[Any, Any] | None = None,
    cfg: RewardConfig | None = None,
) -> RewardResult:
    """Score a model response against the reference answer.

    Args:
        response_text: the final assistant text (or the whole generated text: the last boxed
            answer outside thinking counts).
        answer: the reference answer (a string or number; a list means several accepted ones).
        answer_type: ``math``, ``multiple_choice`` or ``short_answer``.
        candidates: further accepted answers (aliases).
        options: multiple-choice options, a list (letters A, B, … in order) or ``{letter: text}``.
        cfg: reward settings.

    Returns:
        A `RewardResult`. Model output never makes this raise; an unknown ``answer_type`` (a data
        bug, not a model error) raises ValueError.
    """
    cfg = cfg or RewardConfig()
    try:
        kind = AnswerType(answer_type)
    except ValueError:
        raise ValueError(
            f"answer_type must be one of {', '.join(ANSWER_TYPES)} (got {answer_type!r})"
        ) from None
    start = time.perf_counter()
    text = (
        response_text
        if isinstance(response_text, str)
        else ("" if response_text is None else str(response_text))
    )
    details: dict[str, Any] = {"answer_type": kind.value}
    correct = False
    extracted: str | None = None
    fmt = False
    try:
        fmt = check_format(text)
        extracted, how = extract_answer(text, cfg.answer_fallback)
        details["extraction"] = how
        golds = _reference_list(answer, candidates)
        if extracted is None or not extracted.strip():
            details["method"] = "no_answer"
        elif len(extracted) > cfg.max_answer_chars:
            details["method"] = "too_long"
        elif not golds:
            details["method"] = "no_reference"
        elif kind is AnswerType.MATH:
            correct, sub = check_math(golds, extracted, cfg)
            details.update(sub)
        elif kind is AnswerType.MULTIPLE_CHOICE:
            correct, sub = _check_multiple_choice(extracted, golds, _options_map(options), cfg)
            details.update(sub)
        else:
            correct, sub = _check_short_answer(extracted, golds, cfg)
            details.update(sub)
    except Exception as e:  # never let a strange output crash training
        correct = False
        details["method"] = "error"
        details["error"] = repr(e)[:500]
    details["elapsed_s"] = round(time.perf_counter() - start, 6)
    reward = (cfg.correct_reward if correct else cfg.wrong_reward) + cfg.format_weight * float(fmt)
    return RewardResult(
        reward=float(reward), correct=bool(correct), extracted=extracted, format_ok=fmt, details=details
    )


__all__ = [
    "ANSWER_TYPES",
    "AnswerType",
    "RewardConfig",
    "RewardResult",
    "check_format",
    "check_math",
    "clean_latex",
    "extract_answer",
    "extract_boxed",
    "extract_choice",
    "normalize_answer",
    "normalize_tokens",
    "score_answer",
    "strip_thinking",
]

"""Answer normalisation (LaTeX clean-up, SQuAD-style tokens) and the short-answer check."""

from __future__ import annotations

import re
import unicodedata
from decimal import Decimal, InvalidOperation
from typing import Any

from axpo_nemo.agent.rewards.config import RewardConfig

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

"""Multiple-choice answers: option letters, option text mapped to its letter."""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Mapping, Sequence
from typing import Any

from axpo_nemo.agent.rewards.config import RewardConfig
from axpo_nemo.agent.rewards.normalize import _check_short_answer, _contains, clean_latex, normalize_tokens

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

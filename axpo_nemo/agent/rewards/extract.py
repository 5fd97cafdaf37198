"""Answer extraction: the text outside thinking, the last boxed answer, fallbacks, the format check."""

from __future__ import annotations

import re

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

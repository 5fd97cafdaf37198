"""What every search backend shares: the passage and error types, the backend protocol, and the
text handling (tokenizer with its stopwords, title splitting, truncation)."""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from axpo_nemo.agent.tools.search_config import SEARCH_BACKENDS as SEARCH_BACKENDS


@dataclass
class Passage:
    """One retrieved passage."""

    title: str
    text: str
    score: float
    id: str


class SearchError(RuntimeError):
    """A backend could not answer (server down, timeouts, malformed response)."""


@runtime_checkable
class SearchBackend(Protocol):
    """Anything that returns the ``k`` best passages for a query."""

    def search(self, query: str, k: int) -> list[Passage]:
        """The top ``k`` passages, best first; raises `SearchError` when the service fails."""
        ...


# --------------------------------------------------------------------------- text helpers

STOPWORDS = frozenset(
    [
        "a",
        "about",
        "above",
        "after",
        "again",
        "against",
        "all",
        "am",
        "an",
        "and",
        "any",
        "are",
        "as",
        "at",
        "be",
        "because",
        "been",
        "before",
        "being",
        "below",
        "between",
        "both",
        "but",
        "by",
        "can",
        "could",
        "did",
        "do",
        "does",
        "doing",
        "down",
        "during",
        "each",
        "few",
        "for",
        "from",
        "further",
        "had",
        "has",
        "have",
        "having",
        "he",
        "her",
        "here",
        "hers",
        "herself",
        "him",
        "himself",
        "his",
        "how",
        "i",
        "if",
        "in",
        "into",
        "is",
        "it",
        "its",
        "itself",
        "just",
        "me",
        "more",
        "most",
        "my",
        "myself",
        "no",
        "nor",
        "not",
        "of",
        "off",
        "on",
        "once",
        "only",
        "or",
        "other",
        "our",
        "ours",
        "ourselves",
        "out",
        "over",
        "own",
        "same",
        "she",
        "should",
        "so",
        "some",
        "such",
        "than",
        "that",
        "the",
        "their",
        "theirs",
        "them",
        "themselves",
        "then",
        "there",
        "these",
        "they",
        "this",
        "those",
        "through",
        "to",
        "too",
        "under",
        "until",
        "up",
        "very",
        "was",
        "we",
        "were",
        "what",
        "when",
        "where",
        "which",
        "while",
        "who",
        "whom",
        "why",
        "will",
        "with",
        "would",
        "you",
        "your",
        "yours",
        "yourself",
        "yourselves",
    ]
)
_WORD_RE = re.compile(r"[^\W_]+")


def tokenize(text: str) -> list[str]:
    """Lowercase words of ``text`` (NFKC, accents folded), without English stopwords."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = "".join(ch for ch in unicodedata.normalize("NFKD", text) if not unicodedata.combining(ch))
    return [w for w in _WORD_RE.findall(text) if w not in STOPWORDS]


def split_title(contents: str) -> tuple[str, str]:
    """Split Search-R1 ``contents`` (``'"Title"\\ntext…'``) into title and text.

    Without a newline, or when the first line is long (not a title), the title is empty.
    """
    head, sep, rest = contents.partition("\n")
    head = head.strip()
    if not sep or len(head) > 300:
        return "", contents.strip()
    if len(head) >= 2 and head[0] == head[-1] == '"':
        head = head[1:-1].strip()
    return head, rest.strip()


def _record_to_passage(rec: Any, fallback_id: str, score: float = 0.0) -> Passage:
    """A corpus or server record as a `Passage`; raises ValueError when it has no text."""
    if not isinstance(rec, dict):
        raise ValueError(f"expected a JSON object, got {type(rec).__name__}")
    title = rec.get("title")
    if title is not None and not isinstance(title, str):
        title = str(title)
    if isinstance(rec.get("contents"), str):
        text = rec["contents"]
        if title is None:
            title, text = split_title(text)
    elif isinstance(rec.get("text"), str):
        text = rec["text"]
    else:
        raise ValueError("no string 'contents' or 'text' field")
    pid = rec.get("id", rec.get("doc_id", fallback_id))
    return Passage(title=(title or "").strip(), text=text.strip(), score=float(score), id=str(pid))


def truncate(text: str, limit: int) -> str:
    """``text`` cut to at most ``limit`` characters at a word boundary, with an ellipsis."""
    text = " ".join(text.split())
    if len(text) <= limit:
        return text
    cut = text[: limit - 1]
    space = cut.rfind(" ")
    if space > limit // 2:
        cut = cut[:space]
    return cut.rstrip(" ,;:") + "…"

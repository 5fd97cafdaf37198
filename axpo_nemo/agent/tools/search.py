"""The search tool: retrieve text passages for a query from a pluggable backend.

Backends implement `SearchBackend` (``search(query, k) -> list[Passage]``, raising `SearchError`
when the service fails):

* `BM25Backend`: an in-memory Okapi BM25 index over a JSONL corpus (Search-R1 format or
  ``text``/``title`` records). Fine for corpora up to a few million short passages; serve larger
  ones (e.g. the 21M-passage Wikipedia dump) with a retrieval server.
* `HTTPRetrieverBackend`: a client of a Search-R1 style retrieval server (``POST {url}/retrieve``)
  with a per-request timeout and retries with exponential backoff, using only the stdlib.

`SearchTool` validates the model's arguments and formats the passages as a numbered list; it never
raises (a failing backend gives a ``search_unavailable`` observation).
"""

from __future__ import annotations

import http.client
import json
import logging
import math
import re
import time
import unicodedata
import urllib.error
import urllib.request
from array import array
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from axpo_nemo.agent.tools.base import ToolContext, ToolResult, argument_object, unexpected_arguments
from axpo_nemo.agent.tools.search_config import SEARCH_BACKENDS as SEARCH_BACKENDS
from axpo_nemo.agent.tools.search_config import SearchConfig

logger = logging.getLogger(__name__)


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


# --------------------------------------------------------------------------- BM25


def _top_rows(scores: np.ndarray, k: int) -> np.ndarray:
    """Rows of the ``k`` highest positive ``scores``, best first, equal scores in row order."""
    rows = np.flatnonzero(scores > 0)
    s = scores[rows]
    if rows.size > k:
        kth = np.partition(s, rows.size - k)[rows.size - k]
        keep = s >= kth  # the whole tie group at the cut, so that row order decides within it
        rows, s = rows[keep], s[keep]
    return rows[np.argsort(-s, kind="stable")[:k]]


class BM25Backend:
    """Okapi BM25 over an in-memory inverted index of a JSONL corpus.

    Scores are ``Σ idf(t) · tf·(k1+1) / (tf + k1·(1 - b + b·dl/avgdl))`` over the query's
    distinct terms, with the non-negative ``idf(t) = ln(1 + (N - df + 0.5) / (df + 0.5))``
    (Lucene's idf; the `bm25s` library's ``lucene`` method ranks the same, its scores lack the
    constant factor ``k1 + 1``). Postings are stored term-major in numpy arrays (CSR layout),
    each with its term's score in its passage, computed at build time; a query adds up its terms'
    postings. Title and text are both indexed. Bad corpus lines are logged with their line
    numbers and skipped (`skipped_lines`). docs/data.md compares this index with bm25s.
    """

    def __init__(self, passages: Iterable[Passage], k1: float = 1.5, b: float = 0.75) -> None:
        """Index the given passages."""
        self.k1, self.b = float(k1), float(b)
        self.passages: list[Passage] = []
        self.skipped_lines: list[int] = []
        vocab: dict[str, int] = {}
        term_ids, doc_ids, tfs = array("i"), array("i"), array("f")
        lengths = array("f")
        for p in passages:
            d = len(self.passages)
            self.passages.append(p)
            counts = Counter(tokenize(f"{p.title}\n{p.text}" if p.title else p.text))
            lengths.append(sum(counts.values()))
            for term, tf in counts.items():
                tid = vocab.setdefault(term, len(vocab))
                term_ids.append(tid)
                doc_ids.append(d)
                tfs.append(tf)
        self.vocab = vocab
        n = len(self.passages)
        t = np.frombuffer(term_ids, dtype=np.int32) if term_ids else np.zeros(0, np.int32)
        order = np.argsort(t, kind="stable")
        self._post_docs = (np.frombuffer(doc_ids, dtype=np.int32) if doc_ids else np.zeros(0, np.int32))[
            order
        ]
        tf = (np.frombuffer(tfs, dtype=np.float32) if tfs else np.zeros(0, np.float32))[order]
        df = np.bincount(t, minlength=len(vocab)).astype(np.int64)
        self._offsets = np.concatenate([[0], np.cumsum(df)])
        idf = np.log1p((n - df + 0.5) / (df + 0.5)).astype(np.float32)
        doc_len = np.frombuffer(lengths, dtype=np.float32) if lengths else np.zeros(0, np.float32)
        avgdl = float(doc_len.mean()) if n else 0.0
        len_norm = (
            (self.k1 * (1.0 - self.b + self.b * doc_len / avgdl)).astype(np.float32)
            if avgdl > 0
            else np.full(n, self.k1, np.float32)
        )
        # idf · tf · (k1+1) / (tf + len_norm) per posting, in place (postings are term-major)
        score = np.repeat(idf, df)
        score *= tf
        score *= np.float32(self.k1 + 1.0)
        denom = len_norm[self._post_docs]
        denom += tf
        score /= denom
        self._post_score = score

    @classmethod
    def from_jsonl(
        cls, path: str | Path, k1: float = 1.5, b: float = 0.75, max_logged: int = 20
    ) -> BM25Backend:
        """Index a JSONL corpus; bad lines are logged (``path:line``) and skipped."""
        path = Path(path)
        skipped: list[int] = []

        def records() -> Iterable[Passage]:
            """The corpus's good lines as passages, logging the bad ones."""
            with path.open("r", encoding="utf-8", errors="replace") as f:
                for lineno, line in enumerate(f, start=1):
                    if not line.strip():
                        continue
                    try:
                        yield _record_to_passage(json.loads(line), fallback_id=str(lineno))
                    except ValueError as e:  # json.JSONDecodeError is a ValueError
                        skipped.append(lineno)
                        if len(skipped) <= max_logged:
                            logger.warning("%s:%d: skipping bad corpus line: %s", path, lineno, e)

        backend = cls(records(), k1=k1, b=b)
        backend.skipped_lines = skipped
        if len(skipped) > max_logged:
            logger.warning(
                "%s: %d more bad lines skipped (%d in all)", path, len(skipped) - max_logged, len(skipped)
            )
        logger.info(
            "BM25 index of %s: %d passages, %d terms", path, len(backend.passages), len(backend.vocab)
        )
        return backend

    def __len__(self) -> int:
        """Number of indexed passages."""
        return len(self.passages)

    def scores(self, query: str) -> np.ndarray:
        """BM25 score of every passage for ``query`` (float32, one per passage)."""
        out = np.zeros(len(self.passages), dtype=np.float32)
        # distinct terms in query order: a repeated word counts once, and the float sums come out
        # the same in every process (a set's order would follow the string hash seed)
        for term in dict.fromkeys(tokenize(query)):
            tid = self.vocab.get(term)
            if tid is None:
                continue
            lo, hi = self._offsets[tid], self._offsets[tid + 1]
            np.add.at(out, self._post_docs[lo:hi], self._post_score[lo:hi])
        return out

    def search(self, query: str, k: int) -> list[Passage]:
        """The ``k`` highest-scoring passages with a positive score, best first (ties: corpus order)."""
        if k <= 0 or not self.passages:
            return []
        s = self.scores(query)
        return [
            Passage(
                title=self.passages[d].title,
                text=self.passages[d].text,
                score=float(s[d]),
                id=self.passages[d].id,
            )
            for d in _top_rows(s, k).tolist()
        ]


# --------------------------------------------------------------------------- HTTP retriever


class HTTPRetrieverBackend:
    """Client of a Search-R1 style retrieval server.

    Sends ``POST {url}/retrieve`` with ``{"queries": [query], "topk": k, "return_scores": true}``
    and reads ``{"result": [[{"document": {...}, "score": s}, ...]]}`` (items without the
    ``document`` wrapper are accepted too). Connection errors, timeouts and 5xx/429 answers are
    retried ``retries`` times with exponential backoff; then `SearchError` is raised. The worst
    case wall time is ``(retries + 1) · timeout_s`` plus the backoff waits.
    """

    def __init__(
        self,
        url: str,
        timeout_s: float = 10.0,
        retries: int = 2,
        backoff_s: float = 0.5,
        use_env_proxy: bool = False,
    ) -> None:
        """Point the client at a server (``use_env_proxy``: honour ``http_proxy`` and friends)."""
        self.endpoint = url.rstrip("/") + "/retrieve"
        self.timeout_s, self.retries, self.backoff_s = float(timeout_s), int(retries), float(backoff_s)
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler(None if use_env_proxy else {}))

    def _post(self, payload: dict[str, Any]) -> Any:
        """One request; returns the decoded JSON. Raises urllib/socket errors as they come."""
        req = urllib.request.Request(
            self.endpoint,
            data=json.dumps(payload).encode("utf-8"),
            headers={"Content-Type": "application/json", "Accept": "application/json"},
            method="POST",
        )
        with self._opener.open(req, timeout=self.timeout_s) as resp:
            return json.loads(resp.read().decode("utf-8"))

    def search(self, query: str, k: int) -> list[Passage]:
        """The server's top ``k`` passages for ``query``."""
        payload = {"queries": [query], "topk": int(k), "return_scores": True}
        last: str = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            try:
                data = self._post(payload)
            except urllib.error.HTTPError as e:
                last = f"HTTP {e.code} from {self.endpoint}"
                if e.code >= 500 or e.code == 429:
                    continue
                raise SearchError(last) from e
            except (OSError, http.client.HTTPException) as e:  # refused, reset, timed out, cut short
                reason = getattr(e, "reason", e)
                last = f"cannot reach {self.endpoint}: {reason}"
                continue
            except ValueError as e:
                raise SearchError(f"malformed response from {self.endpoint}: {e}") from e
            return self.parse_response(data, k)
        raise SearchError(f"{last} (after {self.retries + 1} attempts)")

    @staticmethod
    def parse_response(data: Any, k: int) -> list[Passage]:
        """Passages from a Search-R1 ``/retrieve`` response; raises `SearchError` if malformed."""
        try:
            results = data["result"]
            items = results[0] if results else []
            if not isinstance(items, list):
                raise TypeError("result[0] is not a list")
            out = []
            for i, item in enumerate(items[:k]):
                if isinstance(item, dict) and isinstance(item.get("document"), dict):
                    doc, score = item["document"], item.get("score", 0.0)
                else:
                    doc, score = item, item.get("score", 0.0) if isinstance(item, dict) else 0.0
                try:
                    score = float(score)
                except (TypeError, ValueError):
                    score = 0.0
                out.append(
                    _record_to_passage(doc, fallback_id=str(i), score=score if math.isfinite(score) else 0.0)
                )
            return out
        except (KeyError, IndexError, TypeError, ValueError) as e:
            raise SearchError(f"malformed retrieval response: {e}") from e


def make_backend(cfg: SearchConfig) -> SearchBackend:
    """The backend ``cfg`` describes (raises ValueError when its settings are incomplete)."""
    if cfg.backend == "bm25":
        if not cfg.corpus_path:
            raise ValueError("SearchConfig: backend 'bm25' needs corpus_path")
        return BM25Backend.from_jsonl(cfg.corpus_path, k1=cfg.k1, b=cfg.b)
    if not cfg.url:
        raise ValueError("SearchConfig: backend 'http' needs url")
    return HTTPRetrieverBackend(
        cfg.url,
        timeout_s=cfg.timeout_s,
        retries=cfg.retries,
        backoff_s=cfg.backoff_s,
        use_env_proxy=cfg.use_env_proxy,
    )


# --------------------------------------------------------------------------- the tool


class SearchTool:
    """Search a text collection (``search``): returns the top passages as a numbered list.

    Arguments: ``query`` (non-empty string), ``top_k`` (optional integer ≥ 1; reduced to
    ``max_top_k``); any other argument is a ``bad_arguments`` error. Never raises.
    """

    name = "search"

    def __init__(self, backend: SearchBackend | None = None, cfg: SearchConfig | None = None) -> None:
        """Use ``backend``, or build the one ``cfg`` describes."""
        self.cfg = cfg or SearchConfig()
        self.backend = backend if backend is not None else make_backend(self.cfg)

    def schema(self) -> dict[str, Any]:
        """The function schema shown to the model."""
        return {
            "type": "function",
            "function": {
                "name": self.name,
                "description": "Search for text passages relevant to a query; returns the best matches with their titles.",
                "parameters": {
                    "type": "object",
                    "properties": {
                        "query": {
                            "type": "string",
                            "description": "What to search for (keywords or a question).",
                        },
                        "top_k": {
                            "type": "integer",
                            "description": f"How many passages to return (default {self.cfg.top_k}, at most {self.cfg.max_top_k}).",
                        },
                    },
                    "required": ["query"],
                },
            },
        }

    def __call__(self, arguments: Any, context: ToolContext) -> ToolResult:
        """Search; any problem comes back as an error `ToolResult`."""
        try:
            return self._search(arguments)
        except Exception as e:
            return ToolResult.failure("crashed", f"search failed: {type(e).__name__}: {e}")

    def _search(self, arguments: Any) -> ToolResult:
        """Validate, query the backend, format."""
        cfg = self.cfg
        arguments = argument_object(arguments, '{"query": "..."}')
        if isinstance(arguments, ToolResult):
            return arguments
        unexpected = unexpected_arguments(arguments, self.name, ("query", "top_k"))
        if unexpected is not None:
            return unexpected
        query = arguments.get("query")
        if not isinstance(query, str) or not query.strip():
            got = "nothing" if query is None else f"{type(query).__name__} {query!r}"[:80]
            return ToolResult.failure("bad_arguments", f"query must be a non-empty string, got {got}.")
        query = " ".join(query.split())
        if len(query) > cfg.max_query_chars:
            return ToolResult.failure(
                "bad_arguments",
                f"query is {len(query):,} characters long; keep it under {cfg.max_query_chars} (a few keywords).",
            )
        top_k = arguments.get("top_k")
        if top_k is None:
            top_k = cfg.top_k
        elif isinstance(top_k, float) and top_k.is_integer():
            top_k = int(top_k)
        if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1:
            return ToolResult.failure(
                "bad_arguments",
                f"top_k must be a positive integer (at most {cfg.max_top_k}), got {top_k!r}."[:200],
            )
        k = min(top_k, cfg.max_top_k)
        start = time.monotonic()
        try:
            passages = self.backend.search(query, k)
        except SearchError as e:
            return ToolResult.failure(
                "search_unavailable",
                f"the search service is unavailable ({e}). Try again later or answer without searching.",
            )
        elapsed = time.monotonic() - start
        meta = {
            "query": query,
            "top_k": k,
            "ids": [p.id for p in passages],
            "scores": [p.score for p in passages],
            "elapsed_s": round(elapsed, 4),
        }
        if not passages:
            return ToolResult(text=f'No results for "{query}".', metadata=meta)
        lines = []
        for i, p in enumerate(passages[:k], start=1):
            head = f"[{i}] {p.title}" if p.title else f"[{i}]"
            lines.append(f"{head}\n{truncate(p.text, cfg.passage_chars)}")
        return ToolResult(text="\n\n".join(lines), metadata=meta)


__all__ = [
    "STOPWORDS",
    "BM25Backend",
    "HTTPRetrieverBackend",
    "Passage",
    "SearchBackend",
    "SearchConfig",
    "SearchError",
    "SearchTool",
    "make_backend",
    "split_title",
    "tokenize",
    "truncate",
]

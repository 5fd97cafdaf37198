"""`BM25Backend`: the search tool's in-memory Okapi BM25 index over a JSONL corpus.

Hand-written rather than taken from `bm25s`: the rankings are identical and it is as fast (the
comparison, with figures, is in docs/data.md), and it adds no dependency to the cluster image.
"""

from __future__ import annotations

import json
import logging
from array import array
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from axpo_nemo.agent.tools.search_text import Passage, _record_to_passage, tokenize

logger = logging.getLogger(__name__)


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



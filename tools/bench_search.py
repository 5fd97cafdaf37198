"""BM25 search: the project's numpy index (`BM25Backend`) against the `bm25s` library.

Builds a deterministic corpus (seeded): ``--passages`` passages of 20-60 words drawn from a
made-up vocabulary (Zipf-distributed) mixed with shared English words (stopwords included), each
with a one-to-three-word title, and ``--queries`` queries of 2-5 words taken from random passages
(some with a stopword or an unknown word added). Three backends, all fed the same tokens (the
project's `tokenize`: NFKC, lowercase, accents folded, English stopwords dropped) and the same k1
and b:

* ``ours``: `BM25Backend`, Okapi BM25 with the non-negative idf
  ``ln(1 + (N - df + 0.5) / (df + 0.5))`` (Lucene's idf);
* ``bm25s``: bm25s ``method="lucene"`` (the same idf; its term part lacks the constant factor
  ``k1 + 1``, applied here) behind our interface (`Bm25sBackend` below): indexed from our token
  ids, scored with ``get_scores_from_ids``, the top k chosen as ours is (positive scores, ties in
  corpus order);
* ``bm25s-rt``: bm25s as its README shows it: ``index`` on lists of tokens, ``retrieve`` the top
  k (its own tie order; zero scores dropped here).

Measured for each backend:

* index build time, the fastest of ``--builds`` builds, tokenization of the corpus included (the
  tokenization alone is printed too);
* query latency p50/p95 over the queries at top-5, query tokenization included; the backends take
  turns query by query (in rotating order) so that load from other processes hits them alike;
* memory of the index, measured with tracemalloc (numpy's buffers included) in a separate build:
  what the index keeps after the build, and the peak during it, over the corpus already in memory;
* agreement of each bm25s top-5 with ours: the fraction of queries with identical ids (in order),
  with the same top-1, and with the same ranking up to ties (equal scores, within float32
  rounding, at every rank); and, ranking both full score vectors with ties in corpus order, the
  fraction with identical top-5 ids, with the largest score difference from ours.

The last line reads ``bm25s/ours index time X, p50 query time Y`` (ratios of the ``bm25s`` row
to ours; above 1: bm25s slower).

    pip install bm25s   # not a dependency of the project
    python tools/bench_search.py [--quick] [--passages 100000] [--queries 300] [--builds 3] [--seed 0]
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import logging
import random
import sys
import time
import tracemalloc
from collections.abc import Callable
from typing import Any

import numpy as np

from axpo_nemo.agent.tools.search import BM25Backend, Passage, _top_rows, tokenize

SHARED_WORDS = (
    "the", "of", "and", "in", "to", "a", "is", "was", "for", "on", "with", "as", "by", "at",
    "from", "that", "which", "river", "city", "year", "known", "first", "new", "old", "great",
    "north", "south", "water", "people", "called", "built", "war", "king", "state", "part", "time",
    "made", "name", "early", "large", "small", "region", "century", "town", "land",
)
SYLLABLES = [c + v for c in "bcdfghjklmnprstvz" for v in ("a", "e", "i", "o", "u", "ai", "ou")]
K = 5


def make_vocab(size: int, rng: random.Random) -> list[str]:
    """``size`` distinct made-up words of two to four syllables."""
    words: dict[str, None] = {}
    while len(words) < size:
        words["".join(rng.choices(SYLLABLES, k=rng.randint(2, 4)))] = None
    return list(words)


def make_corpus(n: int, n_queries: int, seed: int) -> tuple[list[Passage], list[str]]:
    """``n`` passages and ``n_queries`` queries, the same for the same arguments."""
    rng = random.Random(seed)
    vocab = make_vocab(max(2000, n // 3), rng)
    cum = list(np.cumsum(1.0 / np.arange(1, len(vocab) + 1) ** 1.05))
    passages = []
    for i in range(n):
        length = rng.randint(20, 60)
        n_shared = sum(rng.random() < 0.3 for _ in range(length))
        words = rng.choices(vocab, cum_weights=cum, k=length - n_shared) + rng.choices(SHARED_WORDS, k=n_shared)
        rng.shuffle(words)
        title = " ".join(w.capitalize() for w in rng.choices(vocab, cum_weights=cum, k=rng.randint(1, 3)))
        passages.append(Passage(title=title, text=" ".join(words) + ".", score=0.0, id=f"p{i}"))
    queries = []
    for _ in range(n_queries):
        p = passages[rng.randrange(n)]
        words = (p.title + " " + p.text.rstrip(".")).split()
        q = rng.sample(words, k=min(len(words), rng.randint(2, 5)))
        if rng.random() < 0.3:
            q.insert(0, rng.choice(["what is the", "where", "who built the"]))
        if rng.random() < 0.1:
            q.append("".join(rng.choices(SYLLABLES, k=5)))  # not in the corpus
        queries.append(" ".join(q))
    return passages, queries


def doc_tokens(p: Passage) -> list[str]:
    """The tokens BM25Backend indexes for ``p`` (title and text)."""
    return tokenize(f"{p.title}\n{p.text}" if p.title else p.text)


def query_tokens(query: str) -> list[str]:
    """The query's distinct tokens, in order (ours scores each distinct term once)."""
    return list(dict.fromkeys(tokenize(query)))


class Bm25sBackend:
    """bm25s behind the project's interface: what `BM25Backend` would be on top of the library.

    Our token ids and vocabulary go to ``BM25.index`` (lists of ids: no list of strings per
    passage held at once), ``get_scores_from_ids`` scores a query's distinct terms, times
    ``k1 + 1`` to match our scale, and the top k is chosen as ours is (positive scores, ties in
    corpus order).
    """

    def __init__(self, passages: list[Passage], k1: float, b: float) -> None:
        """Tokenize the passages with our tokenizer and index them (method ``lucene``)."""
        import bm25s

        logging.getLogger("bm25s").setLevel(logging.WARNING)  # the library sets DEBUG
        self.passages = passages
        self.k1 = k1
        self.vocab: dict[str, int] = {}
        docs = [[self.vocab.setdefault(t, len(self.vocab)) for t in doc_tokens(p)] for p in passages]
        self.retriever = bm25s.BM25(k1=k1, b=b, method="lucene")
        self.retriever.index((docs, self.vocab), create_empty_token=False, show_progress=False)

    def scores(self, query: str) -> np.ndarray:
        """Every passage's score on our scale."""
        ids = [self.vocab[t] for t in query_tokens(query) if t in self.vocab]
        if not ids:
            return np.zeros(len(self.passages), np.float32)
        return self.retriever.get_scores_from_ids(ids) * np.float32(self.k1 + 1.0)

    def search(self, query: str, k: int) -> list[Passage]:
        """The top ``k`` passages with their scores, chosen as `BM25Backend.search` chooses them."""
        s = self.scores(query)
        return [
            Passage(title=p.title, text=p.text, score=float(s[d]), id=p.id)
            for d in _top_rows(s, k).tolist()
            for p in (self.passages[d],)
        ]


class Bm25sRetrieve:
    """bm25s as its README shows it: ``index`` lists of tokens, ``retrieve`` the top k."""

    def __init__(self, passages: list[Passage], k1: float, b: float) -> None:
        """Tokenize the passages with our tokenizer and index them (method ``lucene``)."""
        import bm25s

        self.passages = passages
        self.retriever = bm25s.BM25(k1=k1, b=b, method="lucene")
        self.retriever.index([doc_tokens(p) for p in passages], show_progress=False)

    def search(self, query: str, k: int) -> list[Passage]:
        """bm25s' top ``k`` with a positive score (its own tie order), scores on its scale."""
        tokens = query_tokens(query)
        if not tokens:
            return []
        docs, scores = self.retriever.retrieve([tokens], k=k, show_progress=False)
        return [self.passages[int(d)] for d, s in zip(docs[0], scores[0], strict=True) if s > 0]


def top_by_corpus_order(scores: np.ndarray, k: int) -> list[int]:
    """Row numbers of the ``k`` best positive scores, ties in corpus order."""
    hits = np.flatnonzero(scores > 0)
    return sorted(hits.tolist(), key=lambda d: (-float(scores[d]), d))[:k]


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    """``fn()`` and its wall time in seconds."""
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def traced(fn: Callable[[], Any]) -> tuple[int, int]:
    """Bytes that ``fn()``'s result keeps and the peak during the call (tracemalloc)."""
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    out = fn()
    gc.collect()
    kept, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    del out
    return kept - base, peak - base


def agreement(ours: BM25Backend, other: Any, queries: list[str]) -> dict[str, float]:
    """How often ``other``'s top-K matches ours (see the module docstring)."""
    row_of = {p.id: i for i, p in enumerate(ours.passages)}
    same5 = same1 = up_to_ties = same_sorted = 0
    max_rel = 0.0
    for q in queries:
        s_ours = ours.scores(q)
        scale = max(float(s_ours.max(initial=0.0)), 1e-9)
        a = [row_of[p.id] for p in ours.search(q, K)]
        b = [row_of[p.id] for p in other.search(q, K)]
        same5 += a == b
        same1 += a[:1] == b[:1]
        up_to_ties += len(a) == len(b) and all(
            abs(float(s_ours[x]) - float(s_ours[y])) <= 1e-6 * scale for x, y in zip(a, b, strict=True)
        )
        if isinstance(other, Bm25sBackend):
            s_other = other.scores(q)
            same_sorted += top_by_corpus_order(s_ours, K) == top_by_corpus_order(s_other, K)
            max_rel = max(max_rel, float(np.abs(s_ours - s_other).max(initial=0.0)) / scale)
    n = len(queries)
    return {
        "ids": same5 / n,
        "top1": same1 / n,
        "ties": up_to_ties / n,
        "sorted": same_sorted / n,
        "max_rel": max_rel,
    }


def main() -> None:
    """Build the indexes, time them, compare their rankings and print the table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="10,000 passages (a smoke run)")
    parser.add_argument("--passages", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--builds", type=int, default=3, help="builds per backend; the fastest counts")
    parser.add_argument("--k1", type=float, default=1.5)
    parser.add_argument("--b", type=float, default=0.75)
    args = parser.parse_args()
    n = 10_000 if args.quick else args.passages
    if n < K or args.queries < 1 or args.builds < 1:
        parser.error(f"need at least {K} passages, one query and one build")
    if importlib.util.find_spec("bm25s") is None:
        sys.exit("bench_search.py compares against the bm25s library: pip install bm25s")

    passages, queries = make_corpus(n, args.queries, args.seed)
    tokens, tok_s = timed(lambda: [doc_tokens(p) for p in passages])
    for _ in range(args.builds - 1):
        tok_s = min(tok_s, timed(lambda: [doc_tokens(p) for p in passages])[1])
    print(
        f"corpus: {n:,} passages, {sum(map(len, tokens)) / n:.1f} tokens each after stopwords; "
        f"{len(queries)} queries, top-{K}; k1 {args.k1}, b {args.b}"
    )
    del tokens

    builders: dict[str, Callable[[], Any]] = {
        "ours": lambda: BM25Backend(passages, k1=args.k1, b=args.b),
        "bm25s": lambda: Bm25sBackend(passages, args.k1, args.b),
        "bm25s-rt": lambda: Bm25sRetrieve(passages, args.k1, args.b),
    }
    built: dict[str, Any] = {}
    build_s = {name: float("inf") for name in builders}
    for _ in range(args.builds):  # rounds over the backends, so that a busy spell hits one round
        for name, build in builders.items():
            built.pop(name, None)
            gc.collect()
            built[name], t = timed(build)
            build_s[name] = min(build_s[name], t)

    names = list(built)
    for q in queries[:10]:  # warm-up
        for name in names:
            built[name].search(q, K)
    latency: dict[str, list[float]] = {name: [] for name in names}
    for i, q in enumerate(queries):
        for name in names[i % len(names) :] + names[: i % len(names)]:
            latency[name].append(timed(lambda b=built[name], q=q: b.search(q, K))[1])

    agree = {name: agreement(built["ours"], built[name], queries) for name in names[1:]}
    del built
    memory = {name: traced(build) for name, build in builders.items()}

    print(f"tokenizing the corpus alone: {tok_s:.2f} s (part of every build time)")
    print()
    print(
        f"{'backend':9} {'build s':>8} {'p50 ms':>7} {'p95 ms':>7} {'kept MB':>8} {'peak MB':>8}"
        f"  {'same ids':>8} {'top-1':>6} {'≈ ties':>6}"
    )
    for name in names:
        lat = np.asarray(latency[name]) * 1e3
        kept, peak = memory[name]
        line = (
            f"{name:9} {build_s[name]:8.2f} {np.percentile(lat, 50):7.2f} {np.percentile(lat, 95):7.2f} "
            f"{kept / 2**20:8.1f} {peak / 2**20:8.1f}"
        )
        if name in agree:
            g = agree[name]
            line += f"  {g['ids']:8.1%} {g['top1']:6.1%} {g['ties']:6.1%}"
        print(line)
    g = agree["bm25s"]
    print()
    print(
        "same ids: identical top-5 ids as ours; top-1: same first hit; ≈ ties: same ranking up to ties.\n"
        f"ours and bm25s score vectors ranked with ties in corpus order: identical top-{K} in "
        f"{g['sorted']:.1%} of queries; largest score difference {g['max_rel']:.1e} of the query's best score"
    )
    p50 = {name: float(np.percentile(latency[name], 50)) for name in latency}
    print(
        f"bm25s/ours index time {build_s['bm25s'] / build_s['ours']:.2f}, "
        f"p50 query time {p50['bm25s'] / p50['ours']:.2f}"
    )


if __name__ == "__main__":
    main()

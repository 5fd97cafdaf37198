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
import time
import urllib.error
import urllib.request
from typing import Any

from axpo_nemo.agent.tools.base import ToolContext, ToolResult, argument_object, unexpected_arguments
from axpo_nemo.agent.tools.bm25 import BM25Backend, _top_rows  # noqa: F401 (re-exported)
from axpo_nemo.agent.tools.search_config import SEARCH_BACKENDS as SEARCH_BACKENDS
from axpo_nemo.agent.tools.search_config import SearchConfig
from axpo_nemo.agent.tools.search_text import (
    STOPWORDS,
    Passage,
    SearchBackend,
    SearchError,
    _record_to_passage,
    split_title,
    tokenize,
    truncate,
)

logger = logging.getLogger(__name__)


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

"""Settings of the search tool and its backend (`SearchConfig`), apart from the tool so that loading
a config imports no numpy.
"""

from __future__ import annotations

from dataclasses import dataclass

from axpo_nemo.core.config import ValidatedConfig, setting

__all__ = ["SEARCH_BACKENDS", "SearchConfig"]

SEARCH_BACKENDS = ("bm25", "http")


@dataclass
class SearchConfig(ValidatedConfig):
    """Settings of the search tool and its backend."""

    backend: str = setting(
        "bm25",
        "Retrieval backend: 'bm25' (local corpus) or 'http' (retrieval server).",
        choices=SEARCH_BACKENDS,
    )
    corpus_path: str | None = setting(
        None,
        "bm25: JSONL corpus, one passage per line ('contents' or 'text', optional 'title', 'id'). "
        "Unset: training and `axpo tools run search` use the data folder's corpus.jsonl (the "
        "synthetic task writes one).",
    )
    url: str | None = setting(None, "http: base URL of the retrieval server; requests go to {url}/retrieve.")
    top_k: int = setting(3, "Passages returned when the model does not ask for a number.", ge=1)
    max_top_k: int = setting(
        10, "Largest top_k the model may ask for; larger requests are reduced to it.", ge=1
    )
    timeout_s: float = setting(10.0, "http: timeout of one request.", gt=0.0)
    retries: int = setting(2, "http: retries after a connection error, timeout or 5xx/429 response.", ge=0)
    backoff_s: float = setting(
        0.5, "http: wait before the first retry; doubled for each further one.", ge=0.0
    )
    use_env_proxy: bool = setting(
        False,
        "http: send requests through the proxy named by http_proxy/https_proxy (off: connect directly).",
    )
    passage_chars: int = setting(600, "Each passage's text is truncated to this many characters.", ge=20)
    max_query_chars: int = setting(500, "Longest query accepted (after collapsing whitespace); longer is an error.", ge=1)
    k1: float = setting(1.5, "bm25: term-frequency saturation k1.", ge=0.0)
    b: float = setting(0.75, "bm25: document-length normalisation b.", ge=0.0, le=1.0)

"""The search tool: BM25 ranking and corpus parsing, argument validation, the HTTP retriever client
against real loopback servers (success, 5xx retries, timeouts, refused connections)."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from axpo_nemo.agent.tools.base import Tool, ToolContext
from axpo_nemo.agent.tools.search import (
    BM25Backend,
    HTTPRetrieverBackend,
    Passage,
    SearchConfig,
    SearchError,
    SearchTool,
    make_backend,
    split_title,
    tokenize,
    truncate,
)

CTX = ToolContext()

CORPUS = [
    {
        "id": "d0",
        "contents": '"Eiffel Tower"\nThe Eiffel Tower is a wrought-iron lattice tower in Paris, France.',
    },
    {"id": "d1", "contents": '"Louvre"\nThe Louvre is the world\'s most-visited museum, located in Paris.'},
    {
        "id": "d2",
        "contents": '"Great Wall"\nThe Great Wall of China is a series of fortifications in northern China.',
    },
    {"id": "d3", "title": "Photosynthesis", "text": "Plants convert light energy into chemical energy."},
    {"id": "d4", "text": "Paris is the capital of France. Paris Paris Paris."},
    {"contents": "A passage without a title line about rivers and lakes."},
]


def write_corpus(path, records, extra_lines=()):
    lines = [json.dumps(r) for r in records] + list(extra_lines)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def corpus(tmp_path):
    return write_corpus(tmp_path / "corpus.jsonl", CORPUS)


@pytest.fixture
def bm25(corpus):
    return BM25Backend.from_jsonl(corpus)


# --------------------------------------------------------------------------- BM25


def test_bm25_obviously_relevant_doc_ranks_first(bm25):
    assert bm25.search("wrought iron lattice tower", 3)[0].id == "d0"
    assert bm25.search("Great Wall of China fortifications", 3)[0].id == "d2"
    assert bm25.search("how do plants use light energy", 1)[0].title == "Photosynthesis"


def test_bm25_idf_favours_rare_terms(tmp_path):
    # "common" is in every document; "zebra" only in d2. A query with both must rank d2 first
    # even though d1 repeats "common" many times.
    docs = [
        {"id": "d0", "text": "common words here"},
        {"id": "d1", "text": "common common common common common text"},
        {"id": "d2", "text": "common zebra"},
        {"id": "d3", "text": "common other stuff"},
    ]
    b = BM25Backend.from_jsonl(write_corpus(tmp_path / "c.jsonl", docs))
    hits = b.search("common zebra", 4)
    assert hits[0].id == "d2"
    s = b.scores("zebra")
    assert s[2] > 0 and s[0] == s[1] == s[3] == 0
    # a term in every document still gets a small positive idf (the non-negative variant)
    assert all(v > 0 for v in b.scores("common"))


def test_bm25_term_frequency_saturates_and_length_normalises(tmp_path):
    docs = [
        {"id": "short", "text": "paris"},
        {"id": "long", "text": "paris " + " ".join(f"w{i}" for i in range(50))},
    ]
    b = BM25Backend.from_jsonl(write_corpus(tmp_path / "c.jsonl", docs))
    assert [p.id for p in b.search("paris", 2)] == ["short", "long"]
    no_norm = BM25Backend.from_jsonl(tmp_path / "c.jsonl", b=0.0)
    s = no_norm.scores("paris")
    assert s[0] == pytest.approx(s[1])


def test_bm25_k_limits_and_zero_scores(bm25):
    assert len(bm25.search("Paris", 2)) == 2
    assert bm25.search("Paris", 2)[0].id == "d4"  # mentions Paris four times in a short text
    assert bm25.search("xylophone quantum", 5) == []
    assert bm25.search("the of and", 5) == []  # only stopwords
    assert bm25.search("Paris", 0) == []
    assert all(p.score > 0 for p in bm25.search("Paris France", 10))


def test_bm25_ties_keep_corpus_order(tmp_path):
    docs = [{"id": f"d{i}", "text": "identical text"} for i in range(5)]
    b = BM25Backend.from_jsonl(write_corpus(tmp_path / "c.jsonl", docs))
    assert [p.id for p in b.search("identical", 3)] == ["d0", "d1", "d2"]


def okapi_scores(texts, query, k1, b):
    """Okapi BM25 of each text for ``query``, from the formula (Lucene's non-negative idf)."""
    docs = [tokenize(t) for t in texts]
    n, avgdl = len(docs), sum(map(len, docs)) / len(docs)
    out = []
    for doc in docs:
        score = 0.0
        for term in set(tokenize(query)):
            df = sum(term in d for d in docs)
            tf = doc.count(term)
            if tf:
                idf = math.log(1 + (n - df + 0.5) / (df + 0.5))
                score += idf * tf * (k1 + 1) / (tf + k1 * (1 - b + b * len(doc) / avgdl))
        out.append(score)
    return out


@pytest.mark.parametrize(("k1", "b"), [(1.5, 0.75), (1.2, 0.3), (0.0, 1.0)])
def test_bm25_scores_follow_the_okapi_formula(k1, b):
    texts = [
        "apple banana apple",
        "apple cherry",
        "banana cherry cherry date elderberry fig",
        "grape",
        "the apple of my eye",
        "cherry cherry cherry cherry cherry",
    ]
    backend = BM25Backend((Passage("", t, 0.0, f"d{i}") for i, t in enumerate(texts)), k1=k1, b=b)
    query = "Apple apple CHERRY, the cherry?"  # repeated words count once; "the" is a stopword
    expected = okapi_scores(texts, query, k1, b)
    assert backend.scores(query).tolist() == pytest.approx(expected, rel=1e-5)
    ranked = sorted(range(len(texts)), key=lambda i: (-expected[i], i))
    hits = backend.search(query, 4)
    assert [p.id for p in hits] == [f"d{i}" for i in ranked[:4]]
    assert [p.score for p in hits] == pytest.approx([expected[i] for i in ranked[:4]], rel=1e-5)
    assert backend.scores("grape")[3] > 0 and backend.search("grape", 5)[0].id == "d3"


def test_bm25_ties_at_the_cut_keep_corpus_order():
    # 1,500 equal scores straddle the cut of a top 3: the first ones in the corpus must come back,
    # after the one passage that scores higher (shorter, at the end of the corpus)
    docs = [Passage("", "identical text", 0.0, f"d{i}") for i in range(1500)]
    docs.append(Passage("", "identical", 0.0, "short"))
    b = BM25Backend(docs)
    assert [p.id for p in b.search("identical text", 3)] == ["d0", "d1", "d2"]
    assert [p.id for p in b.search("identical", 3)] == ["short", "d0", "d1"]


def test_bm25_corpus_without_terms():
    assert BM25Backend([]).search("anything", 3) == []
    assert len(BM25Backend([]).scores("anything")) == 0
    only_stopwords = BM25Backend([Passage("", "the of and", 0.0, "x"), Passage("", "", 0.0, "y")])
    assert only_stopwords.search("the", 3) == [] and only_stopwords.search("text", 3) == []
    assert only_stopwords.scores("text").tolist() == [0.0, 0.0]


def test_title_parsing(bm25):
    by_id = {p.id: p for p in bm25.passages}
    assert by_id["d0"].title == "Eiffel Tower"
    assert by_id["d0"].text.startswith("The Eiffel Tower is")
    assert by_id["d3"].title == "Photosynthesis"
    assert by_id["d4"].title == ""
    untitled = bm25.passages[5]
    assert untitled.title == "" and untitled.id == "6"  # id falls back to the line number
    assert split_title('"Title with "quotes""\nbody') == ('Title with "quotes"', "body")
    assert split_title("Bare title\nbody") == ("Bare title", "body")
    assert split_title("no newline") == ("", "no newline")


def test_titles_are_searchable(bm25):
    assert bm25.search("Louvre", 1)[0].id == "d1"


def test_bad_corpus_lines_are_skipped_and_logged(tmp_path, caplog):
    path = write_corpus(
        tmp_path / "bad.jsonl",
        CORPUS[:2],
        extra_lines=[
            "{not json",
            "",
            '["a list"]',
            '{"id": "x", "contents": 5}',
            '{"title": "only a title"}',
            json.dumps(CORPUS[2]),
        ],
    )
    with caplog.at_level(logging.WARNING, logger="axpo_nemo.agent.tools.search"):
        b = BM25Backend.from_jsonl(path)
    assert len(b) == 3
    assert b.skipped_lines == [3, 5, 6, 7]  # line 4 is blank: ignored, not an error
    text = caplog.text
    for n in (3, 5, 6, 7):
        assert f"bad.jsonl:{n}:" in text
    assert "bad.jsonl:4:" not in text


def test_tokenizer():
    assert tokenize("The Café's MENU, 2024!") == ["cafe", "s", "menu", "2024"]
    assert tokenize("the of and") == []


def test_truncate():
    assert truncate("short text", 100) == "short text"
    out = truncate("word " * 100, 50)
    assert len(out) <= 50 and out.endswith("…") and not out.endswith(" …")


def test_bm25_on_a_larger_corpus_is_fast(tmp_path):
    docs = [
        {"id": str(i), "text": f"document number {i} topic{i % 97} filler words lorem ipsum"}
        for i in range(20000)
    ]
    docs.append({"id": "needle", "text": "the unique needle passage"})
    start = time.perf_counter()
    b = BM25Backend.from_jsonl(write_corpus(tmp_path / "big.jsonl", docs))
    built = time.perf_counter() - start
    start = time.perf_counter()
    assert b.search("needle", 3)[0].id == "needle"
    assert len(b.search("topic5 filler", 5)) == 5
    assert built < 10 and time.perf_counter() - start < 0.5


# --------------------------------------------------------------------------- the tool


def test_tool_protocol_and_output_format(bm25):
    tool = SearchTool(bm25, SearchConfig(passage_chars=40))
    assert isinstance(tool, Tool)
    assert tool.schema()["function"]["name"] == "search" == tool.name
    res = tool({"query": "Eiffel tower Paris"}, CTX)
    assert res.ok
    assert res.text.startswith("[1] Eiffel Tower\n")
    assert "[2]" in res.text and "[3]" in res.text and "[4]" not in res.text  # default top_k 3
    first = res.text.split("\n\n")[0].split("\n")[1]
    assert len(first) <= 40 and first.endswith("…")
    assert res.metadata["ids"][0] == "d0" and res.metadata["top_k"] == 3


def test_tool_builds_backend_from_config(corpus):
    tool = SearchTool(cfg=SearchConfig(backend="bm25", corpus_path=str(corpus)))
    assert tool({"query": "Great Wall"}, CTX).metadata["ids"][0] == "d2"
    with pytest.raises(ValueError, match="corpus_path"):
        make_backend(SearchConfig(backend="bm25"))
    with pytest.raises(ValueError, match="url"):
        make_backend(SearchConfig(backend="http"))
    with pytest.raises(ValueError, match="backend"):
        SearchConfig(backend="google")


@pytest.mark.parametrize("query", ["", "   ", None, 5, ["Paris"], {"q": "x"}])
def test_empty_or_non_string_query(bm25, query):
    args = {} if query is None else {"query": query}
    res = SearchTool(bm25)(args, CTX)
    assert res.error == "bad_arguments" and "query" in res.text


@pytest.mark.parametrize("top_k", [0, -1, 2.5, "3", True, [3]])
def test_bad_top_k(bm25, top_k):
    res = SearchTool(bm25)({"query": "Paris", "top_k": top_k}, CTX)
    assert res.error == "bad_arguments" and "top_k" in res.text


def test_unknown_arguments_are_rejected_by_name(bm25):
    res = SearchTool(bm25)({"query": "Paris", "site": "wikipedia.org", "lang": "fr"}, CTX)
    assert res.error == "bad_arguments"
    assert "unexpected argument(s) lang, site; the search tool takes only 'query', 'top_k'" in res.text


def test_top_k_values(bm25):
    tool = SearchTool(bm25, SearchConfig(max_top_k=4))
    assert len(tool({"query": "Paris France tower", "top_k": 1}, CTX).metadata["ids"]) == 1
    assert tool({"query": "Paris", "top_k": 2.0}, CTX).metadata["top_k"] == 2
    assert tool({"query": "Paris", "top_k": 50}, CTX).metadata["top_k"] == 4  # reduced to max_top_k
    assert tool({"query": "Paris", "top_k": None}, CTX).metadata["top_k"] == 3


def test_no_results_and_odd_arguments(bm25):
    tool = SearchTool(bm25)
    res = tool({"query": "xylophone"}, CTX)
    assert res.ok and res.text == 'No results for "xylophone".'
    assert tool('{"query": "Louvre"}', CTX).metadata["ids"][0] == "d1"  # JSON string arguments
    assert tool("not json", CTX).error == "bad_arguments"
    assert tool(["Paris"], CTX).error == "bad_arguments"
    long = tool({"query": "Paris " * 500}, CTX)
    assert long.error == "bad_arguments" and "keep it under 500" in long.text
    assert tool({"query": "Paris   " * 80}, CTX).ok  # whitespace collapses before the length check


def test_backend_crash_is_reported_not_raised():
    class Exploding:
        def search(self, query, k):
            raise KeyError("boom")

    res = SearchTool(Exploding())({"query": "x"}, CTX)
    assert res.error == "crashed" and "boom" in res.text


# --------------------------------------------------------------------------- HTTP retriever


class _Handler(BaseHTTPRequestHandler):
    """Routes: /ok, /flat (no document wrapper), /flaky (500 twice, then ok), /slow, /bad, /notfound."""

    def log_message(self, *args):  # keep test output quiet
        pass

    def _reply(self, code, body):
        data = json.dumps(body).encode() if not isinstance(body, bytes) else body
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):
        server = self.server
        length = int(self.headers.get("Content-Length", 0))
        req = json.loads(self.rfile.read(length))
        server.requests.append((self.path, req))
        k = req["topk"]
        docs = [
            {"id": str(i), "contents": f'"Title {i}"\nText of passage {i} for {req["queries"][0]}.'}
            for i in range(k)
        ]
        route = self.path.rsplit("/", 2)[-2]
        if route == "ok":
            self._reply(200, {"result": [[{"document": d, "score": 10.0 - i} for i, d in enumerate(docs)]]})
        elif route == "flat":
            self._reply(200, {"result": [docs]})
        elif route == "flaky":
            server.flaky_calls += 1
            if server.flaky_calls <= 2:
                self._reply(500, {"error": "overloaded"})
            else:
                self._reply(200, {"result": [[{"document": d, "score": 1.0} for d in docs]]})
        elif route == "slow":
            time.sleep(1.5)
            with contextlib.suppress(OSError):  # the client may have given up
                self._reply(200, {"result": [[]]})
        elif route == "bad":
            self._reply(200, b"<html>not json</html>")
        else:
            self._reply(404, {"error": "no such route"})


@pytest.fixture(scope="module")
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    httpd.requests = []
    httpd.flaky_calls = 0
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_http_search_r1_format(server):
    httpd, base = server
    backend = HTTPRetrieverBackend(base + "/ok/", timeout_s=5, retries=0)
    hits = backend.search("who built it", 3)
    assert [p.id for p in hits] == ["0", "1", "2"]
    assert hits[0].title == "Title 0" and hits[0].text == "Text of passage 0 for who built it."
    assert hits[0].score == 10.0
    path, req = httpd.requests[-1]
    assert path == "/ok/retrieve"
    assert req == {"queries": ["who built it"], "topk": 3, "return_scores": True}


def test_http_items_without_document_wrapper(server):
    _, base = server
    hits = HTTPRetrieverBackend(base + "/flat", retries=0).search("q", 2)
    assert [p.title for p in hits] == ["Title 0", "Title 1"]


def test_http_retries_after_5xx(server):
    httpd, base = server
    httpd.flaky_calls = 0
    tool = SearchTool(
        cfg=SearchConfig(backend="http", url=base + "/flaky", retries=2, backoff_s=0.05, timeout_s=5)
    )
    res = tool({"query": "eventually", "top_k": 2}, CTX)
    assert res.ok, res.text
    assert httpd.flaky_calls == 3
    assert res.text.startswith("[1] Title 0\nText of passage 0 for eventually.")


def test_http_5xx_until_retries_run_out(server):
    httpd, base = server
    httpd.flaky_calls = 0
    tool = SearchTool(cfg=SearchConfig(backend="http", url=base + "/flaky", retries=1, backoff_s=0.01))
    res = tool({"query": "x"}, CTX)
    assert res.error == "search_unavailable" and "HTTP 500" in res.text and "2 attempts" in res.text


def test_http_timeout_gives_error_in_bounded_time(server):
    _, base = server
    tool = SearchTool(
        cfg=SearchConfig(backend="http", url=base + "/slow", timeout_s=0.3, retries=1, backoff_s=0.05)
    )
    start = time.perf_counter()
    res = tool({"query": "x"}, CTX)
    elapsed = time.perf_counter() - start
    assert res.error == "search_unavailable"
    assert elapsed < 2 * 0.3 + 0.05 + 1.0  # (retries + 1) timeouts + backoff, plus slack


def test_http_connection_refused(server):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    tool = SearchTool(
        cfg=SearchConfig(
            backend="http", url=f"http://127.0.0.1:{port}", retries=2, backoff_s=0.01, timeout_s=2
        )
    )
    start = time.perf_counter()
    res = tool({"query": "x"}, CTX)
    assert res.error == "search_unavailable" and "cannot reach" in res.text
    assert time.perf_counter() - start < 2.0


def test_http_malformed_and_4xx_are_not_retried(server):
    httpd, base = server
    n = len(httpd.requests)
    with pytest.raises(SearchError, match="malformed"):
        HTTPRetrieverBackend(base + "/bad", retries=3, backoff_s=0.01).search("q", 1)
    with pytest.raises(SearchError, match="HTTP 404"):
        HTTPRetrieverBackend(base + "/missing", retries=3, backoff_s=0.01).search("q", 1)
    assert len(httpd.requests) == n + 2


@pytest.mark.parametrize(
    "data",
    [{}, {"result": "x"}, {"result": [["not a dict"]]}, {"result": [[{"document": {"id": 1}}]]}, None, []],
)
def test_parse_response_rejects_malformed(data):
    with pytest.raises(SearchError):
        HTTPRetrieverBackend.parse_response(data, 3)


def test_parse_response_edge_cases():
    assert HTTPRetrieverBackend.parse_response({"result": []}, 3) == []
    out = HTTPRetrieverBackend.parse_response(
        {
            "result": [
                [{"document": {"contents": "x"}, "score": "nan?"}, {"text": "y", "title": "T", "score": 2}]
            ]
        },
        3,
    )
    assert out == [
        Passage(title="", text="x", score=0.0, id="0"),
        Passage(title="T", text="y", score=2.0, id="1"),
    ]

"""The retrieval server as a real uvicorn process on loopback, talked to over real HTTP."""

from __future__ import annotations

import asyncio
import json
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from retrieval_helpers import TOPICS, corpus_docs, tspo_server, write_test_corpus

from tspo.errors import TSPOError
from tspo.retrieval.base import Hit, Retriever
from tspo.retrieval.bm25 import BM25Retriever
from tspo.retrieval.client import HttpRetriever
from tspo.retrieval.index import build_index
from tspo.retrieval.server import (
    MicroBatcher,
    RequestError,
    ServerLimits,
    parse_retrieve_request,
)

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
LIMITS = ("--max-queries", "8", "--max-query-chars", "200", "--max-body-bytes", "4096")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("server")
    corpus = write_test_corpus(folder / "corpus.jsonl")
    index = build_index(corpus, "bm25", folder / "idx", show_progress=False)
    with tspo_server(index, "--token", TOKEN, "--topk", "2", *LIMITS) as base_url:
        with httpx.Client(base_url=base_url, headers=AUTH, timeout=10) as client:
            yield client


def error_of(response: httpx.Response, status: int) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    return body["error"]


def test_return_scores_true(server):
    queries = ["capital of japan", "who wrote hamlet", "largest planet"]
    response = server.post("/retrieve", json={"queries": queries, "topk": 3, "return_scores": True})
    assert response.status_code == 200
    result = response.json()["result"]
    assert [row[0]["document"]["contents"].split("\n")[0] for row in result] == [
        "Tokyo",
        "Shakespeare",
        "Jupiter",
    ]
    for row in result:
        assert len(row) == 3
        assert all(set(item) == {"document", "score"} for item in row)
        assert all(set(item["document"]) == {"id", "contents"} for item in row)
        scores = [item["score"] for item in row]
        assert scores == sorted(scores, reverse=True)


def test_return_scores_false_gives_bare_documents_and_default_topk(server):
    response = server.post("/retrieve", json={"queries": ["capital of france"]})
    result = response.json()["result"]
    assert len(result) == 1 and len(result[0]) == 2  # --topk 2
    assert result[0][0] == {"id": "d1", "contents": "Paris\n" + TOPICS[1][1]}
    explicit = server.post(
        "/retrieve", json={"queries": ["capital of france"], "topk": 1, "return_scores": False}
    )
    assert explicit.json()["result"] == [[result[0][0]]]


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        (b"{not json", 400, "not valid JSON"),
        (b"\xff\xfe", 400, "not valid JSON"),
        (b"[1, 2]", 422, "must be a JSON object"),
        (b"{}", 422, "'queries' is required"),
        (b'{"queries": "capital"}', 422, "'queries' must be a list of strings, got str"),
        (b'{"queries": []}', 422, "'queries' must not be empty"),
        (b'{"queries": ["ok", 3]}', 422, "'queries[1]' must be a string, got int"),
        (b'{"queries": [null]}', 422, "'queries[0]' must be a string, got null"),
        (json.dumps({"queries": ["q"] * 9}).encode(), 422, "has 9 items; at most 8"),
        (json.dumps({"queries": ["x" * 201]}).encode(), 422, "has 201 characters; at most 200"),
        (b'{"queries": ["q"], "topk": 0}', 422, "'topk' must be an integer from 1 to 100"),
        (b'{"queries": ["q"], "topk": 101}', 422, "'topk' must be an integer from 1 to 100"),
        (b'{"queries": ["q"], "topk": "3"}', 422, "'topk' must be an integer"),
        (b'{"queries": ["q"], "topk": 2.5}', 422, "'topk' must be an integer"),
        (b'{"queries": ["q"], "topk": true}', 422, "'topk' must be an integer"),
        (b'{"queries": ["q"], "return_scores": "yes"}', 422, "'return_scores' must be true"),
        (json.dumps({"queries": ["q" * 150] * 30}).encode(), 413, "at most 4096"),
    ],
)
def test_bad_request_gets_4xx_naming_the_problem(server, body, status, message):
    response = server.post("/retrieve", content=body, headers={"content-type": "application/json"})
    assert message in error_of(response, status)
    assert server.post("/retrieve", json={"queries": ["chess"]}).status_code == 200


def test_chunked_body_over_the_limit_is_refused(server):
    def chunks():
        yield b'{"queries": ["'
        for _ in range(10):
            yield b"a" * 1000
        yield b'"]}'

    response = server.post("/retrieve", content=chunks())
    assert "exceeds 4096 bytes" in error_of(response, 413)
    assert server.get("/health").json()["status"] == "ok"


def test_token_is_required(server):
    url = str(server.base_url) + "/retrieve"
    body = {"queries": ["chess"]}
    missing = httpx.post(url, json=body)
    assert "missing bearer token" in error_of(missing, 401)
    assert missing.headers["www-authenticate"] == "Bearer"
    wrong = httpx.post(url, json=body, headers={"Authorization": "Bearer nope"})
    assert error_of(wrong, 401) == "invalid bearer token"
    basic = httpx.post(url, json=body, headers={"Authorization": "Basic czNjcmV0"})
    assert "missing bearer token" in error_of(basic, 401)


def test_unknown_route_and_method_are_json_4xx(server):
    assert error_of(server.get("/nope"), 404) == "Not Found"
    assert error_of(server.get("/retrieve"), 405) == "Method Not Allowed"


def test_32_concurrent_clients_get_their_own_answers(server):
    queries = [query for _, _, query in TOPICS] * 2
    expected = [f"d{i % len(TOPICS)}" for i in range(len(queries))][:32]
    queries = queries[:32]
    before = server.get("/health").json()
    barrier = threading.Barrier(32)

    def ask(query: str) -> str:
        with httpx.Client(base_url=server.base_url, headers=AUTH, timeout=30) as client:
            barrier.wait()
            response = client.post("/retrieve", json={"queries": [query], "topk": 1})
            assert response.status_code == 200
            return response.json()["result"][0][0]["id"]

    with ThreadPoolExecutor(max_workers=32) as pool:
        answers = list(pool.map(ask, queries))
    assert answers == expected
    after = server.get("/health").json()
    assert after["requests"] - before["requests"] == 32
    assert after["queries"] - before["queries"] == 32


def test_http_retriever_against_our_server(server):
    remote = HttpRetriever(str(server.base_url), token=TOKEN, max_batch=8)
    local = BM25Retriever.from_docs(corpus_docs())
    queries = [query for _, _, query in TOPICS]  # 20 queries: 3 requests of at most 8
    assert remote.search(queries, topk=3) == [
        [Hit(h.doc_id, h.title, h.text, pytest.approx(h.score)) for h in hits]
        for hits in local.search(queries, topk=3)
    ]
    remote.close()
    with HttpRetriever(str(server.base_url), token="wrong", retries=3) as rejected:
        with pytest.raises(TSPOError, match="HTTP 401.*invalid bearer token"):
            rejected.search(["chess"])


def test_token_from_environment(server, monkeypatch):
    monkeypatch.setenv("TSPO_RETRIEVER_TOKEN", TOKEN)
    with HttpRetriever(str(server.base_url) + "/retrieve") as remote:
        assert remote.search(["chess"], topk=1)[0][0].title == "Chess"


@settings(max_examples=200, deadline=None)
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
        lambda children: (
            st.lists(children, max_size=4)
            | st.dictionaries(
                st.sampled_from(["queries", "topk", "return_scores", "x"]), children, max_size=4
            )
        ),
        max_leaves=12,
    )
)
def test_any_json_body_is_accepted_or_a_4xx(payload):
    body = json.dumps(payload).encode()
    try:
        parsed = parse_retrieve_request(body, default_topk=3, limits=ServerLimits())
    except RequestError as err:
        assert 400 <= err.status < 500 and err.message
    else:
        assert parsed.queries and all(isinstance(q, str) for q in parsed.queries)
        assert 1 <= parsed.topk <= 100


class GatedRetriever(Retriever):
    """A real BM25 retriever whose first call waits until the test opens a gate."""

    def __init__(self):
        self.inner = BM25Retriever.from_docs(corpus_docs())
        self.calls: list[list[str]] = []
        self.entered = threading.Event()
        self.gate = threading.Event()

    def search(self, queries, topk=3):
        self.calls.append(list(queries))
        self.entered.set()
        assert self.gate.wait(10)
        return self.inner.search(queries, topk)


def test_requests_queued_during_a_search_share_the_next_call():
    retriever = GatedRetriever()

    async def scenario():
        batcher = MicroBatcher(retriever)
        await batcher.start()
        first = asyncio.create_task(batcher.search(["chess"], 1))
        await asyncio.get_running_loop().run_in_executor(None, retriever.entered.wait, 10)
        later = [
            asyncio.create_task(batcher.search([query], topk))
            for query, topk in [("capital of japan", 1), ("largest planet", 3), ("honey", 2)]
        ]
        await asyncio.sleep(0.05)
        retriever.gate.set()
        results = await asyncio.gather(first, *later)
        await batcher.stop()
        return results, batcher.stats

    results, stats = asyncio.run(scenario())
    assert retriever.calls == [["chess"], ["capital of japan", "largest planet", "honey"]]
    assert [len(r[0]) for r in results] == [1, 1, 3, 2]
    assert [r[0][0].title for r in results] == ["Chess", "Tokyo", "Jupiter", "Honey"]
    assert (stats.batches, stats.requests, stats.largest_batch) == (2, 4, 3)


class FailingRetriever(Retriever):
    """A real BM25 retriever that fails on one poisoned query, like a backend hitting a bug."""

    def __init__(self):
        self.inner = BM25Retriever.from_docs(corpus_docs())

    def search(self, queries, topk=3):
        if "poison" in queries:
            raise RuntimeError("backend failure")
        return self.inner.search(queries, topk)


def test_a_failing_search_fails_its_batch_and_the_batcher_keeps_serving():
    async def scenario():
        batcher = MicroBatcher(FailingRetriever())
        await batcher.start()
        with pytest.raises(RuntimeError, match="backend failure"):
            await batcher.search(["poison"], 1)
        hits = await batcher.search(["chess"], 1)
        await batcher.stop()
        return hits

    assert asyncio.run(scenario())[0][0].title == "Chess"


def test_served_connections_send_answers_without_waiting_for_an_ack() -> None:
    """`tspo serve`'s listening socket makes asyncio turn Nagle's algorithm off on every accepted
    connection: with it on, each answer written in two parts waited for the client's delayed
    ACK (~40 ms on Linux), whatever the search cost."""
    import socket

    from tspo.retrieval.server import listen_socket

    sock = listen_socket("127.0.0.1", 0)

    async def accepted_nodelay() -> int:
        accepted: asyncio.Future[int] = asyncio.get_running_loop().create_future()

        def on_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            conn = writer.get_extra_info("socket")
            accepted.set_result(conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            writer.close()

        server = await asyncio.start_server(on_connection, sock=sock)
        _, writer = await asyncio.open_connection(*sock.getsockname()[:2])
        try:
            return await asyncio.wait_for(accepted, timeout=10)
        finally:
            writer.close()
            server.close()
            await server.wait_closed()

    assert asyncio.run(accepted_nodelay()) != 0

"""Fault injection on the retrieval server: overload, gone clients, bad queries, a dead worker.

Every test talks real HTTP to a real uvicorn on loopback: ``tspo serve`` as a process, or
:func:`create_app` in a thread when the fault needs a hand inside the retriever. Each client has a
timeout, so a server that hangs fails the test instead of stalling it.
"""

from __future__ import annotations

import socket
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

import httpx
import pytest
from retrieval_helpers import app_server, corpus_docs, tspo_server, write_test_corpus

from tspo.retrieval.base import Retriever
from tspo.retrieval.bm25 import BM25Retriever
from tspo.retrieval.client import HttpRetriever
from tspo.retrieval.index import build_index
from tspo.retrieval.server import create_app

TIMEOUT = 10


class WorkerCrash(BaseException):
    """Not an ``Exception``: it escapes the batch worker's error handling, as a crash would."""


class ScriptedRetriever(Retriever):
    """A real BM25 retriever with faults: its first call waits for ``gate``; the query
    ``poison`` raises like a backend bug; the query ``crash`` kills the batch worker."""

    def __init__(self) -> None:
        self.inner = BM25Retriever.from_docs(corpus_docs())
        self.calls: list[list[str]] = []
        self.entered = threading.Event()
        self.gate = threading.Event()

    def search(self, queries, topk=3):
        self.calls.append(list(queries))
        self.entered.set()
        assert self.gate.wait(TIMEOUT)
        if "crash" in queries:
            raise WorkerCrash("simulated crash of the batch worker")
        if "poison" in queries:
            raise RuntimeError("backend failure")
        return self.inner.search(queries, topk)

    def __len__(self) -> int:
        return len(self.inner)


def post(base_url: str, query: str) -> httpx.Response:
    return httpx.post(f"{base_url}/retrieve", json={"queries": [query], "topk": 1}, timeout=TIMEOUT)


def health(base_url: str) -> httpx.Response:
    return httpx.get(f"{base_url}/health", timeout=TIMEOUT)


def wait_until(condition, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def queue_depth(base_url: str) -> int:
    return health(base_url).json()["queue_depth"]


def title(response: httpx.Response) -> str:
    assert response.status_code == 200, response.text
    return response.json()["result"][0][0]["contents"].split("\n")[0]


@pytest.fixture
def pool():
    with ThreadPoolExecutor(max_workers=8) as executor:
        yield executor


def block_worker(pool: ThreadPoolExecutor, base_url: str, retriever: ScriptedRetriever) -> Future:
    """Send one request and wait until the worker is stuck in its search."""
    first = pool.submit(post, base_url, "chess board game")
    assert retriever.entered.wait(TIMEOUT)
    return first


def test_full_queue_answers_503_with_retry_after_at_once(pool):
    retriever = ScriptedRetriever()
    with app_server(create_app(retriever, max_pending=2)) as url:
        first = block_worker(pool, url, retriever)
        queued = []
        for depth, query in enumerate(("capital of japan", "largest planet"), 1):
            queued.append(pool.submit(post, url, query))
            wait_until(lambda depth=depth: queue_depth(url) == depth)

        refusals = []
        with httpx.Client(base_url=url, timeout=TIMEOUT) as client:
            client.get("/health")  # open the connection first: time the answer, not the connect
            for _ in range(5):
                started = time.perf_counter()
                response = client.post("/retrieve", json={"queries": ["honey"]})
                refusals.append(time.perf_counter() - started)
                assert response.status_code == 503, response.text
                assert response.headers["retry-after"] == "1"
                assert "overloaded" in response.json()["error"]
        assert sorted(refusals)[len(refusals) // 2] < 0.1, refusals
        assert max(refusals) < 1.0, refusals
        state = health(url).json()
        assert (state["queue_depth"], state["in_flight"], state["refused"]) == (2, 1, 5)
        assert state["limits"]["max_pending"] == 2

        retriever.gate.set()
        assert title(first.result()) == "Chess"
        assert [title(f.result()) for f in queued] == ["Tokyo", "Jupiter"]
        assert retriever.calls == [["chess board game"], ["capital of japan", "largest planet"]]
        assert health(url).json()["queue_depth"] == 0


def test_a_request_whose_client_has_gone_is_not_searched(pool):
    retriever = ScriptedRetriever()
    with app_server(create_app(retriever)) as url:
        first = block_worker(pool, url, retriever)
        body = b'{"queries": ["largest planet"]}'
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=TIMEOUT) as sock:
            sock.sendall(
                b"POST /retrieve HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
            )
            wait_until(lambda: queue_depth(url) == 1)
        # The client has hung up. A live client queues behind it.
        live = pool.submit(post, url, "capital of japan")
        wait_until(lambda: queue_depth(url) == 2)
        time.sleep(0.2)  # let the server see the closed connection
        retriever.gate.set()
        assert title(first.result()) == "Chess"
        assert title(live.result()) == "Tokyo"
        assert retriever.calls == [["chess board game"], ["capital of japan"]]
        assert health(url).json()["abandoned"] == 1


def test_a_failing_query_fails_only_its_own_request(pool):
    retriever = ScriptedRetriever()
    with app_server(create_app(retriever)) as url:
        first = block_worker(pool, url, retriever)
        bad = pool.submit(post, url, "poison")
        wait_until(lambda: queue_depth(url) == 1)
        good = pool.submit(post, url, "capital of japan")
        wait_until(lambda: queue_depth(url) == 2)
        retriever.gate.set()
        assert title(first.result()) == "Chess"
        assert title(good.result()) == "Tokyo"
        failed = bad.result()
        assert failed.status_code == 500
        assert "backend failure" in failed.json()["error"]
        # One micro-batch held both; it failed, so each request was searched on its own.
        assert retriever.calls[1] == ["poison", "capital of japan"]
        assert sorted(map(tuple, retriever.calls[2:])) == [("capital of japan",), ("poison",)]
        state = health(url).json()
        assert (state["status"], state["failed"]) == ("ok", 1)
        assert title(post(url, "largest planet")) == "Jupiter"


def test_a_dead_batch_worker_answers_503_at_once(pool):
    retriever = ScriptedRetriever()
    with app_server(create_app(retriever)) as url:
        crashing = pool.submit(post, url, "crash")
        assert retriever.entered.wait(TIMEOUT)
        queued = pool.submit(post, url, "capital of japan")
        wait_until(lambda: queue_depth(url) == 1)
        retriever.gate.set()
        for response in (crashing.result(), queued.result()):
            assert response.status_code == 503, response.text
            assert "batch worker died" in response.json()["error"]

        started = time.perf_counter()
        dead_health = health(url)
        refused = post(url, "largest planet")
        assert time.perf_counter() - started < 2.0
        assert dead_health.status_code == 503
        assert dead_health.json()["status"] == "unavailable"
        assert "WorkerCrash" in dead_health.json()["error"]
        assert refused.status_code == 503
        assert retriever.calls == [["crash"]]  # nothing was searched after the crash


@pytest.fixture(scope="module")
def served_index(tmp_path_factory):
    folder = tmp_path_factory.mktemp("faults")
    corpus = write_test_corpus(folder / "corpus.jsonl")
    return build_index(corpus, "bm25", folder / "idx", show_progress=False)


@pytest.mark.parametrize(
    "body",
    [
        b"[" * (1 << 20),  # 1 MiB of nesting: the JSON decoder runs out of recursion
        b'{"queries": [' * 50_000 + b'"q"' + b"]}" * 50_000,
        b'{"queries": ["q"], "topk": 1' + b"0" * 100_000 + b"}",  # an integer of 100k digits
    ],
    ids=["nested-brackets", "nested-objects", "huge-integer"],
)
def test_hostile_bodies_get_a_4xx_and_the_server_keeps_serving(served_index, body):
    with tspo_server(served_index) as url:
        response = httpx.post(
            f"{url}/retrieve",
            content=body,
            headers={"content-type": "application/json"},
            timeout=TIMEOUT,
        )
        assert response.status_code == 400, response.text
        assert "not valid JSON" in response.json()["error"]
        assert title(post(url, "capital of japan")) == "Tokyo"


def test_tspo_serve_max_pending_flag_and_health_limits(served_index):
    with tspo_server(served_index, "--max-pending", "3", "--max-query-chars", "50") as url:
        state = health(url).json()
    assert state["status"] == "ok"
    assert state["queue_depth"] == 0
    assert state["limits"] == {
        "max_queries": 256,
        "max_query_chars": 50,
        "max_body_bytes": 1 << 20,
        "max_pending": 3,
    }


def test_a_10000_character_query_fits_a_server_with_small_limits(served_index):
    """A runaway generation as a search query: the client cuts it to the server's limit."""
    runaway = ("capital of japan " * 700)[:10_000]
    queries = [runaway] + [f"largest planet {i}" for i in range(19)]
    with tspo_server(served_index, "--max-query-chars", "200", "--max-queries", "8") as url:
        with HttpRetriever(url, retries=0) as retriever:
            hits = retriever.search(queries, topk=1)
            assert (retriever.max_query_chars, retriever.max_batch) == (200, 8)  # from /health
            assert [row[0].title for row in hits] == ["Tokyo"] + ["Jupiter"] * 19
            assert retriever.search([runaway], topk=1)[0][0].title == "Tokyo"
        state = health(url).json()
    # 422 for the first request, then 3 requests of at most 8 queries, then one more search
    assert (state["requests"], state["queries"]) == (4, 21)

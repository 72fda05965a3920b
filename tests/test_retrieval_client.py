"""HttpRetriever: retries with back-off, clear errors, the Search-R1 reference JSON."""

from __future__ import annotations

import time

import pytest
from retrieval_helpers import ScriptedServer, free_port

from tspo.errors import TSPOError
from tspo.retrieval.base import Hit
from tspo.retrieval.client import HttpRetriever

REFERENCE_RESULT = {
    "result": [
        [
            {
                "document": {"id": "7", "contents": '"Mona Lisa"\nA portrait by Leonardo.'},
                "score": 3.5,
            },
            {"document": {"id": "9", "contents": "Louvre\nA museum in Paris."}, "score": 1.25},
        ],
        [{"document": {"id": "2", "contents": "Paris\nCapital of France."}, "score": 2.0}],
    ]
}


def test_dead_port_retries_with_backoff_then_fails_clearly():
    url = f"http://127.0.0.1:{free_port()}"
    retriever = HttpRetriever(url, retries=2, backoff=0.1, timeout=2)
    started = time.monotonic()
    with pytest.raises(TSPOError, match=r"failed after 3 attempts; last error: Connect"):
        retriever.search(["anything"])
    assert time.monotonic() - started >= 0.1 + 0.2  # waited 0.1 s, then 0.2 s


def test_5xx_is_retried_until_the_server_recovers():
    script = [(503, {"error": "warming up"}), (500, {"error": "boom"}), (200, REFERENCE_RESULT)]
    with ScriptedServer(script) as server:
        retriever = HttpRetriever(server.url, retries=3, backoff=0.01)
        hits = retriever.search(["who painted the mona lisa", "capital of france"], topk=2)
    assert len(server.requests) == 3
    assert server.requests[0] == {
        "queries": ["who painted the mona lisa", "capital of france"],
        "topk": 2,
        "return_scores": True,
    }
    assert hits == [
        [
            Hit("7", "Mona Lisa", "A portrait by Leonardo.", 3.5),
            Hit("9", "Louvre", "A museum in Paris.", 1.25),
        ],
        [Hit("2", "Paris", "Capital of France.", 2.0)],
    ]


def test_persistent_5xx_fails_after_the_retries():
    with ScriptedServer([(502, {"error": "bad gateway"})]) as server:
        with pytest.raises(TSPOError, match=r"after 2 attempts; last error: HTTP 502: bad gateway"):
            HttpRetriever(server.url, retries=1, backoff=0.01).search(["q"])
    assert len(server.requests) == 2


def test_4xx_fails_at_once_with_the_server_message():
    with ScriptedServer([(422, {"error": "'topk' must be an integer from 1 to 100"})]) as server:
        with pytest.raises(TSPOError, match=r"HTTP 422\): 'topk' must be an integer"):
            HttpRetriever(server.url, retries=3, backoff=0.01).search(["q"], topk=500)
    assert len(server.requests) == 1


def test_bare_document_items_parse_without_scores():
    bare = {"result": [[{"id": "1", "contents": "Title\nBody text."}]]}
    with ScriptedServer([(200, bare)]) as server:
        assert HttpRetriever(server.url).search(["q"]) == [[Hit("1", "Title", "Body text.", 0.0)]]


@pytest.mark.parametrize(
    "payload",
    [{"results": []}, {"result": [[]]}, {"result": ["x"]}, {"result": [[{"id": "1"}]]}, [1]],
)
def test_malformed_answers_are_clear_errors(payload):
    with ScriptedServer([(200, payload)]) as server:
        with pytest.raises(TSPOError, match="retriever"):
            HttpRetriever(server.url, retries=0).search(["a", "b"])


def test_large_batches_are_split_and_reassembled_in_order():
    rows = [[{"document": {"id": str(i), "contents": f"T{i}\nx"}, "score": 1.0}] for i in range(2)]
    with ScriptedServer([(200, {"result": rows})]) as server:
        hits = HttpRetriever(server.url, max_batch=2).search(["a", "b", "c", "d"], topk=1)
    assert [len(r["queries"]) for r in server.requests] == [2, 2]
    assert [r["queries"] for r in server.requests] == [["a", "b"], ["c", "d"]]
    assert [h[0].doc_id for h in hits] == ["0", "1", "0", "1"]
    assert HttpRetriever(server.url).search([]) == []


def test_invalid_settings_are_refused():
    with pytest.raises(TSPOError):
        HttpRetriever("http://127.0.0.1:1", retries=-1)


@pytest.mark.parametrize("status", [429, 503])
def test_overload_answers_are_retried_after_retry_after(status):
    script = [(status, {"error": "overloaded"}, {"Retry-After": "1"}), (200, REFERENCE_RESULT)]
    with ScriptedServer(script) as server:
        retriever = HttpRetriever(server.url, retries=2, backoff=0.01)
        started = time.monotonic()
        hits = retriever.search(["a", "b"], topk=2)
        waited = time.monotonic() - started
    assert len(server.requests) == 2
    assert hits[1] == [Hit("2", "Paris", "Capital of France.", 2.0)]
    assert 1.0 <= waited < 5.0  # waited what the server asked for, not backoff's 0.01 s


def test_retry_after_is_capped():
    script = [(503, {"error": "overloaded"}, {"Retry-After": "3600"}), (200, REFERENCE_RESULT)]
    with ScriptedServer(script) as server:
        retriever = HttpRetriever(server.url, retries=1, backoff=0.01, max_backoff=0.2)
        started = time.monotonic()
        retriever.search(["a", "b"])
        assert time.monotonic() - started < 2.0
    assert len(server.requests) == 2


def test_persistent_429_fails_after_the_retries():
    with ScriptedServer([(429, {"error": "slow down"})]) as server:
        with pytest.raises(TSPOError, match=r"after 3 attempts; last error: HTTP 429: slow down"):
            HttpRetriever(server.url, retries=2, backoff=0.01).search(["q"])
    assert len(server.requests) == 3


def test_backoff_is_exponential_jittered_and_capped(monkeypatch):
    retriever = HttpRetriever("http://127.0.0.1:1", backoff=0.5, max_backoff=3.0, jitter=0.5)
    for retry, low in [(1, 0.5), (2, 1.0), (3, 2.0)]:
        waits = [retriever.backoff_seconds(retry) for _ in range(200)]
        assert all(low <= wait <= min(low * 1.5, 3.0) for wait in waits)
        assert len(set(waits)) > 100  # jittered: clients refused together spread out
    assert retriever.backoff_seconds(10) == 3.0
    assert retriever.backoff_seconds(1, retry_after=2.5) == 2.5
    assert retriever.backoff_seconds(1, retry_after=60) == 3.0

    slept: list[float] = []
    monkeypatch.setattr("tspo.retrieval.client.time.sleep", slept.append)
    dead = HttpRetriever(f"http://127.0.0.1:{free_port()}", retries=5, backoff=0.5, max_backoff=3.0)
    with pytest.raises(TSPOError, match="after 6 attempts"):
        dead.search(["q"])
    assert len(slept) == 5
    for wait, low in zip(slept[:3], [0.5, 1.0, 2.0], strict=True):
        assert low <= wait <= low * 1.5
    assert slept[3:] == [3.0, 3.0]


@pytest.mark.parametrize("score", ["high", None, True, [1.0], float("nan")])
def test_a_non_numeric_score_is_a_clear_error(score):
    payload = {"result": [[{"document": {"id": "1", "contents": "T\nx"}, "score": score}]]}
    with ScriptedServer([(200, payload)]) as server:
        with pytest.raises(TSPOError, match="score that is not a number"):
            HttpRetriever(server.url, retries=0).search(["q"])


def test_queries_are_cut_and_batches_split_to_the_default_limits():
    rows = [[{"document": {"id": "1", "contents": "T\nx"}, "score": 1.0}]]
    with ScriptedServer([(200, {"result": rows})]) as server:
        retriever = HttpRetriever(server.url, max_body_bytes=6_000)
        assert retriever.max_query_chars == 4096  # tspo serve's default
        hits = retriever.search(["x" * 10_000], topk=1)
        assert hits == [[Hit("1", "T", "x", 1.0)]]
        assert server.requests[0]["queries"] == ["x" * 4096]
        server.requests.clear()
        assert len(retriever.search(["y" * 5000] * 3, topk=1)) == 3
    # two queries of 4096 characters do not fit one 6,000-byte body: one request each
    assert [r["queries"] for r in server.requests] == [["y" * 4096]] * 3

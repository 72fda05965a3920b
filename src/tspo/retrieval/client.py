"""`HttpRetriever`: the `Retriever` interface over HTTP, for our server or Search-R1's."""

from __future__ import annotations

import os
import time
from typing import Any

import httpx

from tspo.errors import TSPOError
from tspo.retrieval.base import Hit, Retriever, split_contents

TOKEN_ENV = "TSPO_RETRIEVER_TOKEN"
"""Environment variable holding the bearer token, read by the client and the server."""


def _endpoint(url: str) -> str:
    url = url.rstrip("/")
    return url if url.endswith("/retrieve") else f"{url}/retrieve"


def _error_message(response: httpx.Response) -> str:
    try:
        payload = response.json()
    except ValueError:
        return response.text[:200]
    if isinstance(payload, dict):
        return str(payload.get("error") or payload.get("detail") or payload)[:200]
    return str(payload)[:200]


def parse_item(item: Any) -> Hit:
    """One result item: ``{"document": {...}, "score": s}`` or a bare document object."""
    if isinstance(item, dict) and isinstance(item.get("document"), dict):
        document, score = item["document"], item.get("score", 0.0)
    elif isinstance(item, dict):
        document, score = item, item.get("score", 0.0)
    else:
        raise TSPOError(f"retriever returned a result item that is not an object: {item!r:.80}")
    contents = document.get("contents")
    if not isinstance(contents, str):
        raise TSPOError("retriever returned a document without a 'contents' string")
    title, text = split_contents(contents)
    return Hit(doc_id=str(document.get("id", "")), title=title, text=text, score=float(score))


class HttpRetriever(Retriever):
    """Send each batch of queries as one ``POST /retrieve``.

    ``url`` is the server's base URL or its ``/retrieve`` endpoint. Connection errors, timeouts and
    5xx answers are retried ``retries`` times, waiting ``backoff * 2**attempt`` seconds between
    tries; a 4xx answer fails at once. ``token`` defaults to ``$TSPO_RETRIEVER_TOKEN``. Batches
    above ``max_batch`` queries are split into several requests.
    """

    def __init__(
        self,
        url: str,
        *,
        token: str | None = None,
        timeout: float = 30.0,
        retries: int = 3,
        backoff: float = 0.5,
        max_batch: int = 256,
    ):
        if retries < 0 or backoff < 0 or max_batch < 1:
            raise TSPOError("HttpRetriever needs retries >= 0, backoff >= 0 and max_batch >= 1")
        self.url = _endpoint(url)
        self.retries = retries
        self.backoff = backoff
        self.max_batch = max_batch
        token = token if token is not None else os.environ.get(TOKEN_ENV)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._client = httpx.Client(timeout=timeout, headers=headers)

    def close(self) -> None:
        self._client.close()

    def search(self, queries: list[str], topk: int = 3) -> list[list[Hit]]:
        results: list[list[Hit]] = []
        for start in range(0, len(queries), self.max_batch):
            results.extend(self._post(list(queries[start : start + self.max_batch]), topk))
        return results

    def _post(self, queries: list[str], topk: int) -> list[list[Hit]]:
        body = {"queries": queries, "topk": topk, "return_scores": True}
        attempts = self.retries + 1
        last_problem = ""
        for attempt in range(attempts):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                response = self._client.post(self.url, json=body)
            except httpx.TransportError as err:
                last_problem = f"{type(err).__name__}: {err}"
                continue
            if response.status_code >= 500:
                last_problem = f"HTTP {response.status_code}: {_error_message(response)}"
                continue
            if response.status_code >= 400:
                raise TSPOError(
                    f"retriever at {self.url} refused the request "
                    f"(HTTP {response.status_code}): {_error_message(response)}"
                )
            return self._parse(response, len(queries))
        raise TSPOError(
            f"retriever at {self.url} failed after {attempts} attempts; last error: {last_problem}"
        )

    def _parse(self, response: httpx.Response, n_queries: int) -> list[list[Hit]]:
        try:
            payload = response.json()
        except ValueError as err:
            raise TSPOError(f"retriever at {self.url} answered with invalid JSON") from err
        result = payload.get("result") if isinstance(payload, dict) else None
        if not isinstance(result, list) or len(result) != n_queries:
            raise TSPOError(
                f"retriever at {self.url} answered without a 'result' list of {n_queries} entries"
            )
        if not all(isinstance(row, list) for row in result):
            raise TSPOError(f"retriever at {self.url} answered with a non-list result row")
        return [[parse_item(item) for item in row] for row in result]

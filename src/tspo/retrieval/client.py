"""`HttpRetriever`: the `Retriever` interface over HTTP, for our server or Search-R1's."""

from __future__ import annotations

import json
import math
import os
import random
import time
from collections.abc import Callable, Set
from email.utils import parsedate_to_datetime
from typing import Any

import httpx

from tspo.data.corpus import split_contents
from tspo.errors import TSPOError
from tspo.retrieval.base import Hit, Retriever

TOKEN_ENV = "TSPO_RETRIEVER_TOKEN"
"""Environment variable holding the bearer token, read by the client and the server."""

DEFAULT_MAX_QUERY_CHARS = 4096
DEFAULT_MAX_BODY_BYTES = 1 << 20
"""The server's default limits (``tspo serve --max-query-chars``, ``--max-body-bytes``)."""

_BODY_OVERHEAD = 64  # bytes of a request body besides its queries


def _endpoint(url: str) -> str:
    url = url.rstrip("/")
    return url if url.endswith("/retrieve") else f"{url}/retrieve"


def _retry_after(response: httpx.Response) -> float | None:
    """The ``Retry-After`` header in seconds (a number or an HTTP date), or None."""
    value = response.headers.get("retry-after", "").strip()
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError, OverflowError):
            return None
    return max(0.0, seconds) if math.isfinite(seconds) else None


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def _error_message(response: httpx.Response) -> str:
    """The server's error message, on one line, at most 200 characters."""
    try:
        payload = response.json()
    except ValueError:
        text = response.text
    else:
        if isinstance(payload, dict):
            payload = payload.get("error") or payload.get("detail") or payload
        text = str(payload)
    return " ".join(text.split())[:200]


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
    if isinstance(score, bool) or not isinstance(score, int | float) or math.isnan(score):
        raise TSPOError(f"retriever returned a score that is not a number: {score!r:.80}")
    title, text = split_contents(contents)
    return Hit(doc_id=str(document.get("id", "")), title=title, text=text, score=float(score))


class HttpRetriever(Retriever):
    """Send each batch of queries as one ``POST /retrieve``.

    ``url`` is the server's base URL or its ``/retrieve`` endpoint. ``token`` defaults to
    ``$TSPO_RETRIEVER_TOKEN``.

    Retries: connection errors, timeouts, 5xx and 429 answers are retried ``retries`` times. The
    wait before retry ``n`` (1, 2, ...) is ``backoff * 2**(n-1)``, stretched by a random factor
    in ``[1, 1 + jitter)`` so that clients refused together do not come back together, at least
    the server's ``Retry-After``, and at most ``max_backoff`` seconds. Other 4xx answers fail at
    once.

    Limits: each query is cut to ``max_query_chars`` characters, and a batch is split into
    requests of at most ``max_batch`` queries and about ``max_body_bytes`` bytes (the defaults
    are ``tspo serve``'s). When the server still refuses a request as too large (413 or 422), the
    client reads the limits from its ``GET /health`` once, adopts any that are tighter and sends
    the request again.
    """

    def __init__(
        self,
        url: str,
        *,
        token: str | None = None,
        timeout: float = 30.0,
        retries: int = 3,
        backoff: float = 0.5,
        max_backoff: float = 10.0,
        jitter: float = 0.5,
        max_batch: int = 256,
        max_query_chars: int = DEFAULT_MAX_QUERY_CHARS,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    ):
        if retries < 0 or backoff < 0 or max_backoff < 0 or jitter < 0:
            raise TSPOError(
                "HttpRetriever needs retries, backoff, max_backoff and jitter to be >= 0"
            )
        if max_batch < 1 or max_query_chars < 1 or max_body_bytes < 1:
            raise TSPOError(
                "HttpRetriever needs max_batch, max_query_chars and max_body_bytes >= 1"
            )
        self.url = _endpoint(url)
        self.health_url = self.url.removesuffix("/retrieve") + "/health"
        self.retries = retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.jitter = jitter
        self.max_batch = max_batch
        self.max_query_chars = max_query_chars
        self.max_body_bytes = max_body_bytes
        self._asked_for_limits = False
        self._random = random.Random()
        token = token if token is not None else os.environ.get(TOKEN_ENV)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._client = httpx.Client(timeout=timeout, headers=headers)

    def close(self) -> None:
        self._client.close()

    def check(self) -> None:
        """Fail fast, before any expensive work, when the server is unreachable or refuses us.

        ``GET /health`` is retried like a search (connection errors, timeouts, 5xx, 429); a server
        without ``/health`` (404, 405, 501: Search-R1's) is fine. Then one authenticated
        ``POST /retrieve`` with no queries checks the token without searching: 401 or 403 is a
        bad or missing token, 404 or 405 means no retriever at this URL. Anything else (our
        server's 422 for the empty list, a 200) passes. Raises a one-line :class:`TSPOError`.
        """
        # 501 (no /health) is an answer, not a failure; other 4xx answers go on to the token check.
        self._with_retries(lambda: self._client.get(self.health_url), self.health_url, final={501})
        try:
            response = self._client.post(self.url, json={"queries": [], "topk": 1})
        except httpx.TransportError as err:
            raise TSPOError(
                f"retriever at {self.url} failed: {type(err).__name__}: {_one_line(err)}"
            ) from None
        status = response.status_code
        if status in (401, 403):
            raise TSPOError(
                f"retriever at {self.url} refused the token (HTTP {status}): "
                f"{_error_message(response)}; set retriever.token or ${TOKEN_ENV}"
            )
        if status in (404, 405):
            raise TSPOError(
                f"no retriever at {self.url} (HTTP {status} for POST /retrieve); check the URL"
            )

    def search(self, queries: list[str], topk: int = 3) -> list[list[Hit]]:
        results: list[list[Hit]] = []
        while len(results) < len(queries):
            chunk = self._next_chunk(queries, len(results))
            try:
                results.extend(self._post(chunk, topk))
            except _TooLarge as refusal:
                if not self._adopt_server_limits():
                    raise TSPOError(str(refusal)) from None
        return results

    def _next_chunk(self, queries: list[str], start: int) -> list[str]:
        """Queries from ``start`` on, cut to the query limit, that fit one request's limits."""
        chunk: list[str] = []
        size = _BODY_OVERHEAD
        for query in queries[start : start + self.max_batch]:
            query = query[: self.max_query_chars]
            size += len(json.dumps(query).encode()) + 2
            if chunk and size > self.max_body_bytes:
                break
            chunk.append(query)
        return chunk

    def _adopt_server_limits(self) -> bool:
        """Tighten our limits to those the server's ``/health`` reports; True if any changed.

        Asked once per client: Search-R1's reference server has no ``/health``.
        """
        if self._asked_for_limits:
            return False
        self._asked_for_limits = True
        try:
            limits = self._client.get(self.health_url).json().get("limits")
        except (httpx.HTTPError, ValueError, AttributeError):
            return False
        if not isinstance(limits, dict):
            return False
        changed = False
        for key, attribute in (
            ("max_queries", "max_batch"),
            ("max_query_chars", "max_query_chars"),
            ("max_body_bytes", "max_body_bytes"),
        ):
            value = limits.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and 1 <= value:
                if value < getattr(self, attribute):
                    setattr(self, attribute, value)
                    changed = True
        return changed

    def backoff_seconds(self, retry: int, retry_after: float | None = None) -> float:
        """The wait before retry number ``retry`` (1, 2, ...): see the class docstring."""
        wait = self.backoff * 2 ** (retry - 1) * (1 + self.jitter * self._random.random())
        if retry_after is not None:
            wait = max(wait, retry_after)
        return min(wait, self.max_backoff)

    def _with_retries(
        self, send: Callable[[], httpx.Response], url: str, final: Set[int] = frozenset()
    ) -> httpx.Response:
        """The first answer of ``send`` that is not a connection error, a timeout, a 5xx or a 429
        (statuses in ``final`` count as answers), retrying with :meth:`backoff_seconds`; a
        one-line :class:`TSPOError` naming ``url`` once every attempt failed."""
        attempts = self.retries + 1
        last_problem = ""
        retry_after: float | None = None
        for attempt in range(attempts):
            if attempt:
                time.sleep(self.backoff_seconds(attempt, retry_after))
            retry_after = None
            try:
                response = send()
            except httpx.TransportError as err:
                last_problem = f"{type(err).__name__}: {_one_line(err)}"
                continue
            status = response.status_code
            if (status >= 500 or status == 429) and status not in final:
                last_problem = f"HTTP {status}: {_error_message(response)}"
                retry_after = _retry_after(response)
                continue
            return response
        raise TSPOError(
            f"retriever at {url} failed after {attempts} attempts; last error: {last_problem}"
        )

    def _post(self, queries: list[str], topk: int) -> list[list[Hit]]:
        body = {"queries": queries, "topk": topk, "return_scores": True}
        response = self._with_retries(lambda: self._client.post(self.url, json=body), self.url)
        status = response.status_code
        if status >= 400:
            message = (
                f"retriever at {self.url} refused the request "
                f"(HTTP {status}): {_error_message(response)}"
            )
            if status in (413, 422):
                raise _TooLarge(message)
            raise TSPOError(message)
        return self._parse(response, len(queries))

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


class _TooLarge(Exception):
    """A 413 or 422 answer: perhaps the server's limits are tighter than ours."""

"""The retrieval HTTP server: Search-R1's ``POST /retrieve`` JSON, validated, micro-batched.

Requests that arrive while the retriever is busy are queued and answered together by the next
retriever call (one batched search), so concurrent clients share the cost of a call instead of
waiting in line for one call each. Every malformed request gets a 4xx JSON ``{"error": ...}``.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import sys
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from tspo.retrieval.base import Hit, Retriever
from tspo.retrieval.client import TOKEN_ENV

MAX_TOPK = 100


@dataclass(frozen=True)
class ServerLimits:
    """Bounds on one request."""

    max_queries: int = 256
    max_query_chars: int = 4096
    max_body_bytes: int = 1 << 20


@dataclass(frozen=True)
class RetrieveRequest:
    queries: list[str]
    topk: int
    return_scores: bool


class RequestError(Exception):
    """A bad request: answered with ``status`` and ``{"error": message}``."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def parse_retrieve_request(
    body: bytes, *, default_topk: int, limits: ServerLimits
) -> RetrieveRequest:
    """Validate a ``/retrieve`` body; raise :class:`RequestError` naming the first problem."""
    try:
        payload = json.loads(body)
    except (UnicodeDecodeError, ValueError) as err:
        raise RequestError(400, f"request body is not valid JSON: {err}") from err
    if not isinstance(payload, dict):
        raise RequestError(422, f"request body must be a JSON object, got {_type_name(payload)}")

    if "queries" not in payload:
        raise RequestError(422, "'queries' is required: a non-empty list of strings")
    queries = payload["queries"]
    if not isinstance(queries, list):
        raise RequestError(422, f"'queries' must be a list of strings, got {_type_name(queries)}")
    if not queries:
        raise RequestError(422, "'queries' must not be empty")
    if len(queries) > limits.max_queries:
        raise RequestError(
            422, f"'queries' has {len(queries)} items; at most {limits.max_queries} are allowed"
        )
    for position, query in enumerate(queries):
        if not isinstance(query, str):
            raise RequestError(
                422, f"'queries[{position}]' must be a string, got {_type_name(query)}"
            )
        if len(query) > limits.max_query_chars:
            raise RequestError(
                422,
                f"'queries[{position}]' has {len(query)} characters; "
                f"at most {limits.max_query_chars} are allowed",
            )

    topk = payload.get("topk")
    if topk is None:
        topk = default_topk
    if isinstance(topk, bool) or not isinstance(topk, int) or not 1 <= topk <= MAX_TOPK:
        raise RequestError(422, f"'topk' must be an integer from 1 to {MAX_TOPK}, got {topk!r}")

    return_scores = payload.get("return_scores", False)
    if not isinstance(return_scores, bool):
        raise RequestError(
            422, f"'return_scores' must be true or false, got {_type_name(return_scores)}"
        )
    return RetrieveRequest(queries=queries, topk=topk, return_scores=return_scores)


def hit_to_json(hit: Hit, *, with_score: bool) -> dict[str, Any]:
    """One result item in Search-R1's shape."""
    document = {"id": hit.doc_id, "contents": hit.contents}
    return {"document": document, "score": hit.score} if with_score else document


@dataclass
class _Pending:
    queries: list[str]
    topk: int
    future: asyncio.Future[list[list[Hit]]]


@dataclass
class BatchStats:
    batches: int = 0
    requests: int = 0
    queries: int = 0
    largest_batch: int = 0


@dataclass
class MicroBatcher:
    """Queue requests and answer everything queued with one ``retriever.search`` call.

    The retriever runs in one worker thread, so the event loop keeps accepting requests while a
    search runs; those requests form the next batch. ``wait_ms`` > 0 additionally holds a lone
    request that long for company (more batching, more latency).
    """

    retriever: Retriever
    max_batch_queries: int = 512
    wait_ms: float = 0.0
    stats: BatchStats = field(default_factory=BatchStats)

    def __post_init__(self) -> None:
        self._queue: asyncio.Queue[_Pending] | None = None
        self._worker: asyncio.Task[None] | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="retriever")

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._worker = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def search(self, queries: list[str], topk: int) -> list[list[Hit]]:
        assert self._queue is not None, "MicroBatcher.start() was not awaited"
        future: asyncio.Future[list[list[Hit]]] = asyncio.get_running_loop().create_future()
        await self._queue.put(_Pending(queries, topk, future))
        return await future

    async def _collect(self) -> list[_Pending]:
        assert self._queue is not None
        batch = [await self._queue.get()]
        size = len(batch[0].queries)
        if self.wait_ms > 0 and self._queue.empty():
            await asyncio.sleep(self.wait_ms / 1000)
        while size < self.max_batch_queries and not self._queue.empty():
            item = self._queue.get_nowait()
            batch.append(item)
            size += len(item.queries)
        return batch

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._collect()
            queries = [query for item in batch for query in item.queries]
            topk = max(item.topk for item in batch)
            try:
                results = await loop.run_in_executor(
                    self._executor, self.retriever.search, queries, topk
                )
            except Exception as err:  # noqa: BLE001 - handed to each waiting request
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(err)
                continue
            self.stats.batches += 1
            self.stats.requests += len(batch)
            self.stats.queries += len(queries)
            self.stats.largest_batch = max(self.stats.largest_batch, len(batch))
            offset = 0
            for item in batch:
                rows = results[offset : offset + len(item.queries)]
                offset += len(item.queries)
                if not item.future.done():
                    item.future.set_result([row[: item.topk] for row in rows])


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


async def _read_body(request: Request, max_bytes: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise RequestError(400, f"invalid Content-Length header {declared!r}")
        if int(declared) > max_bytes:
            raise RequestError(
                413, f"request body has {declared} bytes; at most {max_bytes} are allowed"
            )
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_bytes:
            raise RequestError(413, f"request body exceeds {max_bytes} bytes")
    return bytes(body)


def _check_token(request: Request, token: str | None) -> None:
    if token is None:
        return
    header = request.headers.get("authorization", "")
    scheme, _, supplied = header.partition(" ")
    if scheme.lower() != "bearer" or not supplied:
        raise RequestError(401, "missing bearer token: send 'Authorization: Bearer <token>'")
    if not hmac.compare_digest(supplied.strip().encode(), token.encode()):
        raise RequestError(401, "invalid bearer token")


def create_app(
    retriever: Retriever,
    *,
    default_topk: int = 3,
    token: str | None = None,
    max_queries: int = 256,
    max_query_chars: int = 4096,
    max_body_bytes: int = 1 << 20,
    batch_wait_ms: float = 0.0,
    max_batch_queries: int = 512,
) -> FastAPI:
    """The FastAPI app serving ``retriever``: ``POST /retrieve`` and ``GET /health``."""
    if not 1 <= default_topk <= MAX_TOPK:
        raise ValueError(f"default_topk must be in 1..{MAX_TOPK}, got {default_topk}")
    limits = ServerLimits(
        max_queries=max_queries, max_query_chars=max_query_chars, max_body_bytes=max_body_bytes
    )
    batcher = MicroBatcher(
        retriever, max_batch_queries=max(max_batch_queries, max_queries), wait_ms=batch_wait_ms
    )

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await batcher.start()
        try:
            yield
        finally:
            await batcher.stop()

    app = FastAPI(title="TSPO retriever", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.batcher = batcher

    @app.exception_handler(RequestError)
    async def on_request_error(_: Request, err: RequestError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
        return _error(err.status, err.message, headers)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(_: Request, err: StarletteHTTPException) -> JSONResponse:
        return _error(err.status_code, str(err.detail), getattr(err, "headers", None))

    @app.exception_handler(Exception)
    async def on_failure(_: Request, err: Exception) -> JSONResponse:
        return _error(500, f"retriever failed: {type(err).__name__}: {err}")

    @app.get("/health")
    async def health() -> dict[str, Any]:
        """Liveness and micro-batching counters."""
        stats = batcher.stats
        return {
            "status": "ok",
            "documents": len(retriever) if hasattr(retriever, "__len__") else None,
            "batches": stats.batches,
            "requests": stats.requests,
            "queries": stats.queries,
            "largest_batch": stats.largest_batch,
        }

    @app.post("/retrieve")
    async def retrieve(request: Request) -> JSONResponse:
        """Search-R1 ``/retrieve``: one list of results per query, in order."""
        _check_token(request, token)
        body = await _read_body(request, limits.max_body_bytes)
        parsed = parse_retrieve_request(body, default_topk=default_topk, limits=limits)
        results = await batcher.search(parsed.queries, parsed.topk)
        payload = [
            [hit_to_json(hit, with_score=parsed.return_scores) for hit in hits] for hits in results
        ]
        return JSONResponse({"result": payload})

    return app


def serve(
    index_dir: str | Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    topk: int = 3,
    token: str | None = None,
    *,
    access_log: bool = False,
    http: str = "auto",
    **limits: Any,
) -> None:
    """Load the index in ``index_dir`` and serve it until interrupted.

    ``token`` falls back to the ``TSPO_RETRIEVER_TOKEN`` environment variable; ``http`` is
    uvicorn's HTTP parser (``auto`` picks httptools when installed, else h11); ``limits`` are
    :func:`create_app`'s keyword arguments.
    """
    import uvicorn

    from tspo.retrieval.index import load_retriever, read_manifest

    retriever = load_retriever(index_dir)
    manifest = read_manifest(index_dir)
    print(
        f"serving the {manifest['kind']} index {index_dir} ({manifest['doc_count']} documents) "
        f"at http://{host}:{port}/retrieve",
        file=sys.stderr,
        flush=True,
    )
    app = create_app(
        retriever, default_topk=topk, token=token or os.environ.get(TOKEN_ENV) or None, **limits
    )
    uvicorn.run(app, host=host, port=port, log_level="info", access_log=access_log, http=http)

"""The retrieval HTTP server: Search-R1's ``POST /retrieve`` JSON, validated, micro-batched.

Requests that arrive while the retriever is busy are queued and answered together by the next
retriever call (one batched search), so concurrent clients share the cost of a call instead of
waiting in line for one call each. Every malformed request gets a 4xx JSON ``{"error": ...}``.

Faults stay local (docs/reliability.md): the queue is bounded (a full queue answers 503 with
``Retry-After`` at once), a request whose client has gone is dropped before it is searched, a
query that makes the retriever fail fails only its own request, and a dead batch worker turns
``/health`` and ``/retrieve`` into immediate 503s instead of requests that wait forever.
"""

from __future__ import annotations

import asyncio
import errno
import hmac
import json
import logging
import os
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from tspo.errors import TSPOError
from tspo.retrieval.base import Hit, Retriever
from tspo.retrieval.client import TOKEN_ENV

MAX_TOPK = 100
logger = logging.getLogger(__name__)
RETRY_AFTER_S = 1
"""``Retry-After`` (seconds) sent with a 503 when the queue is full."""


@dataclass(frozen=True)
class ServerLimits:
    """Bounds on one request, and on how many requests may wait for the retriever."""

    max_queries: int = 256
    max_query_chars: int = 4096
    max_body_bytes: int = 1 << 20
    max_pending: int = 256

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass(frozen=True)
class RetrieveRequest:
    queries: list[str]
    topk: int
    return_scores: bool


class RequestError(Exception):
    """A request we do not serve: answered with ``status`` and ``{"error": message}``."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers


class Unavailable(RequestError):
    """503: the queue is full (with ``Retry-After``) or the batch worker is dead."""

    def __init__(self, message: str, retry_after: int | None = None):
        headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
        super().__init__(503, message, headers)


class ClientGone(Exception):
    """The request's client disconnected before its search ran; nobody reads the answer."""


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def parse_retrieve_request(
    body: bytes, *, default_topk: int, limits: ServerLimits
) -> RetrieveRequest:
    """Validate a ``/retrieve`` body; raise :class:`RequestError` naming the first problem."""
    try:
        payload = json.loads(body)
    except (UnicodeDecodeError, ValueError) as err:  # ValueError also covers over-long integers
        raise RequestError(400, f"request body is not valid JSON: {err}") from err
    except RecursionError as err:
        raise RequestError(400, "request body is not valid JSON: nested too deeply") from err
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
    is_gone: Callable[[], bool] | None = None


@dataclass
class BatchStats:
    batches: int = 0
    requests: int = 0
    queries: int = 0
    largest_batch: int = 0
    refused: int = 0  # 503: the queue was full
    abandoned: int = 0  # dropped unsearched: the client had gone
    failed: int = 0  # requests whose own search raised


@dataclass
class MicroBatcher:
    """Queue requests and answer everything queued with one ``retriever.search`` call.

    The retriever runs in one worker thread, so the event loop keeps accepting requests while a
    search runs; those requests form the next batch. ``wait_ms`` > 0 additionally holds a lone
    request that long for company (more batching, more latency).

    At most ``max_pending`` requests wait in the queue (0: no bound); :meth:`search` refuses more
    with :class:`Unavailable` at once. A batch whose search raises is searched again one request
    at a time, so a bad query fails only its own request. If the worker task ends (it only does
    on a crash or on :meth:`stop`), every waiting request and every later one gets
    :class:`Unavailable`, and :attr:`dead` says why.
    """

    retriever: Retriever
    max_batch_queries: int = 512
    wait_ms: float = 0.0
    max_pending: int = 256
    stats: BatchStats = field(default_factory=BatchStats)

    def __post_init__(self) -> None:
        self._queue: asyncio.Queue[_Pending] | None = None
        self._worker: asyncio.Task[None] | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="retriever")
        self._current: list[_Pending] = []
        self._busy_since: float | None = None
        self.dead: str | None = None

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self.dead = None
        self._worker = asyncio.create_task(self._run())
        self._worker.add_done_callback(self._on_worker_exit)

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass
            except BaseException:  # noqa: BLE001 - the crash was reported by _on_worker_exit
                pass
        self._executor.shutdown(wait=False, cancel_futures=True)

    @property
    def queue_depth(self) -> int:
        """Requests waiting for the worker (not counting the batch being searched)."""
        return self._queue.qsize() if self._queue is not None else 0

    @property
    def in_flight(self) -> int:
        """Requests in the batch being searched now."""
        return len(self._current)

    @property
    def busy_seconds(self) -> float:
        """How long the current search has been running (0 when idle)."""
        return 0.0 if self._busy_since is None else time.monotonic() - self._busy_since

    def refusal(self) -> Unavailable | None:
        """Why a new request could not be queued now (counted as refused), or None."""
        if self.dead is not None:
            return Unavailable(f"retriever unavailable: {self.dead}")
        if self.max_pending and self.queue_depth >= self.max_pending:
            self.stats.refused += 1
            return Unavailable(
                f"server overloaded: {self.queue_depth} requests are queued "
                f"(at most {self.max_pending}); retry later",
                retry_after=RETRY_AFTER_S,
            )
        return None

    def admit(self) -> None:
        """Raise :class:`Unavailable` if a new request could not be queued now."""
        refusal = self.refusal()
        if refusal is not None:
            raise refusal

    async def search(
        self,
        queries: list[str],
        topk: int,
        is_gone: Callable[[], bool] | None = None,
    ) -> list[list[Hit]]:
        """Search ``queries`` in the next batch. ``is_gone()`` says the client has disconnected;
        it must not block: it is asked for every request of every batch."""
        assert self._queue is not None, "MicroBatcher.start() was not awaited"
        self.admit()
        future: asyncio.Future[list[list[Hit]]] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Pending(queries, topk, future, is_gone))
        return await future

    async def _collect(self) -> list[_Pending]:
        """The next batch: everything queued (up to ``max_batch_queries``), minus gone clients."""
        assert self._queue is not None
        while True:
            batch = [await self._queue.get()]
            size = len(batch[0].queries)
            if self.wait_ms > 0 and self._queue.empty():
                await asyncio.sleep(self.wait_ms / 1000)
            while size < self.max_batch_queries and not self._queue.empty():
                item = self._queue.get_nowait()
                batch.append(item)
                size += len(item.queries)
            live = [item for item in batch if not self._drop_if_gone(item)]
            if live:
                return live

    def _drop_if_gone(self, item: _Pending) -> bool:
        if item.future.done():
            return True
        if item.is_gone is None or not item.is_gone():
            return False
        self.stats.abandoned += 1
        item.future.set_exception(ClientGone())
        return True

    async def _search(self, queries: list[str], topk: int) -> list[list[Hit]]:
        loop = asyncio.get_running_loop()
        results = await loop.run_in_executor(self._executor, self.retriever.search, queries, topk)
        if len(results) != len(queries):
            raise RuntimeError(
                f"retriever returned {len(results)} result lists for {len(queries)} queries"
            )
        return results

    async def _run(self) -> None:
        while True:
            batch = await self._collect()
            self._current = batch
            self._busy_since = time.monotonic()
            queries = [query for item in batch for query in item.queries]
            try:
                results = await self._search(queries, max(item.topk for item in batch))
            except Exception as err:  # noqa: BLE001 - isolated below, then handed to its request
                await self._search_one_by_one(batch, err)
            else:
                self._count(batch, len(queries))
                offset = 0
                for item in batch:
                    rows = results[offset : offset + len(item.queries)]
                    offset += len(item.queries)
                    if not item.future.done():
                        item.future.set_result([row[: item.topk] for row in rows])
            self._current = []
            self._busy_since = None

    async def _search_one_by_one(self, batch: list[_Pending], err: Exception) -> None:
        """After a failed batch: search each request alone, so one bad query fails only its own."""
        if len(batch) == 1:
            self.stats.failed += 1
            if not batch[0].future.done():
                batch[0].future.set_exception(err)
            return
        for item in batch:
            try:
                rows = await self._search(item.queries, item.topk)
            except Exception as own_err:  # noqa: BLE001 - handed to this request only
                self.stats.failed += 1
                if not item.future.done():
                    item.future.set_exception(own_err)
                continue
            self._count([item], len(item.queries))
            if not item.future.done():
                item.future.set_result(rows)

    def _count(self, batch: list[_Pending], n_queries: int) -> None:
        self.stats.batches += 1
        self.stats.requests += len(batch)
        self.stats.queries += n_queries
        self.stats.largest_batch = max(self.stats.largest_batch, len(batch))

    def _on_worker_exit(self, task: asyncio.Task[None]) -> None:
        """The worker ended: fail everything waiting, and all later requests, with a 503."""
        if task.cancelled():
            self.dead = "the server is shutting down"
        else:
            crash = task.exception()
            self.dead = f"the batch worker died ({type(crash).__name__}: {crash})"
            logger.error("retrieval server: %s; answering 503 from now on", self.dead)
        waiting = list(self._current)
        while self._queue is not None and not self._queue.empty():
            waiting.append(self._queue.get_nowait())
        self._current = []
        for item in waiting:
            if not item.future.done():
                item.future.set_exception(Unavailable(f"retriever unavailable: {self.dead}"))


class _FrontDoor:
    """ASGI middleware: answer ``POST /retrieve`` with 503 before routing while the queue is full
    or the worker is dead.

    Under overload the refusals themselves take the CPU. Refused here, a request costs about half
    of what the routed path costs (measured: ~3,200 against ~1,550 refusals/s on one core), so
    refusals stay fast. The token is not checked first: a 503 says nothing about the data.
    """

    def __init__(self, app: Any, batcher: MicroBatcher):
        self.app = app
        self.batcher = batcher

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] == "/retrieve" and scope["method"] == "POST":
            refusal = self.batcher.refusal()
            if refusal is not None:
                body = json.dumps({"error": refusal.message}).encode()
                headers = [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    *((k.lower().encode(), v.encode()) for k, v in (refusal.headers or {}).items()),
                ]
                await send({"type": "http.response.start", "status": 503, "headers": headers})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


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


async def _watch_disconnect(request: Request, gone: asyncio.Event) -> None:
    if (await request.receive())["type"] == "http.disconnect":
        gone.set()


def _check_token(request: Request, token: str | None) -> None:
    if token is None:
        return
    header = request.headers.get("authorization", "")
    scheme, _, supplied = header.partition(" ")
    if scheme.lower() != "bearer" or not supplied:
        raise RequestError(401, "missing bearer token: send 'Authorization: Bearer <token>'")
    if not hmac.compare_digest(supplied.strip().encode(), token.encode()):
        raise RequestError(401, "invalid bearer token")


def _add_error_handlers(app: FastAPI) -> None:
    """Every error is one JSON object ``{"error": ...}`` with its status (and headers)."""

    @app.exception_handler(RequestError)
    async def on_request_error(_: Request, err: RequestError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else err.headers
        return _error(err.status, err.message, headers)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(_: Request, err: StarletteHTTPException) -> JSONResponse:
        return _error(err.status_code, str(err.detail), getattr(err, "headers", None))

    @app.exception_handler(Exception)
    async def on_failure(_: Request, err: Exception) -> JSONResponse:
        return _error(500, f"retriever failed: {type(err).__name__}: {err}")


def _add_health(
    app: FastAPI, retriever: Retriever, batcher: MicroBatcher, limits: ServerLimits
) -> None:
    @app.get("/health")
    async def health() -> JSONResponse:
        """Liveness, queue and micro-batching counters, and the request limits; 503 when dead."""
        stats = batcher.stats
        payload = {
            "status": "ok" if batcher.dead is None else "unavailable",
            "documents": len(retriever) if hasattr(retriever, "__len__") else None,
            "batches": stats.batches,
            "requests": stats.requests,
            "queries": stats.queries,
            "largest_batch": stats.largest_batch,
            "queue_depth": batcher.queue_depth,
            "in_flight": batcher.in_flight,
            "busy_seconds": round(batcher.busy_seconds, 3),
            "refused": stats.refused,
            "abandoned": stats.abandoned,
            "failed": stats.failed,
            "limits": limits.as_dict(),
        }
        if batcher.dead is not None:
            payload["error"] = f"retriever unavailable: {batcher.dead}"
            return JSONResponse(payload, status_code=503)
        return JSONResponse(payload)


def _add_retrieve(
    app: FastAPI,
    batcher: MicroBatcher,
    limits: ServerLimits,
    *,
    default_topk: int,
    token: str | None,
) -> None:
    @app.post("/retrieve")
    async def retrieve(request: Request) -> Response:
        """Search-R1 ``/retrieve``: one list of results per query, in order."""
        _check_token(request, token)
        body = await _read_body(request, limits.max_body_bytes)
        parsed = parse_retrieve_request(body, default_topk=default_topk, limits=limits)
        # The body is read, so the next ASGI message is the disconnect (if the client hangs up
        # before the answer). A watcher flags it, and the batch worker skips the request. Asking
        # request.is_disconnected() from the worker instead costs an event-loop turn per request,
        # which under overload stalls the worker for seconds.
        gone = asyncio.Event()
        watcher = asyncio.create_task(_watch_disconnect(request, gone))
        try:
            results = await batcher.search(parsed.queries, parsed.topk, gone.is_set)
        except ClientGone:
            return Response(status_code=499)  # nginx's "client closed request"; nobody reads it
        except RequestError:
            raise
        except Exception as err:  # noqa: BLE001 - this request's own search failed: one log line
            logger.warning(
                "retrieval failed for %d queries: %s: %s",
                len(parsed.queries),
                type(err).__name__,
                err,
            )
            return _error(500, f"retriever failed: {type(err).__name__}: {err}")
        finally:
            watcher.cancel()
        payload = [
            [hit_to_json(hit, with_score=parsed.return_scores) for hit in hits] for hits in results
        ]
        return JSONResponse({"result": payload})


def create_app(
    retriever: Retriever,
    *,
    default_topk: int = 3,
    token: str | None = None,
    max_queries: int = ServerLimits.max_queries,
    max_query_chars: int = ServerLimits.max_query_chars,
    max_body_bytes: int = ServerLimits.max_body_bytes,
    max_pending: int = ServerLimits.max_pending,
    batch_wait_ms: float = 0.0,
    max_batch_queries: int = 512,
) -> FastAPI:
    """The FastAPI app serving ``retriever``: ``POST /retrieve`` and ``GET /health``.

    ``max_pending`` bounds the requests waiting for the retriever (0: no bound); more get 503.
    """
    if not 1 <= default_topk <= MAX_TOPK:
        raise ValueError(f"default_topk must be in 1..{MAX_TOPK}, got {default_topk}")
    if max_pending < 0:
        raise ValueError(f"max_pending must be >= 0, got {max_pending}")
    limits = ServerLimits(
        max_queries=max_queries,
        max_query_chars=max_query_chars,
        max_body_bytes=max_body_bytes,
        max_pending=max_pending,
    )
    batcher = MicroBatcher(
        retriever,
        max_batch_queries=max(max_batch_queries, max_queries),
        wait_ms=batch_wait_ms,
        max_pending=max_pending,
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
    app.state.limits = limits
    app.add_middleware(_FrontDoor, batcher=batcher)
    _add_error_handlers(app)
    _add_health(app, retriever, batcher, limits)
    _add_retrieve(app, batcher, limits, default_topk=default_topk, token=token)
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

    sock = listen_socket(host, port)  # first: a busy port is one line before anything else
    try:
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
        config = uvicorn.Config(
            app, host=host, port=port, log_level="info", access_log=access_log, http=http
        )
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()


def listen_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port``; a busy port or a bad address is one-line TSPOError."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto IPPROTO_TCP, not 0: asyncio turns Nagle's algorithm off (TCP_NODELAY) only on
    # connections whose socket says TCP. Without it every answer waited for the client's delayed
    # ACK: 44 ms for /health, 48 ms for a 4 ms search over 1M passages.
    sock = socket.socket(family=family, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        if err.errno == errno.EADDRINUSE:
            raise TSPOError(
                f"port {port} on {host} is already in use (another `tspo serve`?); "
                "choose another with --port"
            ) from None
        reason = err.strerror or str(err)
        raise TSPOError(f"cannot listen on {host}:{port}: {reason}") from None
    sock.set_inheritable(True)
    return sock

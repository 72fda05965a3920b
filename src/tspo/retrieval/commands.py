"""CLI commands for this area (registered on tspo.cli_apps): `tspo index build`, `tspo serve`."""

from __future__ import annotations

import ipaddress
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from tspo.cli_apps import app, index_app
from tspo.errors import TSPOError


class IndexKind(StrEnum):
    bm25 = "bm25"
    dense = "dense"


class HttpParser(StrEnum):
    auto = "auto"
    h11 = "h11"
    httptools = "httptools"


@index_app.command("build")
def build_command(
    *,  # keyword-only: a required option (--out) follows one with a default
    corpus: Annotated[Path, typer.Option("--corpus", help="Corpus jsonl file (id, contents).")],
    kind: Annotated[IndexKind, typer.Option("--kind", help="Index type.")] = IndexKind.bm25,
    out: Annotated[Path, typer.Option("--out", help="Folder to write the index into.")],
    encoder: Annotated[
        str | None,
        typer.Option(
            "--encoder",
            help="Dense only: a local Hugging Face encoder folder "
            "(default: bundled all-MiniLM-L6-v2).",
        ),
    ] = None,
    batch_size: Annotated[
        int, typer.Option("--batch-size", min=1, help="Dense only: encoder batch.")
    ] = 64,
    chunk_size: Annotated[
        int,
        typer.Option(
            "--chunk-size", min=1, help="Dense only: passages per saved (resumable) chunk."
        ),
    ] = 1024,
    query_prefix: Annotated[
        str,
        typer.Option(
            "--query-prefix", help="Dense only: text put before each query (e5: 'query: ')."
        ),
    ] = "",
    passage_prefix: Annotated[
        str,
        typer.Option(
            "--passage-prefix", help="Dense only: text put before each passage (e5: 'passage: ')."
        ),
    ] = "",
    stemmer: Annotated[
        str | None,
        typer.Option(
            "--stemmer", help="BM25 only: PyStemmer language, e.g. english (needs PyStemmer)."
        ),
    ] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an existing index.")
    ] = False,
    faiss_index: Annotated[
        str | None,
        typer.Option("--faiss-index", help="Dense only: flat (exact, default), ivfpq or hnsw."),
    ] = None,
    nlist: Annotated[
        int | None, typer.Option("--nlist", min=1, help="ivfpq: lists (default 4 sqrt(n)).")
    ] = None,
    pq_m: Annotated[
        int | None, typer.Option("--pq-m", min=1, help="ivfpq: codes per vector (dim/8).")
    ] = None,
    nprobe: Annotated[int, typer.Option("--nprobe", min=1, help="ivfpq: lists searched.")] = 16,
    train_sample: Annotated[
        int, typer.Option("--train-sample", min=1, help="ivfpq: training vectors at most.")
    ] = 100_000,
    hnsw_m: Annotated[int, typer.Option("--hnsw-m", min=1, help="hnsw: links per vector.")] = 32,
    ef_search: Annotated[
        int, typer.Option("--ef-search", min=1, help="hnsw: candidates per query.")
    ] = 64,
) -> None:
    """Build a BM25 or dense index from a corpus jsonl file."""
    from tspo.retrieval.dense import FaissSettings
    from tspo.retrieval.index import build_index, read_manifest

    if kind is IndexKind.bm25 and encoder is not None:
        raise TSPOError("--encoder applies to --kind dense only")
    if kind is IndexKind.bm25 and faiss_index is not None:
        raise TSPOError("--faiss-index applies to --kind dense only")
    faiss = FaissSettings(
        index_type=faiss_index or "flat",
        nlist=nlist,
        pq_m=pq_m,
        nprobe=nprobe,
        train_sample=train_sample,
        hnsw_m=hnsw_m,
        ef_search=ef_search,
    )
    build_index(
        corpus,
        kind.value,
        out,
        overwrite=overwrite,
        encoder=encoder,
        batch_size=batch_size,
        chunk_size=chunk_size,
        query_prefix=query_prefix,
        passage_prefix=passage_prefix,
        stemmer=stemmer,
        faiss=faiss,
    )
    manifest = read_manifest(out)
    typer.echo(
        f"{manifest['kind']} index of {manifest['doc_count']} documents written to {out} "
        f"in {manifest['build_seconds']:.1f}s"
    )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@app.command("serve")
def serve_command(
    index: Annotated[
        Path, typer.Option("--index", help="Index folder built by `tspo index build`.")
    ],
    host: Annotated[
        str, typer.Option("--host", help="Address to bind (loopback by default).")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=1, max=65535, help="TCP port.")] = 8000,
    topk: Annotated[
        int, typer.Option("--topk", min=1, max=100, help="Default results per query.")
    ] = 3,
    token: Annotated[
        str | None,
        typer.Option(
            "--token",
            envvar="TSPO_RETRIEVER_TOKEN",
            help="Require 'Authorization: Bearer <token>' (or set TSPO_RETRIEVER_TOKEN).",
            show_envvar=True,
        ),
    ] = None,
    max_queries: Annotated[
        int, typer.Option("--max-queries", min=1, help="Queries per request.")
    ] = 256,
    max_query_chars: Annotated[
        int, typer.Option("--max-query-chars", min=1, help="Characters per query.")
    ] = 4096,
    max_body_bytes: Annotated[
        int, typer.Option("--max-body-bytes", min=64, help="Request body size limit.")
    ] = 1 << 20,
    max_pending: Annotated[
        int,
        typer.Option(
            "--max-pending",
            min=0,
            help="Requests that may wait for the retriever; more get 503 + Retry-After "
            "(0: no bound).",
        ),
    ] = 256,
    access_log: Annotated[bool, typer.Option("--access-log", help="Log every request.")] = False,
    http: Annotated[
        HttpParser,
        typer.Option("--http", help="HTTP parser: auto uses httptools when installed, else h11."),
    ] = HttpParser.auto,
    mmap: Annotated[
        bool,
        typer.Option(
            "--mmap",
            help="Memory-map the index instead of reading it (sets TSPO_INDEX_MMAP=1): loads "
            "in about a second, pages come in as queries touch them.",
        ),
    ] = False,
) -> None:
    """Serve an index over HTTP: Search-R1's POST /retrieve, plus GET /health."""
    import os

    from tspo import preflight
    from tspo.retrieval.server import serve

    preflight.index_dir(index, "--index")
    if mmap:
        os.environ["TSPO_INDEX_MMAP"] = "1"
    if not _is_loopback(host) and not token:
        typer.echo(
            f"warning: serving on {host} without a token; anyone who can reach it can query it",
            err=True,
        )
    serve(
        index,
        host=host,
        port=port,
        topk=topk,
        token=token,
        access_log=access_log,
        http=http.value,
        max_queries=max_queries,
        max_query_chars=max_query_chars,
        max_body_bytes=max_body_bytes,
        max_pending=max_pending,
    )

"""Benchmark: BM25 retrieval over the bundled Wikipedia corpus, in process and over HTTP.

Builds the corpus with ``tspo data wiki`` (10,033 lead extracts) and a BM25 index, then measures:
build times; in-process queries/s (one query per call, and batches of 32); and a real
``tspo serve`` process on loopback under 1, 8 and 32 concurrent clients that each send one query
per request, back to back, on a keep-alive connection (p50/p99 latency, queries/s, the server's
average micro-batch). Queries are the generated QA questions. Target (issue 2): 32 concurrent
single-query clients sustain at least half the in-process single-query rate.

The load generator is a minimal asyncio HTTP/1.1 client in this process, so it costs the server
as little CPU as possible; on a 2-core machine client and server still share the cores.

    python benchmarks/retrieval.py        # writes docs/bench/retrieval.json and retrieval.md
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from tspo.data.qa import read_qa
from tspo.data.wiki import build_wiki_dataset
from tspo.retrieval.client import HttpRetriever
from tspo.retrieval.index import build_index, load_retriever
from tspo.utils import atomic_write_text, machine_info, peak_memory_mb, write_json

CONCURRENCY = (1, 8, 32)
TOPK = 3
CHECK_QUERY = "who painted the Mona Lisa"
CHECK_TITLE = "Mona Lisa"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def questions_of(wiki_dir: Path, seed: int = 0) -> list[str]:
    questions = [
        ex.question
        for split in ("train", "dev", "test")
        for ex in read_qa(wiki_dir / f"{split}.jsonl")
    ]
    random.Random(seed).shuffle(questions)
    return questions


def in_process(retriever: Any, questions: list[str], seconds: float) -> dict[str, float]:
    """Single-query calls back to back for ``seconds``, then batches of 32 for as long."""
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds
    position = 0
    while time.perf_counter() < deadline:
        query = questions[position % len(questions)]
        start = time.perf_counter()
        retriever.search([query], TOPK)
        latencies.append(time.perf_counter() - start)
        position += 1
    batched, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        batch = [questions[(position + i) % len(questions)] for i in range(32)]
        retriever.search(batch, TOPK)
        batched += 32
        position += 32
    batch_elapsed = time.perf_counter() - started
    return {
        "single_qps": len(latencies) / sum(latencies),
        "single_p50_ms": 1000 * percentile(latencies, 0.5),
        "single_p99_ms": 1000 * percentile(latencies, 0.99),
        "batch32_qps": batched / batch_elapsed,
    }


async def _client(port: int, queries: list[str], deadline: float, latencies: list[float]) -> int:
    """One keep-alive connection sending one single-query request at a time until ``deadline``."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    errors, position = 0, 0
    try:
        while time.perf_counter() < deadline:
            body = json.dumps(
                {"queries": [queries[position % len(queries)]], "topk": TOPK, "return_scores": True}
            ).encode()
            position += 1
            head = (
                "POST /retrieve HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
            ).encode()
            start = time.perf_counter()
            writer.write(head + body)
            await writer.drain()
            status = await reader.readline()
            length = 0
            while (line := await reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.decode().partition(":")
                if name.lower() == "content-length":
                    length = int(value)
            await reader.readexactly(length)
            latencies.append(time.perf_counter() - start)
            errors += not status.startswith(b"HTTP/1.1 200")
    finally:
        writer.close()
    return errors


async def load_test(port: int, concurrency: int, queries: list[str], seconds: float) -> dict:
    warm: list[float] = []
    await _client(port, queries, time.perf_counter() + 0.5, warm)
    latencies: list[float] = []
    started = time.perf_counter()
    deadline = started + seconds
    offsets = [
        queries[i * 97 % len(queries) :] + queries[: i * 97 % len(queries)]
        for i in range(concurrency)
    ]
    errors = await asyncio.gather(
        *(_client(port, offsets[i], deadline, latencies) for i in range(concurrency))
    )
    elapsed = time.perf_counter() - started
    return {
        "concurrency": concurrency,
        "requests": len(latencies),
        "errors": sum(errors),
        "qps": len(latencies) / elapsed,
        "p50_ms": 1000 * percentile(latencies, 0.5),
        "p99_ms": 1000 * percentile(latencies, 0.99),
    }


def server_peak_rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def run_server_benchmarks(index_dir: Path, questions: list[str], seconds: float) -> dict[str, Any]:
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "tspo.cli",
        "serve",
        "--index",
        str(index_dir),
        "--port",
        str(port),
    ]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                if server.poll() is not None or time.monotonic() > deadline:
                    stderr = server.stderr.read().decode()
                    raise RuntimeError(f"server did not start: {stderr}") from None
                time.sleep(0.2)
        with HttpRetriever(base) as client:
            titles = [hit.title for hit in client.search([CHECK_QUERY], TOPK)[0]]
            latencies = []
            for query in questions[:300]:
                start = time.perf_counter()
                client.search([query], TOPK)
                latencies.append(time.perf_counter() - start)
        levels = []
        for concurrency in CONCURRENCY:
            before = httpx.get(f"{base}/health").json()
            result = asyncio.run(load_test(port, concurrency, questions, seconds))
            after = httpx.get(f"{base}/health").json()
            batches = after["batches"] - before["batches"]
            result["avg_requests_per_batch"] = (after["requests"] - before["requests"]) / max(
                1, batches
            )
            levels.append(result)
            print(
                f"  {concurrency:>2} clients: {result['qps']:.0f} q/s, "
                f"p50 {result['p50_ms']:.2f} ms, p99 {result['p99_ms']:.2f} ms"
            )
        return {
            "mona_lisa_top3_over_http": titles,
            "httpx_client_p50_ms": 1000 * percentile(latencies, 0.5),
            "levels": levels,
            "server_peak_rss_mb": server_peak_rss_mb(server.pid),
        }
    finally:
        server.terminate()
        server.wait(timeout=20)


def markdown(report: dict[str, Any]) -> str:
    build, local, http = report["build"], report["in_process"], report["server"]
    lines = [
        "# Retrieval benchmark",
        "",
        f"BM25 (bm25s index, batched sparse scoring) over the bundled Wikipedia corpus: "
        f"{report['documents']:,} documents, top-{TOPK}, queries = generated QA questions.",
        "",
        f"Build: `tspo data wiki` {build['data_wiki_s']:.1f} s + `tspo index build` "
        f"{build['index_build_s']:.1f} s = {build['data_wiki_s'] + build['index_build_s']:.1f} s; "
        f"index load {build['index_load_s']:.2f} s.",
        "",
        "| mode | clients | queries/s | p50 (ms) | p99 (ms) | avg requests per retriever call |",
        "|---|---:|---:|---:|---:|---:|",
        f"| in process, 1 query per call | 1 | {local['single_qps']:.0f} | "
        f"{local['single_p50_ms']:.2f} | {local['single_p99_ms']:.2f} | 1 |",
        f"| in process, 32 queries per call | 1 | {local['batch32_qps']:.0f} | | | |",
    ]
    for level in http["levels"]:
        lines.append(
            f"| HTTP `tspo serve` ({report['uvicorn_http']}), 1 query per request | "
            f"{level['concurrency']} | {level['qps']:.0f} | {level['p50_ms']:.2f} | "
            f"{level['p99_ms']:.2f} | {level['avg_requests_per_batch']:.1f} |"
        )
    target = report["target"]
    lines += [
        "",
        f"HTTP overhead at 1 client (p50 over HTTP minus p50 in process): "
        f"{report['http_overhead_p50_ms']:.2f} ms; through `HttpRetriever` (httpx): "
        f"{http['httpx_client_p50_ms']:.2f} ms per single-query call.",
        "",
        f"Target (32 concurrent single-query clients >= half the in-process single-query rate, "
        f"{target['required_qps']:.0f} q/s): **{'met' if target['met'] else 'not met'}** "
        f"({target['measured_qps']:.0f} q/s, {target['ratio']:.2f}x the in-process rate).",
        "",
        f'Check: top-{TOPK} for "{CHECK_QUERY}": {", ".join(report["mona_lisa_top3"])} '
        f"({'includes' if report['mona_lisa_ok'] else 'MISSES'} the {CHECK_TITLE} article; "
        f"same over HTTP: {http['mona_lisa_top3_over_http'] == report['mona_lisa_top3']}).",
        "",
        f"Machine: {report['machine']['platform']}, {report['machine']['cpu_count']} CPUs, Python "
        f"{report['machine']['python']}; 1-minute load average at the end "
        f"{report['load_average_1m']:.1f} (a shared machine: the load generator, the server and "
        f"other work share the cores). Peak memory (MiB): benchmark process "
        f"{report['peak_memory_mb']['peak_rss_mb']:.0f}, server process "
        f"{http['server_peak_rss_mb'] or float('nan'):.0f}.",
        "",
        "Reproduce: `python benchmarks/retrieval.py`.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=6.0, help="Duration of each measurement.")
    parser.add_argument("--out", type=Path, default=Path("docs/bench"), help="Output folder.")
    parser.add_argument("--work", type=Path, default=None, help="Folder for corpus and index.")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="tspo-bench-retrieval-") as tmp:
        work = args.work or Path(tmp)
        started = time.perf_counter()
        build_wiki_dataset(work / "wiki")
        data_seconds = time.perf_counter() - started
        started = time.perf_counter()
        build_index(
            work / "wiki" / "corpus.jsonl",
            "bm25",
            work / "index",
            overwrite=True,
            show_progress=False,
        )
        index_seconds = time.perf_counter() - started
        started = time.perf_counter()
        retriever = load_retriever(work / "index")
        load_seconds = time.perf_counter() - started
        print(
            f"corpus {data_seconds:.1f} s, index {index_seconds:.1f} s, load {load_seconds:.2f} s"
        )

        questions = questions_of(work / "wiki")
        top3 = [hit.title for hit in retriever.search([CHECK_QUERY], TOPK)[0]]
        local = in_process(retriever, questions, args.seconds)
        print(
            f"in process: {local['single_qps']:.0f} q/s single, {local['batch32_qps']:.0f} batched"
        )
        http = run_server_benchmarks(work / "index", questions, args.seconds)

    at32 = next(level for level in http["levels"] if level["concurrency"] == 32)
    at1 = next(level for level in http["levels"] if level["concurrency"] == 1)
    report = {
        "benchmark": "retrieval",
        "documents": len(retriever),
        "topk": TOPK,
        "build": {
            "data_wiki_s": data_seconds,
            "index_build_s": index_seconds,
            "index_load_s": load_seconds,
        },
        "in_process": local,
        "server": http,
        "http_overhead_p50_ms": at1["p50_ms"] - local["single_p50_ms"],
        "target": {
            "rule": "q/s with 32 concurrent single-query clients >= 0.5 x in-process single q/s",
            "required_qps": 0.5 * local["single_qps"],
            "measured_qps": at32["qps"],
            "ratio": at32["qps"] / local["single_qps"],
            "met": at32["qps"] >= 0.5 * local["single_qps"],
        },
        "uvicorn_http": "httptools" if importlib.util.find_spec("httptools") else "h11",
        "mona_lisa_top3": top3,
        "mona_lisa_ok": CHECK_TITLE in top3,
        "peak_memory_mb": peak_memory_mb(),
        "machine": machine_info(),
        "load_average_1m": os.getloadavg()[0],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "retrieval.json", report)
    atomic_write_text(args.out / "retrieval.md", markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()

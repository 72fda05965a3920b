"""Benchmark: BM25 retrieval over the bundled Wikipedia corpus, in process and over HTTP.

Builds the corpus with ``tspo data wiki`` (10,033 lead extracts) and a BM25 index, then measures:
build times; in-process queries/s (one query per call, and batches of 32); and a real
``tspo serve`` process on loopback under 1, 8 and 32 concurrent clients that each send one query
per request, back to back, on a keep-alive connection (p50/p99 latency, queries/s, the server's
average micro-batch). Queries are the generated QA questions. Target (issue 2): 32 concurrent
single-query clients sustain at least half the in-process single-query rate.

The load generator is a minimal asyncio HTTP/1.1 client in this process, so it costs the server
as little CPU as possible; on a 2-core machine client and server still share the cores. A shared
machine's load swings from minute to minute, so every measurement is repeated in ``--rounds``
interleaved rounds and the tables report medians (and the range of queries/s); the target is
judged per round, in-process and HTTP rates taken minutes apart would not be comparable.
With httptools installed, servers with both uvicorn HTTP parsers (h11, httptools) are measured.

    python benchmarks/retrieval.py        # writes docs/bench/retrieval.json and retrieval.md
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from serving import ServeProcess, percentile

from tspo.data.qa import read_qa
from tspo.data.wiki import build_wiki_dataset
from tspo.retrieval.client import HttpRetriever
from tspo.retrieval.index import build_index, load_retriever
from tspo.utils import atomic_write_text, machine_info, peak_memory_mb, write_json

CONCURRENCY = (1, 8, 32)
TOPK = 3
CHECK_QUERY = "who painted the Mona Lisa"
CHECK_TITLE = "Mona Lisa"


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
        "qps": len(latencies) / sum(latencies),
        "p50_ms": 1000 * percentile(latencies, 0.5),
        "p99_ms": 1000 * percentile(latencies, 0.99),
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


def http_parsers() -> list[str]:
    """uvicorn's HTTP parsers available here; ``tspo serve`` uses the last one by default."""
    return ["h11", "httptools"] if importlib.util.find_spec("httptools") else ["h11"]


def httptools_status() -> dict[str, Any]:
    """Whether httptools is installed, its version, and whether tspo's dependencies name it."""
    from importlib import metadata

    try:
        version = metadata.version("httptools")
    except metadata.PackageNotFoundError:
        version = None
    requirements = metadata.requires("tspo") or []
    return {
        "installed_version": version,
        "in_tspo_dependencies": any(
            r.startswith(("httptools", "uvicorn[standard]")) for r in requirements
        ),
    }


class ServerProcess(ServeProcess):
    """``tspo serve`` with the HTTP parser ``parser``, as a child process on a free port."""

    def __init__(self, index_dir: Path, parser: str):
        self.parser = parser
        super().__init__(index_dir, "--http", parser)

    def measure(self, concurrency: int, questions: list[str], seconds: float) -> dict[str, Any]:
        before = self.health()
        result = asyncio.run(load_test(self.port, concurrency, questions, seconds))
        after = self.health()
        batches = max(1, after["batches"] - before["batches"])
        result["avg_requests_per_batch"] = (after["requests"] - before["requests"]) / batches
        return result

    def client_check(self, questions: list[str]) -> dict[str, Any]:
        """The Mona Lisa check and single-query latency through `HttpRetriever` (httpx)."""
        with HttpRetriever(self.base) as client:
            titles = [hit.title for hit in client.search([CHECK_QUERY], TOPK)[0]]
            latencies = []
            for query in questions[:300]:
                start = time.perf_counter()
                client.search([query], TOPK)
                latencies.append(time.perf_counter() - start)
        return {"mona_lisa_top3": titles, "p50_ms": 1000 * percentile(latencies, 0.5)}

    def stop(self) -> float | None:
        """Stop the server; its peak resident memory in MiB."""
        peak = server_peak_rss_mb(self.process.pid)
        self.terminate()
        return peak


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over rounds of each numeric field, plus the range of queries/s."""
    keys = [k for k, v in runs[0].items() if isinstance(v, int | float)]
    out: dict[str, Any] = {k: statistics.median(run[k] for run in runs) for k in keys}
    out["qps_min"] = min(run["qps"] for run in runs)
    out["qps_max"] = max(run["qps"] for run in runs)
    return out


def markdown(report: dict[str, Any]) -> str:
    build, local = report["build"], report["in_process"]
    lines = [
        "# Retrieval benchmark",
        "",
        f"BM25 (bm25s index, batched sparse scoring) over the bundled Wikipedia corpus: "
        f"{report['documents']:,} documents, top-{TOPK}, queries = generated QA questions. "
        f"Medians of {report['rounds']} interleaved rounds of {report['seconds']:g} s per "
        f"measurement (queries/s range in brackets).",
        "",
        f"Build: `tspo data wiki` {build['data_wiki_s']:.1f} s + `tspo index build` "
        f"{build['index_build_s']:.1f} s = {build['data_wiki_s'] + build['index_build_s']:.1f} s; "
        f"index load {build['index_load_s']:.2f} s.",
        "",
        "| mode | clients | queries/s | p50 (ms) | p99 (ms) | requests per retriever call |",
        "|---|---:|---:|---:|---:|---:|",
        f"| in process, 1 query per call | 1 | {local['qps']:.0f} "
        f"[{local['qps_min']:.0f}–{local['qps_max']:.0f}] | {local['p50_ms']:.2f} | "
        f"{local['p99_ms']:.2f} | 1 |",
        f"| in process, 32 queries per call | 1 | {local['batch32_qps']:.0f} | | | |",
    ]
    for parser, levels in report["servers"].items():
        for level in levels:
            lines.append(
                f"| HTTP `tspo serve --http {parser}`, 1 query per request | "
                f"{level['concurrency']:.0f} | {level['qps']:.0f} "
                f"[{level['qps_min']:.0f}–{level['qps_max']:.0f}] | {level['p50_ms']:.2f} | "
                f"{level['p99_ms']:.2f} | {level['avg_requests_per_batch']:.1f} |"
            )
    lines.append("")
    httptools = report["httptools"]
    if httptools["installed_version"] and not httptools["in_tspo_dependencies"]:
        lines += [
            f"httptools {httptools['installed_version']} was installed for this run; it is not "
            "among tspo's dependencies, so a default install serves with h11.",
            "",
        ]
    for parser, target in report["targets"].items():
        lines += [
            f"Target with {parser} (32 concurrent single-query clients sustain >= half the "
            f"in-process single-query rate of the same round): "
            f"**{'met' if target['met'] else 'not met'}** in {target['rounds_met']} of "
            f"{report['rounds']} rounds; median ratio {target['median_ratio']:.2f} "
            f"(per round: {', '.join(f'{r:.2f}' for r in target['ratios'])}).",
            "",
        ]
    client = report["client_check"]
    lines += [
        f"HTTP overhead at 1 client (median p50 over HTTP minus p50 in process, "
        f"{report['default_http_parser']}): {report['http_overhead_p50_ms']:.2f} ms; through "
        f"`HttpRetriever` (httpx, one client): {client['p50_ms']:.2f} ms per single-query call.",
        "",
        f'Check: top-{TOPK} for "{CHECK_QUERY}": {", ".join(report["mona_lisa_top3"])} '
        f"({'includes' if report['mona_lisa_ok'] else 'MISSES'} the {CHECK_TITLE} article; "
        f"same over HTTP: {client['mona_lisa_top3'] == report['mona_lisa_top3']}).",
        "",
        f"Machine: {report['machine']['platform']}, {report['machine']['cpu_count']} CPUs, Python "
        f"{report['machine']['python']}; 1-minute load average {report['load_average_1m'][0]:.1f} "
        f"at the start and {report['load_average_1m'][1]:.1f} at the end (a shared machine: the "
        f"load generator, the servers and other work share the cores). Peak memory (MiB): "
        f"benchmark process {report['peak_memory_mb']['peak_rss_mb']:.0f}, "
        + ", ".join(
            f"server ({parser}) {mb or float('nan'):.0f}"
            for parser, mb in report["server_peak_rss_mb"].items()
        )
        + ".",
        "",
        "Reproduce: `python benchmarks/retrieval.py`.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=4.0, help="Duration of each measurement.")
    parser.add_argument("--rounds", type=int, default=3, help="Interleaved repetitions.")
    parser.add_argument("--out", type=Path, default=Path("docs/bench"), help="Output folder.")
    parser.add_argument("--work", type=Path, default=None, help="Folder for corpus and index.")
    args = parser.parse_args()
    load_at_start = os.getloadavg()[0]

    with tempfile.TemporaryDirectory(prefix="tspo-bench-retrieval-") as tmp:
        work = args.work or Path(tmp)
        started = time.perf_counter()
        build_wiki_dataset(work / "wiki")
        data_seconds = time.perf_counter() - started
        started = time.perf_counter()
        corpus = work / "wiki" / "corpus.jsonl"
        build_index(corpus, "bm25", work / "index", overwrite=True, show_progress=False)
        index_seconds = time.perf_counter() - started
        started = time.perf_counter()
        retriever = load_retriever(work / "index")
        load_seconds = time.perf_counter() - started
        print(
            f"corpus {data_seconds:.1f} s, index {index_seconds:.1f} s, load {load_seconds:.2f} s"
        )
        questions = questions_of(work / "wiki")
        top3 = [hit.title for hit in retriever.search([CHECK_QUERY], TOPK)[0]]

        parsers = http_parsers()
        servers = {name: ServerProcess(work / "index", name) for name in parsers}
        try:
            client_check = servers[parsers[-1]].client_check(questions)
            local_runs: list[dict[str, Any]] = []
            http_runs: dict[str, dict[int, list[dict[str, Any]]]] = {
                name: {c: [] for c in CONCURRENCY} for name in parsers
            }
            for round_index in range(args.rounds):
                local_runs.append(in_process(retriever, questions, args.seconds))
                print(f"round {round_index + 1}: in process {local_runs[-1]['qps']:.0f} q/s")
                for name, server in servers.items():
                    for concurrency in CONCURRENCY:
                        run = server.measure(concurrency, questions, args.seconds)
                        http_runs[name][concurrency].append(run)
                        print(
                            f"  {name:>9} {concurrency:>2} clients: {run['qps']:.0f} q/s, "
                            f"p50 {run['p50_ms']:.2f} ms, p99 {run['p99_ms']:.2f} ms"
                        )
        finally:
            peaks = {name: server.stop() for name, server in servers.items()}

    local = summarise(local_runs)
    targets = {}
    for name in parsers:
        ratios = [
            run["qps"] / local_run["qps"]
            for run, local_run in zip(http_runs[name][32], local_runs, strict=True)
        ]
        targets[name] = {
            "rule": "q/s with 32 concurrent single-query clients >= 0.5 x in-process single q/s",
            "ratios": ratios,
            "median_ratio": statistics.median(ratios),
            "rounds_met": sum(r >= 0.5 for r in ratios),
            "met": statistics.median(ratios) >= 0.5,
        }
    summaries = {name: [summarise(http_runs[name][c]) for c in CONCURRENCY] for name in parsers}
    one_client = summaries[parsers[-1]][CONCURRENCY.index(1)]
    report = {
        "benchmark": "retrieval",
        "documents": len(retriever),
        "topk": TOPK,
        "seconds": args.seconds,
        "rounds": args.rounds,
        "build": {
            "data_wiki_s": data_seconds,
            "index_build_s": index_seconds,
            "index_load_s": load_seconds,
        },
        "in_process": local,
        "servers": summaries,
        "raw": {"in_process": local_runs, "servers": http_runs},
        "default_http_parser": parsers[-1],
        "httptools": httptools_status(),
        "http_overhead_p50_ms": one_client["p50_ms"] - local["p50_ms"],
        "client_check": client_check,
        "targets": targets,
        "mona_lisa_top3": top3,
        "mona_lisa_ok": CHECK_TITLE in top3,
        "peak_memory_mb": peak_memory_mb(),
        "server_peak_rss_mb": peaks,
        "machine": machine_info(),
        "load_average_1m": [load_at_start, os.getloadavg()[0]],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "retrieval.json", report)
    atomic_write_text(args.out / "retrieval.md", markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()

"""Benchmark: a real ``tspo serve`` on loopback offered about twice the load it can serve.

Builds the bundled Wikipedia corpus and a BM25 index, starts ``tspo serve``, and measures:

1. capacity: 32 closed-loop clients (one single-query request at a time each, keep-alive) for
   ``--seconds``; the requests/s they get through is the capacity C;
2. overload: right after, an open-loop generator sends single-query requests at ``--factor`` x C
   for ``--seconds``, whatever the server answers.

Both run once against the default queue bound and once against a small one (``--max-pending
32``), each on a fresh server. A shared machine's spare CPU swings from minute to minute, so C is
measured again right before each overload, and the CPU the server and the generator got is
reported with the figures.

For the overload runs it reports the share of requests refused (503), the p50/p99 latency of the
accepted ones (from the moment a request was due, so a late generator does not hide waiting),
how fast the refusals came back, whether every 503 carried ``Retry-After``, and wrong answers:
every accepted answer is compared with an in-process search of the same index.

    python benchmarks/overload.py   # < 1 min; writes docs/bench/overload.json and .md
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import tempfile
import time
from pathlib import Path
from typing import Any

from serving import ServeProcess, percentile

from tspo.data.qa import read_qa
from tspo.data.wiki import build_wiki_dataset
from tspo.retrieval.index import build_index, load_retriever
from tspo.utils import atomic_write_text, machine_info, write_json

TOPK = 3
CLOSED_LOOP_CLIENTS = 32
MAX_OUTSTANDING = 2048  # open-loop requests in flight at once; beyond it arrivals are skipped


class Server(ServeProcess):
    """``tspo serve`` with one torch thread, as a child process on a free loopback port."""

    def __init__(self, index_dir: Path, *args: str):
        super().__init__(index_dir, *args, env={**os.environ, "OMP_NUM_THREADS": "1"})

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        self.terminate()


class Connection:
    """A minimal keep-alive HTTP/1.1 client connection (cheap, so the server gets the CPU)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> Connection:
        return cls(*await asyncio.open_connection("127.0.0.1", port))

    async def post(self, query: str) -> tuple[int, dict[str, str], bytes]:
        body = json.dumps({"queries": [query], "topk": TOPK, "return_scores": True}).encode()
        self.writer.write(
            b"POST /retrieve HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
        )
        await self.writer.drain()
        status_line = await self.reader.readline()
        if not status_line:
            raise ConnectionError("server closed the connection")
        headers = {}
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode().partition(":")
            headers[name.strip().lower()] = value.strip()
        payload = await self.reader.readexactly(int(headers.get("content-length", 0)))
        return int(status_line.split()[1]), headers, payload

    def close(self) -> None:
        self.writer.close()


def top_hits(payload: bytes) -> list[tuple[str, float]]:
    return [(i["document"]["id"], i["score"]) for i in json.loads(payload)["result"][0]]


def is_right(answer: list[tuple[str, float]], expected: list[tuple[str, float]]) -> bool:
    """Same scores, and the same documents up to ties at the cut-off score."""
    if len(answer) != len(expected):
        return False
    if any(
        abs(a[1] - e[1]) > 1e-4 * max(1.0, abs(e[1])) for a, e in zip(answer, expected, strict=True)
    ):
        return False
    floor = expected[-1][1] + 1e-4 * max(1.0, abs(expected[-1][1])) if expected else 0.0
    above = {doc for doc, score in expected if score > floor}
    return above <= {doc for doc, _ in answer}


async def closed_loop(port: int, queries: list[str], seconds: float) -> dict[str, Any]:
    latencies: list[float] = []
    errors = 0

    async def client(offset: int, deadline: float) -> None:
        nonlocal errors
        connection = await Connection.open(port)
        position = offset
        try:
            while time.perf_counter() < deadline:
                started = time.perf_counter()
                status, _, _ = await connection.post(queries[position % len(queries)])
                latencies.append(time.perf_counter() - started)
                errors += status != 200
                position += 1
        finally:
            connection.close()

    await client(0, time.perf_counter() + 0.5)  # warm-up
    latencies.clear()
    started = time.perf_counter()
    await asyncio.gather(*(client(i * 97, started + seconds) for i in range(CLOSED_LOOP_CLIENTS)))
    elapsed = time.perf_counter() - started
    return {
        "clients": CLOSED_LOOP_CLIENTS,
        "requests": len(latencies),
        "errors": errors,
        "requests_per_s": len(latencies) / elapsed,
        "p50_ms": 1000 * percentile(latencies, 0.5),
        "p99_ms": 1000 * percentile(latencies, 0.99),
    }


async def open_loop(
    port: int, queries: list[str], expected: dict[str, list], rate: float, seconds: float
) -> dict[str, Any]:
    """Send ``rate`` requests/s for ``seconds`` without waiting for answers."""
    idle: list[Connection] = [await Connection.open(port) for _ in range(64)]
    accepted: list[float] = []
    refused: list[float] = []
    counts = {"sent": 0, "skipped": 0, "other_status": 0, "transport_errors": 0, "wrong": 0}
    retry_after_missing = 0
    outstanding: set[asyncio.Task] = set()

    async def one(query: str, due: float) -> None:
        nonlocal retry_after_missing
        connection = idle.pop() if idle else None
        try:
            if connection is None:
                connection = await Connection.open(port)
            status, headers, payload = await connection.post(query)
        except (OSError, asyncio.IncompleteReadError, ConnectionError):
            counts["transport_errors"] += 1
            if connection is not None:
                connection.close()
            return
        latency = time.perf_counter() - due
        idle.append(connection)
        if status == 200:
            accepted.append(latency)
            counts["wrong"] += not is_right(top_hits(payload), expected[query])
        elif status == 503:
            refused.append(latency)
            retry_after_missing += "retry-after" not in headers
        else:
            counts["other_status"] += 1

    rng = random.Random(0)
    started = time.perf_counter()
    total = int(rate * seconds)
    for i in range(total):
        due = started + i / rate
        delay = due - time.perf_counter()
        if delay > 0.002:
            await asyncio.sleep(delay)
        if len(outstanding) >= MAX_OUTSTANDING:
            counts["skipped"] += 1
            continue
        task = asyncio.create_task(one(queries[rng.randrange(len(queries))], due))
        outstanding.add(task)
        task.add_done_callback(outstanding.discard)
        counts["sent"] += 1
    send_elapsed = time.perf_counter() - started
    if outstanding:
        await asyncio.wait(outstanding, timeout=60)
    for connection in idle:
        connection.close()
    answered = len(accepted) + len(refused)
    return {
        "offered_per_s": rate,
        "sent_per_s": counts["sent"] / send_elapsed,
        "seconds": seconds,
        **counts,
        "accepted": len(accepted),
        "refused": len(refused),
        "refused_share": len(refused) / answered if answered else float("nan"),
        "accepted_per_s": len(accepted) / send_elapsed,
        "accepted_p50_ms": 1000 * percentile(accepted, 0.5),
        "accepted_p99_ms": 1000 * percentile(accepted, 0.99),
        "refused_p50_ms": 1000 * percentile(refused, 0.5),
        "refused_p99_ms": 1000 * percentile(refused, 0.99),
        "retry_after_missing": retry_after_missing,
    }


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "| server | capacity C (req/s; p50 / p99 ms) | offered (req/s) | sent | accepted | "
        "refused (503) | refused share | accepted p50 / p99 (ms) | 503 p50 / p99 (ms) | "
        "other errors | wrong answers | CPU: server / generator (cores) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for run in report["overload"]:
        cap = run["capacity"]
        errors = run["other_status"] + run["transport_errors"]
        lines.append(
            f"| `{run['server']}` | {cap['requests_per_s']:.0f}; {cap['p50_ms']:.0f} / "
            f"{cap['p99_ms']:.0f} | {run['offered_per_s']:.0f} | {run['sent']} | "
            f"{run['accepted']} | {run['refused']} | {100 * run['refused_share']:.0f}% | "
            f"{run['accepted_p50_ms']:.0f} / {run['accepted_p99_ms']:.0f} | "
            f"{run['refused_p50_ms']:.0f} / {run['refused_p99_ms']:.0f} | {errors} | "
            f"{run['wrong']} | {run['server_cpu_cores']:.2f} / {run['generator_cpu_cores']:.2f} |"
        )
    machine = report["machine"]
    lines += [
        "",
        f"C: 32 closed-loop single-query clients for {report['seconds']:g} s; then "
        f"{report['factor']:g} x C offered open-loop for {report['seconds']:g} s (latency counted "
        f"from when a request was due). BM25 over {report['documents']:,} Wikipedia documents, "
        f"top-{TOPK}. Every 503 carried Retry-After: "
        f"{all(r['retry_after_missing'] == 0 for r in report['overload'])}. Machine: "
        f"{machine['cpu_count']} CPUs shared with other work, load average "
        f"{report['load_average_1m']:.1f} at the start. Run took {report['wall_seconds']:.0f} s.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=4.0, help="Duration of each phase.")
    parser.add_argument("--factor", type=float, default=2.0, help="Offered load / capacity.")
    parser.add_argument("--rate", type=float, default=None, help="Offer this many req/s instead.")
    parser.add_argument("--out", type=Path, default=Path("docs/bench/overload.json"))
    args = parser.parse_args()
    wall = time.perf_counter()
    load_average = os.getloadavg()[0]

    with tempfile.TemporaryDirectory(prefix="tspo-bench-overload-") as tmp:
        work = Path(tmp)
        build_wiki_dataset(work / "wiki")
        index = build_index(work / "wiki" / "corpus.jsonl", "bm25", work / "bm25")
        questions = sorted({ex.question for ex in read_qa(work / "wiki" / "train.jsonl")})
        questions = questions[:2000]
        local = load_retriever(index)
        expected = {
            q: [(h.doc_id, h.score) for h in hits]
            for q, hits in zip(questions, local.search(questions, TOPK), strict=True)
        }
        documents = len(local)
        del local

        report: dict[str, Any] = {
            "factor": args.factor,
            "seconds": args.seconds,
            "documents": documents,
            "load_average_1m": load_average,
            "machine": machine_info(),
            "overload": [],
        }
        for server_args in ((), ("--max-pending", "32")):
            server = Server(index, *server_args)
            try:
                capacity = asyncio.run(closed_loop(server.port, questions, args.seconds))
                rate = args.rate or args.factor * capacity["requests_per_s"]
                before = server.health()
                server_cpu, own_cpu, started = (
                    server.cpu_seconds(),
                    time.process_time(),
                    time.perf_counter(),
                )
                run = asyncio.run(open_loop(server.port, questions, expected, rate, args.seconds))
                elapsed = time.perf_counter() - started
                run["server_cpu_cores"] = (server.cpu_seconds() - server_cpu) / elapsed
                run["generator_cpu_cores"] = (time.process_time() - own_cpu) / elapsed
                after = server.health()
            finally:
                server.stop()
            run["capacity"] = capacity
            run["server"] = " ".join(["tspo serve", *server_args]) if server_args else "tspo serve"
            run["max_pending"] = after["limits"]["max_pending"]
            run["server_refused"] = after["refused"] - before["refused"]
            run["server_largest_batch"] = after["largest_batch"]
            run["server_abandoned"] = after["abandoned"] - before["abandoned"]
            report["overload"].append(run)

    report["wall_seconds"] = time.perf_counter() - wall
    write_json(args.out, report)
    table = markdown(report)
    atomic_write_text(args.out.with_suffix(".md"), "# Overload benchmark\n\n" + table)
    print(table, end="")


if __name__ == "__main__":
    main()

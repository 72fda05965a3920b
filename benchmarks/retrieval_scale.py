"""Benchmark: BM25 retrieval at 10k, 100k and 1M passages, and faiss index types beyond flat.

Corpora are generated from the bundled Wikipedia extracts (``tspo data wiki``, 10,033 leads),
nothing is downloaded: passage ``i`` is extract ``i mod 10,033``; from the second copy on, each
passage gets a numbered title, keeps its first sentence and replaces every later sentence with
probability 1/2 by a sentence drawn from the whole pool, then gains one more drawn sentence
(seeded by ``i``, so every run writes the same bytes). Smaller corpora are prefixes of larger
ones. For each size this measures, each step in a child process so its peak RSS is its own:

- ``tspo index build --kind bm25`` wall time and peak RSS (streaming build);
- index size on disk (BM25 arrays, documents, the rest);
- load time in a fresh process: memory-mapped (``load_retriever(mmap=True)``, the integrity
  check included) and fully read, with the resident memory after loading;
- query latency p50/p99 with 1 and 32 concurrent single-query clients through a real
  ``tspo serve --mmap`` on a free loopback port (stopped afterwards).

Targets on 2 cores at 1M passages: build <= 10 min, its peak RSS <= 8 GB, memory-
mapped load <= 5 s, p50 at 1 client <= 20 ms. The figures are extrapolated to the 21M-passage
Wikipedia dump of Search-R1.

Dense (``--dense``, on by default): the bundled extracts embedded with the bundled MiniLM (cached
in ``--work``; about 7 minutes on 2 quiet cores), then faiss ``flat``, ``ivfpq`` and ``hnsw``
indexes built with ``tspo.retrieval.dense.build_faiss_index``; recall@3 of each against flat over
the generated questions, build time, size, query time, and a memory-mapped read
(``faiss_mmap_flags()``: ``IO_FLAG_MMAP_IFC``) of each.

    python benchmarks/retrieval_scale.py                      # 10k,100k,1M + dense -> docs/bench
    python benchmarks/retrieval_scale.py --sizes 10k --no-dense --out /tmp/bench   # quick run
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from retrieval import load_test, questions_of, server_peak_rss_mb
from serving import ServeProcess, percentile

from tspo.utils import atomic_write_text, machine_info, peak_memory_mb, write_json

TARGETS = {"build_s": 600.0, "build_peak_rss_gb": 8.0, "mmap_load_s": 5.0, "p50_1_client_ms": 20.0}
WIKIPEDIA_PASSAGES = 21_000_000
GENERATOR_VERSION = 1
SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
CONCURRENCY = (1, 32)
GB = 1e9


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} load {os.getloadavg()[0]:.1f}] {message}", flush=True)


def parse_sizes(text: str) -> list[int]:
    """``10k,100k,1M`` -> [10000, 100000, 1000000]."""
    sizes = []
    for part in text.split(","):
        part = part.strip().lower()
        scale = {"k": 1_000, "m": 1_000_000}.get(part[-1:], 1)
        sizes.append(int(float(part.rstrip("km")) * scale))
    return sizes


def size_name(n: int) -> str:
    if n % 1_000_000 == 0:
        return f"{n // 1_000_000}M"
    return f"{n // 1000}k" if n % 1000 == 0 else str(n)


# -- corpora ---------------------------------------------------------------------------------


def base_documents(work: Path) -> list[tuple[str, str]]:
    from tspo.data.corpus import read_corpus
    from tspo.data.wiki import build_wiki_dataset

    if not (work / "wiki" / "manifest.json").is_file():
        log("tspo data wiki (the bundled extracts)")
        build_wiki_dataset(work / "wiki")
    return [(d.title, d.text) for d in read_corpus(work / "wiki" / "corpus.jsonl")]


def passages(base: list[tuple[str, str]], n: int) -> Any:
    """(id, contents) of the first ``n`` generated passages (see the module docstring)."""
    sentences = [SENTENCE_END.split(text) for _, text in base]
    pool = [s for group in sentences for s in group if s]
    for i in range(n):
        copy, row = divmod(i, len(base))
        title, text = base[row]
        if copy == 0:
            yield str(i), f"{title}\n{text}"
            continue
        rng = random.Random(i)
        own = sentences[row]
        mixed = [own[0]] + [s if rng.random() < 0.5 else rng.choice(pool) for s in own[1:]]
        mixed.append(rng.choice(pool))
        yield f"s{i}", f"{title} ({copy})\n{' '.join(mixed)}"


def generate_corpus(base: list[tuple[str, str]], n: int, path: Path) -> float:
    """Write the ``n``-passage corpus to ``path`` unless it is there already; seconds taken."""
    stamp = path.with_suffix(".json")
    expected = {"passages": n, "generator_version": GENERATOR_VERSION, "base": len(base)}
    if path.is_file() and stamp.is_file() and json.loads(stamp.read_text()) == expected:
        log(f"corpus of {n:,} passages: reusing {path}")
        return 0.0
    started = time.perf_counter()
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        for index, (doc_id, contents) in enumerate(passages(base, n)):
            handle.write(json.dumps({"id": doc_id, "contents": contents}, ensure_ascii=False))
            handle.write("\n")
            if (index + 1) % 200_000 == 0:
                log(f"  generated {index + 1:,} passages")
    tmp.replace(path)
    stamp.write_text(json.dumps(expected) + "\n")
    seconds = time.perf_counter() - started
    log(f"corpus of {n:,} passages written in {seconds:.0f} s ({path.stat().st_size / GB:.2f} GB)")
    return seconds


# -- child processes -------------------------------------------------------------------------


def build_in_child(corpus: Path, index_dir: Path) -> tuple[float, float, float]:
    """``tspo index build --kind bm25`` in a child: (seconds, peak RSS MB, CPU seconds)."""
    command = [sys.executable, "-m", "tspo.cli", "index", "build", "--corpus", str(corpus)]
    command += ["--kind", "bm25", "--out", str(index_dir), "--overwrite"]
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert process.stderr is not None
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - started
    stderr = process.stderr.read().decode(errors="replace")
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise RuntimeError(f"index build failed ({process.returncode}): {stderr[-2000:]}")
    return seconds, usage.ru_maxrss / 1024, usage.ru_utime + usage.ru_stime


def probe_in_child(index_dir: Path, mmap: bool, queries: Path) -> dict[str, Any]:
    """Load ``index_dir`` in a fresh process and time it (see :func:`probe`)."""
    command = [sys.executable, __file__, "--probe", str(index_dir), "--queries", str(queries)]
    command += ["--mmap"] if mmap else []
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    assert process.stdout is not None and process.stderr is not None
    out, err = process.stdout.read().decode(), process.stderr.read().decode(errors="replace")
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"load probe failed: {err[-2000:]}")
    result = json.loads(out.strip().splitlines()[-1])
    result["process_s"] = time.perf_counter() - started
    result["peak_rss_mb"] = usage.ru_maxrss / 1024
    return result


def probe(index_dir: Path, mmap: bool, queries_path: Path) -> None:
    """Child side: load times, RSS after loading, first and warm in-process query latency."""
    import resource

    from tspo.retrieval.bm25 import BM25Retriever
    from tspo.retrieval.index import load_retriever

    queries = json.loads(queries_path.read_text())
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    started = time.perf_counter()
    BM25Retriever.load(index_dir, mmap=mmap).close()
    backend_s = time.perf_counter() - started
    started, cpu_started = time.perf_counter(), time.process_time()
    retriever = load_retriever(index_dir, mmap=mmap)  # with the manifest's size + SHA-256 check
    load_s, load_cpu_s = time.perf_counter() - started, time.process_time() - cpu_started
    rss_loaded = _rss_now_mb()
    started = time.perf_counter()
    retriever.search([queries[0]], 3)
    first_ms = 1000 * (time.perf_counter() - started)
    latencies = []
    for query in queries[1:301]:
        started = time.perf_counter()
        retriever.search([query], 3)
        latencies.append(time.perf_counter() - started)
    started = time.perf_counter()
    retriever.search(queries[:32], 3)
    batch32_ms = 1000 * (time.perf_counter() - started)
    print(
        json.dumps(
            {
                "mmap": mmap,
                "load_s": load_s,
                "load_cpu_s": load_cpu_s,
                "backend_load_s": backend_s,
                "rss_before_mb": rss_before,
                "rss_after_load_mb": rss_loaded,
                "rss_after_queries_mb": _rss_now_mb(),
                "first_query_ms": first_ms,
                "in_process_p50_ms": 1000 * percentile(latencies, 0.5),
                "in_process_p99_ms": 1000 * percentile(latencies, 0.99),
                "batch32_ms": batch32_ms,
            }
        )
    )


def _rss_now_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


# -- one size --------------------------------------------------------------------------------


def disk_usage(index_dir: Path) -> dict[str, float]:
    sizes = {"bm25_arrays": 0, "documents": 0, "other": 0}
    for path in index_dir.rglob("*"):
        if not path.is_file():
            continue
        if path.parent.name == "bm25":
            key = "bm25_arrays"
        elif path.name == "documents.jsonl":
            key = "documents"
        else:
            key = "other"
        sizes[key] += path.stat().st_size
    out = {f"{k}_gb": v / GB for k, v in sizes.items()}
    out["total_gb"] = sum(sizes.values()) / GB
    return out


def serve_latency(index_dir: Path, questions: list[str], seconds: float) -> dict[str, Any]:
    env = {**os.environ, "TSPO_INDEX_MMAP": "1"}  # what `tspo serve --mmap` sets
    server = ServeProcess(index_dir, "--max-pending", "0", env=env)
    levels = []
    try:
        for concurrency in CONCURRENCY:
            before = server.health()
            load_before = os.getloadavg()[0]
            result = asyncio.run(load_test(server.port, concurrency, questions, seconds))
            after = server.health()
            batches = max(1, after["batches"] - before["batches"])
            result["avg_requests_per_batch"] = (after["requests"] - before["requests"]) / batches
            result["load_average_1m"] = [load_before, os.getloadavg()[0]]
            levels.append(result)
            log(
                f"  serve, {concurrency:>2} clients: p50 {result['p50_ms']:.1f} ms, p99 "
                f"{result['p99_ms']:.1f} ms, {result['qps']:.0f} q/s, errors {result['errors']}"
            )
    finally:
        peak = server_peak_rss_mb(server.process.pid)
        server.terminate()
    return {"levels": levels, "server_peak_rss_mb": peak}


def measure_size(
    n: int,
    base: list[tuple[str, str]],
    work: Path,
    questions: list[str],
    seconds: float,
    reuse_build: bool = False,
) -> dict[str, Any]:
    name = size_name(n)
    corpus = work / f"corpus-{name}.jsonl"
    result: dict[str, Any] = {"passages": n, "name": name}
    result["corpus_generate_s"] = generate_corpus(base, n, corpus)
    result["corpus_gb"] = corpus.stat().st_size / GB
    index_dir = work / f"index-bm25-{name}"
    stamp = work / f"index-bm25-{name}.build.json"
    if reuse_build and stamp.is_file() and (index_dir / "manifest.json").is_file():
        result["build"] = json.loads(stamp.read_text())
        result["build"]["reused_from"] = str(stamp)
        log(f"{name}: reusing the index built at {result['build']['finished']}")
    else:
        log(f"{name}: tspo index build --kind bm25 ...")
        load_before = os.getloadavg()[0]
        build_s, build_rss, build_cpu = build_in_child(corpus, index_dir)
        result["build"] = {
            "seconds": build_s,
            "cpu_s": build_cpu,
            "peak_rss_mb": build_rss,
            "load_average_1m": [load_before, os.getloadavg()[0]],
            "finished": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        }
        write_json(stamp, result["build"])
    manifest = json.loads((index_dir / "manifest.json").read_text())
    result["build"]["manifest_build_s"] = manifest["build_seconds"]
    result["disk"] = disk_usage(index_dir)
    log(
        f"{name}: built in {result['build']['seconds']:.1f} s, peak RSS "
        f"{result['build']['peak_rss_mb'] / 1024:.2f} GB, "
        f"{result['disk']['total_gb']:.2f} GB on disk"
    )
    queries_path = work / "queries.json"
    queries_path.write_text(json.dumps(questions[:400]))
    result["load"] = {}
    for mmap in (True, False):
        load_before = os.getloadavg()[0]
        probe_result = probe_in_child(index_dir, mmap, queries_path)
        probe_result["load_average_1m"] = [load_before, os.getloadavg()[0]]
        result["load"]["mmap" if mmap else "read"] = probe_result
        log(
            f"{name}: load ({'mmap' if mmap else 'read'}) {probe_result['load_s']:.2f} s "
            f"(backend {probe_result['backend_load_s']:.2f} s), RSS "
            f"{probe_result['rss_after_load_mb']:.0f} MB, in-process p50 "
            f"{probe_result['in_process_p50_ms']:.1f} ms"
        )
    result["serve"] = serve_latency(index_dir, questions, seconds)
    result["targets"] = size_targets(result)
    return result


def size_targets(result: dict[str, Any]) -> dict[str, Any]:
    one = result["serve"]["levels"][0]
    measured = {
        "build_s": result["build"]["seconds"],
        "build_peak_rss_gb": result["build"]["peak_rss_mb"] / 1024,
        "mmap_load_s": result["load"]["mmap"]["load_s"],
        "p50_1_client_ms": one["p50_ms"],
    }
    return {
        key: {"measured": value, "target": TARGETS[key], "met": value <= TARGETS[key]}
        for key, value in measured.items()
    }


# -- extrapolation ---------------------------------------------------------------------------


def fit(points: list[tuple[int, float]]) -> tuple[float, float]:
    """Least-squares line ``a + b n`` through the two largest sizes (or the one there is)."""
    points = sorted(points)[-2:]
    if len(points) == 1:
        return 0.0, points[0][1] / points[0][0]
    (n0, y0), (n1, y1) = points
    slope = (y1 - y0) / (n1 - n0)
    return y0 - slope * n0, slope


def extrapolate(sizes: list[dict[str, Any]], n: int = WIKIPEDIA_PASSAGES) -> dict[str, Any]:
    def at(key: Any) -> float:
        a, b = fit([(s["passages"], key(s)) for s in sizes])
        return max(0.0, a + b * n)

    out = {
        "passages": n,
        "from_sizes": [s["name"] for s in sorted(sizes, key=lambda s: s["passages"])[-2:]],
        "build_s": at(lambda s: s["build"]["seconds"]),
        "build_cpu_s": at(lambda s: s["build"].get("cpu_s", float("nan"))),
        "build_peak_rss_gb": at(lambda s: s["build"]["peak_rss_mb"] / 1024),
        "disk_gb": at(lambda s: s["disk"]["total_gb"]),
        "bm25_arrays_gb": at(lambda s: s["disk"]["bm25_arrays_gb"]),
        "documents_gb": at(lambda s: s["disk"]["documents_gb"]),
        "read_load_rss_gb": at(lambda s: s["load"]["read"]["rss_after_load_mb"] / 1024),
        "p50_1_client_ms": at(lambda s: s["serve"]["levels"][0]["p50_ms"]),
        # steady state: the index in memory (a fresh map's first queries read pages from disk)
        "in_process_p50_ms": at(lambda s: s["load"]["read"]["in_process_p50_ms"]),
    }
    # Shards: each a 2-core, 24 GiB machine like this one, each answering its slice in parallel
    # and a front merging the top-k lists. The search itself (in process) must fit the p50
    # target; HTTP adds a few ms on a quiet machine (docs/bench/retrieval.md), far more here,
    # where the nice-19 server waits for the cores (see the HTTP column).
    shards_for_latency = math.ceil(out["in_process_p50_ms"] / TARGETS["p50_1_client_ms"])
    shards_for_build_ram = math.ceil(out["build_peak_rss_gb"] / TARGETS["build_peak_rss_gb"])
    hot_gb = out["bm25_arrays_gb"] + out["documents_gb"]  # everything in page cache: no disk reads
    shards_for_page_cache = math.ceil(hot_gb / 16)  # 16 of 24 GiB left to the page cache
    needed = max(shards_for_latency, shards_for_build_ram, shards_for_page_cache)
    out["machines"] = {
        "reference": "2 cores, 24 GiB RAM, one shard per machine",
        "for_p50_target": shards_for_latency,
        "for_build_rss_target": shards_for_build_ram,
        "for_index_in_page_cache": shards_for_page_cache,
        "needed": needed,
        "passages_per_shard": math.ceil(n / needed),
        "build_s_per_shard": out["build_s"] / needed,
    }
    return out


# -- dense -----------------------------------------------------------------------------------


def dense_benchmark(
    work: Path, questions: list[str], n_queries: int, scale_rows: int, max_passages: int | None
) -> dict[str, Any]:
    """faiss flat / ivfpq / hnsw over the bundled extracts: recall@3 vs flat, size, speed, mmap."""
    import faiss
    import numpy as np

    from tspo.data.corpus import read_corpus
    from tspo.retrieval.dense import Encoder, FaissSettings, build_faiss_index, encode_in_chunks
    from tspo.retrieval.documents import DocumentTable

    table = DocumentTable.from_docs(read_corpus(work / "wiki" / "corpus.jsonl")[:max_passages])
    encoder = Encoder(None)
    log(f"dense: embedding {len(table):,} passages with MiniLM (cached in {work / 'dense-emb'})")
    started = time.perf_counter()
    if max_passages is None:
        vectors = encode_in_chunks(
            encoder,
            table.contents_list(),
            work / "dense-emb",
            chunk_size=1024,
            on_chunk=lambda done, total, reused: log(
                f"  chunk {done}/{total}{' (cached)' * reused}"
            ),
        )
    else:  # a prefix: read the chunks a full run saved (never re-fingerprint that folder)
        chunks = [
            np.load(work / "dense-emb" / f"emb-{i:05d}.npy") for i in range(len(table) // 1024)
        ]
        vectors = np.concatenate(chunks)
        table = DocumentTable(table.ids[: len(vectors)], table.titles[: len(vectors)],
                              table.texts[: len(vectors)])  # fmt: skip
    embed_s = time.perf_counter() - started
    query_vectors = encoder.encode_queries(questions[:n_queries])
    truth = None
    results: dict[str, Any] = {
        "passages": len(table),
        "queries": len(query_vectors),
        "dim": encoder.dim,
        "embed_s": embed_s,
        "indexes": {},
    }
    for kind in ("flat", "ivfpq", "hnsw"):
        settings = FaissSettings(index_type=kind)
        started = time.perf_counter()
        index, used = build_faiss_index(vectors, settings)
        build_s = time.perf_counter() - started
        with tempfile.TemporaryDirectory(prefix="tspo-faiss-") as tmp:
            path = Path(tmp) / "dense.faiss"
            faiss.write_index(index, str(path))
            size = path.stat().st_size
            mmap_info = _faiss_mmap(path, used, query_vectors)
        started = time.perf_counter()
        _, rows = index.search(query_vectors, 3)
        search_s = time.perf_counter() - started
        if truth is None:
            truth = rows
        recall = float(
            np.mean([len(set(a) & set(b)) / 3 for a, b in zip(rows, truth, strict=True)])
        )
        if kind == "ivfpq":  # recall against query time as more lists are searched
            results["ivfpq_nprobe_sweep"] = _nprobe_sweep(index, used, query_vectors, truth)
        results["indexes"][kind] = {
            "settings": used.to_json(),
            "build_s": build_s,
            "bytes": size,
            "bytes_per_vector": size / len(table),
            "search_ms_per_query": 1000 * search_s / len(query_vectors),
            "recall_at_3_vs_flat": recall,
            "mmap": mmap_info,
        }
        log(
            f"dense {kind}: recall@3 vs flat {recall:.3f}, {size / 1e6:.1f} MB, build "
            f"{build_s:.2f} s, {1000 * search_s / len(query_vectors):.3f} ms/query, mmap "
            f"{'ok' if mmap_info['works'] else 'not supported'}"
        )
    if scale_rows:
        results["mmap_at_scale"] = _faiss_mmap_at_scale(vectors, query_vectors, scale_rows)
    return results


def _nprobe_sweep(index: Any, settings: Any, queries: Any, truth: Any) -> list[dict[str, Any]]:
    import faiss
    import numpy as np

    ivf = faiss.extract_index_ivf(index)
    sweep = []
    for nprobe in sorted({1, 4, 16, 64, 256, settings.nlist}):
        if nprobe > settings.nlist:
            continue
        ivf.nprobe = nprobe
        started = time.perf_counter()
        rows = index.search(queries, 3)[1]
        seconds = time.perf_counter() - started
        recall = float(
            np.mean([len(set(a) & set(b)) / 3 for a, b in zip(rows, truth, strict=True)])
        )
        sweep.append(
            {"nprobe": nprobe, "recall_at_3": recall, "ms_per_query": 1000 * seconds / len(rows)}
        )
    ivf.nprobe = settings.nprobe
    log("ivfpq nprobe: " + ", ".join(f"{r['nprobe']}: {r['recall_at_3']:.3f}" for r in sweep))
    return sweep


def _faiss_mmap_at_scale(vectors: Any, queries: Any, rows: int) -> dict[str, Any]:
    """Full read vs IO_FLAG_MMAP of flat and ivfpq indexes of ``rows`` vectors (the extracts'
    embeddings repeated with noise, re-normalised): load time, resident growth, query time."""
    import faiss
    import numpy as np

    from tspo.retrieval.dense import (
        FaissSettings,
        apply_search_settings,
        build_faiss_index,
        faiss_mmap_flags,
    )

    rng = np.random.default_rng(0)
    big = vectors[np.arange(rows) % len(vectors)] + 0.05 * rng.standard_normal(
        (rows, vectors.shape[1]), dtype=np.float32
    )
    big /= np.linalg.norm(big, axis=1, keepdims=True)
    out: dict[str, Any] = {"vectors": rows}
    for kind in ("flat", "ivfpq"):
        started = time.perf_counter()
        index, used = build_faiss_index(big, FaissSettings(index_type=kind))
        build_s = time.perf_counter() - started
        with tempfile.TemporaryDirectory(prefix="tspo-faiss-scale-") as tmp:
            path = Path(tmp) / "dense.faiss"
            faiss.write_index(index, str(path))
            del index
            entry: dict[str, Any] = {"build_s": build_s, "bytes": path.stat().st_size}
            modes = (
                ("read", 0),
                ("IO_FLAG_MMAP", faiss.IO_FLAG_MMAP),
                ("mmap", faiss_mmap_flags()),
            )
            for mode, flags in modes:
                rss = _rss_now_mb()
                started = time.perf_counter()
                loaded = faiss.read_index(str(path), flags)
                load_s = time.perf_counter() - started
                apply_search_settings(loaded, used)
                grown = _rss_now_mb() - rss
                started = time.perf_counter()
                loaded.search(queries[:1], 3)
                first_ms = 1000 * (time.perf_counter() - started)
                started = time.perf_counter()
                loaded.search(queries, 3)
                per_query = 1000 * (time.perf_counter() - started) / len(queries)
                entry[mode] = {
                    "load_s": load_s,
                    "rss_growth_mb": grown,
                    "rss_after_queries_growth_mb": _rss_now_mb() - rss,
                    "first_query_ms": first_ms,
                    "ms_per_query": per_query,
                }
                del loaded
        out[kind] = entry
        log(
            f"dense {kind} at {rows:,} vectors: {entry['bytes'] / 1e6:.0f} MB; read "
            f"{entry['read']['load_s']:.2f} s (+{entry['read']['rss_growth_mb']:.0f} MB), mmap "
            f"{entry['mmap']['load_s']:.3f} s (+{entry['mmap']['rss_growth_mb']:.0f} MB, "
            f"+{entry['mmap']['rss_after_queries_growth_mb']:.0f} MB after queries)"
        )
    return out


def _faiss_mmap(path: Path, settings: Any, queries: Any) -> dict[str, Any]:
    """Read ``path`` with IO_FLAG_MMAP: does it work, how long, same answers as a full read?"""
    import faiss

    from tspo.retrieval.dense import apply_search_settings, faiss_mmap_flags

    full = faiss.read_index(str(path))
    apply_search_settings(full, settings)
    rss = _rss_now_mb()
    started = time.perf_counter()
    try:
        mapped = faiss.read_index(str(path), faiss_mmap_flags())
    except RuntimeError as err:
        return {"works": False, "error": str(err).strip().splitlines()[-1][:200]}
    load_s = time.perf_counter() - started
    apply_search_settings(mapped, settings)
    rss_growth = _rss_now_mb() - rss
    started = time.perf_counter()
    _, rows = mapped.search(queries, 3)
    search_s = time.perf_counter() - started
    return {
        "works": True,
        "load_s": load_s,
        "rss_growth_mb": rss_growth,
        "search_ms_per_query": 1000 * search_s / len(queries),
        "same_results": bool((rows == full.search(queries, 3)[1]).all()),
    }


# -- report ----------------------------------------------------------------------------------


def mark(ok: bool) -> str:
    return "met" if ok else "**missed**"


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "# Retrieval at scale",
        "",
        "BM25 (`tspo index build --kind bm25`, streaming build) over corpora generated from the "
        "bundled Wikipedia extracts (see `benchmarks/retrieval_scale.py`); latency through a real "
        "`tspo serve --mmap` with single-query clients, top-3. Each step ran in its own process "
        "on a 2-core machine; the 1-minute load average is given next to each figure (above "
        "about 1, other jobs shared the cores and absolute times are pessimistic).",
        "",
        "| passages | build | build peak RSS | disk (arrays + docs) | load, mmap | load, "
        "read (RSS) | search in process p50 / p99 (p50 right after a mapped load) | "
        "HTTP p50 / p99, 1 client | HTTP p50 / p99, "
        "32 clients | q/s at 32 |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    nan = float("nan")
    for s in report["sizes"]:
        b, d, lm, lr = s["build"], s["disk"], s["load"]["mmap"], s["load"]["read"]
        one, many = s["serve"]["levels"]
        lines.append(
            f"| {s['passages']:,}{' (a)' if b.get('reused_from') else ''} | {b['seconds']:.1f} s "
            f"({b.get('cpu_s', nan):.0f} s CPU; "
            f"load {b['load_average_1m'][1]:.1f}) | "
            f"{b['peak_rss_mb'] / 1024:.2f} GB | {d['total_gb']:.2f} GB ({d['bm25_arrays_gb']:.2f} "
            f"+ {d['documents_gb']:.2f}) | {lm['load_s']:.2f} s "
            f"({lm.get('load_cpu_s', nan):.2f} s CPU; load "
            f"{lm['load_average_1m'][1]:.1f}) | {lr['load_s']:.1f} s "
            f"({lr['rss_after_load_mb'] / 1024:.2f} GB) | {lr['in_process_p50_ms']:.1f} / "
            f"{lr['in_process_p99_ms']:.1f} ms ({lm['in_process_p50_ms']:.1f} ms) | "
            f"{one['p50_ms']:.1f} / {one['p99_ms']:.1f} ms (load "
            f"{one['load_average_1m'][1]:.1f}) | {many['p50_ms']:.1f} / {many['p99_ms']:.1f} ms | "
            f"{many['qps']:.0f} |"
        )
    lines.append("")
    reused = [s for s in report["sizes"] if s["build"].get("reused_from")]
    if reused:
        lines += [
            "(a) index and build figures from an earlier run of this script, finished "
            + ", ".join(f"{s['name']} at {s['build']['finished']}" for s in reused)
            + " (`--reuse-builds`); the loads and queries are this run's.",
            "",
        ]
    largest = max(report["sizes"], key=lambda s: s["passages"])
    lines += [
        f"Targets at {largest['passages']:,} passages (they are set for 1,000,000):",
        "",
        "| measure | target | measured | |",
        "|---|---:|---:|---|",
    ]
    units = {"build_s": "s", "build_peak_rss_gb": "GB", "mmap_load_s": "s", "p50_1_client_ms": "ms"}
    for key, t in largest["targets"].items():
        lines.append(
            f"| {key} | <= {t['target']:g} {units[key]} | {t['measured']:.2f} {units[key]} | "
            f"{mark(t['met'])} |"
        )
    x = report["extrapolation_21m"]
    m = x["machines"]
    lines += [
        "",
        "With one size the line goes through zero: measure 100k and 1M for a real curve. "
        if len(x["from_sizes"]) == 1
        else "",
        f"Extrapolated to {x['passages']:,} passages (a line through "
        f"{' and '.join(x['from_sizes'])}): build {x['build_s'] / 60:.0f} min "
        f"({x.get('build_cpu_s', float('nan')) / 60:.0f} min of CPU) at "
        f"{x['build_peak_rss_gb']:.1f} GB peak RSS, "
        f"{x['disk_gb']:.1f} GB on disk ({x['bm25_arrays_gb']:.1f} GB arrays, "
        f"{x['documents_gb']:.1f} GB documents), {x['read_load_rss_gb']:.1f} GB resident when read "
        f"into memory, search p50 {x['in_process_p50_ms']:.0f} ms in process on one index "
        f"(HTTP at 1 client here: {x['p50_1_client_ms']:.0f} ms). Machines ({m['reference']}): "
        f"{m['for_p50_target']} for a search p50 <= 20 ms, {m['for_build_rss_target']} for a "
        f"build peak RSS <= 8 GB, {m['for_index_in_page_cache']} to hold arrays and documents "
        f"in page cache: **{m['needed']}** shards of {m['passages_per_shard']:,} passages, each "
        f"built in about {m['build_s_per_shard'] / 60:.0f} min, in parallel.",
        "",
    ]
    dense = report.get("dense")
    if dense:
        lines += [
            f"## Dense: faiss index types ({dense['passages']:,} extracts, MiniLM, "
            f"{dense['queries']} questions)",
            "",
            "| index | settings | recall@3 vs flat | size | bytes/vector | build | ms/query "
            "| mapped read |",
            "|---|---|---:|---:|---:|---:|---:|---|",
        ]
        for kind, r in dense["indexes"].items():
            mm = r["mmap"]
            mm_text = (
                f"works: {mm['load_s'] * 1000:.1f} ms, RSS +{mm['rss_growth_mb']:.0f} MB, "
                f"{mm['search_ms_per_query']:.3f} ms/query, same results {mm['same_results']}"
                if mm["works"]
                else f"not supported ({mm['error']})"
            )
            settings = ", ".join(f"{k}={v}" for k, v in r["settings"].items() if k != "index_type")
            lines.append(
                f"| {kind} | {settings or '-'} | {r['recall_at_3_vs_flat']:.3f} | "
                f"{r['bytes'] / 1e6:.1f} MB | {r['bytes_per_vector']:.0f} | {r['build_s']:.2f} s | "
                f"{r['search_ms_per_query']:.3f} | {mm_text} |"
            )
        lines.append("")
        sweep = dense.get("ivfpq_nprobe_sweep")
        if sweep:
            lines += [
                "IVF-PQ recall@3 against flat by `nprobe` (lists searched per query; the rest "
                "of the gap is the 48-byte codes' approximation):",
                "",
                "| nprobe | " + " | ".join(str(r["nprobe"]) for r in sweep) + " |",
                "|---|" + "---:|" * len(sweep),
                "| recall@3 | " + " | ".join(f"{r['recall_at_3']:.3f}" for r in sweep) + " |",
                "| ms/query | " + " | ".join(f"{r['ms_per_query']:.3f}" for r in sweep) + " |",
                "",
            ]
        scale = dense.get("mmap_at_scale")
        if scale:
            lines += [
                f"Full read vs memory-mapped reads at {scale['vectors']:,} vectors (the extracts' "
                "embeddings repeated with noise; warm page cache):",
                "",
                "| index | file | read: load, RSS | `IO_FLAG_MMAP`: load, RSS | tspo's map "
                "(`IO_FLAG_MMAP_IFC`): load, RSS | its RSS after queries | ms/query read / map |",
                "|---|---:|---:|---:|---:|---:|---:|",
            ]
            for kind in ("flat", "ivfpq"):
                e = scale[kind]
                r, m, plain = e["read"], e["mmap"], e.get("IO_FLAG_MMAP", e["mmap"])
                lines.append(
                    f"| {kind} | {e['bytes'] / 1e6:.0f} MB | {r['load_s']:.2f} s, "
                    f"+{r['rss_growth_mb']:.0f} MB | {plain['load_s']:.3f} s, "
                    f"+{plain['rss_growth_mb']:.0f} MB | {m['load_s']:.3f} s, "
                    f"+{m['rss_growth_mb']:.0f} MB | +{m['rss_after_queries_growth_mb']:.0f} MB | "
                    f"{r['ms_per_query']:.2f} / "
                    f"{m['ms_per_query']:.2f} |"
                )
            lines.append("")
    lines += [
        f"Machine: {report['machine']['platform']}, {report['machine']['cpu_count']} CPUs, Python "
        f"{report['machine']['python']}; 1-minute load average {report['load_average_1m'][0]:.1f} "
        f"at the start, {report['load_average_1m'][1]:.1f} at the end.",
        "",
        f"Reproduce: `python benchmarks/retrieval_scale.py --sizes {report['sizes_arg']}`.",
    ]
    if report.get("dense_run"):
        load = report["dense_run"]["load_average_1m"]
        lines += [
            "",
            f"The dense part came from a separate run (`--sizes '' --dense-scale 200000`; load "
            f"average {load[0]:.1f} at its start, {load[1]:.1f} at its end), merged into this "
            "report with `--from-json BM25.json DENSE.json`.",
        ]
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted(report["sizes"], key=lambda s: s["passages"])
    x = [s["passages"] for s in sizes]
    extra = report["extrapolation_21m"]
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    panels = [
        (axes[0][0], "index build (s)", [
            ("wall", [s["build"]["seconds"] for s in sizes], extra["build_s"]),
            ("CPU", [s["build"].get("cpu_s", float("nan")) for s in sizes], None),
        ], TARGETS["build_s"]),
        (axes[0][1], "GB", [
            ("build peak RSS", [s["build"]["peak_rss_mb"] / 1024 for s in sizes],
             extra["build_peak_rss_gb"]),
            ("on disk", [s["disk"]["total_gb"] for s in sizes], extra["disk_gb"]),
            ("RSS, read into memory",
             [s["load"]["read"]["rss_after_load_mb"] / 1024 for s in sizes],
             extra["read_load_rss_gb"]),
        ], TARGETS["build_peak_rss_gb"]),
        (axes[1][0], "index load (s)", [
            ("mmap", [s["load"]["mmap"]["load_s"] for s in sizes], None),
            ("read", [s["load"]["read"]["load_s"] for s in sizes], None),
        ], TARGETS["mmap_load_s"]),
        (axes[1][1], "query latency (ms)", [
            ("search in process p50", [s["load"]["read"]["in_process_p50_ms"] for s in sizes],
             extra["in_process_p50_ms"]),
            ("HTTP p50, 1 client", [s["serve"]["levels"][0]["p50_ms"] for s in sizes],
             extra["p50_1_client_ms"]),
            ("HTTP p99, 1 client", [s["serve"]["levels"][0]["p99_ms"] for s in sizes], None),
            ("HTTP p50, 32 clients", [s["serve"]["levels"][1]["p50_ms"] for s in sizes], None),
        ], TARGETS["p50_1_client_ms"]),
    ]  # fmt: skip
    for ax, label, series, target in panels:
        for name, ys, at_21m in series:
            line = ax.plot(x, ys, marker="o", label=name)[0]
            if at_21m is not None:
                ax.plot([x[-1], extra["passages"]], [ys[-1], at_21m], linestyle="--",
                         color=line.get_color())  # fmt: skip
                ax.annotate(f"{at_21m:.3g}", (extra["passages"], at_21m), fontsize=8)
        ax.axhline(target, color="red", linewidth=0.8, linestyle=":", label="target at 1M")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("passages (dashed: extrapolated to 21M)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("BM25 retrieval cost by corpus size (2 shared CPU cores)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- main ------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10k,100k,1M", help="Corpus sizes, e.g. 10k,100k,1M.")
    parser.add_argument("--seconds", type=float, default=5.0, help="Duration of each load test.")
    parser.add_argument("--out", type=Path, default=Path("docs/bench"), help="JSON + Markdown.")
    parser.add_argument("--plot", type=Path, default=Path("docs/img/retrieval_scale.png"))
    parser.add_argument(
        "--work",
        type=Path,
        default=Path(tempfile.gettempdir()) / "tspo-retrieval-scale",
        help="Corpora, indexes and cached embeddings (kept: a rerun reuses corpora, embeddings).",
    )
    parser.add_argument(
        "--reuse-builds",
        action="store_true",
        help="Keep an index already built in --work and its recorded build figures.",
    )
    parser.add_argument("--dense", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--dense-queries", type=int, default=1000)
    parser.add_argument(
        "--dense-passages", type=int, default=None, help="Embed only the first N extracts."
    )
    parser.add_argument(
        "--dense-scale",
        type=int,
        default=200_000,
        help="Vectors for the full-read vs memory-mapped faiss comparison (0: skip).",
    )
    parser.add_argument("--probe", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--queries", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--mmap", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument(
        "--from-json",
        type=Path,
        nargs="+",
        help="Rewrite the extrapolation, Markdown and plot from saved JSON files (a BM25 run and "
        "a dense run are merged); measure nothing.",
    )
    args = parser.parse_args()
    if args.probe:
        probe(args.probe, args.mmap, args.queries)
        return
    if args.from_json:
        parts = [json.loads(path.read_text()) for path in args.from_json]
        report = next(part for part in parts if part.get("sizes"))
        for part in parts:
            if part.get("dense") and not report.get("dense"):
                report["dense"] = part["dense"]
                report["dense_run"] = {k: part[k] for k in ("machine", "load_average_1m")}
        report["extrapolation_21m"] = extrapolate(report["sizes"])
        write_outputs(report, args.out, args.plot)
        return

    load_at_start = os.getloadavg()[0]
    args.work.mkdir(parents=True, exist_ok=True)
    base = base_documents(args.work)
    questions = questions_of(args.work / "wiki")
    sizes = []
    for n in parse_sizes(args.sizes) if args.sizes else []:
        sizes.append(measure_size(n, base, args.work, questions, args.seconds, args.reuse_builds))
        write_json(args.work / "retrieval_scale.partial.json", sizes)
    report: dict[str, Any] = {
        "benchmark": "retrieval_scale",
        "sizes_arg": args.sizes,
        "targets": TARGETS,
        "sizes": sizes,
        "extrapolation_21m": extrapolate(sizes) if sizes else None,
    }
    if args.dense:
        report["dense"] = dense_benchmark(
            args.work, questions, args.dense_queries, args.dense_scale, args.dense_passages
        )
    report["peak_memory_mb"] = peak_memory_mb()
    report["machine"] = machine_info()
    report["load_average_1m"] = [load_at_start, os.getloadavg()[0]]
    write_outputs(report, args.out, args.plot)


def write_outputs(report: dict[str, Any], out: Path, plot_path: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "retrieval_scale.json", report)
    if not report["sizes"]:  # a dense-only run (--sizes ''): merge it with --from-json
        log(f"wrote {out / 'retrieval_scale.json'} (no BM25 sizes: no Markdown or plot)")
        return
    atomic_write_text(out / "retrieval_scale.md", markdown(report))
    plot(report, plot_path)
    log(f"wrote {out / 'retrieval_scale.json'}, retrieval_scale.md and {plot_path}")
    print(markdown(report))


if __name__ == "__main__":
    main()

"""faiss index types beyond flat (ivfpq, hnsw): build, save, load, memory-map, CLI errors."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from retrieval_helpers import TOPICS, write_test_corpus

from tspo.errors import TSPOError
from tspo.retrieval.dense import (
    FAISS_INDEX_TYPES,
    DenseRetriever,
    FaissSettings,
    build_faiss_index,
)
from tspo.retrieval.index import build_index, load_retriever, read_manifest


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_test_corpus(tmp_path_factory.mktemp("faiss") / "corpus.jsonl")


def _unit_vectors(n: int, dim: int, seed: int = 0) -> np.ndarray:
    vectors = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


@pytest.mark.parametrize("kind", FAISS_INDEX_TYPES)
def test_each_index_type_builds_saves_loads_and_finds_topics(kind, corpus, tmp_path):
    out = tmp_path / f"idx-{kind}"
    build_index(corpus, "dense", out, faiss=FaissSettings(index_type=kind), show_progress=False)
    manifest = read_manifest(out)
    assert manifest["options"]["faiss"]["index_type"] == kind
    queries = [query for _, _, query in TOPICS]
    answers = {}
    for mmap in (False, True):
        retriever = load_retriever(out, mmap=mmap)
        assert isinstance(retriever, DenseRetriever)
        assert retriever.settings == FaissSettings.from_json(manifest["options"]["faiss"])
        results = retriever.search(queries, topk=3)
        found = sum(f"d{i}" in [h.doc_id for h in hits] for i, hits in enumerate(results))
        assert found >= len(TOPICS) - 1, (kind, mmap, found)  # approximate: allow one miss
        assert all(len(hits) == 3 for hits in results)
        answers[mmap] = results
    assert answers[True] == answers[False]  # a memory-mapped read answers the same


def test_search_settings_are_saved_and_restored(corpus, tmp_path):
    out = tmp_path / "idx"
    settings = FaissSettings(index_type="ivfpq", nprobe=3, nlist=2, pq_m=8)
    build_index(corpus, "dense", out, faiss=settings, show_progress=False)
    saved = json.loads((out / "dense.json").read_text())["faiss"]
    assert saved["nprobe"] == 3 and saved["nlist"] == 2 and saved["pq_m"] == 8
    assert saved["pq_bits"] >= 1  # filled in from the corpus size
    import faiss

    retriever = load_retriever(out)
    assert isinstance(retriever, DenseRetriever)
    assert faiss.extract_index_ivf(retriever.index).nprobe == 3


def test_approximate_indexes_recall_most_of_flat():
    vectors = _unit_vectors(600, 16)
    queries = vectors[:50] + 0.05 * _unit_vectors(50, 16, seed=1)
    flat, _ = build_faiss_index(vectors, FaissSettings())
    truth = flat.search(queries, 3)[1]
    for kind, floor in (("hnsw", 0.9), ("ivfpq", 0.5)):
        index, used = build_faiss_index(vectors, FaissSettings(index_type=kind, nprobe=8))
        rows = index.search(queries, 3)[1]
        recall = np.mean([len(set(a) & set(b)) / 3 for a, b in zip(rows, truth, strict=True)])
        assert recall >= floor, (kind, recall, used)


def test_automatic_settings_fit_tiny_and_large_corpora():
    tiny = FaissSettings(index_type="ivfpq").resolved(10, 384)
    assert tiny.nlist == 1 and tiny.pq_m == 48 and tiny.pq_bits == 3
    large = FaissSettings(index_type="ivfpq").resolved(1_000_000, 384)
    assert large.nlist == 4000 and large.pq_bits == 8
    assert FaissSettings(index_type="hnsw").resolved(10, 384) == FaissSettings(index_type="hnsw")
    assert FaissSettings.from_json(None) == FaissSettings()  # an index saved before: flat
    with pytest.raises(TSPOError, match="choose one of flat, ivfpq, hnsw"):
        FaissSettings(index_type="ivf")
    with pytest.raises(TSPOError, match="must divide"):
        FaissSettings(index_type="ivfpq", pq_m=7).resolved(100, 384)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--kind", "dense", "--faiss-index", "bogus"], "unknown faiss index 'bogus'"),
        (["--faiss-index", "hnsw"], "--faiss-index applies to --kind dense only"),
    ],
)
def test_cli_bad_faiss_index_is_one_line_and_exit_2(args, message, corpus, tmp_path):
    command = [sys.executable, "-m", "tspo.cli", "index", "build", "--corpus", str(corpus)]
    done = subprocess.run(
        [*command, "--out", str(tmp_path / "x"), *args], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0, done.stderr
    assert done.stderr.startswith("error: ") and message in done.stderr
    assert not (tmp_path / "x").exists()

"""Index folders: build, manifest, atomic replacement, and refusal of damaged indexes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from retrieval_helpers import TOPICS, corpus_docs, write_test_corpus

from tspo.errors import TSPOError
from tspo.retrieval.bm25 import BM25Retriever
from tspo.retrieval.index import (
    FORMAT_VERSION,
    build_index,
    file_sha256,
    load_retriever,
    open_retriever,
    read_manifest,
)


@pytest.fixture()
def corpus(tmp_path):
    return write_test_corpus(tmp_path / "corpus.jsonl")


@pytest.fixture()
def index_dir(corpus, tmp_path):
    return build_index(corpus, "bm25", tmp_path / "idx", show_progress=False)


def test_build_writes_manifest_and_loads(corpus, index_dir):
    manifest = read_manifest(index_dir)
    assert manifest["format_version"] == FORMAT_VERSION
    assert manifest["kind"] == "bm25"
    assert manifest["encoder"] is None
    assert manifest["doc_count"] == len(TOPICS)
    assert manifest["corpus_sha256"] == file_sha256(corpus)
    assert "documents.jsonl" in manifest["files"]
    assert not (index_dir.parent / ".idx.partial").exists()
    retriever = load_retriever(index_dir, corpus_path=corpus)
    assert isinstance(retriever, BM25Retriever)
    assert retriever.search(["capital of japan"], topk=1)[0][0].title == "Tokyo"


def test_existing_index_needs_overwrite(corpus, index_dir):
    with pytest.raises(TSPOError, match="--overwrite"):
        build_index(corpus, "bm25", index_dir, show_progress=False)
    smaller = write_test_corpus(corpus.parent / "small.jsonl", corpus_docs()[:5])
    build_index(smaller, "bm25", index_dir, overwrite=True, show_progress=False)
    assert read_manifest(index_dir)["doc_count"] == 5
    assert not (index_dir.parent / ".idx.old").exists()


def test_bad_build_arguments(corpus, tmp_path):
    with pytest.raises(TSPOError, match="unknown index kind"):
        build_index(corpus, "splade", tmp_path / "x", show_progress=False)
    with pytest.raises(TSPOError, match="corpus file not found"):
        build_index(tmp_path / "missing.jsonl", "bm25", tmp_path / "x", show_progress=False)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "1", "contents": "T\\nx"}\n{"id": 2}\n')
    with pytest.raises(TSPOError, match="line 2"):
        build_index(bad, "bm25", tmp_path / "x", show_progress=False)
    assert not (tmp_path / "x").exists()


def test_missing_folder(tmp_path):
    with pytest.raises(TSPOError, match="no index folder"):
        load_retriever(tmp_path / "nothing")


def test_half_written_index_without_manifest(index_dir):
    (index_dir / "manifest.json").unlink()
    with pytest.raises(TSPOError, match="not a finished index"):
        load_retriever(index_dir)


def test_corrupt_manifest(index_dir):
    (index_dir / "manifest.json").write_text('{"kind": "bm25", ')
    with pytest.raises(TSPOError, match="corrupt"):
        load_retriever(index_dir)


def test_other_format_version(index_dir):
    manifest = read_manifest(index_dir)
    (index_dir / "manifest.json").write_text(json.dumps({**manifest, "format_version": 99}))
    with pytest.raises(TSPOError, match="format version 99"):
        load_retriever(index_dir)


def test_truncated_file(index_dir):
    path = index_dir / "bm25" / "data.csc.index.npy"
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(TSPOError, match="damaged: bm25/data.csc.index.npy"):
        load_retriever(index_dir)


def test_missing_file(index_dir):
    (index_dir / "documents.jsonl").unlink()
    with pytest.raises(TSPOError, match="documents.jsonl is missing"):
        load_retriever(index_dir)


def test_garbage_array_with_matching_size(index_dir):
    path = index_dir / "bm25" / "indptr.csc.index.npy"
    path.write_bytes(b"\0" * path.stat().st_size)
    with pytest.raises(TSPOError, match="damaged: bm25/indptr.csc.index.npy does not match"):
        load_retriever(index_dir)
    # A manifest from before hashes were recorded: the loader still refuses the array.
    manifest = read_manifest(index_dir)
    del manifest["sha256"]
    (index_dir / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(TSPOError, match="unreadable"):
        load_retriever(index_dir)


def test_a_changed_document_of_the_same_size_is_caught_by_its_hash(index_dir):
    path = index_dir / "documents.jsonl"
    text = path.read_text()
    assert "Paris" in text
    path.write_text(text.replace("Paris", "Parix", 1))  # same size, still valid JSON
    manifest = read_manifest(index_dir)
    assert set(manifest["sha256"]) == set(manifest["files"])
    assert path.stat().st_size == manifest["files"]["documents.jsonl"]
    with pytest.raises(TSPOError, match="damaged: documents.jsonl does not match the SHA-256"):
        load_retriever(index_dir)


def test_documents_mismatching_the_index(index_dir, tmp_path):
    other = write_test_corpus(tmp_path / "other.jsonl", corpus_docs()[:3])
    (index_dir / "documents.jsonl").write_bytes(other.read_bytes())
    manifest = read_manifest(index_dir)
    manifest["files"]["documents.jsonl"] = other.stat().st_size
    manifest["sha256"]["documents.jsonl"] = file_sha256(other)
    (index_dir / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(TSPOError, match="covers 20 documents but the document table has 3"):
        load_retriever(index_dir)


def test_manifest_doc_count_mismatch(index_dir):
    manifest = read_manifest(index_dir)
    (index_dir / "manifest.json").write_text(json.dumps({**manifest, "doc_count": 7}))
    with pytest.raises(TSPOError, match="manifest says 7"):
        load_retriever(index_dir)


def test_index_built_from_another_corpus(index_dir, tmp_path):
    other = write_test_corpus(tmp_path / "other.jsonl", corpus_docs()[:3])
    with pytest.raises(TSPOError, match="different corpus"):
        load_retriever(index_dir, corpus_path=other)


def test_open_retriever_takes_a_folder_a_url_or_a_corpus(corpus, index_dir):
    assert isinstance(open_retriever(index=index_dir), BM25Retriever)
    with open_retriever(corpus=corpus) as in_memory:
        assert isinstance(in_memory, BM25Retriever)
        assert len(in_memory.search(["anything"], topk=1)[0]) == 1
    with pytest.raises(TSPOError, match="exactly one retriever"):
        open_retriever(index=index_dir, corpus=corpus)
    with pytest.raises(TSPOError, match="exactly one retriever"):
        open_retriever()
    with pytest.raises(TSPOError):  # a server is checked at once, before any model loads
        open_retriever(url="http://127.0.0.1:9/retrieve", retries=0, timeout=2.0)


def test_cli_build_and_one_line_errors(corpus, tmp_path):
    out = tmp_path / "cli-idx"
    command = [sys.executable, "-m", "tspo.cli", "index", "build", "--corpus", str(corpus)]
    done = subprocess.run(
        [*command, "--out", str(out)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert f"bm25 index of {len(TOPICS)} documents written to {out}" in done.stdout
    assert read_manifest(out)["doc_count"] == len(TOPICS)

    again = subprocess.run(
        [*command, "--out", str(out)], capture_output=True, text=True, timeout=120
    )
    assert again.returncode == 2
    assert again.stderr.strip().count("\n") == 0
    assert again.stderr.startswith("error: ") and "--overwrite" in again.stderr

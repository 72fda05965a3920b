"""BM25 backend: ranking, batching, edge-case queries, save/load."""

from __future__ import annotations

import sys

import bm25s
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from retrieval_helpers import TOPICS, corpus_docs
from scipy import sparse

from tspo.data.corpus import CorpusDoc, write_corpus
from tspo.errors import TSPOError
from tspo.retrieval.base import Hit
from tspo.retrieval.bm25 import MMAP_ENV, BM25Retriever, build_folder, index_arrays, tokenize
from tspo.retrieval.documents import MappedDocumentTable

RETRIEVER = BM25Retriever.from_docs(corpus_docs())


def test_each_topic_query_ranks_its_document_first():
    queries = [query for _, _, query in TOPICS]
    results = RETRIEVER.search(queries, topk=3)
    assert len(results) == len(queries)
    for position, hits in enumerate(results):
        assert len(hits) == 3
        assert hits[0].doc_id == f"d{position}", queries[position]
        assert hits[0].title == TOPICS[position][0]
        assert hits[0].text == TOPICS[position][1]
        assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
        assert hits[0].score > 0


def test_batch_equals_one_query_at_a_time():
    queries = ["capital of japan", "who wrote hamlet", "largest planet"]
    batched = RETRIEVER.search(queries, topk=2)
    single = [RETRIEVER.search([q], topk=2)[0] for q in queries]
    assert batched == single


def test_topk_above_corpus_size_returns_every_document():
    hits = RETRIEVER.search(["chess"], topk=100)[0]
    assert len(hits) == len(TOPICS)
    assert len({h.doc_id for h in hits}) == len(TOPICS)


def test_empty_batch_and_queries_without_known_words():
    assert RETRIEVER.search([], topk=3) == []
    results = RETRIEVER.search(["", "the of and", "zzzqqq xyzzy"], topk=2)
    assert [len(hits) for hits in results] == [2, 2, 2]
    assert all(h.score == 0 for hits in results for h in hits)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.text(max_size=40), min_size=1, max_size=4), st.integers(1, 30))
def test_any_text_query_returns_min_topk_hits(queries, topk):
    results = RETRIEVER.search(queries, topk=topk)
    assert len(results) == len(queries)
    assert all(len(hits) == min(topk, len(TOPICS)) for hits in results)
    assert all(isinstance(h, Hit) for hits in results for h in hits)


def test_save_load_round_trip(tmp_path):
    RETRIEVER.save(tmp_path / "idx")
    loaded = BM25Retriever.load(tmp_path / "idx")
    queries = [query for _, _, query in TOPICS]
    assert loaded.search(queries, topk=4) == RETRIEVER.search(queries, topk=4)


def test_empty_corpus_is_refused():
    with pytest.raises(TSPOError, match="empty corpus"):
        BM25Retriever.from_docs([])


def test_stemmer_without_pystemmer_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "Stemmer", None)  # makes `import Stemmer` fail
    with pytest.raises(TSPOError, match="PyStemmer"):
        BM25Retriever.from_docs(corpus_docs(), stemmer="english")


def test_stemmer_matches_inflected_forms(tmp_path):
    stemmed = BM25Retriever.from_docs(corpus_docs(), stemmer="english")
    assert stemmed.search(["painting"], topk=1)[0][0].title == "Mona Lisa"
    stemmed.save(tmp_path / "idx")
    assert BM25Retriever.load(tmp_path / "idx").stemmer_name == "english"


@pytest.mark.parametrize("method", ["lucene", "bm25+"])
def test_batched_scores_equal_bm25s_one_query_at_a_time(method):
    retriever = BM25Retriever.from_docs(corpus_docs())
    if method != "lucene":
        retriever.model = bm25s.BM25(method=method)
        retriever.model.index(
            [tokenize(c) for c in retriever.table.contents_list()], show_progress=False
        )
        retriever = BM25Retriever(retriever.model, retriever.table)
    queries = ["capital of france and japan", "planet planet rings", "the", "unknownword"]
    batched = retriever.scores(queries)
    assert batched.shape == (len(queries), len(TOPICS))
    for row, query in enumerate(queries):
        tokens = tokenize(query)
        expected = (
            retriever.model.get_scores(tokens) if tokens else np.zeros(len(TOPICS), np.float32)
        )
        np.testing.assert_allclose(batched[row], expected, rtol=1e-5, atol=1e-6)


def test_large_batches_are_scored_in_blocks(monkeypatch):
    monkeypatch.setattr("tspo.retrieval.bm25.MAX_SCORE_CELLS", len(TOPICS) * 2)
    queries = [query for _, _, query in TOPICS]
    blocked = RETRIEVER.search(queries, topk=2)
    monkeypatch.undo()
    assert blocked == RETRIEVER.search(queries, topk=2)


def _random_docs(n: int, seed: int = 0) -> list[CorpusDoc]:
    """Documents of words drawn with repeats, so counts, lengths and document frequencies vary."""
    rng = np.random.default_rng(seed)
    words = [f"w{i}" for i in range(60)] + ["the", "and", "of"]
    return [
        CorpusDoc(
            id=f"r{i}",
            title=f"Title {i % 7}",
            text=" ".join(rng.choice(words, size=int(rng.integers(0, 40)))),
        )
        for i in range(n)
    ]


@pytest.mark.parametrize("chunk_docs", [1, 7, 10_000])
def test_streaming_arrays_equal_bm25s_index(chunk_docs):
    docs = [*corpus_docs(), *_random_docs(120)]
    contents = [f"{d.title}\n{d.text}" for d in docs]
    scores, vocab = index_arrays(iter(contents), chunk_docs=chunk_docs, k1=1.2, b=0.7)
    reference = bm25s.BM25(k1=1.2, b=0.7)
    reference.index([tokenize(c) for c in contents], show_progress=False)
    ours = sparse.csc_matrix(
        (scores["data"], scores["indices"], scores["indptr"]), shape=(len(docs), len(vocab) - 1)
    )
    ref = reference.scores
    theirs = sparse.csc_matrix(
        (ref["data"], ref["indices"], ref["indptr"]),
        shape=(len(docs), len(reference.vocab_dict) - 1),
    )
    # the same (document, token) scores, whatever ids the two vocabularies give each token
    for token, ref_id in reference.vocab_dict.items():
        if token == "":
            continue
        np.testing.assert_allclose(
            ours[:, vocab[token]].toarray(), theirs[:, ref_id].toarray(), rtol=1e-6
        )
    assert vocab[""] == len(vocab) - 1
    assert scores["indices"].dtype == scores["indptr"].dtype


def test_streaming_folder_loads_like_a_saved_index(tmp_path):
    docs = [*corpus_docs(), *_random_docs(50, seed=1)]
    count = build_folder(iter(docs), tmp_path / "streamed", chunk_docs=5)
    assert count == len(docs)
    BM25Retriever.from_docs(docs).save(tmp_path / "saved")
    queries = [query for _, _, query in TOPICS] + ["w1 w2 w3", "title 3 w5"]
    expected = BM25Retriever.load(tmp_path / "saved").search(queries, topk=5)
    for mmap in (False, True):
        loaded = BM25Retriever.load(tmp_path / "streamed", mmap=mmap)
        assert len(loaded) == len(docs)
        assert loaded.search(queries, topk=5) == expected


def test_mmap_load_maps_arrays_and_documents(tmp_path, monkeypatch):
    RETRIEVER.save(tmp_path / "idx")  # no offsets file: the mapped table scans for newlines
    loaded = BM25Retriever.load(tmp_path / "idx", mmap=True)
    assert isinstance(loaded.table, MappedDocumentTable)
    assert isinstance(loaded.model.scores["data"], np.memmap)
    assert isinstance(loaded._indices.base, np.memmap)  # a view of the map, not a copy
    queries = [query for _, _, query in TOPICS]
    assert loaded.search(queries, topk=3) == RETRIEVER.search(queries, topk=3)
    monkeypatch.setenv(MMAP_ENV, "1")
    assert isinstance(BM25Retriever.load(tmp_path / "idx").table, MappedDocumentTable)
    monkeypatch.setenv(MMAP_ENV, "0")
    assert not isinstance(BM25Retriever.load(tmp_path / "idx").table, MappedDocumentTable)


def test_mapped_index_is_checked_by_size_not_hash(tmp_path):
    from tspo.retrieval.index import build_index, load_retriever

    corpus = tmp_path / "corpus.jsonl"
    write_corpus(corpus_docs(), corpus)
    build_index(corpus, "bm25", tmp_path / "idx", show_progress=False)
    documents = tmp_path / "idx" / "documents.jsonl"
    data = documents.read_bytes()
    documents.write_bytes(data.replace(b"Mona Lisa", b"Mona Lise", 1))  # same size
    with pytest.raises(TSPOError, match="SHA-256"):
        load_retriever(tmp_path / "idx")
    mapped = load_retriever(tmp_path / "idx", mmap=True)  # sizes only: the map reads lazily
    assert len(mapped) == len(TOPICS)

"""Dense backend: the real bundled MiniLM on a small corpus, resumable chunks, local encoders."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from retrieval_helpers import TOPICS, write_test_corpus

from tspo.errors import TSPOError
from tspo.retrieval.dense import DenseBuildOptions, DenseRetriever, Encoder, encode_in_chunks
from tspo.retrieval.index import build_index, load_retriever, read_manifest

WORDS = "hello world plants sunlight capital france query passage mountain".split()


class Interrupted(Exception):
    """Stands for Ctrl-C in the middle of a build."""


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_test_corpus(tmp_path_factory.mktemp("dense") / "corpus.jsonl")


@pytest.fixture(scope="module")
def minilm_index(corpus, tmp_path_factory):
    """A MiniLM index built in chunks of 8 passages, interrupted after the first chunk, resumed."""
    out = tmp_path_factory.mktemp("dense-index") / "idx"
    first_run: list[tuple[int, int, bool]] = []

    def interrupt_after_first_chunk(done: int, total: int, reused: bool) -> None:
        first_run.append((done, total, reused))
        if done == 1:
            raise Interrupted

    with pytest.raises(Interrupted):
        build_index(
            corpus, "dense", out, chunk_size=8, show_progress=False,
            on_chunk=interrupt_after_first_chunk,
        )  # fmt: skip
    assert not out.exists()
    partial = out.parent / ".idx.partial"
    saved = sorted(p.name for p in (partial / "embeddings").glob("emb-*.npy"))
    second_run: list[tuple[int, int, bool]] = []
    build_index(
        corpus, "dense", out, chunk_size=8, show_progress=False,
        on_chunk=lambda *c: second_run.append(c),
    )  # fmt: skip
    assert not partial.exists()
    return out, first_run, saved, second_run


@pytest.fixture(scope="module")
def tiny_encoder_dir(tmp_path_factory):
    """A random-weight BERT saved as a plain Hugging Face folder (no sentence-transformers)."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-bert")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ":", *WORDS]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=str(folder / "vocab.txt"))
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
    )
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_interrupted_build_resumes_from_saved_chunks(minilm_index):
    _, first_run, saved, second_run = minilm_index
    assert first_run == [(1, 3, False)]
    assert saved == ["emb-00000.npy"]
    assert second_run == [(1, 3, True), (2, 3, False), (3, 3, False)]


def test_minilm_index_finds_each_topic(minilm_index):
    out = minilm_index[0]
    manifest = read_manifest(out)
    assert manifest["kind"] == "dense"
    assert manifest["encoder"] == "all-MiniLM-L6-v2"
    assert manifest["doc_count"] == len(TOPICS)
    assert not (out / "embeddings").exists()
    retriever = load_retriever(out)
    assert isinstance(retriever, DenseRetriever)
    fresh = retriever.encoder.encode_passages(retriever.table.contents_list())
    np.testing.assert_allclose(retriever.index.reconstruct_n(0, len(TOPICS)), fresh, atol=1e-5)
    results = retriever.search([query for _, _, query in TOPICS], topk=3)
    top1 = [hits[0].doc_id for hits in results]
    assert top1 == [f"d{i}" for i in range(len(TOPICS))]
    for hits in results:
        scores = [h.score for h in hits]
        assert scores == sorted(scores, reverse=True)
        assert all(-1.0 - 1e-5 <= s <= 1.0 + 1e-5 for s in scores)
    assert len(retriever.search(["planets"], topk=100)[0]) == len(TOPICS)


def test_chunks_from_another_encoder_are_not_reused(tiny_encoder_dir, tmp_path):
    passages = ["hello world", "plants sunlight", "capital france"]
    first = Encoder(str(tiny_encoder_dir))
    encode_in_chunks(first, passages, tmp_path, chunk_size=2)
    calls: list[tuple[int, int, bool]] = []
    prefixed = Encoder(str(tiny_encoder_dir), passage_prefix="passage: ")
    encode_in_chunks(
        prefixed, passages, tmp_path, chunk_size=2, on_chunk=lambda *c: calls.append(c)
    )
    assert calls == [(1, 2, False), (2, 2, False)]
    calls.clear()
    encode_in_chunks(
        prefixed, passages, tmp_path, chunk_size=2, on_chunk=lambda *c: calls.append(c)
    )
    assert calls == [(1, 2, True), (2, 2, True)]


def test_local_encoder_mean_pools_and_normalises_with_prefixes(tiny_encoder_dir):
    from transformers import AutoModel, AutoTokenizer

    encoder = Encoder(str(tiny_encoder_dir), query_prefix="query: ", passage_prefix="passage: ")
    texts = ["hello world", "plants sunlight capital france mountain"]
    tokenizer = AutoTokenizer.from_pretrained(tiny_encoder_dir)
    model = AutoModel.from_pretrained(tiny_encoder_dir).eval()

    def expected(prefix: str) -> np.ndarray:
        batch = tokenizer([prefix + t for t in texts], padding=True, return_tensors="pt")
        with torch.no_grad():
            states = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        pooled = (states * mask).sum(1) / mask.sum(1)
        return torch.nn.functional.normalize(pooled, dim=-1).numpy()

    queries = encoder.encode_queries(texts)
    passages = encoder.encode_passages(texts)
    assert queries.shape == (2, 16) and queries.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(queries, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(queries, expected("query: "), atol=1e-5)
    np.testing.assert_allclose(passages, expected("passage: "), atol=1e-5)


def test_local_encoder_index_round_trip(tiny_encoder_dir, corpus, tmp_path):
    out = tmp_path / "idx"
    build_index(
        corpus, "dense", out, encoder=str(tiny_encoder_dir), query_prefix="query: ",
        show_progress=False,
    )  # fmt: skip
    manifest = read_manifest(out)
    assert manifest["encoder"] == str(tiny_encoder_dir.resolve())
    assert manifest["options"]["query_prefix"] == "query: "
    loaded = load_retriever(out)
    assert loaded.encoder.query_prefix == "query: "
    assert [len(h) for h in loaded.search(["hello", "world"], topk=2)] == [2, 2]


def test_missing_encoder_is_a_clear_error(tmp_path):
    with pytest.raises(TSPOError, match="cannot load encoder"):
        Encoder(str(tmp_path / "no-such-encoder"))


def test_dense_rejects_empty_corpus():
    with pytest.raises(TSPOError, match="empty corpus"):
        DenseRetriever.from_docs([], options=DenseBuildOptions())

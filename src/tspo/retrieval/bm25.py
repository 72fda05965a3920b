"""BM25 retrieval with `bm25s`: the default backend, fast to build and dependency-light.

`bm25s` builds and stores the index: a (vocabulary x documents) sparse matrix of precomputed
per-term BM25 contributions. A batch of queries is scored in one sparse product against that
matrix (term counts x contributions, the sum bm25s computes one query at a time), so answering
many queries together costs much less per query than one by one; the server's micro-batching
relies on that.

The index is built in one streaming pass (:func:`index_arrays`): documents are tokenised in
chunks straight into integer term ids, each chunk is reduced to (document, term, count) triples
with numpy, and the per-term contributions are computed once at the end, in bm25s's formulas
(``lucene`` BM25, the bm25s default) and bm25s's on-disk layout. The corpus and its token
strings are never held in memory at once; a million passages build in a few GB. ``load(...,
mmap=True)`` memory-maps the arrays and the documents instead of reading them.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import bm25s
import numpy as np
from bm25s.stopwords import STOPWORDS_EN

from tspo.errors import TSPOError
from tspo.retrieval.base import Hit, Retriever
from tspo.retrieval.documents import (
    DOCUMENTS_FILE,
    DocLike,
    DocumentTable,
    MappedDocumentTable,
)

MODEL_DIR = "bm25"
PARAMS_FILE = "bm25.json"
TOKENIZER = "regex-w2-lower-stopwords-en"
TOKEN_PATTERN = re.compile(r"(?u)\b\w\w+\b")  # bm25s's default split: runs of >= 2 word chars
STOPWORD_SET = frozenset(STOPWORDS_EN)
MAX_SCORE_CELLS = 1 << 24  # queries x documents scored at once: bounds the dense score block
SMALL_K = 8  # top-k by repeated argmax up to this k, by a partition above
CHUNK_DOCS = 20_000  # documents tokenised per chunk of the streaming build
OFFSETS_FILE = "doc_offsets.npy"  # under MODEL_DIR: byte offset of each line of documents.jsonl
MMAP_ENV = "TSPO_INDEX_MMAP"  # "1": load indexes memory-mapped unless told otherwise


def make_stemmer(language: str | None) -> Any:
    """A PyStemmer stemmer for ``language``, or None when stemming is off."""
    if not language:
        return None
    try:
        import Stemmer
    except ImportError as err:
        raise TSPOError(
            f"BM25 stemming ({language!r}) needs PyStemmer: pip install PyStemmer"
        ) from err
    try:
        return Stemmer.Stemmer(language)
    except KeyError as err:
        raise TSPOError(f"PyStemmer has no stemmer for language {language!r}") from err


def tokenize(text: str, stemmer: Any = None) -> list[str]:
    """Lower-cased word tokens without English stopwords, stemmed when a stemmer is given."""
    tokens = [t for t in TOKEN_PATTERN.findall(text.lower()) if t not in STOPWORD_SET]
    return stemmer.stemWords(tokens) if stemmer is not None and tokens else tokens


def mmap_default(mmap: bool | None) -> bool:
    """``mmap`` when given, else whether ``$TSPO_INDEX_MMAP`` is set to 1/true/yes/on."""
    if mmap is not None:
        return mmap
    return os.environ.get(MMAP_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def _chunk_triples(
    flat_ids: list[int], lengths: list[int], first_doc: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(document, term, count) of each distinct term of each document in one chunk."""
    ids = np.asarray(flat_ids, dtype=np.int64)
    local = np.repeat(np.arange(len(lengths), dtype=np.int64), lengths)
    keys, counts = np.unique((local << 32) | ids, return_counts=True)
    docs = (keys >> 32).astype(np.int32) + np.int32(first_doc)
    terms = (keys & 0xFFFFFFFF).astype(np.int32)
    return docs, terms, counts.astype(np.float32)


def _lucene_scores(
    docs: np.ndarray,
    terms: np.ndarray,
    counts: np.ndarray,
    doc_lengths: np.ndarray,
    doc_freqs: np.ndarray,
    *,
    k1: float,
    b: float,
    block: int = 1 << 22,
) -> np.ndarray:
    """bm25s's ``lucene`` contribution of each (document, term, count) triple, as float32.

    Same arithmetic as bm25s (float32 idf times a float64 term-frequency part), so the arrays
    equal those ``bm25s.BM25().index(...)`` builds; computed in blocks to bound temporaries.
    """
    n_docs = len(doc_lengths)
    with np.errstate(divide="ignore"):
        idf = np.log(1 + (n_docs - doc_freqs + 0.5) / (doc_freqs + 0.5)).astype(np.float32)
    avg_len = np.float64(doc_lengths.mean()) if n_docs else np.float64(1.0)
    out = np.empty(len(docs), dtype=np.float32)
    for start in range(0, len(docs), block):
        sl = slice(start, start + block)
        tf = counts[sl].astype(np.float64)
        norm = k1 * ((1 - b) + b * doc_lengths[docs[sl]] / avg_len)
        out[sl] = idf[terms[sl]] * (tf / (norm + tf))
    return out


def index_arrays(
    contents: Iterable[str],
    *,
    k1: float = 1.5,
    b: float = 0.75,
    stemmer: Any = None,
    chunk_docs: int = CHUNK_DOCS,
) -> tuple[dict[str, Any], dict[str, int]]:
    """bm25s's index (``scores`` arrays, vocabulary) of ``contents``, streamed in chunks.

    Holds the integer (document, term, count) triples, never the texts or token strings: memory
    is about 20 bytes per distinct term of each document plus one chunk of text.
    """
    vocab: dict[str, int] = {}
    doc_lengths: list[int] = []
    parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    flat: list[int] = []
    lengths: list[int] = []
    for text in contents:
        ids = [vocab.setdefault(t, len(vocab)) for t in tokenize(text, stemmer)]
        flat.extend(ids)
        lengths.append(len(ids))
        if len(lengths) >= chunk_docs:
            parts.append(_chunk_triples(flat, lengths, len(doc_lengths)))
            doc_lengths.extend(lengths)
            flat, lengths = [], []
    if lengths:
        parts.append(_chunk_triples(flat, lengths, len(doc_lengths)))
        doc_lengths.extend(lengths)
    del flat, lengths
    docs = np.concatenate([p[0] for p in parts]) if parts else np.zeros(0, np.int32)
    terms = np.concatenate([p[1] for p in parts]) if parts else np.zeros(0, np.int32)
    counts = np.concatenate([p[2] for p in parts]) if parts else np.zeros(0, np.float32)
    del parts
    n_vocab = len(vocab)
    doc_freqs = np.bincount(terms, minlength=n_vocab).astype(np.float64)
    data = _lucene_scores(
        docs, terms, counts, np.asarray(doc_lengths, np.float64), doc_freqs, k1=k1, b=b
    )
    del counts
    order = np.argsort(terms, kind="stable")  # term-major, documents ascending within a term
    del terms
    # scipy wants indices and indptr of one dtype; a mismatch would copy a memory-mapped array
    index_dtype = np.int32 if len(order) < np.iinfo(np.int32).max else np.int64
    indptr = np.zeros(n_vocab + 1, dtype=index_dtype)
    np.cumsum(doc_freqs.astype(np.int64), out=indptr[1:])
    scores = {
        "data": data[order],
        "indices": docs[order].astype(index_dtype, copy=False),
        "indptr": indptr,
        "num_docs": len(doc_lengths),
    }
    vocab.setdefault("", n_vocab)  # bm25s's empty token: a vocabulary entry without postings
    return scores, vocab


def _bm25s_model(scores: dict[str, Any], vocab: dict[str, int], *, k1: float, b: float) -> Any:
    model = bm25s.BM25(k1=k1, b=b)
    model.scores = scores
    model.vocab_dict = vocab
    model.unique_token_ids_set = set(vocab.values())
    model.nonoccurrence_array = None  # lucene BM25 scores absent terms as 0
    return model


def build_folder(
    docs: Iterable[DocLike],
    folder: str | Path,
    *,
    k1: float = 1.5,
    b: float = 0.75,
    stemmer: str | None = None,
    chunk_docs: int = CHUNK_DOCS,
) -> int:
    """Index ``docs`` into ``folder`` in one streaming pass; the number of documents.

    Writes what :meth:`BM25Retriever.save` writes plus the byte offset of each document line,
    while holding only the index arrays and one chunk of text: the way to index corpora that
    would not fit in memory as Python objects.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MODEL_DIR).mkdir(exist_ok=True)
    offsets: list[int] = [0]
    with open(folder / DOCUMENTS_FILE, "wb") as handle:

        def contents() -> Iterator[str]:
            for doc in docs:
                text = f"{doc.title}\n{doc.text}"
                line = json.dumps({"id": str(doc.id), "contents": text}, ensure_ascii=False)
                offsets.append(offsets[-1] + handle.write((line + "\n").encode("utf-8")))
                yield text

        scores, vocab = index_arrays(
            contents(), k1=k1, b=b, stemmer=make_stemmer(stemmer), chunk_docs=chunk_docs
        )
        handle.flush()
        os.fsync(handle.fileno())
    if scores["num_docs"] == 0:
        raise TSPOError("cannot build a BM25 index over an empty corpus")
    _bm25s_model(scores, vocab, k1=k1, b=b).save(str(folder / MODEL_DIR), show_progress=False)
    np.save(folder / MODEL_DIR / OFFSETS_FILE, np.asarray(offsets, dtype=np.int64))
    params = {"stemmer": stemmer, "tokenizer": TOKENIZER}
    (folder / PARAMS_FILE).write_text(json.dumps(params) + "\n", encoding="utf-8")
    return int(scores["num_docs"])


def top_k_rows(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row of ``scores`` (queries, docs): the ``k`` best (docs, scores), best first.

    For small ``k`` (the usual 3) ``k`` passes of argmax beat a partition of every row; ties go
    to the lower document number. ``scores`` may be overwritten.
    """
    if k <= SMALL_K:
        rows = np.arange(scores.shape[0])
        docs = np.empty((scores.shape[0], k), dtype=np.int64)
        values = np.empty((scores.shape[0], k), dtype=scores.dtype)
        for j in range(k):
            docs[:, j] = best = np.argmax(scores, axis=1)
            values[:, j] = scores[rows, best]
            scores[rows, best] = -np.inf
        return docs, values
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    part_scores = np.take_along_axis(scores, part, axis=1)
    order = np.argsort(-part_scores, axis=1, kind="stable")
    return np.take_along_axis(part, order, axis=1), np.take_along_axis(part_scores, order, axis=1)


class BM25Retriever(Retriever):
    """Lexical search over a document table; ``search`` answers a whole batch in one call."""

    def __init__(
        self,
        model: bm25s.BM25,
        table: DocumentTable | MappedDocumentTable,
        *,
        stemmer: str | None = None,
    ):
        self.model = model
        self.table = table
        self.stemmer_name = stemmer
        self._stemmer = make_stemmer(stemmer)
        arrays = model.scores
        # plain ndarray views (of memory maps too): slicing them is cheaper than np.memmap's
        self._data = np.asarray(arrays["data"])
        self._indices = np.asarray(arrays["indices"])
        self._indptr = np.asarray(arrays["indptr"])
        self._num_docs = int(arrays["num_docs"])

    @classmethod
    def from_docs(
        cls,
        docs: Sequence[DocLike],
        *,
        k1: float = 1.5,
        b: float = 0.75,
        stemmer: str | None = None,
    ) -> BM25Retriever:
        """Index ``docs`` (CorpusDoc-like: ``id``, ``title``, ``text``) in memory."""
        table = DocumentTable.from_docs(docs)
        if len(table) == 0:
            raise TSPOError("cannot build a BM25 index over an empty corpus")
        contents = (f"{t}\n{x}" for t, x in zip(table.titles, table.texts, strict=True))
        scores, vocab = index_arrays(contents, k1=k1, b=b, stemmer=make_stemmer(stemmer))
        return cls(_bm25s_model(scores, vocab, k1=k1, b=b), table, stemmer=stemmer)

    def __len__(self) -> int:
        return len(self.table)

    def _query_terms(self, query: str) -> Counter[int]:
        """Term id -> count in ``query``; words outside the index vocabulary are dropped."""
        vocab, n_terms = self.model.vocab_dict, len(self._indptr) - 1
        ids = (vocab.get(t, -1) for t in tokenize(query, self._stemmer))
        return Counter(i for i in ids if 0 <= i < n_terms)

    def scores(self, queries: Sequence[str]) -> np.ndarray:
        """(queries, documents) BM25 scores.

        Each query term adds its posting list (documents, precomputed contributions) to the
        query's row; a term's documents are distinct, so a buffered ``+=`` is exact. The cost is
        the postings the query touches plus one pass over the documents.
        """
        out = np.zeros((len(queries), self._num_docs), dtype=self._data.dtype)
        nonoccurrence = getattr(self.model, "nonoccurrence_array", None)
        indptr, indices, data = self._indptr, self._indices, self._data
        for row, query in enumerate(queries):
            terms = self._query_terms(query)
            for term, count in terms.items():
                start, end = int(indptr[term]), int(indptr[term + 1])
                out[row, indices[start:end]] += (
                    data[start:end] * count if count > 1 else (data[start:end])
                )
            if nonoccurrence is not None and terms:  # BM25L / BM25+ score absent terms too
                out[row] += sum(count * nonoccurrence[t] for t, count in terms.items())
        return out

    def search(self, queries: list[str], topk: int = 3) -> list[list[Hit]]:
        if not queries:
            return []
        k = min(topk, len(self.table))
        rows_per_block = max(1, MAX_SCORE_CELLS // len(self.table))
        results: list[list[Hit]] = []
        for start in range(0, len(queries), rows_per_block):
            block = queries[start : start + rows_per_block]
            doc_rows, doc_scores = top_k_rows(self.scores(block), k)
            results.extend(
                [self.table.hit(int(i), float(s)) for i, s in zip(ids, vals, strict=True)]
                for ids, vals in zip(doc_rows, doc_scores, strict=True)
            )
        return results

    def save(self, folder: str | Path) -> None:
        """Write the bm25s arrays, the documents and the tokenizer settings under ``folder``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.model.save(str(folder / MODEL_DIR), show_progress=False)
        self.table.save(folder)
        params = {"stemmer": self.stemmer_name, "tokenizer": TOKENIZER}
        (folder / PARAMS_FILE).write_text(json.dumps(params) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, folder: str | Path, *, mmap: bool | None = None) -> BM25Retriever:
        """Load what :meth:`save` or :func:`build_folder` wrote; damage is a one-line TSPOError.

        ``mmap=True`` memory-maps the index arrays and the documents (pages are read when a
        query touches them), so loading takes about a second whatever the corpus size and
        the resident memory stays a fraction of the index. ``None``: ``$TSPO_INDEX_MMAP``.
        """
        folder = Path(folder)
        mmap = mmap_default(mmap)
        try:
            params = json.loads((folder / PARAMS_FILE).read_text(encoding="utf-8"))
            model = bm25s.BM25.load(str(folder / MODEL_DIR), show_progress=False, mmap=mmap)
        except (OSError, ValueError, KeyError, EOFError) as err:
            raise TSPOError(f"BM25 index in {folder} is unreadable: {err}") from err
        if params.get("tokenizer") != TOKENIZER:
            raise TSPOError(
                f"BM25 index in {folder} uses tokenizer {params.get('tokenizer')!r}; this tspo "
                f"uses {TOKENIZER!r}: rebuild it with `tspo index build`"
            )
        table: DocumentTable | MappedDocumentTable
        table = (
            MappedDocumentTable.open(folder, folder / MODEL_DIR / OFFSETS_FILE)
            if mmap
            else (DocumentTable.load(folder))
        )
        indexed = int(model.scores["num_docs"])
        if indexed != len(table):
            raise TSPOError(
                f"BM25 index in {folder} covers {indexed} documents but the document table "
                f"has {len(table)}"
            )
        return cls(model, table, stemmer=params.get("stemmer"))

"""BM25 retrieval with `bm25s`: the default backend, fast to build and dependency-light.

`bm25s` builds and stores the index: a (vocabulary x documents) sparse matrix of precomputed
per-term BM25 contributions. A batch of queries is scored in one sparse product against that
matrix (term counts x contributions, the sum bm25s computes one query at a time), so answering
many queries together costs much less per query than one by one; the server's micro-batching
relies on that.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import bm25s
import numpy as np
from bm25s.stopwords import STOPWORDS_EN
from scipy import sparse

from tspo.errors import TSPOError
from tspo.retrieval.base import Hit, Retriever
from tspo.retrieval.documents import DocLike, DocumentTable

MODEL_DIR = "bm25"
PARAMS_FILE = "bm25.json"
TOKENIZER = "regex-w2-lower-stopwords-en"
TOKEN_PATTERN = re.compile(r"(?u)\b\w\w+\b")  # bm25s's default split: runs of >= 2 word chars
STOPWORD_SET = frozenset(STOPWORDS_EN)
MAX_SCORE_CELLS = 1 << 24  # queries x documents scored at once: bounds the dense score block


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


def top_k_rows(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row of ``scores`` (queries, docs): the ``k`` best (docs, scores), best first."""
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    part_scores = np.take_along_axis(scores, part, axis=1)
    order = np.argsort(-part_scores, axis=1, kind="stable")
    return np.take_along_axis(part, order, axis=1), np.take_along_axis(part_scores, order, axis=1)


class BM25Retriever(Retriever):
    """Lexical search over a document table; ``search`` answers a whole batch in one call."""

    def __init__(self, model: bm25s.BM25, table: DocumentTable, *, stemmer: str | None = None):
        self.model = model
        self.table = table
        self.stemmer_name = stemmer
        self._stemmer = make_stemmer(stemmer)
        arrays = model.scores
        self._term_doc = sparse.csr_matrix(
            (arrays["data"], arrays["indices"], arrays["indptr"]),
            shape=(len(arrays["indptr"]) - 1, int(arrays["num_docs"])),
        )

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
        stemmer_fn = make_stemmer(stemmer)
        tokens = [tokenize(contents, stemmer_fn) for contents in table.contents_list()]
        model = bm25s.BM25(k1=k1, b=b)
        model.index(tokens, show_progress=False)
        return cls(model, table, stemmer=stemmer)

    def __len__(self) -> int:
        return len(self.table)

    def _query_matrix(self, queries: Sequence[str]) -> sparse.csr_matrix:
        """(queries, vocabulary) term counts; words outside the vocabulary are dropped."""
        vocab = self.model.vocab_dict
        rows, cols = [], []
        for row, query in enumerate(queries):
            ids = [vocab[t] for t in tokenize(query, self._stemmer) if t in vocab]
            rows.extend([row] * len(ids))
            cols.extend(ids)
        counts = np.ones(len(cols), dtype=self._term_doc.dtype)
        return sparse.csr_matrix(
            (counts, (rows, cols)), shape=(len(queries), self._term_doc.shape[0])
        )

    def scores(self, queries: Sequence[str]) -> np.ndarray:
        """(queries, documents) BM25 scores."""
        query_terms = self._query_matrix(queries)
        scores = (query_terms @ self._term_doc).toarray()
        nonoccurrence = getattr(self.model, "nonoccurrence_array", None)
        if nonoccurrence is not None:  # BM25L / BM25+ score absent terms too
            scores += (query_terms @ nonoccurrence)[:, None]
        return scores

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
    def load(cls, folder: str | Path) -> BM25Retriever:
        """Load what :meth:`save` wrote; any damage is a one-line TSPOError."""
        folder = Path(folder)
        try:
            params = json.loads((folder / PARAMS_FILE).read_text(encoding="utf-8"))
            model = bm25s.BM25.load(str(folder / MODEL_DIR), show_progress=False)
        except (OSError, ValueError, KeyError, EOFError) as err:
            raise TSPOError(f"BM25 index in {folder} is unreadable: {err}") from err
        if params.get("tokenizer") != TOKENIZER:
            raise TSPOError(
                f"BM25 index in {folder} uses tokenizer {params.get('tokenizer')!r}; this tspo "
                f"uses {TOKENIZER!r}: rebuild it with `tspo index build`"
            )
        table = DocumentTable.load(folder)
        indexed = int(model.scores["num_docs"])
        if indexed != len(table):
            raise TSPOError(
                f"BM25 index in {folder} covers {indexed} documents but the document table "
                f"has {len(table)}"
            )
        return cls(model, table, stemmer=params.get("stemmer"))

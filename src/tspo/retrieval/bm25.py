"""BM25 retrieval with `bm25s`: the default backend, fast to build and dependency-light."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import bm25s

from tspo.errors import TSPOError
from tspo.retrieval.base import Hit, Retriever
from tspo.retrieval.documents import DocLike, DocumentTable

MODEL_DIR = "bm25"
PARAMS_FILE = "bm25.json"
STOPWORDS = "en"


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


class BM25Retriever(Retriever):
    """Lexical search over a document table; ``search`` answers a whole batch in one call."""

    def __init__(self, model: bm25s.BM25, table: DocumentTable, *, stemmer: str | None = None):
        self.model = model
        self.table = table
        self.stemmer_name = stemmer
        self._stemmer = make_stemmer(stemmer)

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
        tokens = bm25s.tokenize(
            table.contents_list(),
            stopwords=STOPWORDS,
            stemmer=make_stemmer(stemmer),
            return_ids=False,
            show_progress=False,
        )
        model = bm25s.BM25(k1=k1, b=b)
        model.index(tokens, show_progress=False)
        return cls(model, table, stemmer=stemmer)

    def __len__(self) -> int:
        return len(self.table)

    def search(self, queries: list[str], topk: int = 3) -> list[list[Hit]]:
        if not queries:
            return []
        k = min(topk, len(self.table))
        tokens = bm25s.tokenize(
            list(queries),
            stopwords=STOPWORDS,
            stemmer=self._stemmer,
            return_ids=False,
            show_progress=False,
        )
        indices, scores = self.model.retrieve(tokens, k=k, show_progress=False, n_threads=0)
        return [
            [self.table.hit(int(i), float(s)) for i, s in zip(row_ids, row_scores, strict=True)]
            for row_ids, row_scores in zip(indices, scores, strict=True)
        ]

    def save(self, folder: str | Path) -> None:
        """Write the bm25s arrays, the documents and the tokenizer settings under ``folder``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.model.save(str(folder / MODEL_DIR), show_progress=False)
        self.table.save(folder)
        params = {"stemmer": self.stemmer_name, "stopwords": STOPWORDS}
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
        table = DocumentTable.load(folder)
        indexed = int(model.scores["num_docs"])
        if indexed != len(table):
            raise TSPOError(
                f"BM25 index in {folder} covers {indexed} documents but the document table "
                f"has {len(table)}"
            )
        return cls(model, table, stemmer=params.get("stemmer"))

"""The documents an index returns, kept beside it as a corpus jsonl file."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from tspo.retrieval.base import Hit

DOCUMENTS_FILE = "documents.jsonl"


class DocLike(Protocol):
    """What an index needs from a document: ``tspo.data.corpus.CorpusDoc`` fits.

    Read-only, so frozen dataclasses fit too.
    """

    @property
    def id(self) -> str: ...
    @property
    def title(self) -> str: ...
    @property
    def text(self) -> str: ...


@dataclass(frozen=True)
class DocumentTable:
    """Documents by row number, the way index backends refer to them."""

    ids: list[str]
    titles: list[str]
    texts: list[str]

    @classmethod
    def from_docs(cls, docs: Sequence[DocLike]) -> DocumentTable:
        return cls(
            ids=[str(doc.id) for doc in docs],
            titles=[doc.title for doc in docs],
            texts=[doc.text for doc in docs],
        )

    def __len__(self) -> int:
        return len(self.ids)

    def contents_list(self) -> list[str]:
        """Each document as indexed: title, then text."""
        return [f"{title}\n{text}" for title, text in zip(self.titles, self.texts, strict=True)]

    def hit(self, row: int, score: float) -> Hit:
        return Hit(doc_id=self.ids[row], title=self.titles[row], text=self.texts[row], score=score)

    def save(self, folder: str | Path) -> None:
        from tspo.data.corpus import CorpusDoc, write_corpus

        docs = [
            CorpusDoc(id=i, title=t, text=x)
            for i, t, x in zip(self.ids, self.titles, self.texts, strict=True)
        ]
        write_corpus(docs, Path(folder) / DOCUMENTS_FILE)

    @classmethod
    def load(cls, folder: str | Path) -> DocumentTable:
        from tspo.data.corpus import read_corpus

        return cls.from_docs(read_corpus(Path(folder) / DOCUMENTS_FILE))

"""The documents an index returns, kept beside it as a corpus jsonl file."""

from __future__ import annotations

import json
import mmap
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

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


class MappedDocumentTable:
    """``documents.jsonl`` memory-mapped: a hit parses its own line, nothing is read up front.

    The line offsets come from ``offsets_path`` (an int64 ``.npy`` of ``rows + 1`` byte
    positions, written by the streaming BM25 build) or, when that file is absent, from one scan
    of the file for newlines.
    """

    def __init__(self, data: mmap.mmap | bytes, offsets: np.ndarray):
        self._data = data
        self._offsets = offsets

    @classmethod
    def open(
        cls, folder: str | Path, offsets_path: str | Path | None = None
    ) -> MappedDocumentTable:
        path = Path(folder) / DOCUMENTS_FILE
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            data = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
        if offsets_path is not None and Path(offsets_path).is_file():
            offsets = np.asarray(np.load(offsets_path, mmap_mode="r"))
        else:
            offsets = cls._scan_offsets(np.frombuffer(data, dtype=np.uint8))
        if len(offsets) < 1 or int(offsets[-1]) != size:
            raise ValueError(f"line offsets do not match {path}")
        return cls(data, offsets)

    @staticmethod
    def _scan_offsets(data: np.ndarray, block: int = 1 << 26) -> np.ndarray:
        ends = [
            np.flatnonzero(data[start : start + block] == 10) + start + 1
            for start in range(0, len(data), block)
        ]
        tail = [] if not len(data) or data[-1] == 10 else [np.array([len(data)])]
        return np.concatenate([np.zeros(1, np.int64), *ends, *tail]).astype(np.int64)

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def save(self, folder: str | Path) -> None:
        """Write the mapped lines, unchanged, as ``folder/documents.jsonl``."""
        from tspo.utils import atomic_write_text

        atomic_write_text(Path(folder) / DOCUMENTS_FILE, bytes(self._data).decode("utf-8"))

    def hit(self, row: int, score: float) -> Hit:
        from tspo.data.corpus import split_contents

        start, end = int(self._offsets[row]), int(self._offsets[row + 1])
        record = json.loads(self._data[start:end])
        title, text = split_contents(record["contents"])
        return Hit(doc_id=str(record["id"]), title=title, text=text, score=score)

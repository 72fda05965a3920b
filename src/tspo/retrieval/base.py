"""The one retriever interface every backend (BM25, dense, HTTP) implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass


@dataclass(frozen=True)
class Hit:
    """One retrieved document."""

    doc_id: str
    title: str
    text: str
    score: float

    @property
    def contents(self) -> str:
        """The corpus form: ``"Title\\ntext"`` (docs/data.md, corpus jsonl)."""
        return f"{self.title}\n{self.text}"


class Retriever(ABC):
    """Batched retrieval: one call answers many queries, in order."""

    @abstractmethod
    def search(self, queries: list[str], topk: int = 3) -> list[list[Hit]]:
        """Return ``topk`` hits for each query, best first, one inner list per query."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources (connections, memory maps). Safe to call twice."""

    def __enter__(self) -> Retriever:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

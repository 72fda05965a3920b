"""QA examples and their file formats (Search-R1 parquet, FlashRAG jsonl)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class QAExample:
    """One question with its gold answers (aliases)."""

    id: str
    question: str
    golds: list[str]
    data_source: str = "unknown"
    metadata: dict[str, Any] = field(default_factory=dict, compare=False)

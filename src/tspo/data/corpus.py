"""Retrieval corpora in the Search-R1/FlashRAG jsonl form: one ``{"id", "contents"}`` per line.

``contents`` is ``"Title\\ntext"``: the first line is the title (docs/data.md).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tspo.errors import TSPOError
from tspo.utils import atomic_write_text


def split_contents(contents: str) -> tuple[str, str]:
    """Split a corpus ``contents`` string into (title, text); the title is the first line."""
    title, _, text = contents.partition("\n")
    return title.strip().strip('"'), text.strip()


@dataclass(frozen=True)
class CorpusDoc:
    """One retrievable document."""

    id: str
    title: str
    text: str

    @property
    def contents(self) -> str:
        """The corpus form: ``"Title\\ntext"``."""
        return f"{self.title}\n{self.text}"

    @classmethod
    def from_contents(cls, doc_id: str, contents: str) -> CorpusDoc:
        """Split ``contents`` into title (its first line, quotes stripped) and text."""
        title, text = split_contents(contents)
        return cls(doc_id, title, text)


MAX_JSONL_LINE_BYTES = 64 << 20
"""Longest jsonl line the readers accept (64 MiB); a longer one is a broken file, not a record."""


def iter_jsonl(
    path: str | Path, *, max_line_bytes: int | None = None
) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line of a UTF-8 jsonl file.

    Raises a one-line TSPOError naming the file and line for a missing file, bytes that are not
    UTF-8, invalid JSON (including numbers too long to convert and nesting too deep to decode), a
    line longer than ``max_line_bytes`` (default :data:`MAX_JSONL_LINE_BYTES`, newline included;
    such a line is never read whole), or a line that is not a JSON object.
    """
    path = Path(path)
    limit = MAX_JSONL_LINE_BYTES if max_line_bytes is None else max_line_bytes
    try:
        handle = path.open("rb")
    except OSError as err:
        raise TSPOError(f"{path}: cannot read ({err.strerror})") from err
    with handle:
        line_no = 0
        while raw := handle.readline(limit + 1):
            line_no += 1
            where = f"{path}: line {line_no}"
            if len(raw) > limit:
                raise TSPOError(f"{where}: line longer than {limit} bytes")
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise TSPOError(f"{where}: not UTF-8 text ({err.reason})") from err
            if not line.strip():
                continue
            yield line_no, _json_object(line, where)


def _json_object(line: str, where: str) -> dict[str, Any]:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as err:
        raise TSPOError(f"{where}: invalid JSON ({err.msg})") from err
    except ValueError as err:  # int() refuses integers of more than sys.get_int_max_str_digits()
        raise TSPOError(
            f"{where}: invalid JSON (an integer of more than {sys.get_int_max_str_digits()} digits)"
        ) from err
    except RecursionError as err:
        raise TSPOError(f"{where}: invalid JSON (nested too deeply)") from err
    if not isinstance(obj, dict):
        raise TSPOError(f"{where}: expected a JSON object")
    return obj


def _corpus_doc(path: Path, line_no: int, row: dict[str, Any]) -> CorpusDoc:
    for key in ("id", "contents"):
        if key not in row:
            raise TSPOError(f"{path}: line {line_no}: missing field '{key}'")
    doc_id, contents = row["id"], row["contents"]
    if isinstance(doc_id, bool) or not isinstance(doc_id, str | int):
        raise TSPOError(f"{path}: line {line_no}: field 'id' must be a string or an integer")
    if not isinstance(contents, str):
        raise TSPOError(f"{path}: line {line_no}: field 'contents' must be a string")
    return CorpusDoc.from_contents(str(doc_id), contents)


def iter_corpus(path: str | Path) -> Iterator[CorpusDoc]:
    """Stream the documents of a corpus jsonl file (see :func:`read_corpus`)."""
    path = Path(path)
    empty = True
    for line_no, row in iter_jsonl(path):
        empty = False
        yield _corpus_doc(path, line_no, row)
    if empty:
        raise TSPOError(f"{path}: empty corpus (no documents)")


def read_corpus(path: str | Path) -> list[CorpusDoc]:
    """All documents of a corpus jsonl file, in file order.

    Raises TSPOError naming the file and line for an empty file, invalid JSON, bytes that are not
    UTF-8, a missing ``id``/``contents`` field, or a field of the wrong type.
    """
    return list(iter_corpus(path))


def write_corpus(docs: Iterable[CorpusDoc], path: str | Path) -> None:
    """Write ``docs`` as corpus jsonl, atomically (a reader never sees half a file)."""
    lines = (
        json.dumps({"id": doc.id, "contents": doc.contents}, ensure_ascii=False) + "\n"
        for doc in docs
    )
    atomic_write_text(path, "".join(lines))

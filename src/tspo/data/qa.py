"""QA examples and their file formats (Search-R1 parquet, FlashRAG jsonl).

Search-R1 parquet rows carry ``data_source``, ``prompt`` (a chat list whose user turn holds the
question), ``ability``, ``reward_model.ground_truth.target`` (the gold answers) and ``extra_info``;
the files Search-R1's scripts write also keep FlashRAG's ``id``, ``question`` and
``golden_answers`` columns. FlashRAG jsonl lines carry ``id``, ``question`` and ``golden_answers``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tspo.data.corpus import iter_jsonl
from tspo.errors import TSPOError
from tspo.protocol import build_prompt
from tspo.utils import atomic_write_text

SEARCHR1_COLUMNS = ("data_source", "prompt", "reward_model")
SPLIT_FILE_STEMS = frozenset({"train", "dev", "val", "valid", "validation", "test"})
# Search-R1's prompts end with "Question: <question>\n"; ours too (tspo.protocol.PROMPT_TEMPLATE).
QUESTION_MARKER = "Question:"


@dataclass(frozen=True)
class QAExample:
    """One question with its gold answers (aliases)."""

    id: str
    question: str
    golds: list[str]
    data_source: str = "unknown"
    metadata: dict[str, Any] = field(default_factory=dict, compare=False)


def read_qa(path: str | Path) -> list[QAExample]:
    """QA examples from ``path``: ``.parquet`` is Search-R1, ``.jsonl`` is FlashRAG.

    Raises TSPOError naming the file (and the row or line) for an unknown suffix, an unreadable or
    empty file, a missing column or field, or a value of the wrong type.
    """
    path = Path(path)
    if path.suffix == ".parquet":
        return read_searchr1_parquet(path)
    if path.suffix == ".jsonl":
        return read_flashrag_jsonl(path)
    raise TSPOError(
        f"{path}: unknown QA format; expected .parquet (Search-R1) or .jsonl (FlashRAG)"
    )


# --- FlashRAG jsonl ---------------------------------------------------------------------------


def default_data_source(path: Path) -> str:
    """FlashRAG keeps ``<dataset>/<split>.jsonl``: the folder names the source; else the stem."""
    if path.stem in SPLIT_FILE_STEMS and path.parent.name:
        return path.parent.name
    return path.stem


def read_flashrag_jsonl(path: str | Path) -> list[QAExample]:
    """FlashRAG jsonl: ``id``, ``question``, ``golden_answers`` (and optional ``data_source``,
    ``metadata``). Without a ``data_source`` field, :func:`default_data_source` names the source."""
    path = Path(path)
    fallback_source = default_data_source(path)
    examples = []
    for line_no, row in iter_jsonl(path):
        where = f"{path}: line {line_no}"
        for key in ("id", "question", "golden_answers"):
            if key not in row:
                raise TSPOError(f"{where}: missing field '{key}'")
        metadata = row.get("metadata") or {}
        if not isinstance(metadata, dict):
            raise TSPOError(f"{where}: field 'metadata' must be an object")
        examples.append(
            QAExample(
                id=_example_id(row["id"], where),
                question=_question(row["question"], where, "question"),
                golds=_golds(row["golden_answers"], where, "golden_answers"),
                data_source=_data_source(row.get("data_source", fallback_source), where),
                metadata=metadata,
            )
        )
    if not examples:
        raise TSPOError(f"{path}: empty file (no examples)")
    return examples


def write_flashrag_jsonl(examples: Iterable[QAExample], path: str | Path) -> None:
    """Write ``examples`` as FlashRAG jsonl (plus ``data_source`` and ``metadata``), atomically."""
    lines = (
        json.dumps(
            {
                "id": ex.id,
                "question": ex.question,
                "golden_answers": list(ex.golds),
                "data_source": ex.data_source,
                "metadata": ex.metadata,
            },
            ensure_ascii=False,
        )
        + "\n"
        for ex in examples
    )
    atomic_write_text(path, "".join(lines))


# --- Search-R1 parquet ------------------------------------------------------------------------


def read_searchr1_parquet(path: str | Path) -> list[QAExample]:
    """Search-R1 parquet (the train files and the 7 standard test sets read as they are).

    The question comes from the ``question`` column when there is one, else from
    ``extra_info.question``, else from the text after the last ``Question:`` in the prompt's user
    turn. The id comes from the ``id`` column, else ``<data_source>_<split>_<index>`` from
    ``extra_info``, else the row number. ``extra_info`` becomes the example's metadata.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as err:
        raise TSPOError(f"{path}: not a readable parquet file ({err})") from err
    missing = [name for name in SEARCHR1_COLUMNS if name not in table.column_names]
    if missing:
        raise TSPOError(f"{path}: missing column(s) {', '.join(missing)} (not Search-R1 format)")
    if table.num_rows == 0:
        raise TSPOError(f"{path}: empty file (no rows)")
    wanted = [*SEARCHR1_COLUMNS, "id", "question", "extra_info"]
    if "question" in table.column_names and table.column("question").null_count == 0:
        wanted.remove("prompt")  # the questions are all there: skip parsing the long prompts
    columns = {
        name: table.column(name).to_pylist() for name in wanted if name in table.column_names
    }
    return [_searchr1_example(path, row, columns) for row in range(table.num_rows)]


def _searchr1_example(path: Path, row: int, columns: dict[str, list[Any]]) -> QAExample:
    where = f"{path}: row {row}"
    data_source = _data_source(columns["data_source"][row], where)
    extra_info = (columns["extra_info"][row] if "extra_info" in columns else None) or {}
    if not isinstance(extra_info, dict):
        raise TSPOError(f"{where}: column 'extra_info' must be a struct/map")
    metadata = {
        key: value for key, value in extra_info.items() if value is not None and key != "question"
    }

    if columns.get("question") and columns["question"][row] is not None:
        question = _question(columns["question"][row], where, "question")
    elif extra_info.get("question") is not None:
        question = _question(extra_info["question"], where, "extra_info.question")
    else:
        question = _question_from_prompt(columns["prompt"][row], where)

    reward_model = columns["reward_model"][row]
    if not isinstance(reward_model, dict) or not isinstance(reward_model.get("ground_truth"), dict):
        raise TSPOError(f"{where}: column 'reward_model' has no 'ground_truth' struct")
    target_name = "reward_model.ground_truth.target"
    if "target" not in reward_model["ground_truth"]:
        raise TSPOError(f"{where}: missing field '{target_name}'")
    golds = _golds(reward_model["ground_truth"]["target"], where, target_name)

    if columns.get("id") and columns["id"][row] is not None:
        example_id = _example_id(columns["id"][row], where)
    elif "index" in metadata:
        example_id = f"{data_source}_{metadata.get('split', 'row')}_{metadata['index']}"
    else:
        example_id = f"{data_source}_{row}"
    return QAExample(example_id, question, golds, data_source, metadata)


def _question_from_prompt(prompt: Any, where: str) -> str:
    if not isinstance(prompt, list) or not prompt:
        raise TSPOError(f"{where}: column 'prompt' must be a non-empty list of chat messages")
    user_turns = [
        msg["content"]
        for msg in prompt
        if isinstance(msg, dict)
        and msg.get("role") == "user"
        and isinstance(msg.get("content"), str)
    ]
    if not user_turns:
        raise TSPOError(f"{where}: column 'prompt' has no user message with text content")
    content = user_turns[-1]
    marker_at = content.rfind(QUESTION_MARKER)
    if marker_at < 0:
        raise TSPOError(
            f"{where}: no '{QUESTION_MARKER}' in the prompt and no 'question' column to read from"
        )
    return _question(content[marker_at + len(QUESTION_MARKER) :], where, "prompt")


def searchr1_rows(examples: Iterable[QAExample], split: str) -> list[dict[str, Any]]:
    """Search-R1 rows for ``examples``, with our prompt (:func:`tspo.protocol.build_prompt`).

    The FlashRAG columns (``id``, ``question``, ``golden_answers``) ride along, as in the files
    Search-R1's scripts write. ``extra_info`` holds ``split``, ``index``, the metadata and the
    question (the veRL reward function reads it from there).
    """
    return [
        {
            "id": ex.id,
            "question": ex.question,
            "golden_answers": list(ex.golds),
            "data_source": ex.data_source,
            "prompt": [{"role": "user", "content": build_prompt(ex.question)}],
            "ability": "fact-reasoning",
            "reward_model": {"style": "rule", "ground_truth": {"target": list(ex.golds)}},
            "extra_info": {**ex.metadata, "split": split, "index": index, "question": ex.question},
        }
        for index, ex in enumerate(examples)
    ]


def write_searchr1_parquet(
    examples: Iterable[QAExample], path: str | Path, split: str = "train"
) -> None:
    """Write ``examples`` as Search-R1 parquet, atomically (see :func:`searchr1_rows`)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    rows = searchr1_rows(examples, split)
    if not rows:
        raise TSPOError(f"{path}: no examples to write")
    table = pa.Table.from_pylist(rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        pq.write_table(table, tmp)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


# --- field checks -----------------------------------------------------------------------------


def _example_id(value: Any, where: str) -> str:
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise TSPOError(f"{where}: field 'id' must be a string or an integer")
    return str(value)


def _question(value: Any, where: str, name: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise TSPOError(f"{where}: field '{name}' must be a non-empty string")
    return value.strip()


def _golds(value: Any, where: str, name: str) -> list[str]:
    golds = [value] if isinstance(value, str) else value
    if not isinstance(golds, Sequence) or not all(isinstance(gold, str) for gold in golds):
        raise TSPOError(f"{where}: field '{name}' must be a list of strings")
    golds = [gold for gold in golds if gold.strip()]
    if not golds:
        raise TSPOError(f"{where}: field '{name}' has no non-empty gold answer")
    return golds


def _data_source(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise TSPOError(f"{where}: field 'data_source' must be a non-empty string")
    return value

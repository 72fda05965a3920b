"""tspo.data.qa: Search-R1 parquet and FlashRAG jsonl, as the public files lay them out."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tspo.data.qa import (
    QAExample,
    read_qa,
    searchr1_rows,
    write_flashrag_jsonl,
    write_searchr1_parquet,
)
from tspo.errors import TSPOError
from tspo.protocol import build_prompt

EXAMPLES = [
    QAExample("q0", "who painted the Mona Lisa?", ["Leonardo da Vinci", "Leonardo"], "wiki", {}),
    QAExample("q1", "Größte Stadt der Schweiz?", ["Zürich"], "nq", {"kind": "single", "hops": 1}),
]

# Search-R1's own prompt prefix (scripts/data_process/nq_search.py, template "base"), abridged:
# the question follows the last "Question:".
SEARCHR1_PREFIX = (
    "Answer the given question. You must conduct reasoning inside <think> and </think> first "
    "every time you get new information. ... For example, <answer> Beijing </answer>. "
    "Question: {question}\n"
)
STANDARD_TEST_SETS = [
    "nq",
    "triviaqa",
    "popqa",
    "hotpotqa",
    "2wikimultihopqa",
    "musique",
    "bamboogle",
]


def searchr1_row(index: int, data_source: str, question: str, golds: list[str]) -> dict[str, Any]:
    """A row as Search-R1's data scripts write it: FlashRAG columns kept, plus the verl ones."""
    return {
        "id": f"test_{index}",
        "question": question,
        "golden_answers": golds,
        "data_source": data_source,
        "prompt": [{"role": "user", "content": SEARCHR1_PREFIX.format(question=question)}],
        "ability": "fact-reasoning",
        "reward_model": {"style": "rule", "ground_truth": {"target": golds}},
        "extra_info": {"split": "test", "index": index},
    }


def write_rows(path: Path, rows: list[dict[str, Any]], drop: tuple[str, ...] = ()) -> Path:
    table = pa.Table.from_pylist(rows)
    pq.write_table(table.drop_columns(list(drop)), path)
    return path


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_round_trip(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"qa{suffix}"
    if suffix == ".jsonl":
        write_flashrag_jsonl(EXAMPLES, path)
    else:
        write_searchr1_parquet(EXAMPLES, path, split="dev")
    read = read_qa(path)
    assert read == EXAMPLES
    assert [ex.data_source for ex in read] == ["wiki", "nq"]
    assert read[1].metadata["kind"] == "single" and read[1].metadata["hops"] == 1
    if suffix == ".parquet":
        assert read[1].metadata["split"] == "dev" and read[1].metadata["index"] == 1
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp files left


def test_written_parquet_has_the_search_r1_layout(tmp_path: Path) -> None:
    path = tmp_path / "train.parquet"
    write_searchr1_parquet(EXAMPLES, path)
    row = pq.read_table(path).to_pylist()[0]
    assert row["data_source"] == "wiki"
    assert row["prompt"] == [{"role": "user", "content": build_prompt(EXAMPLES[0].question)}]
    assert row["ability"] == "fact-reasoning"
    assert row["reward_model"] == {
        "style": "rule",
        "ground_truth": {"target": ["Leonardo da Vinci", "Leonardo"]},
    }
    # One parquet struct holds every row's metadata keys: keys a row lacks read back as null.
    assert row["extra_info"] == {
        "split": "train",
        "index": 0,
        "question": EXAMPLES[0].question,
        "kind": None,
        "hops": None,
    }
    assert (row["id"], row["question"], row["golden_answers"]) == (
        "q0",
        EXAMPLES[0].question,
        ["Leonardo da Vinci", "Leonardo"],
    )
    assert searchr1_rows(EXAMPLES, "train")[0] == {
        **row,
        "extra_info": {"split": "train", "index": 0, "question": EXAMPLES[0].question},
    }


def test_reads_the_merged_standard_test_sets_as_is(tmp_path: Path) -> None:
    """Search-R1's test.parquet merges 7 FlashRAG sets; some carry a FlashRAG metadata column."""
    rows = [
        searchr1_row(i, source, f"question {i} from {source}?", [f"answer {i}", "alias"])
        for i, source in enumerate(STANDARD_TEST_SETS)
    ]
    for i, row in enumerate(rows):
        row["metadata"] = {"type": "bridge"} if i % 2 else None
    examples = read_qa(write_rows(tmp_path / "test.parquet", rows))
    assert [ex.data_source for ex in examples] == STANDARD_TEST_SETS
    assert examples[3] == QAExample(
        "test_3", "question 3 from hotpotqa?", ["answer 3", "alias"], "hotpotqa"
    )
    assert examples[3].metadata == {"split": "test", "index": 3}


def test_question_from_the_prompt_when_no_question_column(tmp_path: Path) -> None:
    rows = [searchr1_row(0, "nq", "when was the eiffel tower built?", ["1889"])]
    rows[0]["prompt"] = [
        {"role": "system", "content": "You are helpful. Question: not this one"},
        rows[0]["prompt"][0],
    ]
    (example,) = read_qa(write_rows(tmp_path / "a.parquet", rows, drop=("id", "question")))
    assert example.question == "when was the eiffel tower built?"
    assert example.id == "nq_test_0"


def test_question_from_extra_info(tmp_path: Path) -> None:
    rows = [searchr1_row(0, "nq", "q?", ["a"])]
    rows[0]["extra_info"]["question"] = "the extra_info question?"
    rows[0]["prompt"][0]["content"] = "no marker here"
    (example,) = read_qa(write_rows(tmp_path / "a.parquet", rows, drop=("question",)))
    assert example.question == "the extra_info question?"


def test_a_single_string_target_is_one_gold(tmp_path: Path) -> None:
    rows = [searchr1_row(0, "nq", "q?", ["a"])]
    rows[0]["reward_model"]["ground_truth"]["target"] = "Paris"
    (example,) = read_qa(write_rows(tmp_path / "a.parquet", rows))
    assert example.golds == ["Paris"]


def test_flashrag_data_source_from_the_folder(tmp_path: Path) -> None:
    folder = tmp_path / "hotpotqa"
    folder.mkdir()
    line = {"id": 5, "question": " q? ", "golden_answers": ["a"], "metadata": {"type": "x"}}
    (folder / "dev.jsonl").write_text(json.dumps(line) + "\n", encoding="utf-8")
    (tmp_path / "bamboogle.jsonl").write_text(json.dumps(line) + "\n", encoding="utf-8")
    (example,) = read_qa(folder / "dev.jsonl")
    assert example == QAExample("5", "q?", ["a"], "hotpotqa")
    assert example.metadata == {"type": "x"}
    assert read_qa(tmp_path / "bamboogle.jsonl")[0].data_source == "bamboogle"


FLASHRAG_OK = '{"id": "1", "question": "q?", "golden_answers": ["a"]}\n'


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "empty file"),
        (FLASHRAG_OK.encode() + b'{"id": "2", "question": "q?"}\n', "line 2: missing field"),
        (FLASHRAG_OK.encode() + b'{"id": "2", "question": 3, "golden_answers": ["a"]}', "line 2"),
        (FLASHRAG_OK.encode() + b'{"id": "2", "question": "q", "golden_answers": [1]}', "line 2"),
        (FLASHRAG_OK.encode() + b'{"id": "2", "question": "q", "golden_answers": []}', "line 2"),
        (FLASHRAG_OK.encode() + b'{"id": "2", "question": " ", "golden_answers": ["a"]}', "line 2"),
        (
            FLASHRAG_OK.encode() + b'{"id": "2", "question": "q", "golden_answers": ["a"], '
            b'"metadata": 3}',
            "line 2: field 'metadata'",
        ),
        (FLASHRAG_OK.encode() + b"\xff\n", "line 2: not UTF-8"),
        (FLASHRAG_OK.encode() + b"{oops\n", "line 2: invalid JSON"),
        (
            FLASHRAG_OK.encode() + b'{"id": 9' + b"9" * 10_000 + b', "question": "q"}\n',
            "line 2: invalid JSON [(]an integer of more than",
        ),
        (
            FLASHRAG_OK.encode() + b"[" * (1 << 20) + b"\n",
            "line 2: invalid JSON [(]nested too deeply",
        ),
        (
            FLASHRAG_OK.encode()
            + b'{"id": "2", "question": "q", "golden_answers": '
            + b'{"a": ' * 50_000
            + b"1"
            + b"}" * 50_000
            + b"}\n",
            "line 2: invalid JSON [(]nested too deeply",
        ),
    ],
)
def test_bad_flashrag_files(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content)
    with pytest.raises(TSPOError, match=message) as err:
        read_qa(path)
    assert str(path) in str(err.value)
    assert "\n" not in str(err.value)


def test_an_over_long_flashrag_line_names_the_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "long.jsonl"
    path.write_text(FLASHRAG_OK + FLASHRAG_OK.replace("q?", "q" * 3000))
    assert len(read_qa(path)) == 2
    monkeypatch.setattr("tspo.data.corpus.MAX_JSONL_LINE_BYTES", 1000)
    with pytest.raises(TSPOError, match=f"{path}: line 2: line longer than 1000 bytes"):
        read_qa(path)


def _bad_target(row: dict[str, Any]) -> None:
    row["reward_model"]["ground_truth"]["target"] = ["a", None]


def _no_ground_truth(row: dict[str, Any]) -> None:
    row["reward_model"] = {"style": "rule"}


def _empty_target(row: dict[str, Any]) -> None:
    row["reward_model"]["ground_truth"]["target"] = ["  "]


def _no_question_anywhere(row: dict[str, Any]) -> None:
    row["question"] = None
    row["prompt"][0]["content"] = "a prompt without the marker"


def _bad_data_source(row: dict[str, Any]) -> None:
    row["data_source"] = ""


@pytest.mark.parametrize(
    ("break_row", "message"),
    [
        (_bad_target, "row 1: field 'reward_model.ground_truth.target' must be a list of strings"),
        (_no_ground_truth, "row 1: column 'reward_model' has no 'ground_truth'"),
        (_empty_target, "row 1: field 'reward_model.ground_truth.target' has no non-empty"),
        (_no_question_anywhere, "row 1: no 'Question:' in the prompt"),
        (_bad_data_source, "row 1: field 'data_source'"),
    ],
)
def test_bad_parquet_rows_name_the_row(tmp_path: Path, break_row, message: str) -> None:
    good = searchr1_row(0, "nq", "q?", ["a"])
    bad = searchr1_row(1, "nq", "q?", ["a"])
    break_row(bad)
    path = write_rows(tmp_path / "bad.parquet", [good, bad])
    with pytest.raises(TSPOError, match=message) as err:
        read_qa(path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize(
    ("columns", "message"),
    [(("reward_model",), "reward_model"), (("prompt", "data_source"), "data_source, prompt")],
)
def test_parquet_missing_columns(tmp_path: Path, columns: tuple[str, ...], message: str) -> None:
    path = write_rows(tmp_path / "a.parquet", [searchr1_row(0, "nq", "q?", ["a"])], drop=columns)
    with pytest.raises(TSPOError, match=f"missing column.*{message}"):
        read_qa(path)


def test_parquet_not_parquet_or_empty(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.parquet"
    garbage.write_bytes(b"PAR1 this is not parquet")
    empty = tmp_path / "empty.parquet"
    empty.write_bytes(b"")
    for path in (garbage, empty):
        with pytest.raises(TSPOError, match="not a readable parquet file"):
            read_qa(path)
    no_rows = tmp_path / "no_rows.parquet"
    table = pa.Table.from_pylist([searchr1_row(0, "nq", "q?", ["a"])])
    pq.write_table(table.slice(0, 0), no_rows)
    with pytest.raises(TSPOError, match="empty file"):
        read_qa(no_rows)


def test_unknown_suffix_and_empty_writes(tmp_path: Path) -> None:
    with pytest.raises(TSPOError, match="unknown QA format"):
        read_qa(tmp_path / "qa.csv")
    with pytest.raises(TSPOError, match="no examples"):
        write_searchr1_parquet([], tmp_path / "x.parquet")


def test_searchr1_rows_carry_the_question_in_extra_info(tmp_path) -> None:
    import pyarrow.parquet as pq

    from tspo.data.qa import QAExample, read_qa, write_searchr1_parquet

    path = tmp_path / "train.parquet"
    write_searchr1_parquet([QAExample("q1", "Who wrote Hamlet?", ["Shakespeare"], "nq")], path)
    assert pq.read_table(path).to_pylist()[0]["extra_info"]["question"] == "Who wrote Hamlet?"
    assert "question" not in read_qa(path)[0].metadata

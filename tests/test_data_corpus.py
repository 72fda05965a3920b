"""tspo.data.corpus: corpus jsonl round trip and one-line errors that name the file and line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tspo.data.corpus import CorpusDoc, iter_corpus, read_corpus, write_corpus
from tspo.errors import TSPOError


def test_contents_is_title_newline_text() -> None:
    doc = CorpusDoc("7", "Mona Lisa", "A portrait by Leonardo da Vinci.")
    assert doc.contents == "Mona Lisa\nA portrait by Leonardo da Vinci."
    assert CorpusDoc.from_contents("7", doc.contents) == doc


def test_round_trip_keeps_order_and_unicode(tmp_path: Path) -> None:
    docs = [
        CorpusDoc("0", "Zürich", "Größte Stadt der Schweiz. 日本語 🙂"),
        CorpusDoc("doc-1", "Paris", "Capital of France.\nSecond paragraph."),
    ]
    path = tmp_path / "sub" / "corpus.jsonl"
    write_corpus(docs, path)
    assert read_corpus(path) == docs
    assert list(iter_corpus(path)) == docs
    assert [json.loads(line)["id"] for line in path.read_text("utf-8").splitlines()] == [
        "0",
        "doc-1",
    ]
    assert not [p for p in path.parent.iterdir() if p.name != "corpus.jsonl"]  # no temp files


title_text = st.text(
    st.characters(blacklist_categories=("Cs", "Zl", "Zp", "Cc")), min_size=1, max_size=20
).filter(lambda s: s.strip() == s and not s.startswith('"') and not s.endswith('"'))


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(title_text, title_text), min_size=1, max_size=5))
def test_round_trip_property(tmp_path_factory: pytest.TempPathFactory, pairs) -> None:
    path = tmp_path_factory.mktemp("corpus") / "c.jsonl"
    docs = [CorpusDoc(str(i), title, text) for i, (title, text) in enumerate(pairs)]
    write_corpus(docs, path)
    assert read_corpus(path) == docs


def test_reads_search_r1_wiki18_rows(tmp_path: Path) -> None:
    """wiki-18 writes quoted titles and integer-like ids; blank lines are skipped."""
    path = tmp_path / "wiki18.jsonl"
    path.write_text(
        '{"id": "0", "contents": "\\"Aaron\\"\\nAaron is a prophet."}\n\n'
        '{"id": 12, "contents": "Title only"}\n',
        encoding="utf-8",
    )
    assert read_corpus(path) == [
        CorpusDoc("0", "Aaron", "Aaron is a prophet."),
        CorpusDoc("12", "Title only", ""),
    ]


GOOD = '{"id": "1", "contents": "T\\nx"}\n'


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "empty corpus"),
        (b"\n  \n", "empty corpus"),
        (GOOD.encode() + b'{"id": "2"}\n', "line 2: missing field 'contents'"),
        (GOOD.encode() + b'{"contents": "T\\nx"}\n', "line 2: missing field 'id'"),
        (GOOD.encode() + b'{"id": "2", "contents": 5}\n', "line 2: field 'contents' must be"),
        (GOOD.encode() + b'{"id": [2], "contents": "x"}\n', "line 2: field 'id' must be"),
        (GOOD.encode() + b'{"id": true, "contents": "x"}\n', "line 2: field 'id' must be"),
        (GOOD.encode() + b'{"id": "2", "contents": \n', "line 2: invalid JSON"),
        (GOOD.encode() + b'["id", "contents"]\n', "line 2: expected a JSON object"),
        (GOOD.encode() * 2 + b'{"id": "3", "contents": "\xff\xfe"}\n', "line 3: not UTF-8"),
        (
            GOOD.encode() + b'{"id": 1' + b"0" * 5000 + b', "contents": "x"}\n',
            r"line 2: invalid JSON \(an integer of more than 4300 digits\)",
        ),
        (
            GOOD.encode() + b'{"id": "2", "contents": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n",
            r"line 2: invalid JSON \(nested too deeply\)",
        ),
        (GOOD.encode() + b"[" * (1 << 20) + b"\n", r"line 2: invalid JSON \(nested too deeply\)"),
    ],
)
def test_bad_files_name_the_file_and_line(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content)
    with pytest.raises(TSPOError, match=message) as err:
        read_corpus(path)
    assert str(path) in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(TSPOError, match="cannot read"):
        read_corpus(tmp_path / "nope.jsonl")


def test_an_over_long_line_is_refused_without_reading_it_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "long.jsonl"
    long_doc = '{"id": "2", "contents": "T\\n' + "x" * 5000 + '"}\n'
    path.write_text(GOOD + long_doc + GOOD)
    assert len(read_corpus(path)) == 3
    monkeypatch.setattr("tspo.data.corpus.MAX_JSONL_LINE_BYTES", 1000)
    with pytest.raises(TSPOError, match="line 2: line longer than 1000 bytes") as err:
        read_corpus(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)
    exact = tmp_path / "exact.jsonl"
    exact.write_text(GOOD.rstrip("\n").ljust(999) + "\n")  # 1000 bytes with the newline
    assert len(read_corpus(exact)) == 1

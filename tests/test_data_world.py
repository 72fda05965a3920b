"""The synthetic world: determinism, entity-disjoint splits, answerability, files, CLI."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from tspo.algo import exact_match
from tspo.data.corpus import read_corpus
from tspo.data.expert import ExpertNoise, run_expert
from tspo.data.qa import read_qa
from tspo.data.world import (
    SPLITS,
    generate_world,
    load_world,
    qa_examples,
    relation_pattern,
    world_to_dict,
    write_world,
)
from tspo.errors import TSPOError
from tspo.retrieval.bm25 import BM25Retriever


@pytest.fixture(scope="module")
def small_world():
    return generate_world(seed=3, size="small")


@pytest.fixture(scope="module")
def small_retriever(small_world, tmp_path_factory):
    paths = write_world(small_world, tmp_path_factory.mktemp("world"))
    return BM25Retriever.from_docs(read_corpus(paths["corpus"]))


def test_same_seed_same_world_and_other_seed_other_world():
    first, again = generate_world(7, "tiny"), generate_world(7, "tiny")
    assert json.dumps(world_to_dict(first)) == json.dumps(world_to_dict(again))
    other = generate_world(8, "tiny")
    assert world_to_dict(other)["documents"] != world_to_dict(first)["documents"]


def test_world_is_deterministic_across_processes(tmp_path):
    code = (
        "import json,sys; from tspo.data.world import generate_world, world_to_dict; "
        "print(json.dumps(world_to_dict(generate_world(5, 'tiny'))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONHASHSEED": "123", "PATH": ""},
    ).stdout
    assert json.loads(out) == json.loads(json.dumps(world_to_dict(generate_world(5, "tiny"))))


def test_splits_do_not_share_subjects(small_world):
    subjects = {s: {q.subject for q in small_world.questions[s]} for s in SPLITS}
    assert all(subjects[s] for s in SPLITS)
    assert not subjects["train"] & subjects["test"]
    assert not subjects["train"] & subjects["dev"]
    assert not subjects["dev"] & subjects["test"]
    # No test question names a training subject anywhere in its text either.
    train_names = {small_world.entities[e].name for e in subjects["train"]}
    for q in small_world.questions["test"]:
        assert not any(name in q.question for name in train_names)


def test_questions_have_all_hop_counts_and_answers_not_in_question(small_world):
    for split in SPLITS:
        examples = qa_examples(small_world, split)
        assert {e.metadata["hops"] for e in examples} == {1, 2, 3}
        for example in examples:
            assert example.golds and example.golds[0] == example.metadata["chain"][-1]
            assert not any(g.lower() in example.question.lower() for g in example.golds)


def test_every_fact_is_stated_once_in_its_document(small_world):
    for entity in small_world.entities.values():
        title, text = small_world.documents[entity.id]
        assert title == entity.name
        for relation, obj in entity.relations.items():
            found = relation_pattern(relation, entity.name).findall(text)
            assert found == [small_world.entities[obj].name]


def test_near_duplicate_twins_exist_and_differ_by_one_letter(small_world):
    twins = [e for e in small_world.entities.values() if e.twin]
    assert len(twins) >= 10
    for entity in twins:
        other = small_world.entities[entity.twin].name
        assert len(other) == len(entity.name)
        assert sum(a != b for a, b in zip(other, entity.name, strict=True)) == 1


def test_retrieval_is_not_trivial(small_world, small_retriever):
    """A search for a name often brings back its near-duplicate too, so titles must be checked."""
    twins = [e for e in small_world.entities.values() if e.twin]
    hits = small_retriever.search([e.name for e in twins], topk=3)
    with_twin = sum(
        any(h.title == small_world.entities[e.twin].name for h in row)
        for e, row in zip(twins, hits, strict=True)
    )
    assert with_twin / len(twins) > 0.8


def test_noise_free_expert_answers_through_bm25(small_world, small_retriever):
    """Every question is answerable from the corpus within its hop count (>= 95% EM)."""
    for split in SPLITS:
        examples = qa_examples(small_world, split)
        episodes = run_expert(small_world, examples, small_retriever)
        em = [exact_match(e.final_answer or "", e.example.golds) for e in episodes]
        assert sum(em) / len(em) >= 0.95, split
        for episode in episodes:
            assert episode.num_searches == episode.example.metadata["hops"]


def test_noisy_expert_is_only_partly_competent(small_world, small_retriever):
    examples = qa_examples(small_world, "train")
    noise = ExpertNoise(early_answer=0.6, wrong_query=0.15)
    episodes = run_expert(small_world, examples, small_retriever, noise=noise, seed=1)
    em = sum(exact_match(e.final_answer or "", e.example.golds) for e in episodes) / len(episodes)
    assert 0.2 < em < 0.8
    again = run_expert(small_world, examples, small_retriever, noise=noise, seed=1)
    assert [e.generated for e in again] == [e.generated for e in episodes]


def test_every_question_names_the_kind_of_its_answer():
    """The goal the expert writes must be readable from the question alone."""
    from tspo.data.expert import RELATION_KIND
    from tspo.data.world import QUESTION_TEMPLATES

    cue = {"person": "Who", "organisation": "organisation", "capital": "capital"}
    cue |= {"country": "country", "city": "city"}
    for templates in QUESTION_TEMPLATES.values():
        for relations, template in templates:
            question = template.format(subject="Xa Yb")
            words = [cue[kind] for kind in cue if cue[kind] in question]
            first = min(words, key=question.find)  # "the capital of the country ..." asks a capital
            assert first == cue[RELATION_KIND[relations[-1]]], question


def test_expert_states_its_goal_and_what_it_found(small_world, small_retriever):
    from tspo.data.expert import RELATION_KIND

    examples = qa_examples(small_world, "train")
    plain = run_expert(small_world, examples, small_retriever)
    stated = run_expert(small_world, examples, small_retriever, notes="goal")
    for with_goal, without in zip(stated, plain, strict=True):
        goal = f"Goal: {RELATION_KIND[with_goal.example.metadata['relations'][-1]]}."
        assert with_goal.final_answer == without.final_answer  # same searches, same reading
        assert with_goal.observations == without.observations
        assert with_goal.generated[0].startswith(f"<think> {goal} </think>\n<search>")
        for text, old in zip(with_goal.generated[1:], without.generated[1:], strict=True):
            assert text.startswith(f"<think> {goal} ")
            stripped = re.sub(r" Found: [a-z]+\.", "", text.replace(f"{goal} ", ""))
            assert stripped == old
        last = with_goal.generated[-1]
        if with_goal.final_answer in with_goal.example.golds:  # stops when found == goal
            assert f"Found: {goal.removeprefix('Goal: ')}" in last


def test_expert_plan_lists_the_kinds_left_to_find(small_world, small_retriever):
    """``notes="plan"``: each think line ends with the kinds still to find; a hop read drops the
    first, a completed chain is answered after ``Left: none.``, and the searches are the same."""
    from tspo.data.expert import RELATION_KIND

    examples = qa_examples(small_world, "train")
    noise = ExpertNoise(early_answer=0.3, wrong_query=0.3)
    plain = run_expert(small_world, examples, small_retriever, noise=noise, seed=2)
    planned = run_expert(small_world, examples, small_retriever, noise=noise, seed=2, notes="plan")
    completed = 0
    for with_plan, without in zip(planned, plain, strict=True):
        kinds = [RELATION_KIND[r] for r in with_plan.example.metadata["relations"]]
        assert with_plan.observations == without.observations
        assert with_plan.final_answer == without.final_answer
        lefts = []
        for text, old in zip(with_plan.generated, without.generated, strict=True):
            match = re.search(r" ?Left: ([a-z, ]+)\. </think>", text)
            assert match, text
            stripped = re.sub(r" ?Left: [a-z, ]+\.", "", text).replace("<think> </think>\n", "")
            assert stripped == old  # the notes are all that differs
            lefts.append(match.group(1).split(", "))
        assert lefts[0] == kinds  # before the first search: the whole chain
        for before, after in zip(lefts[:-1], lefts[1:], strict=True):
            assert after in (before, before[1:] or ["none"])  # a hop read pops one kind
        if with_plan.generated[-1].endswith("</answer>") and lefts[-1] == ["none"]:
            completed += 1
            assert len([x for x in lefts if x != ["none"]]) >= len(kinds)
    assert completed > len(planned) // 2


def test_expert_refuses_unknown_notes(small_world, small_retriever):
    examples = qa_examples(small_world, "train")[:1]
    with pytest.raises(TSPOError, match="expert notes must be one of"):
        run_expert(small_world, examples, small_retriever, notes="diary")


def test_write_world_round_trips_through_the_real_readers(tmp_path):
    world = generate_world(1, "tiny")
    paths = write_world(world, tmp_path)
    corpus = read_corpus(paths["corpus"])
    assert len(corpus) == len(world.documents)
    assert {d.id: (d.title, d.text) for d in corpus} == world.documents
    for split in SPLITS:
        read = read_qa(paths[split])
        assert [(e.id, e.question, e.golds) for e in read] == [
            (e.id, e.question, e.golds) for e in qa_examples(world, split)
        ]
    assert world_to_dict(load_world(tmp_path)) == world_to_dict(world)


def test_bad_size_and_missing_world_are_one_line_errors(tmp_path):
    with pytest.raises(TSPOError, match="unknown world size"):
        generate_world(0, "huge")
    with pytest.raises(TSPOError, match="no world here"):
        load_world(tmp_path)


def test_cli_writes_the_world(tmp_path):
    from typer.testing import CliRunner

    from tspo.cli import app

    result = CliRunner().invoke(
        app, ["data", "world", "--seed", "2", "--size", "tiny", "--out", str(tmp_path)]
    )
    assert result.exit_code == 0, result.output
    assert (tmp_path / "corpus.jsonl").is_file() and (tmp_path / "test.jsonl").is_file()
    assert world_to_dict(load_world(tmp_path)) == world_to_dict(generate_world(2, "tiny"))

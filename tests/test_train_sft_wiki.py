"""`tspo sft --data`: the Wikipedia expert, and SFT of a Hugging Face causal LM on its episodes.

A six-article corpus in the `tspo data wiki` layout and a random-weight micro Llama stand in for
the bundled extracts and SmolLM2; everything else (retriever, protocol, masking, the command) is
the real code path.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from train_helpers import single_thread
from typer.testing import CliRunner
from wiki_helpers import ARTICLES, build_wiki_folder, wiki_examples

from tspo.data.qa import read_qa
from tspo.data.wiki_expert import (
    NO_ANSWER,
    NO_BRIDGE,
    alias_as_written,
    documents_of,
    run_wiki_expert,
)
from tspo.protocol import parse_action
from tspo.retrieval.bm25 import BM25Retriever
from tspo.train.sft import SFTExample, collate, encode_episode, masked_lm_loss, model_loss


class _Doc:
    def __init__(self, doc_id: str, title: str, text: str):
        self.id, self.title, self.text = doc_id, title, text


@pytest.fixture(scope="module")
def retriever() -> BM25Retriever:
    return BM25Retriever.from_docs([_Doc(str(i), t, x) for i, (t, x) in enumerate(ARTICLES)])


def test_expert_plays_single_hop_and_bridge_through_the_retriever(retriever) -> None:
    result = run_wiki_expert(wiki_examples(), retriever, topk=2)
    by_id = {e.example.id: e for e in result.episodes}
    assert set(by_id) == {"wiki-single-0", "wiki-single-1", "wiki-single-2", "wiki-bridge-0"}
    assert result.skipped == {"wiki-single-3": NO_ANSWER, "wiki-bridge-1": NO_BRIDGE}
    assert result.skip_counts == {NO_ANSWER: 1, NO_BRIDGE: 1}

    single = by_id["wiki-single-0"]  # search, read, think, answer
    assert [parse_action(turn).kind for turn in single.generated] == ["search", "answer"]
    assert single.generated[0] == "<search> the capital and largest city of France </search>"
    assert single.generated[1].startswith("<think> Doc 1 ")
    assert single.observations[1] is None and single.final_answer == "Paris"
    # The gold alias is written "oslo"; the answer is copied as the passage writes it.
    assert by_id["wiki-single-1"].final_answer == "Oslo"

    bridge = by_id["wiki-bridge-0"]  # two searches, then the answer
    kinds = [parse_action(turn).kind for turn in bridge.generated]
    assert kinds == ["search", "search", "answer"]
    assert parse_action(bridge.generated[0]).content.startswith("a major north-flowing river")
    assert parse_action(bridge.generated[1]).content == "country in North Africa Nile"
    assert "Nile" in bridge.generated[1].split("<search>")[0]  # the think names the bridge
    assert bridge.final_answer == "Egypt"
    for episode in result.episodes:  # every answer is visible in the last observation
        seen = [obs for obs in episode.observations if obs is not None][-1]
        assert episode.final_answer in seen


def test_alias_as_written_and_document_lines() -> None:
    assert alias_as_written("the NILE river and the Nile delta", ["Nile"]) == "NILE"
    assert alias_as_written("Parisian cafes", ["Paris"]) is None  # whole words only
    assert alias_as_written("John Wycliffe was", ["Wycliffe", "John Wycliffe"]) == "John Wycliffe"
    observation = "Doc 1(Title: Nile) The Nile is long.\nDoc 2(Title: Egypt (country)) Egy"
    assert [(n, t) for n, t, _ in documents_of(observation)] == [
        (1, "Nile"),
        (2, "Egypt (country)"),
    ]


@pytest.fixture(scope="module")
def wiki_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_wiki_folder(tmp_path_factory.mktemp("wiki"))


def test_answers_must_be_visible_after_the_observation_budget(wiki_folder, retriever) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(wiki_folder / "model")
    roomy = run_wiki_expert(wiki_examples(), retriever, tokenizer=tokenizer, max_obs_tokens=500)
    assert len(roomy.episodes) == 4
    # Three tokens leave only "Doc 1(": no answer is visible, so nothing is answered.
    starved = run_wiki_expert(wiki_examples(), retriever, tokenizer=tokenizer, max_obs_tokens=3)
    assert starved.episodes == [] and len(starved.skipped) == 6


def test_expert_episodes_mask_observations(wiki_folder: Path, retriever) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(wiki_folder / "model")
    episodes = run_wiki_expert(read_qa(wiki_folder / "train.jsonl"), retriever).episodes
    bridge = next(e for e in episodes if e.num_searches == 2)
    example = encode_episode(
        tokenizer, bridge.example.question, bridge.generated, bridge.observations
    )
    ids = torch.tensor(example.input_ids)
    mask = torch.tensor(example.loss_mask, dtype=torch.bool)
    assert tokenizer.decode(ids[mask]) == "".join(bridge.generated)
    masked_out = tokenizer.decode(ids[~mask])
    assert all(obs.split("\n")[0] in masked_out for obs in bridge.observations if obs)


def test_the_fast_loss_equals_the_full_forward_loss(wiki_folder: Path) -> None:
    """Only loss positions reach the output layer, with the same value and gradient."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(wiki_folder / "model")
    examples = [
        SFTExample(list(range(5, 25)), [0] * 8 + [1] * 12),
        SFTExample([7] * 9, [0, 1] * 4 + [0]),
    ]
    batch = collate(examples, pad_id=0)
    with single_thread():
        fast = model_loss(model, batch)
        fast.backward()
        fast_grad = model.get_input_embeddings().weight.grad.clone()
        model.zero_grad()
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        full = masked_lm_loss(logits, batch["input_ids"], batch["loss_mask"])
        full.backward()
    assert torch.allclose(fast, full, atol=1e-6)
    assert torch.allclose(fast_grad, model.get_input_embeddings().weight.grad, atol=1e-6)


def test_tspo_sft_data_fine_tunes_a_causal_lm_and_reports_skips(
    wiki_folder: Path, tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM

    from tspo.cli import app

    out = tmp_path / "sft"
    args = [
        "sft", "--data", str(wiki_folder), "--base", str(wiki_folder / "model"), "--out", str(out),
        "--episodes", "3", "--batch-size", "2", "--epochs", "2", "--lr", "1e-3",
        "--max-obs-tokens", "40", "--topk", "2", "--device", "cpu", "--threads", "1",
    ]  # fmt: skip
    with single_thread():
        result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    info = json.loads((out / "tspo_sft.json").read_text())
    assert info["episodes"] == 3 and info["steps"] == 4 and len(info["losses"]) == 4
    assert info["use_chat_template"] is False  # the micro tokenizer has no chat template
    assert info["questions_played"] == 3 and info["skipped"] == 0
    assert info["max_obs_tokens"] == 40 and info["topk"] == 2
    assert AutoModelForCausalLM.from_pretrained(out).config.model_type == "llama"

    # Every question played: the unanswerable ones are skipped and counted with their reasons.
    again = [*args, "--episodes", "50", "--overwrite"]  # the last --episodes wins
    with single_thread():
        result = CliRunner().invoke(app, again)
    assert result.exit_code == 0, result.output
    info = json.loads((out / "tspo_sft.json").read_text())
    assert info["questions_played"] == 6 and info["episodes"] + info["skipped"] == 6
    assert info["skipped"] >= 2 and sum(info["skip_reasons"].values()) == info["skipped"]


def test_tspo_sft_user_errors_are_one_line(wiki_folder: Path, tmp_path: Path) -> None:
    from tspo.cli import app
    from tspo.errors import TSPOError

    cases = [
        (["sft", "--out", str(tmp_path / "a")], "exactly one of --world"),
        (["sft", "--data", str(tmp_path), "--base", str(wiki_folder / "model"),
          "--out", str(tmp_path / "b")], "no train.jsonl"),
        (["sft", "--data", str(wiki_folder), "--base", "no-such-model",
          "--out", str(tmp_path / "c")], "--base: unknown model"),
        (["sft", "--data", str(wiki_folder), "--base", str(wiki_folder / "model"), "--bf16", "x",
          "--out", str(tmp_path / "d")], "--bf16"),
        (["sft", "--data", str(wiki_folder), "--base", str(wiki_folder / "model"),
          "--chat-template", "--out", str(tmp_path / "e")], "no chat template"),
    ]  # fmt: skip
    for args, message in cases:
        result = CliRunner().invoke(app, args)
        assert isinstance(result.exception, TSPOError), (args, result.output)
        assert message in str(result.exception)

"""SFT: the tokenizer on world text, episode encoding, the masked loss, training and saving."""

from __future__ import annotations

import pytest
import torch
from quickstart_helpers import torch_threads

from tspo.data.expert import ExpertNoise, run_expert
from tspo.data.world import generate_world, iter_world_text, qa_examples
from tspo.models.tiny import build_tiny_model, train_tokenizer
from tspo.protocol import INFO_CLOSE, INFO_OPEN, PROMPT_TEMPLATE
from tspo.retrieval.bm25 import BM25Retriever
from tspo.train.sft import (
    ACTION_TAGS,
    SFTConfig,
    action_tag_weights,
    collate,
    encode_episode,
    masked_lm_loss,
    save_policy,
    train_sft,
)


class _Doc:
    def __init__(self, doc_id: str, title: str, text: str):
        self.id, self.title, self.text = doc_id, title, text


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def world():
    return generate_world(seed=11, size="tiny")


@pytest.fixture(scope="module")
def episodes(world):
    retriever = BM25Retriever.from_docs([_Doc(k, t, x) for k, (t, x) in world.documents.items()])
    noise = ExpertNoise(early_answer=0.3, wrong_query=0.2)
    return run_expert(world, qa_examples(world, "train"), retriever, noise=noise)


@pytest.fixture(scope="module")
def tokenizer(world, episodes):
    texts = [*iter_world_text(world), *[PROMPT_TEMPLATE] * 50]
    texts += [turn for episode in episodes for turn in episode.generated]
    return train_tokenizer(texts, vocab_size=600)


def test_tokenizer_round_trips_world_text(world, tokenizer):
    texts = list(iter_world_text(world))[:200] + [PROMPT_TEMPLATE, "<search>Foo Bar</search>"]
    for text in texts:
        assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text
    tag_ids = tokenizer.encode("<information>", add_special_tokens=False)
    assert len(tag_ids) == 1


def test_encoded_episode_masks_everything_but_generated_turns(tokenizer, episodes):
    episode = next(e for e in episodes if e.num_searches >= 2)
    example = encode_episode(
        tokenizer, episode.example.question, episode.generated, episode.observations
    )
    ids = torch.tensor(example.input_ids)
    mask = torch.tensor(example.loss_mask, dtype=torch.bool)
    assert tokenizer.decode(ids[mask]) == "".join(episode.generated)
    masked_out = tokenizer.decode(ids[~mask])
    assert masked_out.startswith("Answer the question below.")
    in_prompt = PROMPT_TEMPLATE.count(INFO_OPEN)  # the prompt names the tags once
    assert masked_out.count(INFO_OPEN) == episode.num_searches + in_prompt
    assert masked_out.count(INFO_CLOSE) == episode.num_searches + in_prompt
    for observation in episode.observations:
        if observation is not None:
            assert observation in masked_out


@pytest.mark.parametrize("tags_are_tokens", [True, False])
def test_action_tags_carry_the_action_tag_weight(world, episodes, tags_are_tokens):
    """Every token of an action tag, and no other, gets the weight; the ids do not change, also
    when a tag spans several tokens, as in real LMs."""
    texts = [*iter_world_text(world), *[t for e in episodes for t in e.generated]]
    tokenizer = train_tokenizer(texts, vocab_size=600, protocol_tags=tags_are_tokens)
    episode = next(e for e in episodes if e.num_searches >= 2)
    plain = encode_episode(
        tokenizer, episode.example.question, episode.generated, episode.observations
    )
    weighted = encode_episode(
        tokenizer,
        episode.example.question,
        episode.generated,
        episode.observations,
        action_tag_weight=5.0,
    )
    assert weighted.input_ids == plain.input_ids
    assert set(plain.loss_mask) == {0.0, 1.0}
    heavy = [i for i, w in enumerate(weighted.loss_mask) if w == 5.0]
    assert [i for i, w in enumerate(weighted.loss_mask) if w == 0.0] == [
        i for i, w in enumerate(plain.loss_mask) if w == 0.0
    ]
    heavy_text = "".join(tokenizer.decode([weighted.input_ids[i]]) for i in heavy)
    tags = [tag for turn in episode.generated for tag in ACTION_TAGS if tag in turn]
    assert heavy_text.replace(" ", "") != ""
    for tag in tags:
        assert tag in heavy_text
    assert sum(len(tag) for tag in tags) <= len(heavy_text.replace(" ", ""))
    # Off the tags the weight stays 1: the think line and the query are plain tokens.
    turn = episode.generated[0]
    ids, weights = action_tag_weights(tokenizer, turn, 5.0)
    untagged = "".join(tokenizer.decode([i]) for i, w in zip(ids, weights, strict=True) if w == 1)
    assert untagged.strip() and not any(tag in untagged for tag in ACTION_TAGS)


def test_up_weighted_tags_weigh_more_in_the_loss(tokenizer, episodes):
    episode = episodes[0]
    args = (tokenizer, episode.example.question, episode.generated, episode.observations)
    plain, weighted = encode_episode(*args), encode_episode(*args, action_tag_weight=10.0)
    torch.manual_seed(0)
    logits = torch.randn(1, len(plain.input_ids), len(tokenizer))
    tag_ids = {tokenizer.convert_tokens_to_ids(tag) for tag in ACTION_TAGS}
    ids = torch.tensor([plain.input_ids])
    # A model that is sure of every tag: up-weighting the tags lowers the mean loss.
    for position in range(1, ids.shape[1]):
        if int(ids[0, position]) in tag_ids:
            logits[0, position - 1, ids[0, position]] = 50.0
    plain_loss = masked_lm_loss(logits, ids, torch.tensor([plain.loss_mask]))
    weighted_loss = masked_lm_loss(logits, ids, torch.tensor([weighted.loss_mask]))
    assert weighted_loss < plain_loss * 0.9


def test_masked_loss_ignores_observation_and_prompt_targets(tokenizer, episodes):
    examples = [
        encode_episode(tokenizer, e.example.question, e.generated, e.observations)
        for e in episodes[:3]
    ]
    batch = collate(examples, tokenizer.pad_token_id)
    vocab = len(tokenizer)
    logits = torch.randn(*batch["input_ids"].shape, vocab, requires_grad=True)
    loss = masked_lm_loss(logits, batch["input_ids"], batch["loss_mask"])
    loss.backward()
    grad_norm = logits.grad.abs().sum(-1)  # (B, L): which positions the loss looks at
    predicts_generated = batch["loss_mask"][:, 1:].bool()
    assert torch.all(grad_norm[:, :-1][~predicts_generated] == 0)
    assert torch.all(grad_norm[:, :-1][predicts_generated] > 0)
    assert torch.all(grad_norm[:, -1] == 0)
    # The value is the mean cross-entropy over generated targets only.
    targets = batch["input_ids"][:, 1:][predicts_generated]
    picked = logits[:, :-1][predicts_generated]
    expected = torch.nn.functional.cross_entropy(picked, targets)
    assert torch.allclose(loss, expected)


def test_sft_learns_and_saves_a_loadable_hf_checkpoint(tmp_path, tokenizer, episodes):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = build_tiny_model(tokenizer, "micro", seed=0)
    examples = [
        encode_episode(tokenizer, e.example.question, e.generated, e.observations)
        for e in episodes[:16]
    ]
    config = SFTConfig(epochs=6, batch_size=8, lr=3e-3)
    losses = train_sft(model, examples, config, pad_id=tokenizer.pad_token_id)
    assert len(losses) == 12
    assert sum(losses[-2:]) / 2 < losses[0] - 1.0
    folder = save_policy(model, tokenizer, tmp_path / "policy")
    loaded = AutoModelForCausalLM.from_pretrained(folder)
    loaded_tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = torch.tensor([examples[0].input_ids])
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, model(ids).logits, atol=1e-5)
    text = episodes[0].generated[0]
    assert loaded_tokenizer.encode(text, add_special_tokens=False) == tokenizer.encode(
        text, add_special_tokens=False
    )


def test_mismatched_episode_is_a_clear_error(tokenizer):
    from tspo.errors import TSPOError

    with pytest.raises(TSPOError, match="2 generations but 1 observations"):
        encode_episode(tokenizer, "Q?", ["<search>a</search>", "<answer>b</answer>"], [None])


def test_practice_worlds_share_no_question_entities_with_the_real_world(world):
    from tspo.quickstart.pipeline import expert_episodes
    from tspo.quickstart.settings import PolicyStage

    retriever = BM25Retriever.from_docs([_Doc(k, t, x) for k, (t, x) in world.documents.items()])
    policy = PolicyStage(practice_worlds=2, expert_passes=1)
    own, practice, worlds = expert_episodes(world, retriever, policy, rollout_topk=3, max_turns=4)
    assert len(worlds) == 3 and worlds[0] is world
    assert len({w.seed for w in worlds}) == 3
    names = {e.name for e in world.entities.values()}
    test_subjects = {world.entities[q.subject].name for q in world.questions["test"]}
    assert len(own) == len(qa_examples(world, "train")) and practice
    for episode in practice:
        assert not names.intersection(episode.example.metadata["chain"])
    for episode in own + practice:
        assert episode.example.metadata["chain"][0] not in test_subjects
        assert " Left: " in episode.generated[-1]  # the policy's notes reach the expert (plan)
    none = PolicyStage(practice_worlds=0, expert_notes="none")
    plain, _, _ = expert_episodes(world, retriever, none, rollout_topk=3, max_turns=4)
    assert not any("Left:" in turn for episode in plain for turn in episode.generated)


def test_sft_cli_saves_a_checkpoint_auto_classes_load(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from typer.testing import CliRunner

    from tspo.cli import app

    runner = CliRunner()
    world_dir, out = tmp_path / "world", tmp_path / "sft"
    result = runner.invoke(app, ["data", "world", "--size", "tiny", "--out", str(world_dir)])
    assert result.exit_code == 0, result.output
    result = runner.invoke(
        app,
        ["sft", "--world", str(world_dir), "--out", str(out), "--practice-worlds", "0"]
        + ["--epochs", "1"],
    )
    assert result.exit_code == 0, result.output
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert model.config.vocab_size >= len(tokenizer)
    assert tokenizer.convert_tokens_to_ids("<search>") != tokenizer.unk_token_id


def test_tag_weights_need_a_tokenizer_with_offsets(tokenizer):
    """Slow (Python) Hugging Face tokenizers raise NotImplementedError for offsets: one line."""
    from tspo.errors import TSPOError

    class SlowTokenizer:
        def encode(self, text, add_special_tokens=False):
            return tokenizer.encode(text, add_special_tokens=add_special_tokens)

        def __call__(self, text, **kwargs):
            raise NotImplementedError("return_offset_mapping is not available")

    with pytest.raises(TSPOError, match="fast tokenizer"):
        action_tag_weights(SlowTokenizer(), "<search> Gesto </search>", 5.0)
    assert action_tag_weights(SlowTokenizer(), "<search> x </search>", 1.0)[1] == [1.0] * len(
        tokenizer.encode("<search> x </search>", add_special_tokens=False)
    )


def test_sft_cli_refuses_unknown_expert_notes_in_one_line(tmp_path, capsys):
    from tspo.cli import main

    world_dir, out = tmp_path / "world", tmp_path / "sft"
    with pytest.raises(SystemExit) as stop:
        main(["data", "world", "--size", "tiny", "--out", str(world_dir)])
    assert stop.value.code == 0
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        main(
            ["sft", "--world", str(world_dir), "--out", str(out), "--practice-worlds", "0"]
            + ["--expert-notes", "diary"]
        )
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.strip() == "error: expert notes must be one of none, goal, plan, not 'diary'"
    assert not (out / "model.safetensors").exists()

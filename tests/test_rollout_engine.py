"""The rollout engine end to end on scripted tiny Llamas: masks, turns, stops, groups, scoring."""

from __future__ import annotations

import pytest
import torch
from rollout_helpers import (
    DOCS,
    WordOverlapRetriever,
    check_batch_consistency,
    make_tokenizer,
    scripted_model,
    teacher_forced_logprobs,
)

from tspo.data.qa import QAExample
from tspo.errors import TSPOError
from tspo.protocol import INVALID_ACTION_MESSAGE, format_documents, wrap_information
from tspo.rollout import RolloutConfig, RolloutEngine

HAMLET = QAExample("h", "Who wrote Hamlet?", ["William Shakespeare", "Shakespeare"], "test")
NILE = QAExample("n", "Where is the Nile?", ["Africa"], "test")

# The prompt and corrective messages end in "\n", observations in "\n\n".
SEARCH_THEN_ANSWER = {
    "\n": ["<think>"],
    "<think>": ["ponder"],
    "ponder": ["</think>"],
    "</think>": ["<search>"],
    "<search>": ["hamlet"],
    "hamlet": ["</search>"],
    "</search>": ["junk"],  # what would follow if the turn did not stop
    "\n\n": ["<answer>"],
    "<answer>": ["shakespeare"],
    "shakespeare": ["</answer>"],
    "</answer>": ["junk"],
    "junk": ["junk"],
}
ALWAYS_SEARCH = {**SEARCH_THEN_ANSWER, "\n\n": ["<think>"]}
NEVER_ACT = {"\n": ["junk"], "junk": ["junk"]}


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the CI box is small and shared; intra-op threads only contend
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer(merges=False)


def run(tok, transitions, examples, group_size=1, **config):
    model = scripted_model(tok, transitions)
    retriever = WordOverlapRetriever(DOCS)
    config = {"max_turns": 3, "max_turn_tokens": 12, "max_obs_tokens": 90, **config}
    engine = RolloutEngine(model, tok, retriever, RolloutConfig(**config))
    batch = engine.generate(examples, group_size, greedy=True)
    check_batch_consistency(batch, tok)
    return batch, retriever, model


def test_search_then_answer_masks_turns_and_scores(tok):
    batch, retriever, model = run(tok, SEARCH_THEN_ANSWER, [HAMLET])
    (trajectory,) = batch.trajectories
    assert trajectory.generated == [
        "<think>ponder</think><search>hamlet</search>",
        "<answer>shakespeare</answer>",
    ]
    assert trajectory.queries == ["hamlet", None]
    # The top-3 documents, cut to max_obs_tokens (90 one-character tokens).
    observation = format_documents([(t, x) for t, x in DOCS[:3]])[:90]
    assert trajectory.observations == [observation, None]
    assert trajectory.response_text == (
        trajectory.generated[0] + wrap_information(observation) + trajectory.generated[1]
    )
    assert trajectory.final_answer == "shakespeare"
    assert (trajectory.outcome, trajectory.f1, trajectory.first_hit_turn) == (1.0, 1.0, 0)
    assert retriever.calls == [["hamlet"]]
    # Exact token layout: 6 generated tokens (turn 0), the observation (masked), 3 (turn 1).
    obs_len = len(tok.encode(wrap_information(observation), add_special_tokens=False))
    expected_turns = [0] * 6 + [-1] * obs_len + [1] * 3
    assert batch.turn_ids[0].tolist() == expected_turns
    assert batch.loss_mask[0].tolist() == [float(t >= 0) for t in expected_turns]
    assert batch.response_mask[0].tolist() == [1] * len(expected_turns)
    torch.testing.assert_close(teacher_forced_logprobs(model, batch), batch.old_logprobs)


def test_forced_final_turn_does_not_search(tok):
    batch, retriever, _ = run(tok, ALWAYS_SEARCH, [HAMLET], max_turns=2)
    (trajectory,) = batch.trajectories
    assert trajectory.num_turns == 3  # max_turns searching turns, then the forced final one
    assert trajectory.queries == ["hamlet", "hamlet", None]
    assert [o is not None for o in trajectory.observations] == [True, True, False]
    assert trajectory.generated[-1].endswith("</search>")
    assert trajectory.response_text.endswith("</search>")  # nothing appended after it
    assert len(retriever.calls) == 2
    assert trajectory.final_answer is None and trajectory.outcome == 0.0
    assert batch.turn_ids[0].max() == 2


def test_invalid_actions_get_masked_message_and_turn_limit_truncates(tok):
    batch, _, _ = run(tok, NEVER_ACT, [NILE], max_turns=1, max_turn_tokens=5)
    (trajectory,) = batch.trajectories
    assert trajectory.generated == ["junk" * 5, "junk" * 5]
    assert trajectory.observations == [None, None]
    assert trajectory.response_text == "junk" * 5 + INVALID_ACTION_MESSAGE + "junk" * 5
    assert trajectory.final_answer is None  # not the "<answer> and </answer>" of the message
    message_len = len(tok.encode(INVALID_ACTION_MESSAGE, add_special_tokens=False))
    assert batch.loss_mask[0].tolist() == [1.0] * 5 + [0.0] * message_len + [1.0] * 5
    assert batch.turn_ids[0].tolist() == [0] * 5 + [-1] * message_len + [1] * 5


def test_groups_padding_and_batched_retrieval(tok):
    # Every row follows the same script; only the Hamlet rows' answer is right.
    batch, retriever, _ = run(tok, SEARCH_THEN_ANSWER, [HAMLET, NILE, HAMLET], group_size=2)
    assert batch.group_ids.tolist() == [0, 0, 1, 1, 2, 2]
    assert [t.example_id for t in batch.trajectories] == ["h", "h", "n", "n", "h", "h"]
    assert retriever.calls == [["hamlet"] * 6]  # one call per turn for every searching row
    assert batch.outcome.tolist() == [1.0, 1.0, 0.0, 0.0, 1.0, 1.0]
    assert batch.first_hit_turn.tolist() == [0, 0, -1, -1, 0, 0]
    # Prompts differ in length: shorter ones are left-padded with pad tokens.
    lengths = batch.prompt_mask.sum(dim=1)
    assert lengths[0] < lengths[2]
    pad_cols = batch.prompt_mask[0] == 0
    assert bool((batch.prompt_ids[0][pad_cols] == tok.pad_token_id).all())


def test_end_of_sequence_ends_the_turn(tok):
    eos = tok.eos_token
    chain = {"\n": ["<answer>"], "<answer>": ["shakespeare"], "shakespeare": [eos]}
    batch, _, _ = run(tok, chain, [HAMLET], max_turns=1)
    (trajectory,) = batch.trajectories
    # The unclosed answer is invalid; the EOS token is kept (and trained on) but not shown.
    assert trajectory.generated == ["<answer>shakespeare"] * 2
    assert trajectory.final_answer is None
    message_len = len(tok.encode(INVALID_ACTION_MESSAGE, add_special_tokens=False))
    assert batch.loss_mask[0].tolist() == [1.0] * 3 + [0.0] * message_len + [1.0] * 3
    assert batch.response_ids[0][2].item() == tok.eos_token_id


@pytest.mark.parametrize("stop", ["</search>", "</answer>"])
def test_multi_token_stop_strings_end_the_turn(stop):
    tok = make_tokenizer(protocol_tags=False, merges=False)
    assert len(tok.encode(stop, add_special_tokens=False)) == len(stop)
    text = "q" + stop + "z"  # without the stop, "z" would repeat to the token limit
    chain = {"\n": ["q"], **{a: [b] for a, b in zip(text, text[1:], strict=False)}, "z": ["z"]}
    batch, _, _ = run(tok, chain, [NILE], max_turns=1, max_turn_tokens=30)
    (trajectory,) = batch.trajectories
    assert trajectory.generated == ["q" + stop, "q" + stop]
    assert batch.loss_mask.sum() == 2 * len("q" + stop)


def test_sampling_is_reproducible_and_matches_teacher_forcing(tok):
    branching = {
        **SEARCH_THEN_ANSWER,
        "</think>": ["<search>", "<answer>", "junk"],
        "junk": ["</think>", "ponder"],
        "\n\n": ["<think>", "<answer>"],
    }
    model = scripted_model(tok, branching)
    engine = RolloutEngine(
        model,
        tok,
        WordOverlapRetriever(DOCS),
        RolloutConfig(max_turns=3, max_turn_tokens=10, max_obs_tokens=40, temperature=1.0),
    )
    first = engine.generate([HAMLET, NILE], 4, generator=torch.Generator().manual_seed(3))
    again = engine.generate([HAMLET, NILE], 4, generator=torch.Generator().manual_seed(3))
    check_batch_consistency(first, tok)
    assert torch.equal(first.response_ids, again.response_ids)
    assert len({t.num_turns for t in first.trajectories}) > 1  # rows finish at different times
    torch.testing.assert_close(
        teacher_forced_logprobs(model, first), first.old_logprobs, atol=1e-4, rtol=0
    )


def test_engine_rejects_bad_input(tok):
    model = scripted_model(tok, NEVER_ACT)
    engine = RolloutEngine(model, tok, WordOverlapRetriever(DOCS))
    with pytest.raises(TSPOError, match="group_size"):
        engine.generate([NILE], 0)
    with pytest.raises(TSPOError, match="no examples"):
        engine.generate([], 2)
    chat = RolloutEngine(
        model, tok, WordOverlapRetriever(DOCS), RolloutConfig(use_chat_template=True)
    )
    with pytest.raises(TSPOError, match="chat template"):
        chat.generate([NILE], 1)
    with pytest.raises(TSPOError, match="rollout.top_p"):
        RolloutConfig(top_p=0)

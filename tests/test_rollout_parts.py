"""The rollout engine's parts on their own: sampling, stop checks, config, packing, scoring."""

from __future__ import annotations

import pytest
import torch
from rollout_helpers import DOCS, WordOverlapRetriever, make_tokenizer, scripted_model

from tspo.data.qa import QAExample
from tspo.errors import TSPOError
from tspo.protocol import INVALID_ACTION_MESSAGE, build_prompt
from tspo.rollout import RolloutConfig, RolloutEngine, Trajectory, score_trajectory
from tspo.rollout.assemble import Segment, assemble_batch
from tspo.rollout.sampling import next_tokens
from tspo.rollout.stopping import StopChecker


def test_greedy_picks_argmax_and_reports_temperature_one_logprobs():
    logits = torch.tensor([[0.0, 2.0, 1.0], [3.0, 0.0, 3.0]])
    tokens, logprobs = next_tokens(logits, greedy=True, temperature=0.5)
    assert tokens.tolist() == [1, 0]  # ties go to the lowest id
    expected = torch.log_softmax(logits, dim=-1).gather(-1, tokens[:, None]).squeeze(-1)
    torch.testing.assert_close(logprobs, expected)


def test_sampling_follows_temperature_and_top_p():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.2])).expand(4000, 3)
    generator = torch.Generator().manual_seed(0)
    tokens, logprobs = next_tokens(logits, greedy=False, generator=generator)
    share = torch.bincount(tokens, minlength=3).float() / 4000
    torch.testing.assert_close(share, torch.tensor([0.5, 0.3, 0.2]), atol=0.03, rtol=0)
    torch.testing.assert_close(logprobs, torch.log(torch.tensor([0.5, 0.3, 0.2]))[tokens])
    nucleus, _ = next_tokens(logits, greedy=False, top_p=0.7, generator=generator)
    assert set(nucleus.tolist()) == {0, 1}  # 0.5 + 0.3 reaches 0.7; token 2 is cut
    share = torch.bincount(nucleus, minlength=3).float() / 4000
    torch.testing.assert_close(share[:2], torch.tensor([0.625, 0.375]), atol=0.03, rtol=0)
    cold, _ = next_tokens(logits, greedy=False, temperature=0.05, generator=generator)
    assert bool((cold == 0).all())
    again, _ = next_tokens(logits, greedy=False, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again, tokens)


def test_stop_checker_on_multi_token_tags():
    tok = make_tokenizer(protocol_tags=False, merges=False)
    checker = StopChecker(tok, ["</search>", "</answer>"])
    text = "a </search"
    ids = tok.encode(text + "> more", add_special_tokens=False)
    rows = [ids[: len(text) + 1], ids[: len(text)], ids[: len(text) + 3]]
    new = [row[-1] for row in rows]
    assert checker.stopped(new, rows, [0, 1, 2]) == [0]  # row 2's newest token is not ">"
    assert checker.stopped(new, rows, [1, 2]) == []
    assert checker.may_end(tok.encode(">", add_special_tokens=False)[0])
    assert not checker.may_end(tok.encode("s", add_special_tokens=False)[0])


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_turns", -1),
        ("max_turn_tokens", 0),
        ("max_obs_tokens", -1),
        ("topk", 0),
        ("temperature", 0.0),
        ("top_p", 1.5),
        ("detect_in", "nowhere"),
        ("min_answer_chars", -1),
    ],
)
def test_config_rejects_bad_values(field, value):
    with pytest.raises(TSPOError, match=f"rollout.{field}"):
        RolloutConfig(**{field: value})


def test_assemble_batch_layout():
    trajectories = [
        Trajectory("a", "q", ["x"], "s", group_id=0, outcome=1.0, first_hit_turn=0),
        Trajectory("b", "q", ["x"], "s", group_id=0),
    ]
    responses = [
        [Segment([1, 2], 0, [-0.1, -0.2]), Segment([3, 4, 5], 0), Segment([6], 1, [-0.3])],
        [Segment([7], 0, [-0.4])],
    ]
    batch = assemble_batch([[10, 11, 12], [13]], responses, trajectories, pad_id=0)
    assert batch.prompt_ids.tolist() == [[10, 11, 12], [0, 0, 13]]
    assert batch.prompt_mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert batch.response_ids.tolist() == [[1, 2, 3, 4, 5, 6], [7, 0, 0, 0, 0, 0]]
    assert batch.response_mask.tolist() == [[1] * 6, [1, 0, 0, 0, 0, 0]]
    assert batch.loss_mask.tolist() == [[1, 1, 0, 0, 0, 1], [1, 0, 0, 0, 0, 0]]
    assert batch.turn_ids.tolist() == [[0, 0, -1, -1, -1, 1], [0, -1, -1, -1, -1, -1]]
    torch.testing.assert_close(
        batch.old_logprobs,
        torch.tensor([[-0.1, -0.2, 0, 0, 0, -0.3], [-0.4, 0, 0, 0, 0, 0]]),
    )
    assert batch.outcome.tolist() == [1.0, 0.0] and batch.first_hit_turn.tolist() == [0, -1]


def test_scoring_reads_the_last_answer_the_model_wrote():
    trajectory = Trajectory(
        "a",
        "Who wrote Hamlet?",
        ["William Shakespeare"],
        "s",
        group_id=0,
        generated=[
            "<search> hamlet </search>",
            "<answer>Bacon</answer><answer> william  Shakespeare! </answer>",
        ],
        observations=["Doc 1(Title: Hamlet) by William Shakespeare.", None],
    )
    score_trajectory(trajectory)
    assert trajectory.final_answer == "william  Shakespeare!"
    assert (trajectory.outcome, trajectory.f1, trajectory.first_hit_turn) == (1.0, 1.0, 0)
    trajectory.observations = [None, None]
    assert score_trajectory(trajectory).first_hit_turn == -1
    generated = score_trajectory(trajectory, detect_in="generated")
    assert generated.first_hit_turn == -1  # the final answer itself is not evidence
    # The corrective message spells out "<answer> and </answer>": it is not the model's answer.
    trajectory.generated = ["I don't know", "still nothing"]
    trajectory.response_text = "I don't know" + INVALID_ACTION_MESSAGE + "still nothing"
    score_trajectory(trajectory)
    assert trajectory.final_answer is None and trajectory.outcome == 0.0
    trajectory.generated = ["<answer> Marlowe </answer>", "nothing"]
    assert score_trajectory(trajectory).final_answer == "Marlowe"


def test_chat_template_prompts():
    tok = make_tokenizer(merges=False)
    tok.chat_template = "{% for m in messages %}<|user|>{{ m['content'] }}{% endfor %}<|bot|>"
    model = scripted_model(tok, {"\n": ["junk"], ">": ["<answer>"], "<answer>": ["</answer>"]})
    config = RolloutConfig(use_chat_template=True, max_turns=0, max_turn_tokens=4)
    engine = RolloutEngine(model, tok, WordOverlapRetriever(DOCS), config)
    example = QAExample("a", "Who wrote Hamlet?", ["Shakespeare"])
    batch = engine.generate([example], 1, greedy=True)
    prompt = batch.prompt_ids[0][batch.prompt_mask[0].bool()].tolist()
    assert tok.decode(prompt) == build_prompt(example.question, tok, use_chat_template=True)
    assert tok.decode(prompt).endswith("<|bot|>")
    assert batch.trajectories[0].generated == ["<answer></answer>"]


def test_sliding_window_models_are_refused():
    from transformers import Qwen2Config

    from tspo.rollout.context import new_cache

    shape = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    assert len(new_cache(Qwen2Config(**shape)).layers) == 2
    sliding = Qwen2Config(**shape, use_sliding_window=True, sliding_window=8, max_window_layers=0)
    with pytest.raises(TSPOError, match="full-attention"):
        new_cache(sliding)


def test_tokenizer_without_pad_token_pads_with_eos():
    tok = make_tokenizer(merges=False)
    model = scripted_model(tok, {"\n": ["<answer>"], "<answer>": ["</answer>"]})
    tok.pad_token = None
    engine = RolloutEngine(model, tok, WordOverlapRetriever(DOCS), RolloutConfig(max_turns=0))
    assert engine.pad_id == tok.eos_token_id
    examples = [QAExample("a", "Who?", ["x"]), QAExample("b", "Where is the Nile?", ["x"])]
    batch = engine.generate(examples, 1, greedy=True)
    assert batch.prompt_ids[0, 0].item() == tok.eos_token_id  # the shorter prompt is padded
    assert [t.generated for t in batch.trajectories] == [["<answer></answer>"]] * 2

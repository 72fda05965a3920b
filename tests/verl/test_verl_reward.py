"""The veRL reward function on Search-R1-style responses, alone and through veRL's own plumbing."""

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from verl import DataProto
from verl.experimental.reward_loop.reward_manager.naive import NaiveRewardManager
from verl.trainer.ppo.core_algos import get_adv_estimator_fn
from verl.trainer.ppo.reward import get_custom_reward_fn
from verl.utils.import_utils import load_extern_object

from tspo.algo import compute_advantages
from tspo.errors import TSPOError
from tspo.integrations.verl import decode_batch
from tspo.integrations.verl.reward import compute_score, gold_answers, split_turns
from tspo.models.tiny import train_tokenizer
from tspo.protocol import build_prompt, extract_last_answer, format_documents, wrap_information

pytestmark = pytest.mark.verl

QUESTION = "What is the capital of Australia?"
GOLDS = {"target": np.array(["Canberra", "Canberra, ACT"], dtype=object)}
SYDNEY = format_documents([("Sydney", "Sydney is the largest city in Australia.")])
CANBERRA = format_documents(
    [("Canberra", "Canberra is the capital city of Australia."), ("ACT", "A federal territory.")]
)

# (the model's text, the observation the environment appended after it or None), turn by turn.
TWO_SEARCHES_THEN_RIGHT = [
    ("<think>I need the capital.</think>\n<search>capital of Australia</search>", SYDNEY),
    ("<think>Sydney is not it.</think>\n<search>Australian federal capital</search>", CANBERRA),
    ("<think>Found it.</think>\n<answer> Canberra </answer>", None),
]
ENDED_ON_THE_HIT = [("<think>Look it up.</think>\n<search>capital of Australia</search>", CANBERRA)]


def render(turns):
    """The response text veRL decodes, and one mask entry per character (1 = generated)."""
    text, mask = "", []
    for generated, observation in turns:
        text += generated
        mask += [1] * len(generated)
        if observation is not None:
            block = wrap_information(observation)
            text += block
            mask += [0] * len(block)
    return text, mask


def score(turns, **extra):
    return compute_score("nq", render(turns)[0], GOLDS, {"question": QUESTION, **extra})


def test_a_right_answer_after_the_answer_surfaced_in_the_second_search():
    result = score(TWO_SEARCHES_THEN_RIGHT)
    assert result == {
        "score": 9.0,  # R + 4 (k* + 1) = 1 + 4 * 2
        "em": 1.0,
        "f1": 1.0,
        "folr_hit": 1.0,
        "first_hit_turn": 1.0,
        "turns_aligned": 1.0,
    }


def test_a_hit_in_the_last_turn_of_a_trajectory_that_never_answered():
    result = score(ENDED_ON_THE_HIT)
    assert (result["score"], result["em"], result["first_hit_turn"]) == (4.0, 0.0, 0.0)


def test_the_example_answer_in_the_prompt_never_counts():
    response = render(ENDED_ON_THE_HIT)[0]
    prompt = build_prompt("What is the capital of France?")
    assert extract_last_answer(prompt + response) == "Paris"  # what a prompt-blind scorer sees
    result = compute_score("nq", response, ["Paris"], {"question": "capital of France?"})
    assert (result["em"], result["score"]) == (0.0, 0.0)


def test_an_answer_quoted_inside_a_retrieved_passage_is_not_the_models_answer():
    quoting = format_documents([("Quiz", "Reply like <answer> Canberra </answer> to win.")])
    result = score([("<search>capital quiz</search>", quoting)])
    assert result["em"] == 0.0
    assert result["first_hit_turn"] == 0.0


def test_an_alias_given_away_by_the_question_is_no_hit():
    question = "Is Canberra the capital of Australia?"
    response = render(ENDED_ON_THE_HIT)[0]
    result = compute_score("nq", response, ["Canberra"], {"question": question})
    assert result["first_hit_turn"] == -1.0


def test_an_information_block_the_model_wrote_without_searching_is_no_observation():
    response = (
        "<think>I recall <information>Canberra</information></think><answer>Canberra</answer>"
    )
    result = compute_score("nq", response, GOLDS, {"question": QUESTION})
    assert (result["score"], result["first_hit_turn"]) == (1.0, -1.0)


def test_a_hermes_tool_call_with_chat_template_glue_counts_as_a_search():
    response = (
        '<tool_call>\n{"name": "search", "arguments": {"query": "capital of Australia"}}\n'
        "</tool_call>user\n<tool_response>\n"
        + wrap_information(CANBERRA)
        + "</tool_response>\nassistant\n<answer>Canberra</answer>"
    )
    result = compute_score("nq", response, GOLDS, {"question": QUESTION, "num_turns": 4})
    assert (result["score"], result["turns_aligned"]) == (5.0, 1.0)


def test_a_block_cut_open_by_truncation_still_counts_to_the_end():
    response = "<search>capital of Australia</search>\n\n<information>Doc 1(Title: Canberra) Canb"
    turns = split_turns(response)
    assert turns.observations == ["Doc 1(Title: Canberra) Canb"]
    assert score([("<search>q</search>", "Doc 1(Title: C) Canberra is")])["first_hit_turn"] == 0.0


def test_when_the_text_disagrees_with_verls_turn_count_the_hit_is_dropped():
    # The three turns and two tool responses make 1 + 3 + 2 = 6 veRL messages.
    assert score(TWO_SEARCHES_THEN_RIGHT, num_turns=6)["first_hit_turn"] == 1.0
    disagreeing = score(TWO_SEARCHES_THEN_RIGHT, num_turns=7)
    assert (disagreeing["first_hit_turn"], disagreeing["turns_aligned"]) == (-1.0, 0.0)
    assert disagreeing["score"] == 1.0


def test_reward_kwargs_reach_folr():
    turns = [("<think>Maybe Canberra.</think><search>check</search>", SYDNEY)]
    assert score(turns)["first_hit_turn"] == -1.0
    response = render(turns)[0]
    both = compute_score("nq", response, GOLDS, {"question": QUESTION}, detect_in="both")
    assert both["first_hit_turn"] == 0.0


@pytest.mark.parametrize(
    "ground_truth",
    [GOLDS, {"target": ["Canberra"]}, ["Canberra"], "Canberra", np.array(["Canberra"])],
)
def test_ground_truth_in_every_shape_veRL_hands_over(ground_truth):
    assert "Canberra" in gold_answers(ground_truth)


def test_missing_question_or_target_is_an_error():
    response = render(ENDED_ON_THE_HIT)[0]
    with pytest.raises(TSPOError, match="question"):
        compute_score("nq", response, GOLDS, {"split": "train", "index": 3})
    with pytest.raises(TSPOError, match="target"):
        compute_score("nq", response, {"answers": ["Canberra"]}, {"question": QUESTION})


@pytest.mark.parametrize("turns", [TWO_SEARCHES_THEN_RIGHT, ENDED_ON_THE_HIT])
def test_the_hit_turn_the_text_names_is_the_run_of_the_mask_holding_that_text(turns):
    text, mask = render(turns)
    rewards = torch.zeros(1, len(mask))
    rewards[0, -1] = score(turns)["score"]
    _, first_hit_turn, turn_ids = decode_batch(rewards, torch.tensor([mask]))
    k_star = int(first_hit_turn[0])
    hit_chars = [
        char for char, turn in zip(text, turn_ids[0].tolist(), strict=True) if turn == k_star
    ]
    assert "".join(hit_chars) == turns[k_star][0]


def test_verl_loads_the_reward_function_by_package_path_with_reward_kwargs():
    path = "pkg://tspo.integrations.verl.reward"
    assert load_extern_object(path, "compute_score") is compute_score
    config = OmegaConf.create(
        {
            "reward": {
                "custom_reward_function": {
                    "path": path,
                    "name": "compute_score",
                    "reward_kwargs": {"detect_in": "both"},
                }
            }
        }
    )
    reward_fn = get_custom_reward_fn(config)
    turns = [("<think>Maybe Canberra.</think><search>check</search>", SYDNEY)]
    result = reward_fn(
        data_source="nq",
        solution_str=render(turns)[0],
        ground_truth=GOLDS,
        extra_info={"question": QUESTION},
    )
    assert result["first_hit_turn"] == 0.0


@pytest.fixture(scope="module")
def tokenizer():
    texts = [render(TWO_SEARCHES_THEN_RIGHT)[0], render(ENDED_ON_THE_HIT)[0], QUESTION] * 4
    return train_tokenizer(texts, vocab_size=400)


def verl_rollout_row(tokenizer, turns, prompt_width=8, response_width=160):
    """One row as veRL's agent loop lays it out: padded prompt, response ids, masks."""
    response_ids, response_mask = [], []
    for generated, observation in turns:
        ids = tokenizer.encode(generated, add_special_tokens=False)
        response_ids += ids
        response_mask += [1] * len(ids)
        if observation is not None:
            ids = tokenizer.encode(wrap_information(observation), add_special_tokens=False)
            response_ids += ids
            response_mask += [0] * len(ids)
    valid = len(response_ids)
    assert valid <= response_width
    pad = tokenizer.pad_token_id
    responses = response_ids + [pad] * (response_width - valid)
    attention = [0] * (prompt_width - 1) + [1] + [1] * valid + [0] * (response_width - valid)
    return {
        "prompts": [pad] * (prompt_width - 1) + [tokenizer.encode("Q")[0]],
        "responses": responses,
        "attention_mask": attention,
        "response_mask": response_mask + [0] * (response_width - valid),
        "num_turns": 1 + len(turns) + sum(obs is not None for _, obs in turns),
    }


def reward_fn_as_verl_loads_it():
    path, name = "pkg://tspo.integrations.verl.reward", "compute_score"
    config = {"reward": {"custom_reward_function": {"path": path, "name": name}}}
    return get_custom_reward_fn(OmegaConf.create(config))


def test_verls_reward_manager_and_the_estimator_end_to_end(tokenizer):
    """Decode with veRL's NaiveRewardManager, place the score as the agent loop does, estimate."""
    group = [TWO_SEARCHES_THEN_RIGHT, ENDED_ON_THE_HIT, TWO_SEARCHES_THEN_RIGHT[2:]]
    rows = [verl_rollout_row(tokenizer, turns) for turns in group]
    data = DataProto.from_dict(
        tensors={
            key: torch.tensor([row[key] for row in rows])
            for key in ("prompts", "responses", "attention_mask", "response_mask")
        },
        non_tensors={
            "data_source": np.array(["nq"] * 3, dtype=object),
            "reward_model": np.array([{"ground_truth": GOLDS}] * 3, dtype=object),
            "extra_info": np.array([{"question": QUESTION} for _ in rows], dtype=object),
            "__num_turns__": np.array([row["num_turns"] for row in rows], dtype=np.int32),
        },
    )
    manager = NaiveRewardManager(OmegaConf.create({}), tokenizer, reward_fn_as_verl_loads_it())
    results = [
        manager.loop.run_until_complete(manager.run_single(data[i : i + 1]))
        for i in range(len(rows))
    ]
    assert [r["reward_score"] for r in results] == [9.0, 4.0, 1.0]

    valid = data.batch["attention_mask"][:, 8:].sum(dim=1)
    rewards = torch.zeros(3, 160)
    rewards[torch.arange(3), valid - 1] = torch.tensor([r["reward_score"] for r in results])
    index = np.array(["q"] * 3, dtype=object)
    advantages, _ = get_adv_estimator_fn("tspo")(rewards, data.batch["response_mask"], index)
    outcome, first_hit_turn, turn_ids = decode_batch(rewards, data.batch["response_mask"])
    assert outcome.tolist() == [1.0, 0.0, 1.0] and first_hit_turn.tolist() == [1, 0, -1]
    expected = compute_advantages(
        "tspo",
        outcome=outcome.float(),
        first_hit_turn=first_hit_turn,
        turn_ids=turn_ids,
        group_ids=torch.zeros(3, dtype=torch.long),
    )
    assert torch.equal(advantages, expected)

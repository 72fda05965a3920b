"""The score encoding and the turn recovery that carry TSPO's facts through veRL's tensors."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from verl_helpers import Spec, algo_inputs, verl_batch

from tspo.errors import TSPOError
from tspo.integrations.verl import (
    HIT_STRIDE,
    decode_batch,
    decode_scores,
    encode_score,
    turn_ids_from_response_mask,
)

pytestmark = pytest.mark.verl

binary_outcomes = st.sampled_from([-1.0, 0.0, 1.0])
any_outcomes = st.floats(min_value=-1.0, max_value=1.0, allow_nan=False, width=32)
hit_turns = st.integers(min_value=-1, max_value=1000)


def decode_one(score: float, width: int = 3, at: int = -1) -> tuple[float, int]:
    rewards = torch.zeros(1, width)
    rewards[0, at] = score
    outcome, first_hit_turn = decode_scores(rewards)
    return float(outcome[0]), int(first_hit_turn[0])


@given(outcome=binary_outcomes, first_hit_turn=hit_turns)
def test_round_trip_is_exact_for_binary_outcomes(outcome, first_hit_turn):
    assert decode_one(encode_score(outcome, first_hit_turn)) == (outcome, first_hit_turn)


@given(outcome=any_outcomes, first_hit_turn=st.integers(min_value=-1, max_value=50))
def test_round_trip_recovers_fractional_outcomes_within_float32_rounding(outcome, first_hit_turn):
    decoded_outcome, decoded_turn = decode_one(encode_score(outcome, first_hit_turn))
    assert decoded_turn == first_hit_turn
    assert decoded_outcome == pytest.approx(outcome, abs=1e-5)


@given(a=st.tuples(binary_outcomes, hit_turns), b=st.tuples(binary_outcomes, hit_turns))
def test_distinct_facts_never_share_a_score(a, b):
    if a != b:
        assert encode_score(*a) != encode_score(*b)


@pytest.mark.parametrize("position", [0, 1, 4])
def test_decoding_does_not_depend_on_which_token_carries_the_score(position):
    assert decode_one(encode_score(1.0, 2), width=5, at=position) == (1.0, 2)


def test_a_hit_in_the_last_turn_with_a_right_answer_is_not_mistaken_for_another_pair():
    # R = 1 with k* = 1 is 9; R = 1 with k* = 0 is 5; R = 0 with k* = 1 is 8; no hit R = 1 is 1.
    assert [encode_score(1.0, 1), encode_score(1.0, 0), encode_score(0.0, 1)] == [9.0, 5.0, 8.0]
    assert encode_score(1.0, -1) == 1.0
    assert decode_one(9.0) == (1.0, 1)


@pytest.mark.parametrize(
    ("outcome", "first_hit_turn"), [(1.5, 0), (-1.01, -1), (0.0, -2), (float("nan"), 0)]
)
def test_encoding_rejects_what_it_cannot_carry(outcome, first_hit_turn):
    with pytest.raises(TSPOError):
        encode_score(outcome, first_hit_turn)


def test_the_stride_leaves_room_for_the_whole_outcome_range():
    assert HIT_STRIDE / 2 > 1.0


def test_a_non_finite_score_is_an_error():
    with pytest.raises(TSPOError, match="NaN or infinite"):
        decode_scores(torch.tensor([[0.0, float("inf")]]))


@pytest.mark.parametrize(
    ("mask", "expected"),
    [
        ([1, 1, 0, 0, 1, 0, 1, 1], [0, 0, -1, -1, 1, -1, 2, 2]),
        ([0, 1, 1, 0, 0, 0], [-1, 0, 0, -1, -1, -1]),  # masked lead, trailing observation
        ([1, 1, 1, 1], [0, 0, 0, 0]),  # a single-turn trajectory
        ([1, 0, 1, 0, 1, 0], [0, -1, 1, -1, 2, -1]),  # one-token turns
        ([0, 0, 0], [-1, -1, -1]),  # no loss token at all
    ],
)
def test_turn_k_is_the_kth_run_of_ones(mask, expected):
    assert turn_ids_from_response_mask(torch.tensor([mask])).tolist() == [expected]


def test_turns_are_recovered_row_by_row_in_a_padded_batch():
    specs = [
        Spec("a", ((3, 2), (1, 4), (2, 0)), 1.0, 2),
        Spec("a", ((5, 0),), 0.0, -1),
        Spec("b", ((2, 3),), 1.0, 0, leading_masked=1),
        Spec("b", (), 0.0, -1, leading_masked=2),
    ]
    batch = verl_batch(specs, width=16)
    expected = algo_inputs(specs, width=16)
    assert torch.equal(turn_ids_from_response_mask(batch["response_mask"]), expected["turn_ids"])


EDGE_CASES = {
    "no hit": Spec("g", ((2, 3), (2, 0)), 1.0, -1),
    "hit in turn 0": Spec("g", ((2, 3), (2, 0)), 0.0, 0),
    "hit in the last turn, ended on its observation": Spec("g", ((2, 3), (1, 3)), 1.0, 1),
    "hit in the last turn, one token long": Spec("g", ((2, 3), (1, 1)), 1.0, 1),
    "single turn with a hit": Spec("g", ((4, 2),), 1.0, 0),
    "single turn without a hit": Spec("g", ((4, 0),), 0.0, -1),
    "zero loss tokens": Spec("g", (), 0.0, -1, leading_masked=3),
    "empty response": Spec("g", (), 0.0, -1),
}


@pytest.mark.parametrize("name", list(EDGE_CASES))
def test_every_edge_case_decodes_to_its_own_facts(name):
    spec = EDGE_CASES[name]
    batch = verl_batch([spec], width=12)
    outcome, first_hit_turn, turn_ids = decode_batch(
        batch["token_level_rewards"], batch["response_mask"]
    )
    expected = algo_inputs([spec], width=12)
    assert outcome.tolist() == expected["outcome"].tolist()
    assert first_hit_turn.tolist() == expected["first_hit_turn"].tolist()
    assert torch.equal(turn_ids, expected["turn_ids"])


def test_a_first_hit_turn_beyond_the_rows_turns_is_an_error():
    # veRL's plain reward manager writing a score of 5 on a one-turn row would decode as k* = 0
    # with R = 1; a score of 9 names turn 1, which that row does not have.
    rewards = torch.tensor([[0.0, 0.0, 9.0]])
    with pytest.raises(TSPOError, match="row 0: .* first-hit turn 1, but .* 1 turn"):
        decode_batch(rewards, torch.tensor([[1, 1, 1]]))


def test_a_score_below_the_no_hit_range_is_an_error():
    with pytest.raises(TSPOError, match="first-hit turn -3"):
        decode_batch(torch.tensor([[0.0, -8.0]]), torch.tensor([[1, 0]]))


def test_mismatched_shapes_are_an_error():
    with pytest.raises(TSPOError, match=r"\(bs, L\)"):
        decode_batch(torch.zeros(2, 3), torch.zeros(2, 4, dtype=torch.long))

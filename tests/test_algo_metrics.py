"""SQuAD normalisation, exact match and token F1 against gold alias lists."""

import pytest

from tspo.algo import exact_match, f1_score, normalize_answer


@pytest.mark.parametrize(
    ("raw", "normalized"),
    [
        ("The  Quick, brown FOX!", "quick brown fox"),
        ("An apple a day", "apple day"),
        ("  Paris.  ", "paris"),
        ("U.S.A.", "usa"),
        ("theatre", "theatre"),  # articles are removed as whole words only
        ("", ""),
    ],
)
def test_normalize_answer_follows_squad(raw, normalized):
    assert normalize_answer(raw) == normalized


def test_exact_match_accepts_any_alias_after_normalisation():
    assert exact_match("the Eiffel Tower", ["Tour Eiffel", "Eiffel tower"]) == 1.0
    assert exact_match("Eiffel", ["Tour Eiffel", "Eiffel tower"]) == 0.0


def test_exact_match_of_missing_prediction_or_no_golds_is_zero():
    assert exact_match(None, ["Paris"]) == 0.0
    assert exact_match("Paris", []) == 0.0


def test_f1_is_token_overlap_and_takes_the_best_alias():
    # prediction {quick, fox} against gold {quick, brown, fox}: P = 1, R = 2/3, F1 = 0.8
    assert f1_score("the quick fox", ["quick brown fox"]) == pytest.approx(0.8)
    assert f1_score("the quick fox", ["slow dog", "quick brown fox", "fox"]) == pytest.approx(0.8)
    assert f1_score("quick fox", ["quick fox"]) == 1.0


def test_f1_counts_repeated_tokens_once_each():
    # prediction "fox fox" against "fox": overlap 1, P = 1/2, R = 1, F1 = 2/3
    assert f1_score("fox fox", ["fox"]) == pytest.approx(2 / 3)


def test_f1_edge_cases_are_zero():
    assert f1_score(None, ["Paris"]) == 0.0
    assert f1_score("Paris", []) == 0.0
    assert f1_score("Berlin", ["Paris"]) == 0.0
    assert f1_score("the", ["a"]) == 0.0  # both normalise to nothing

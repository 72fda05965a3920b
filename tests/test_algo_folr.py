"""FOLR first-occurrence turn: word-boundary matching, the guards, and where to look."""

import pytest

from tspo.algo import first_occurrence_turn
from tspo.errors import TSPOError


def doc(text: str) -> str:
    return f"Doc 1(Title: Some page) {text}"


def test_matches_whole_words_only():
    question = "What do you put in a cold drink?"
    assert first_occurrence_turn(question, ["ice"], [doc("The price of tea rose.")]) == -1
    assert first_occurrence_turn(question, ["ice"], [doc("Add ice, then lemon.")]) == 0


def test_matching_is_after_normalisation():
    question = "Who recorded Abbey Road?"
    observations = [doc("It was recorded by BEATLES, in 1969.")]
    assert first_occurrence_turn(question, ["The Beatles"], observations) == 0


def test_returns_the_first_turn_that_retrieved_an_alias():
    question = "What is the capital of France?"
    observations = [doc("France is in Europe."), None, doc("Paris is its capital."), doc("Paris")]
    assert first_occurrence_turn(question, ["Paris"], observations) == 2


def test_turns_without_a_search_never_count_in_retrieved_mode():
    question = "What is the capital of France?"
    generated = ["<think>Paris, maybe.</think><search>France</search>", "<answer>Paris</answer>"]
    observations = [doc("France is in Europe."), None]
    assert first_occurrence_turn(question, ["Paris"], observations, generated) == -1


def test_multi_word_alias_matches_as_a_phrase():
    question = "Where is the Statue of Liberty?"
    assert first_occurrence_turn(question, ["New York"], [doc("York is new to me")]) == -1
    assert first_occurrence_turn(question, ["New York"], [doc("It stands in New York.")]) == 0


def test_guard_alias_in_question_prevents_incidental_match():
    # Any passage about the question's topic mentions "Mexico"; that is no evidence of the answer.
    question = "Which city is the capital of Mexico?"
    observations = [doc("Mexico is a country in North America.")]
    assert first_occurrence_turn(question, ["Mexico"], observations) == -1
    # Control: without the guard's trigger, the same passage would have counted.
    assert (
        first_occurrence_turn("Which country is south of the USA?", ["Mexico"], observations) == 0
    )


def test_guard_alias_in_question_keeps_the_other_aliases():
    question = "Which city is the capital of Mexico?"
    golds = ["Mexico", "Mexico City"]
    # "mexico" is dropped; "mexico city" is not in the question and still counts.
    assert first_occurrence_turn(question, golds, [doc("Mexico is large.")]) == -1
    assert first_occurrence_turn(question, golds, [doc("Mexico City is huge.")]) == 0


def test_guard_short_alias_prevents_incidental_match():
    # A one-character answer such as "3" matches stray numbers in almost any passage.
    question = "How many members did the trio have?"
    observations = [doc("Founded in 1903, it had 3 owners and 12 staff.")]
    assert first_occurrence_turn(question, ["3"], observations) == -1
    assert first_occurrence_turn(question, ["3"], observations, min_answer_chars=1) == 0


def test_guard_short_alias_measures_the_normalised_alias():
    # "The X" normalises to "x": one character, too short at the default of 2.
    assert first_occurrence_turn("Which letter?", ["The X"], [doc("x marks it")]) == -1


def test_guard_yes_no_answers_never_match():
    question = "Were the Beatles from Liverpool?"
    observations = [doc("Yes, they were formed there. No other band...")]
    assert first_occurrence_turn(question, ["yes"], observations) == -1
    assert first_occurrence_turn(question, ["No"], observations) == -1
    assert first_occurrence_turn(question, ["Yes."], observations, min_answer_chars=0) == -1


def test_generated_mode_finds_the_answer_in_the_models_own_text():
    question = "What is the capital of France?"
    generated = [
        "<think>It could be Paris.</think><search>capital of France</search>",
        "<answer>Paris</answer>",
    ]
    observations = [doc("France is in Europe."), None]
    assert first_occurrence_turn(question, ["Paris"], observations, generated) == -1
    assert (
        first_occurrence_turn(question, ["Paris"], observations, generated, detect_in="generated")
        == 0
    )


def test_generated_mode_ignores_the_final_answer():
    question = "What is the capital of France?"
    generated = [
        "<search>capital of France</search>",
        "<think>I know.</think><answer>Paris</answer>",
    ]
    observations = [doc("France is in Europe."), None]
    hit = first_occurrence_turn(question, ["Paris"], observations, generated, detect_in="generated")
    assert hit == -1


def test_generated_mode_counts_text_before_the_final_answer():
    question = "What is the capital of France?"
    generated = ["<search>France</search>", "<think>So Paris.</think><answer>Paris</answer>"]
    observations = [doc("France is in Europe."), None]
    hit = first_occurrence_turn(question, ["Paris"], observations, generated, detect_in="generated")
    assert hit == 1


def test_both_mode_takes_the_earliest_of_either_source():
    question = "What is the capital of France?"
    golds = ["Paris"]
    generated = ["<search>France</search>", "<think>So Paris?</think><search>x</search>", "..."]
    observations = [doc("France is in Europe."), doc("Lyon."), doc("Paris is the capital.")]
    assert first_occurrence_turn(question, golds, observations, generated) == 2
    assert first_occurrence_turn(question, golds, observations, generated, detect_in="both") == 1
    generated[1] = "<search>y</search>"
    assert first_occurrence_turn(question, golds, observations, generated, detect_in="both") == 2


def test_no_usable_alias_means_no_hit():
    assert first_occurrence_turn("Q?", [], [doc("anything")]) == -1
    assert first_occurrence_turn("Q?", ["Paris"], []) == -1


def test_bad_arguments_are_reported():
    with pytest.raises(TSPOError, match="detect_in"):
        first_occurrence_turn("Q?", ["Paris"], [None], detect_in="everywhere")
    with pytest.raises(ValueError, match="generated text"):
        first_occurrence_turn("Q?", ["Paris"], [None], detect_in="both")
    with pytest.raises(TSPOError, match="min_answer_chars"):
        first_occurrence_turn("Q?", ["Paris"], [None], min_answer_chars=-1)


def test_punctuation_glued_to_words_does_not_hide_a_match():
    question = "Which cities did the train link?"
    assert first_occurrence_turn(question, ["Paris"], [doc("Routes: Paris/London daily.")]) == 0
    assert (
        first_occurrence_turn(question, ["London"], [doc("<information>London</information>")]) == 0
    )


def test_abbreviations_match_with_or_without_dots():
    question = "Which country launched the probe?"
    assert first_occurrence_turn(question, ["U.S.A."], [doc("The USA launched it.")]) == 0
    assert first_occurrence_turn(question, ["USA"], [doc("The U.S.A. launched it.")]) == 0


def test_an_alias_whose_spaced_form_is_too_short_matches_only_as_a_whole():
    # "A-ha" with punctuation as spaces is "ha" (the article goes); that form must not match "ha".
    question = "Which band recorded Take On Me?"
    assert first_occurrence_turn(question, ["A-ha"], [doc("He laughed: ha ha.")]) == -1
    assert first_occurrence_turn(question, ["A-ha"], [doc("It was a-ha, in 1985.")]) == 0


def test_abbreviation_with_an_article_letter_does_not_match_its_prefix():
    # "U.S.A." split at the dots is "u s a", and "a" is an article: "u s" must not match "U.S.".
    question = "Which country launched the probe?"
    assert first_occurrence_turn(question, ["U.S.A."], [doc("The U.S. Army launched it.")]) == -1

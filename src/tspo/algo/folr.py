"""First-Occurrence Latent Reward (FOLR): the turn at which a gold answer first surfaces.

docs/algorithm.md §3. Matching is on whole words after SQuAD normalisation, and three guards drop
aliases whose appearance says nothing about the search: aliases that occur in the question,
aliases shorter than ``min_answer_chars`` after normalisation, and yes/no answers.

SQuAD normalisation deletes punctuation, which glues words together in running text
("<think>So Paris?" becomes "thinkso paris", "Paris/London" becomes "parislondon"). Protocol tags
are therefore replaced by spaces first, and every text and alias is compared in two forms:
punctuation deleted (so "U.S.A." still matches "USA") and punctuation turned into spaces (so
"Paris/London" still contains "Paris"). A match in either form counts.
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from dataclasses import dataclass

from tspo.algo.metrics import normalize_answer
from tspo.errors import TSPOError
from tspo.protocol import ANSWER_OPEN, PROTOCOL_TAGS

DETECT_IN = ("retrieved", "generated", "both")
# The defaults every caller (RolloutConfig, scoring, the veRL reward) takes from here.
DEFAULT_DETECT_IN = "retrieved"
DEFAULT_MIN_ANSWER_CHARS = 2
YES_NO_ANSWERS = frozenset({"yes", "no"})
_PUNCTUATION_TO_SPACE = str.maketrans(string.punctuation, " " * len(string.punctuation))


def contains_phrase(normalized_text: str, normalized_phrase: str) -> bool:
    """Whether ``normalized_phrase`` occurs in ``normalized_text`` as whole words.

    Both arguments must already be normalised (single spaces between words), so padding with a
    space on each side turns a substring test into a word-boundary test: "ice" is not in "price".
    """
    if not normalized_phrase:
        return False
    return f" {normalized_phrase} " in f" {normalized_text} "


@dataclass(frozen=True)
class MatchForms:
    """A text normalised with punctuation deleted (SQuAD) and with punctuation as spaces."""

    deleted: str
    spaced: str

    @classmethod
    def of(cls, text: str) -> MatchForms:
        for tag in PROTOCOL_TAGS:
            text = text.replace(tag, " ")
        return cls(normalize_answer(text), normalize_answer(text.translate(_PUNCTUATION_TO_SPACE)))

    def spaced_keeps_every_letter(self) -> bool:
        """False when splitting at punctuation freed an article that normalisation then dropped.

        "A-ha" spaced is "ha" and "U.S.A." spaced is "u s": such a form would match unrelated words.
        """
        return self.spaced.replace(" ", "") == self.deleted.replace(" ", "")

    def contains(self, alias: MatchForms) -> bool:
        """Whether ``alias`` occurs here as whole words, in either form."""
        return contains_phrase(self.deleted, alias.deleted) or contains_phrase(
            self.spaced, alias.spaced
        )


def _too_weak(normalized_alias: str, min_answer_chars: int) -> bool:
    return len(normalized_alias) < min_answer_chars or normalized_alias in YES_NO_ANSWERS


def usable_aliases(
    question: str, golds: Sequence[str], *, min_answer_chars: int = DEFAULT_MIN_ANSWER_CHARS
) -> list[MatchForms]:
    """The gold aliases FOLR may match, after the guards, without duplicates."""
    question_forms = MatchForms.of(question)
    aliases: list[MatchForms] = []
    for gold in golds:
        alias = MatchForms.of(gold)
        if _too_weak(alias.deleted, min_answer_chars):
            continue
        if not alias.spaced_keeps_every_letter() or _too_weak(alias.spaced, min_answer_chars):
            alias = MatchForms(alias.deleted, "")
        if question_forms.contains(alias) or alias in aliases:
            continue
        aliases.append(alias)
    return aliases


def strip_final_answer(generated: Sequence[str]) -> list[str]:
    """``generated`` with the final turn cut at its first ``<answer>``.

    An answer ends a trajectory, so only the last turn can hold one; the answer itself is the
    outcome, not evidence that the search surfaced it.
    """
    turns = list(generated)
    if turns:
        answer_at = turns[-1].find(ANSWER_OPEN)
        if answer_at >= 0:
            turns[-1] = turns[-1][:answer_at]
    return turns


def first_occurrence_turn(
    question: str,
    golds: Sequence[str],
    observations: Sequence[str | None],
    generated: Sequence[str] | None = None,
    *,
    detect_in: str = DEFAULT_DETECT_IN,
    min_answer_chars: int = DEFAULT_MIN_ANSWER_CHARS,
) -> int:
    """k*: the first turn (0-based) whose text contains a usable gold alias, or -1.

    Args:
        question: the question, for the "alias occurs in the question" guard.
        golds: gold answer aliases.
        observations: ``observations[k]`` is the retrieved text of turn k, ``None`` when turn k
            did not issue a search (only model-issued searches count).
        generated: the model's text of each turn; needed for ``detect_in`` "generated"/"both".
            The final turn's ``<answer>`` and what follows it are never searched.
        detect_in: "retrieved" (observations), "generated" (the model's own text) or "both".
        min_answer_chars: aliases shorter than this many characters after normalisation are skipped.
    """
    if detect_in not in DETECT_IN:
        raise TSPOError(f"detect_in must be one of {', '.join(DETECT_IN)}, got {detect_in!r}")
    if min_answer_chars < 0:
        raise TSPOError(f"min_answer_chars must be >= 0, got {min_answer_chars}")
    use_generated = detect_in in ("generated", "both")
    use_retrieved = detect_in in ("retrieved", "both")
    if use_generated and generated is None:
        raise ValueError(f"detect_in={detect_in!r} needs the generated text of each turn")

    aliases = usable_aliases(question, golds, min_answer_chars=min_answer_chars)
    if not aliases:
        return -1
    own_text = strip_final_answer(generated) if use_generated and generated is not None else []
    num_turns = max(len(observations), len(own_text))
    for turn in range(num_turns):
        texts: list[str] = []
        observation = observations[turn] if turn < len(observations) else None
        if use_retrieved and observation is not None:
            texts.append(observation)
        if use_generated and turn < len(own_text):
            texts.append(own_text[turn])
        for text in texts:
            forms = MatchForms.of(text)
            if any(forms.contains(alias) for alias in aliases):
                return turn
    return -1

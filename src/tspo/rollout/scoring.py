"""Scoring a finished trajectory: outcome EM and F1 of its last answer, and FOLR's k*."""

from __future__ import annotations

from collections.abc import Sequence

from tspo.algo import exact_match, f1_score, first_occurrence_turn
from tspo.algo.folr import DEFAULT_DETECT_IN, DEFAULT_MIN_ANSWER_CHARS
from tspo.protocol import extract_last_answer
from tspo.rollout.batch import Trajectory


def last_generated_answer(generated: Sequence[str]) -> str | None:
    """The last complete ``<answer>`` the model wrote, searching its turns from the last one.

    Only the model's own text counts: the prompt shows an example answer, and neither the prompt
    nor the environment's messages are the model's answer.
    """
    for text in reversed(generated):
        answer = extract_last_answer(text)
        if answer is not None:
            return answer
    return None


def score_trajectory(
    trajectory: Trajectory,
    *,
    detect_in: str = DEFAULT_DETECT_IN,
    min_answer_chars: int = DEFAULT_MIN_ANSWER_CHARS,
) -> Trajectory:
    """Fill ``final_answer``, ``outcome``, ``f1`` and ``first_hit_turn`` in place; return it."""
    answer = last_generated_answer(trajectory.generated)
    trajectory.final_answer = answer
    trajectory.outcome = exact_match(answer, trajectory.golds)
    trajectory.f1 = f1_score(answer, trajectory.golds)
    trajectory.first_hit_turn = first_occurrence_turn(
        trajectory.question,
        trajectory.golds,
        trajectory.observations,
        trajectory.generated,
        detect_in=detect_in,
        min_answer_chars=min_answer_chars,
    )
    return trajectory

"""A veRL 0.9.1 custom reward function: exact match and FOLR, as one encoded score.

Point veRL at it with ``reward.custom_reward_function.path=pkg://tspo.integrations.verl.reward``
(``name`` stays ``compute_score``); options go in ``reward.custom_reward_function.reward_kwargs``.

veRL calls ``compute_score(data_source, solution_str, ground_truth, extra_info)`` once per
trajectory with ``solution_str`` = the decoded response (generations and tool responses, never the
prompt), ``ground_truth`` = the row's ``reward_model.ground_truth`` and ``extra_info`` = the row's
``extra_info``, which must hold the ``question`` (for FOLR's "alias occurs in the question" guard).
The returned ``score`` is :func:`tspo.integrations.verl.encoding.encode_score` of the outcome and
k*; the other keys are logged by veRL as reward extra info.

**Turns in the text.** The response is cut at every ``<information>…</information>`` block: the
text before block k (after block k-1) is turn k's generation, the block's content its
observation, and text after the last block is one more turn. A block counts as an observation only
when the generation before it issued a search (``</search>`` or ``</tool_call>``). A block left
open by truncation runs to the end of the response. Turn k of the text is turn k of the response
mask (its k-th run of generated tokens) when every tool response is one whole block, as
:mod:`tspo.integrations.verl.tool` returns them. Where veRL reports its turn count
(``extra_info["num_turns"]``) the two are checked against each other; on a disagreement (a tool
error, a block the model wrote itself) k* is not trusted and set to -1.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from tspo.algo import exact_match, f1_score, first_occurrence_turn
from tspo.errors import TSPOError
from tspo.integrations.verl.encoding import encode_score
from tspo.protocol import INFO_CLOSE, INFO_OPEN, SEARCH_CLOSE, extract_last_answer

TOOL_CALL_CLOSE = "</tool_call>"
SEARCH_MARKERS = (SEARCH_CLOSE, TOOL_CALL_CLOSE)


class ResponseTurns(NamedTuple):
    """A decoded response cut into turns (see the module docstring)."""

    generated: list[str]  # the model's text of each turn
    observations: list[str | None]  # the observation of each turn, None when it did not search
    num_blocks: int  # <information> blocks, searched for or not


def split_turns(response: str) -> ResponseTurns:
    """The model's text of each turn and its observation (``None`` when it did not search)."""
    generated: list[str] = []
    observations: list[str | None] = []
    position = 0
    while (open_at := response.find(INFO_OPEN, position)) >= 0:
        body_at = open_at + len(INFO_OPEN)
        close_at = response.find(INFO_CLOSE, body_at)
        end_at = len(response) if close_at < 0 else close_at
        turn_text = response[position:open_at]
        searched = any(marker in turn_text for marker in SEARCH_MARKERS)
        generated.append(turn_text)
        observations.append(response[body_at:end_at] if searched else None)
        position = len(response) if close_at < 0 else close_at + len(INFO_CLOSE)
    num_blocks = len(generated)
    if response[position:].strip():
        generated.append(response[position:])
        observations.append(None)
    return ResponseTurns(generated, observations, num_blocks)


def turns_match_the_rollout(turns: ResponseTurns, num_turns: Any) -> bool:
    """Whether the text's turns agree with veRL's message count, when veRL reports one.

    veRL's tool agent loop counts the prompt, each assistant turn and each tool response
    (``extra_info["num_turns"]``). A tool error (no ``<information>`` block) or a block the model
    wrote itself breaks the agreement; k* is then not trusted.
    """
    if num_turns is None:
        return True
    return int(num_turns) == 1 + len(turns.generated) + turns.num_blocks


def gold_answers(ground_truth: Any) -> list[str]:
    """Gold aliases from a Search-R1 ``{"target": [...]}``, a list or a single string."""
    if isinstance(ground_truth, Mapping):
        if "target" not in ground_truth:
            raise TSPOError("reward_model.ground_truth must hold 'target' (the gold answers)")
        ground_truth = ground_truth["target"]
    if isinstance(ground_truth, str):
        return [ground_truth]
    if isinstance(ground_truth, Sequence | np.ndarray):
        return [str(gold) for gold in ground_truth]
    raise TSPOError(f"unsupported ground truth {type(ground_truth).__name__}: want a list of str")


def compute_score(
    data_source: str,
    solution_str: str,
    ground_truth: Any,
    extra_info: Mapping[str, Any] | None = None,
    *,
    detect_in: str = "retrieved",
    min_answer_chars: int = 2,
) -> dict[str, float]:
    """Score one veRL trajectory: EM of the last ``<answer>`` in the model's own text, and k*.

    Returns ``score`` (the encoded outcome and first-hit turn, for the TSPO estimators), ``em``,
    ``f1``, ``folr_hit`` (1.0 when k* >= 0), ``first_hit_turn`` and ``turns_aligned`` (0.0 when
    the text's turns disagree with veRL's turn count, in which case k* is left at -1).
    """
    question = (extra_info or {}).get("question")
    if not isinstance(question, str) or not question.strip():
        raise TSPOError(
            f"{data_source}: extra_info has no 'question'; FOLR needs it to skip answers that the "
            "question gives away (write the data with tspo, or add extra_info.question)"
        )
    golds = gold_answers(ground_truth)
    turns = split_turns(solution_str)
    answer = extract_last_answer("".join(turns.generated))
    outcome = exact_match(answer, golds)
    aligned = turns_match_the_rollout(turns, (extra_info or {}).get("num_turns"))
    first_hit_turn = -1
    if aligned:
        first_hit_turn = first_occurrence_turn(
            question,
            golds,
            turns.observations,
            turns.generated,
            detect_in=detect_in,
            min_answer_chars=min_answer_chars,
        )
    return {
        "score": encode_score(outcome, first_hit_turn),
        "em": outcome,
        "f1": f1_score(answer, golds),
        "folr_hit": float(first_hit_turn >= 0),
        "first_hit_turn": float(first_hit_turn),
        "turns_aligned": float(aligned),
    }

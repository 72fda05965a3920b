"""The environment's side of a turn: run the searches, format observations, correct bad actions."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from tspo.protocol import (
    INVALID_ACTION_MESSAGE,
    Action,
    format_documents,
    special_tokens_of,
    truncate_to_tokens,
    wrap_information,
)
from tspo.retrieval.base import Retriever

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class EnvReply:
    """What follows one turn's generation.

    ``text`` is appended to the context (None when the rollout is over); ``observation`` is the
    retrieved text the model sees inside ``<information>`` (None when the turn did not search).
    """

    done: bool
    query: str | None = None
    observation: str | None = None
    text: str | None = None


def reply_to_actions(
    actions: list[Action],
    *,
    final_turn: bool,
    retriever: Retriever,
    topk: int,
    tokenizer: PreTrainedTokenizerBase,
    max_obs_tokens: int,
) -> list[EnvReply]:
    """One reply per action; all searches of the turn go to ``retriever`` as one batched call.

    An answer ends a rollout, and so does anything in the final turn (whose searches are not run).
    An invalid action gets ``INVALID_ACTION_MESSAGE``. Retrieved text loses protocol tags and the
    tokenizer's special tokens before it is encoded, so a passage cannot end a turn, fake an
    answer or inject ``<|im_end|>`` (:func:`tspo.protocol.strip_protocol_tags`).
    """
    searching = [i for i, a in enumerate(actions) if a.kind == "search" and not final_turn]
    hits = retriever.search([actions[i].content for i in searching], topk) if searching else []
    special = special_tokens_of(tokenizer) if searching else ()
    observations = {
        i: truncate_to_tokens(
            format_documents([(h.title, h.text) for h in row_hits], special),
            tokenizer,
            max_obs_tokens,
        )
        for i, row_hits in zip(searching, hits, strict=True)
    }
    replies = []
    for i, action in enumerate(actions):
        if i in observations:
            obs = observations[i]
            replies.append(EnvReply(False, action.content, obs, wrap_information(obs)))
        elif final_turn or action.kind == "answer":
            replies.append(EnvReply(True))
        else:
            replies.append(EnvReply(False, text=INVALID_ACTION_MESSAGE))
    return replies

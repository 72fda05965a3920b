"""A scripted expert for the bundled Wikipedia questions, played through the real retriever.

It plays each ``tspo data wiki`` question the way a policy would (the model of
:mod:`tspo.data.expert`, the synthetic world's expert), producing SFT episodes:

- **single-hop** ("Who was an English scholastic philosopher, ...?"): search the description,
  read the results, think, answer;
- **bridge** ("Which <kind> has a summary that mentions <clue>?"): search the clue, read which
  article it is (the hidden bridge B), search "<kind> B", read, think, answer.

Every observation is built exactly as the rollout environment builds it (``format_documents``
with the tokenizer's special tokens stripped, then cut to ``max_obs_tokens`` tokens), and the
answer is the gold alias **as it is written in that observation**: the policy learns to copy a
name it can see. A question whose answer never shows up in what the expert reads is skipped and
recorded (``WikiExpertResult.skipped``), never answered with a guess.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tspo.data.expert import ExpertTrajectory, answer_turn, search_turn
from tspo.data.qa import QAExample
from tspo.data.wiki import normalize_text
from tspo.protocol import (
    format_documents,
    special_tokens_of,
    truncate_to_tokens,
)

if TYPE_CHECKING:
    from tspo.retrieval.base import Retriever

_SINGLE = re.compile(r"^(?:Who|What) (?:is|was|are|were) (?P<description>.+?)\?$")
_BRIDGE = re.compile(r"^Which (?P<kind>.+?) has a summary that mentions (?P<clue>.+?)\?$")
_DOC_LINE = re.compile(r"^Doc (?P<number>\d+)\(Title: (?P<title>.*?)\) ", re.MULTILINE)

# Why a question yields no episode (the keys of ``WikiExpertResult.skipped``).
UNPARSED = "question not in a known form"
NO_BRIDGE = "bridge article not in the first search's results"
NO_ANSWER = "answer not in what the expert read"


@dataclass
class WikiExpertResult:
    """Episodes of the questions the expert solved, and why the others were skipped."""

    episodes: list[ExpertTrajectory]
    skipped: dict[str, str] = field(default_factory=dict)  # question id -> reason

    @property
    def skip_counts(self) -> Counter[str]:
        """How many questions were skipped for each reason."""
        return Counter(self.skipped.values())


def documents_of(observation: str) -> list[tuple[int, str, str]]:
    """(number, title, whole line) of each ``Doc i(Title: T) text`` line in an observation; a
    line cut by the token budget keeps what is left of it."""
    starts = list(_DOC_LINE.finditer(observation))
    docs = []
    for i, match in enumerate(starts):
        end = starts[i + 1].start() if i + 1 < len(starts) else len(observation)
        docs.append((int(match["number"]), match["title"], observation[match.start() : end]))
    return docs


def alias_as_written(text: str, aliases: Sequence[str]) -> str | None:
    """The first occurrence in ``text`` of any alias, as whole words and ignoring case, exactly as
    ``text`` writes it (the longest alias when several start at the same place); None if none."""
    best: tuple[int, int, str] | None = None
    for alias in aliases:
        alias = alias.strip()
        if not alias:
            continue
        pattern = re.compile(r"(?<!\w)" + re.escape(alias) + r"(?!\w)", re.IGNORECASE)
        found = pattern.search(text)
        if found and (best is None or (found.start(), -len(alias)) < (best[0], -best[1])):
            best = (found.start(), len(alias), found.group())
    return best[2] if best else None


def find_answer(observation: str, aliases: Sequence[str], title: str) -> tuple[int, str] | None:
    """(doc number, answer as written) from one observation: the answer article's own line when it
    was retrieved (``title``), else the first line naming a gold alias; None when none does."""
    docs = documents_of(observation)
    own = [d for d in docs if normalize_text(d[1]) == normalize_text(title)]
    for number, _, line in own + [d for d in docs if d not in own]:
        written = alias_as_written(line, aliases)
        if written is not None:
            return number, written
    return None


class _Observer:
    """Observations exactly as the rollout environment writes them."""

    def __init__(self, retriever: Retriever, tokenizer: Any, topk: int, max_obs_tokens: int):
        self.retriever = retriever
        self.tokenizer = tokenizer
        self.topk = topk
        self.max_obs_tokens = max_obs_tokens
        self.special = special_tokens_of(tokenizer)

    def search(self, queries: list[str]) -> list[str]:
        if not queries:
            return []
        results = self.retriever.search(queries, self.topk)
        observations = []
        for hits in results:
            text = format_documents([(h.title, h.text) for h in hits], self.special)
            if self.tokenizer is not None:
                text = truncate_to_tokens(text, self.tokenizer, self.max_obs_tokens)
            observations.append(text)
        return observations


def run_wiki_expert(
    examples: Sequence[QAExample],
    retriever: Retriever,
    *,
    tokenizer: Any = None,
    topk: int = 3,
    max_obs_tokens: int = 500,
) -> WikiExpertResult:
    """Expert episodes for ``tspo data wiki`` questions (single-hop and bridge).

    Searches go to ``retriever`` in one batched call per round. With ``tokenizer``, observations
    are cut to ``max_obs_tokens`` tokens as in a rollout, and the answer must be visible in what
    is left. Episodes come back in the order of ``examples``, skipped questions left out.
    """
    observer = _Observer(retriever, tokenizer, topk, max_obs_tokens)
    result = WikiExpertResult([])
    singles: list[tuple[int, QAExample, str]] = []
    bridges: list[tuple[int, QAExample, str, str]] = []
    for position, example in enumerate(examples):
        kind = example.metadata.get("kind")
        single = _SINGLE.match(example.question) if kind != "bridge" else None
        bridge = _BRIDGE.match(example.question) if kind == "bridge" else None
        if single:
            singles.append((position, example, single["description"]))
        elif bridge and example.metadata.get("bridge"):
            bridges.append((position, example, bridge["kind"], bridge["clue"]))
        else:
            result.skipped[example.id] = UNPARSED
    solved: dict[int, ExpertTrajectory] = {}

    # Single-hop: search the description, then think and answer from the observation.
    observations = observer.search([query for _, _, query in singles])
    for (position, example, query), observation in zip(singles, observations, strict=True):
        found = find_answer(observation, example.golds, example.metadata.get("title", ""))
        if found is None:
            result.skipped[example.id] = NO_ANSWER
            continue
        number, answer = found
        solved[position] = ExpertTrajectory(
            example,
            [search_turn("", query), answer_turn(f"Doc {number} answers the question.", answer)],
            [observation, None],
            answer,
        )

    # Bridge: search the clue and read the bridge article's name, then search "<kind> <bridge>".
    observations = observer.search([clue for _, _, _, clue in bridges])
    second: list[tuple[int, QAExample, str, str, str, str, str]] = []
    for (position, example, kind, clue), observation in zip(bridges, observations, strict=True):
        bridge_title = example.metadata["bridge"]
        named = [d for d in documents_of(observation) if d[1] == bridge_title]
        if not named:
            result.skipped[example.id] = NO_BRIDGE
            continue
        think = f"Doc {named[0][0]} is {bridge_title}."
        second.append((position, example, clue, observation, think, f"{kind} {bridge_title}", kind))
    observations = observer.search([row[5] for row in second])
    for row, observation in zip(second, observations, strict=True):
        position, example, clue, first_obs, think, query, _ = row
        found = find_answer(observation, example.golds, example.metadata.get("title", ""))
        if found is None:
            result.skipped[example.id] = NO_ANSWER
            continue
        number, answer = found
        solved[position] = ExpertTrajectory(
            example,
            [
                search_turn("", clue),
                search_turn(think, query),
                answer_turn(f"Doc {number} mentions it.", answer),
            ],
            [first_obs, observation, None],
            answer,
        )
    result.episodes = [solved[position] for position in sorted(solved)]
    return result

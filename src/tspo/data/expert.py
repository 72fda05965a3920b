"""A scripted expert for the synthetic world: search for an entity, read, hop, answer.

The expert speaks the real protocol through a real ``Retriever``: each turn it writes a generation
(``<think>…</think>`` with the fact it just read, then ``<search>name</search>`` or
``<answer>name</answer>``), and it reads facts only from the documents the retriever returned,
picking the hit whose title is the entity it searched for. Without noise it answers nearly every
question; with noise it makes the mistakes a half-trained agent makes, so a policy fine-tuned on its
trajectories starts only partly competent:

- ``early_answer``: after reading a hop that is not the last, answer with the entity found so far.
- ``wrong_query``: search for a near-duplicate of the intended name (or a part of it); then, with
  probability ``recover``, notice the wrong title and search again, else read the wrong document.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from tspo.data.qa import QAExample
from tspo.data.world import RELATIONS, World, relation_pattern
from tspo.errors import TSPOError
from tspo.protocol import (
    ANSWER_CLOSE,
    ANSWER_OPEN,
    SEARCH_CLOSE,
    SEARCH_OPEN,
    THINK_CLOSE,
    THINK_OPEN,
    format_documents,
)

if TYPE_CHECKING:
    from tspo.retrieval.base import Hit, Retriever


@dataclass(frozen=True)
class ExpertNoise:
    """Probabilities of the expert's mistakes (all 0: a competent expert)."""

    early_answer: float = 0.0
    wrong_query: float = 0.0
    recover: float = 0.5


@dataclass
class ExpertTrajectory:
    """One scripted episode: the generation of each turn and the observation it received."""

    example: QAExample
    generated: list[str] = field(default_factory=list)
    observations: list[str | None] = field(default_factory=list)
    final_answer: str | None = None

    @property
    def num_searches(self) -> int:
        return sum(o is not None for o in self.observations)


@dataclass
class _Episode:
    """Where one question's episode stands: the entity to look up next and the hops left."""

    trajectory: ExpertTrajectory
    chain: list[str]  # entity names: subject, then each hop's object
    relations: list[str]
    hop: int = 0  # index of the relation being resolved
    current: str = ""  # the name whose document we need now
    pending_query: str = ""  # set before the episode's first search
    pending_think: str = ""
    notes: str = "none"  # one of EXPERT_NOTES
    done: bool = False

    @property
    def goal(self) -> str:
        """The kind of thing the question asks for (the last relation's object)."""
        return RELATION_KIND[self.relations[-1]]

    def think(self, text: str = "") -> str:
        """``text`` as a think line, with the notes the expert keeps (see :func:`run_expert`)."""
        if self.notes == "goal":
            return f"Goal: {self.goal}. {text}".rstrip()
        if self.notes == "plan":
            left = ", ".join(RELATION_KIND[r] for r in self.relations[self.hop :]) or "none"
            return f"{text} Left: {left}.".lstrip()
        return text


# What the object of each relation is, in the words a think line uses for it. ``capital`` stands
# apart from ``city`` so that "the capital of the country where X was born" does not stop at the
# city where X was born.
RELATION_KIND = {
    "born_in": "city",
    "works_for": "organisation",
    "founded_by": "person",
    "headquartered_in": "city",
    "located_in": "country",
    "capital": "capital",
}

# The notes a scripted expert keeps in its think lines (see run_expert).
EXPERT_NOTES = ("none", "goal", "plan")


def search_turn(think: str, query: str) -> str:
    """One search turn: an optional ``<think>`` line, then the query."""
    prefix = f"{THINK_OPEN} {think} {THINK_CLOSE}\n" if think else ""
    return f"{prefix}{SEARCH_OPEN} {query} {SEARCH_CLOSE}"


def answer_turn(think: str, answer: str) -> str:
    """One answer turn: an optional ``<think>`` line, then the answer."""
    prefix = f"{THINK_OPEN} {think} {THINK_CLOSE}\n" if think else ""
    return f"{prefix}{ANSWER_OPEN} {answer} {ANSWER_CLOSE}"


def _corrupt(name: str, world_names: dict[str, str | None], rng: random.Random) -> str:
    """A plausible wrong query for ``name``: its near-duplicate twin, else one of its words."""
    twin = world_names.get(name)
    if twin is not None:
        return twin
    words = name.split(" ")
    return words[0] if len(words) == 1 else rng.choice(words)


def _read(hits: Sequence[Hit], wanted: str, relation: str) -> tuple[str | None, str | None]:
    """(title of the document read, the object of ``relation`` in it).

    The expert reads the hit titled ``wanted``; when none is, it reads the top hit (and so follows
    whatever entity the retriever returned).
    """
    hit = next((h for h in hits if h.title == wanted), hits[0] if hits else None)
    if hit is None:
        return None, None
    match = relation_pattern(relation, hit.title).search(hit.text)
    return hit.title, (match.group(1).strip() if match else None)


def run_expert(
    world: World,
    examples: Sequence[QAExample],
    retriever: Retriever,
    *,
    noise: ExpertNoise = ExpertNoise(),
    seed: int = 0,
    topk: int = 3,
    max_turns: int = 4,
    notes: str = "none",
) -> list[ExpertTrajectory]:
    """Play the expert on ``examples`` (world questions with ``metadata`` chains).

    Each round sends every unfinished episode's query to ``retriever`` in one call. An episode that
    has used ``max_turns`` searches answers with what it has.

    ``notes`` (one of :data:`EXPERT_NOTES`) is what the expert writes in its think lines besides
    the fact it read:

    - ``"none"``: nothing.
    - ``"goal"``: the first search gets ``Goal: country.`` (the kind of thing the question asks
      for, :data:`RELATION_KIND` of its last relation), every later think line opens with it, and a
      fact read is followed by what it found (``Gesto is ... Found: city.``). Whether to search
      again is then a comparison of two words of one line.
    - ``"plan"``: every think line ends with the kinds still to find, in order: ``Left:
      organisation, city, country.`` before the first search, then one fewer after each hop read,
      down to ``Left: none.`` before the answer. Writing the list is copying the previous one
      without its head, and whether to search again is read off the word before ``</think>``.
    """
    if notes not in EXPERT_NOTES:
        raise TSPOError(f"expert notes must be one of {', '.join(EXPERT_NOTES)}, not {notes!r}")
    rng = random.Random(f"tspo-expert-{seed}")
    twin_of = {
        e.name: (world.entities[e.twin].name if e.twin else None) for e in world.entities.values()
    }
    episodes = []
    for example in examples:
        chain = list(example.metadata["chain"])
        relations = list(example.metadata["relations"])
        episode = _Episode(ExpertTrajectory(example), chain, relations, notes=notes)
        episode.current = chain[0]
        episode.pending_query = _choose_query(chain[0], twin_of, noise, rng)
        episode.pending_think = episode.think()
        episodes.append(episode)

    while active := [e for e in episodes if not e.done]:
        results = retriever.search([e.pending_query for e in active], topk=topk)
        for episode, hits in zip(active, results, strict=True):
            _advance(episode, hits, twin_of, noise, rng, max_turns)
    return [e.trajectory for e in episodes]


def _choose_query(name: str, twin_of: dict[str, str | None], noise: ExpertNoise, rng) -> str:
    return _corrupt(name, twin_of, rng) if rng.random() < noise.wrong_query else name


def _advance(
    episode: _Episode,
    hits: list[Hit],
    twin_of: dict[str, str | None],
    noise: ExpertNoise,
    rng: random.Random,
    max_turns: int,
) -> None:
    """Record the turn that issued ``pending_query`` and its observation, then plan the next one."""
    traj = episode.trajectory
    traj.generated.append(search_turn(episode.pending_think, episode.pending_query))
    traj.observations.append(format_documents([(h.title, h.text) for h in hits]))

    relation = episode.relations[episode.hop]
    title, found = _read(hits, episode.current, relation)
    out_of_turns = traj.num_searches >= max_turns
    if title != episode.current and rng.random() < noise.recover and not out_of_turns:
        episode.pending_think = episode.think(f"This is {title}, not {episode.current}.")
        episode.pending_query = episode.current
        return
    if found is None:
        _finish(episode, episode.think(f"{title} has no such fact."), title or episode.current)
        return
    fact = RELATIONS[relation][2].format(subject=title, object=found)
    found_kind = f" Found: {RELATION_KIND[relation]}." if episode.notes == "goal" else ""
    episode.hop += 1
    think = episode.think(fact + found_kind)
    last_hop = episode.hop == len(episode.relations)
    if last_hop or out_of_turns or rng.random() < noise.early_answer:
        _finish(episode, think, found)
        return
    episode.current = found
    episode.pending_think = think
    episode.pending_query = _choose_query(found, twin_of, noise, rng)


def _finish(episode: _Episode, think: str, answer: str) -> None:
    episode.trajectory.generated.append(answer_turn(think, answer))
    episode.trajectory.observations.append(None)
    episode.trajectory.final_answer = answer
    episode.done = True

"""Pre-training items generated from practice worlds: documents, reading items, copy drills.

An item is a list of ``(text, weight)`` segments; the weight multiplies the next-token loss of the
segment's tokens. Three kinds (their shares are a :class:`PretrainMix`):

- document: ``"{title}\\n{text}\\n"``, plain LM loss;
- reading comprehension: one to three documents in the retriever's ``Doc i(Title: T) text`` layout
  (the subject's own document, sometimes next to its near-duplicate twin), then
  ``"Question: {q}\\nAnswer:"`` and the gold name, whose tokens carry ``answer_weight``. A share
  ``question_first`` of them puts the question before the documents instead, as the search agent
  reads: its question comes first and the documents arrive later, in the search results;
- name-copy drill: ``"Name: X. Repeat: X.\\n"`` or ``"Names: A, B, C. Repeat: A, B, C.\\n"``.

No protocol tag ever appears: the base is a reader that can copy; the search protocol is taught
later, by SFT. Practice worlds come from their own seed range, disjoint from the seeds users and
the quickstart evaluate on.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

from tspo.data.world import QUESTION_TEMPLATES, RELATIONS, World, generate_world
from tspo.protocol import format_documents

PRACTICE_SEED_BASE = 2_000_000  # pre-training worlds: 2_000_000 + i (users' worlds are small ints)
GATE_WORLD_SEED = 3_000_000  # the world the gates are measured on; never trained on
Segment = tuple[str, float]
Item = list[Segment]

# One-hop questions for every relation, so the base can read each kind of document the agent
# meets. People and organisations use the world's own one-hop templates; cities and countries,
# which are only ever intermediate hops in the world's questions, get these.
EXTRA_ONE_HOP = {
    "city": [(("located_in",), "In which country is {subject}?")],
    "country": [(("capital",), "What is the capital of {subject}?")],
}


def practice_seed(index: int) -> int:
    """Seed of the ``index``-th practice world."""
    return PRACTICE_SEED_BASE + index


@dataclass(frozen=True)
class PretrainMix:
    """What the item stream is made of."""

    rc_share: float = 0.6
    doc_share: float = 0.2
    copy_share: float = 0.2
    answer_weight: float = 5.0  # loss weight of the reading items' answer tokens
    max_docs: int = 3  # documents shown with a reading item: 1..max_docs
    twin_distractor: float = 0.5  # chance the subject's twin is among them, when it has one
    question_first: float = 0.0  # share of reading items with the question before the documents
    world_size: str = "small"


@dataclass(frozen=True)
class ReadingItem:
    """One one-hop question about a world entity: the subject, the question, the answer."""

    subject: str  # entity id
    question: str
    answer: str  # entity id


def one_hop_items(world: World) -> list[ReadingItem]:
    """Every one-hop question the world supports (each subject x each of its relations)."""
    items: list[ReadingItem] = []
    for entity in world.entities.values():
        templates = [*QUESTION_TEMPLATES.get(entity.kind, []), *EXTRA_ONE_HOP.get(entity.kind, [])]
        for relations, template in templates:
            if len(relations) != 1 or relations[0] not in entity.relations:
                continue
            items.append(
                ReadingItem(
                    subject=entity.id,
                    question=template.format(subject=entity.name),
                    answer=entity.relations[relations[0]],
                )
            )
    return items


def reading_documents(
    world: World, item: ReadingItem, count: int, twin_share: float, rng: random.Random
) -> list[tuple[str, str]]:
    """``count`` documents for ``item``: the subject's, its twin's (sometimes), random others."""
    ids = [item.subject]
    twin = world.entities[item.subject].twin
    if count > 1 and twin is not None and rng.random() < twin_share:
        ids.append(twin)
    others = [eid for eid in world.documents if eid not in ids]
    ids += rng.sample(others, count - len(ids))
    rng.shuffle(ids)
    return [world.documents[eid] for eid in ids]


def reading_prompt(
    docs: list[tuple[str, str]], question: str, *, question_first: bool = False
) -> str:
    """The text before the answer of a reading item (also the gates' prompt).

    ``question_first`` puts the question before the documents: the agent's layout, where the
    answer must look back past every document to the question.
    """
    if question_first:
        return f"Question: {question}\n{format_documents(docs)}\nAnswer:"
    return f"{format_documents(docs)}\nQuestion: {question}\nAnswer:"


def copy_prompt(names: list[str]) -> str:
    """The text before the copy of a drill (also the gates' prompt)."""
    label = "Name" if len(names) == 1 else "Names"
    return f"{label}: {', '.join(names)}. Repeat:"


def items_for_world(world: World, mix: PretrainMix, rng: random.Random) -> list[Item]:
    """All items of one practice world, shuffled: every one-hop question plus documents and drills
    in the proportions of ``mix``."""
    reading = one_hop_items(world)
    n_docs = round(len(reading) * mix.doc_share / mix.rc_share)
    n_copy = round(len(reading) * mix.copy_share / mix.rc_share)
    names = [entity.name for entity in world.entities.values()]
    doc_ids = list(world.documents)
    items: list[Item] = []
    for question in reading:
        docs = reading_documents(
            world, question, rng.randint(1, mix.max_docs), mix.twin_distractor, rng
        )
        answer = world.entities[question.answer].name
        # No draw when the share is 0, so streams made before this option stay identical.
        first = mix.question_first > 0 and rng.random() < mix.question_first
        prompt = reading_prompt(docs, question.question, question_first=first)
        items.append([(prompt, 1.0), (f" {answer}\n", mix.answer_weight)])
    for _ in range(n_docs):
        title, text = world.documents[rng.choice(doc_ids)]
        items.append([(f"{title}\n{text}\n", 1.0)])
    for _ in range(n_copy):
        chosen = rng.sample(names, 1 if rng.random() < 0.5 else rng.randint(2, 3))
        items.append([(copy_prompt(chosen), 1.0), (f" {', '.join(chosen)}.\n", 1.0)])
    rng.shuffle(items)
    return items


def practice_world_items(index: int, mix: PretrainMix) -> list[Item]:
    """The items of the ``index``-th practice world (the same for the same index, always)."""
    seed = practice_seed(index)
    return items_for_world(generate_world(seed, mix.world_size), mix, random.Random(seed))


def tokenizer_corpus(worlds: int = 6, mix: PretrainMix = PretrainMix()) -> Iterator[str]:
    """Texts the base tokenizer is trained on: practice worlds, item layouts, the agent's prompt.

    The prompt and the corrective message are included so their words become whole tokens (the
    SFT'd agent reads them in every episode); names stay split into syllable pieces shared by all
    worlds, so any unseen name is a sequence of familiar pieces.
    """
    from tspo.data.world import iter_world_text
    from tspo.protocol import INVALID_ACTION_MESSAGE, PROMPT_TEMPLATE

    for index in range(worlds):
        world = generate_world(practice_seed(index), mix.world_size)
        yield from iter_world_text(world)
        rng = random.Random(index)
        for item in items_for_world(world, mix, rng)[:200]:
            yield "".join(text for text, _ in item)
    for _ in range(200):
        yield PROMPT_TEMPLATE
        yield INVALID_ACTION_MESSAGE
    for relation in RELATIONS.values():
        yield relation[2]

"""A seeded synthetic search world: made-up entities, a corpus about them, multi-hop questions.

Every name is generated from syllables, so no pre-training knowledge can answer a question; the
facts exist only in the corpus. The world has four kinds of entity and six relations:

- a person is ``born_in`` a city and ``works_for`` an organisation;
- an organisation is ``founded_by`` a person and ``headquartered_in`` a city;
- a city is ``located_in`` a country; a country has a ``capital`` (one of its cities).

Each entity gets one corpus document stating its relations once, mixed with distractor sentences
that name other entities of the same kind (a person "moved to" another city, a country's "largest
city" is not its capital, a city is "twinned with" a city abroad). Some entities get a near-
duplicate twin (one vowel changed, different facts), and a twin's document names the other, so a
search for one name also retrieves the other and the reader must check titles.

Questions follow a chain of relations from a subject (a person or an organisation): 1, 2 or 3 hops.
Subjects are split into train/dev/test, so a test question asks about a subject no training question
asks about. Intermediate entities (cities, countries, other people) are shared by all splits, as in
real multi-hop data; only subjects are held out."""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tspo.errors import TSPOError

KINDS = ("country", "city", "person", "org")
SPLITS = ("train", "dev", "test")

# relation -> (kind of the subject, kind of the object, the sentence that states it in the subject's
# document). Readers (the scripted expert, tests) extract facts with ``relation_pattern``.
RELATIONS: dict[str, tuple[str, str, str]] = {
    "born_in": ("person", "city", "{subject} was born in {object}."),
    "works_for": ("person", "org", "{subject} works for {object}."),
    "founded_by": ("org", "person", "{subject} was founded by {object}."),
    "headquartered_in": ("org", "city", "{subject} is headquartered in {object}."),
    "located_in": ("city", "country", "{subject} is a city in {object}."),
    "capital": ("country", "city", "The capital of {subject} is {object}."),
}

# (relation chain, question template). ``{subject}`` is the subject's name.
QUESTION_TEMPLATES: dict[str, list[tuple[tuple[str, ...], str]]] = {
    "person": [
        (("born_in",), "In which city was {subject} born?"),
        (("works_for",), "Which organisation does {subject} work for?"),
        (("born_in", "located_in"), "In which country was {subject} born?"),
        (("works_for", "headquartered_in"), "In which city is the employer of {subject} based?"),
        (("works_for", "founded_by"), "Who founded the organisation that {subject} works for?"),
        (
            ("born_in", "located_in", "capital"),
            "What is the capital of the country where {subject} was born?",
        ),
        (
            ("works_for", "headquartered_in", "located_in"),
            "In which country is the employer of {subject} based?",
        ),
        (
            ("works_for", "founded_by", "born_in"),
            "In which city was the founder of the employer of {subject} born?",
        ),
    ],
    "org": [
        (("founded_by",), "Who founded {subject}?"),
        (("headquartered_in",), "In which city is {subject} based?"),
        (("founded_by", "born_in"), "In which city was the founder of {subject} born?"),
        (("headquartered_in", "located_in"), "In which country is {subject} based?"),
        (
            ("founded_by", "born_in", "located_in"),
            "In which country was the founder of {subject} born?",
        ),
        (
            ("headquartered_in", "located_in", "capital"),
            "What is the capital of the country where {subject} is based?",
        ),
    ],
}


@dataclass(frozen=True)
class WorldSize:
    """How big a world is. Subjects (people and organisations) are split into train/dev/test."""

    countries: int
    cities_per_country: int
    people: int
    orgs: int
    twin_share: float = 0.25  # share of people/cities/orgs that get a near-duplicate twin
    split_shares: tuple[float, float, float] = (0.7, 0.1, 0.2)


SIZES: dict[str, WorldSize] = {
    "tiny": WorldSize(countries=3, cities_per_country=3, people=24, orgs=8),
    "small": WorldSize(countries=8, cities_per_country=4, people=160, orgs=40),
    "medium": WorldSize(countries=16, cities_per_country=5, people=600, orgs=120),
    "large": WorldSize(countries=40, cities_per_country=6, people=3000, orgs=500),
}


@dataclass
class Entity:
    """One made-up entity: its name, its other names, and its relations (to entity ids)."""

    id: str
    kind: str
    name: str
    aliases: list[str] = field(default_factory=list)  # gold aliases besides ``name``
    relations: dict[str, str] = field(default_factory=dict)
    twin: str | None = None  # id of the near-duplicate entity, if any


@dataclass
class WorldQuestion:
    """A question with the chain of entities that answers it (subject first, answer last)."""

    id: str
    question: str
    subject: str
    relations: list[str]
    chain: list[str]  # entity ids: subject, each hop's object; chain[-1] is the answer

    @property
    def hops(self) -> int:
        return len(self.relations)


@dataclass
class World:
    """A generated world: entities, one document per entity, questions per split."""

    seed: int
    size: str
    entities: dict[str, Entity]
    documents: dict[str, tuple[str, str]]  # entity id -> (title, text)
    questions: dict[str, list[WorldQuestion]]  # split -> questions

    def by_name(self) -> dict[str, Entity]:
        """Entities keyed by their exact name (names are unique)."""
        return {e.name: e for e in self.entities.values()}

    def golds(self, entity_id: str) -> list[str]:
        """The gold aliases of an answer entity: its name first."""
        entity = self.entities[entity_id]
        return [entity.name, *entity.aliases]


def relation_pattern(relation: str, subject: str) -> re.Pattern[str]:
    """A regex whose group 1 captures the object of ``relation`` for ``subject`` in a document."""
    sentence = RELATIONS[relation][2]
    head, _, tail = sentence.partition("{object}")
    prefix = re.escape(head.format(subject=subject))
    suffix = re.escape(tail)
    return re.compile(rf"(?:^|(?<=\s)){prefix}([^.]+?){suffix}")


# ---------------------------------------------------------------------------------------------
# Names


_ONSETS = "b d f g h k l m n p r s t v z br dr kr tr st th".split()
_VOWELS = "a e i o u a e o".split()
_CODAS = ["", "", "", "", "n", "r", "l", "s", "m"]
_COUNTRY_SUFFIXES = ["ia", "land", "mark", "stan", "ora", "esh"]
_CITY_SUFFIXES = ["", "", "", "ton", "ford", "burg", "vale", "port"]
_ORG_SUFFIXES = ["Labs", "Works", "Guild", "Institute", "Trading", "Foundry", "Press", "Systems"]
_SWAP_VOWEL = {"a": "e", "e": "i", "i": "o", "o": "u", "u": "a"}


def _syllable(rng: random.Random) -> str:
    return rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS)


def _word(rng: random.Random, syllables: int) -> str:
    return "".join(_syllable(rng) for _ in range(syllables)).capitalize()


def _twin_name(name: str, kind: str, rng: random.Random) -> str:
    """``name`` with one vowel of its distinctive word changed: a near-duplicate."""
    words = name.split(" ")
    at = 0 if kind == "org" else len(words) - 1  # an org's last word is a generic suffix
    word = words[at]
    positions = [i for i, ch in enumerate(word) if ch in _SWAP_VOWEL]
    i = rng.choice(positions)
    words[at] = word[:i] + _SWAP_VOWEL[word[i]] + word[i + 1 :]
    return " ".join(words)


class _NameMaker:
    """Unique names; no name equals another, and no word is shared between kinds of entity."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.used: set[str] = set()
        self.words_of_kind: dict[str, set[str]] = {kind: set() for kind in KINDS}

    def _free(self, name: str, kind: str) -> bool:
        if name in self.used or len(name) < 4:
            return False
        words = {w.lower() for w in name.split()}
        return not any(words & other for k, other in self.words_of_kind.items() if k != kind)

    def claim(self, name: str, kind: str) -> None:
        self.used.add(name)
        self.words_of_kind[kind].update(w.lower() for w in name.split())

    def make(self, kind: str) -> str:
        rng = self.rng
        for _ in range(10_000):
            if kind == "country":
                name = _word(rng, 1) + rng.choice(_COUNTRY_SUFFIXES)
            elif kind == "city":
                name = _word(rng, 2) + rng.choice(_CITY_SUFFIXES)
            elif kind == "person":
                name = f"{_word(rng, rng.choice((1, 2)))} {_word(rng, 2)}"
            else:
                name = f"{_word(rng, 2)} {rng.choice(_ORG_SUFFIXES)}"
            if self._free(name, kind):
                self.claim(name, kind)
                return name
        raise TSPOError(f"could not generate a unique {kind} name; ask for a smaller world")

    def twin(self, name: str, kind: str) -> str | None:
        for _ in range(20):
            candidate = _twin_name(name, kind, self.rng)
            if candidate != name and self._free(candidate, kind):
                self.claim(candidate, kind)
                return candidate
        return None


# ---------------------------------------------------------------------------------------------
# Entities and relations


def _make_entities(size: WorldSize, rng: random.Random) -> dict[str, Entity]:
    names = _NameMaker(rng)
    entities: dict[str, Entity] = {}

    def add(kind: str, name: str, index: int) -> Entity:
        entity = Entity(id=f"{kind}-{index:04d}", kind=kind, name=name)
        entities[entity.id] = entity
        return entity

    def add_many(kind: str, count: int) -> list[Entity]:
        made: list[Entity] = []
        while len(made) < count:
            entity = add(kind, names.make(kind), len(made))
            made.append(entity)
            if kind != "country" and len(made) < count and rng.random() < size.twin_share:
                twin_name = names.twin(entity.name, kind)
                if twin_name is not None:
                    twin = add(kind, twin_name, len(made))
                    twin.twin, entity.twin = entity.id, twin.id
                    made.append(twin)
        return made

    countries = add_many("country", size.countries)
    cities = add_many("city", size.countries * size.cities_per_country)
    people = add_many("person", size.people)
    orgs = add_many("org", size.orgs)

    for i, city in enumerate(cities):
        city.relations["located_in"] = countries[i % len(countries)].id
    for country in countries:
        own = [c for c in cities if c.relations["located_in"] == country.id]
        country.relations["capital"] = rng.choice(own).id
        country.aliases.append(f"Republic of {country.name}")
    for org in orgs:
        org.relations["headquartered_in"] = rng.choice(cities).id
        org.relations["founded_by"] = rng.choice(people).id
        org.aliases.append(org.name.rsplit(" ", 1)[0])
    for person in people:
        person.relations["born_in"] = rng.choice(cities).id
        person.relations["works_for"] = rng.choice(orgs).id
        first, last = person.name.split(" ")
        person.aliases.append(f"{first[0]}. {last}")
    _drop_ambiguous_aliases(entities)
    return entities


def _drop_ambiguous_aliases(entities: dict[str, Entity]) -> None:
    """Keep an alias only if no other entity is called or aliased the same."""
    owners: dict[str, set[str]] = {}
    for entity in entities.values():
        for name in (entity.name, *entity.aliases):
            owners.setdefault(name.lower(), set()).add(entity.id)
    for entity in entities.values():
        entity.aliases = [a for a in entity.aliases if len(owners[a.lower()]) == 1]


# ---------------------------------------------------------------------------------------------
# Documents


def _other(rng: random.Random, pool: list[Entity], avoid: set[str]) -> Entity:
    choices = [e for e in pool if e.id not in avoid]
    return rng.choice(choices)


def _make_document(entity: Entity, world: dict[str, Entity], rng: random.Random) -> str:
    """The text of ``entity``'s document: its relation sentences mixed with distractors.

    Every distractor names an entity of the kind a question could ask for (another city, another
    organisation, another person), so reading the right sentence matters.
    """
    name = entity.name
    of_kind = {kind: [e for e in world.values() if e.kind == kind] for kind in KINDS}
    facts = [
        RELATIONS[rel][2].format(subject=name, object=world[obj].name)
        for rel, obj in entity.relations.items()
    ]
    related = set(entity.relations.values()) | {entity.id}
    distractors: list[str] = []
    if entity.kind == "person":
        moved = _other(rng, of_kind["city"], related)
        distractors += [
            f"Later in life {name} moved to {moved.name}.",
            f"{name} once gave a talk at {_other(rng, of_kind['org'], related).name}.",
        ]
    elif entity.kind == "org":
        distractors += [
            f"{name} has a branch office in {_other(rng, of_kind['city'], related).name}.",
            f"{_other(rng, of_kind['person'], related).name} chairs the board of {name}.",
        ]
    elif entity.kind == "city":
        twin_city = _other(rng, of_kind["city"], related)
        distractors += [
            f"{name} is twinned with {twin_city.name}.",
        ]
    else:
        capital = entity.relations["capital"]
        own = [
            c for c in of_kind["city"] if c.relations["located_in"] == entity.id and c.id != capital
        ]
        largest = rng.choice(own) if own else world[capital]
        distractors += [
            f"The largest city of {name} is {largest.name}.",
            f"{name} borders {_other(rng, of_kind['country'], related).name}.",
        ]
    if entity.twin is not None:
        distractors.append(f"{name} is not to be confused with {world[entity.twin].name}.")
    sentences = facts + distractors
    rng.shuffle(sentences)
    return " ".join(sentences)


# ---------------------------------------------------------------------------------------------
# Questions


def _follow(entity_id: str, relations: tuple[str, ...], world: dict[str, Entity]) -> list[str]:
    chain = [entity_id]
    for relation in relations:
        chain.append(world[chain[-1]].relations[relation])
    return chain


def _answer_in_question(golds: list[str], question: str) -> bool:
    words = f" {re.sub(r'[^a-z0-9]+', ' ', question.lower())} "
    return any(f" {re.sub(r'[^a-z0-9]+', ' ', g.lower()).strip()} " in words for g in golds)


def _make_questions(
    entities: dict[str, Entity], size: WorldSize, rng: random.Random
) -> dict[str, list[WorldQuestion]]:
    subjects = sorted(e.id for e in entities.values() if e.kind in QUESTION_TEMPLATES)
    rng.shuffle(subjects)
    n_train = round(size.split_shares[0] * len(subjects))
    n_dev = round(size.split_shares[1] * len(subjects))
    split_of = {
        "train": subjects[:n_train],
        "dev": subjects[n_train : n_train + n_dev],
        "test": subjects[n_train + n_dev :],
    }
    questions: dict[str, list[WorldQuestion]] = {}
    for split, members in split_of.items():
        out: list[WorldQuestion] = []
        for subject_id in sorted(members):
            subject = entities[subject_id]
            templates = QUESTION_TEMPLATES[subject.kind]
            # One question per hop count for every subject keeps the hop mix balanced.
            for hops in (1, 2, 3):
                relations, template = rng.choice([t for t in templates if len(t[0]) == hops])
                chain = _follow(subject_id, relations, entities)
                text = template.format(subject=subject.name)
                answer = entities[chain[-1]]
                if _answer_in_question([answer.name, *answer.aliases], text):
                    continue
                out.append(
                    WorldQuestion(
                        id=f"world-{split}-{len(out):05d}",
                        question=text,
                        subject=subject_id,
                        relations=list(relations),
                        chain=chain,
                    )
                )
        questions[split] = out
    return questions


# ---------------------------------------------------------------------------------------------
# The world


def generate_world(seed: int = 0, size: str = "small") -> World:
    """Build the world for ``seed`` and ``size`` (a key of ``SIZES``). Same inputs, same world."""
    if size not in SIZES:
        raise TSPOError(f"unknown world size {size!r}; choose one of {', '.join(SIZES)}")
    spec = SIZES[size]
    rng = random.Random(f"tspo-world-{seed}")
    entities = _make_entities(spec, rng)
    documents = {
        entity_id: (entity.name, _make_document(entity, entities, rng))
        for entity_id, entity in entities.items()
    }
    questions = _make_questions(entities, spec, rng)
    return World(seed, size, entities, documents, questions)


def iter_world_text(world: World) -> Iterator[str]:
    """Every piece of text in the world (documents and questions), e.g. to train a tokenizer."""
    for title, text in world.documents.values():
        yield f"{title}\n{text}"
    for questions in world.questions.values():
        for q in questions:
            yield q.question


def qa_examples(world: World, split: str) -> list[Any]:
    """The questions of ``split`` as ``QAExample``s (``data_source`` = ``world-<hops>hop``).

    ``metadata`` carries the hop count, the subject and the chain of entity names.
    """
    from tspo.data.qa import QAExample

    if split not in world.questions:
        raise TSPOError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    return [
        QAExample(
            id=q.id,
            question=q.question,
            golds=world.golds(q.chain[-1]),
            data_source=f"world-{q.hops}hop",
            metadata={
                "hops": q.hops,
                "subject": world.entities[q.subject].name,
                "relations": list(q.relations),
                "chain": [world.entities[e].name for e in q.chain],
            },
        )
        for q in world.questions[split]
    ]


WORLD_FILE = "world.json"
CORPUS_FILE = "corpus.jsonl"


def split_file(split: str) -> str:
    """File name of a split's FlashRAG jsonl."""
    return f"{split}.jsonl"


def write_world(world: World, out_dir: str | Path) -> dict[str, Path]:
    """Write ``corpus.jsonl``, ``{train,dev,test}.jsonl`` (FlashRAG) and ``world.json``.

    The corpus and QA files go through ``tspo.data.corpus`` and ``tspo.data.qa``, the code path
    real data takes. ``world.json`` holds the entities and questions for ``load_world``.
    """
    from tspo.data.corpus import CorpusDoc, write_corpus
    from tspo.data.qa import write_flashrag_jsonl
    from tspo.utils import write_json

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"corpus": out / CORPUS_FILE, "world": out / WORLD_FILE}
    docs = [CorpusDoc(id=eid, title=t, text=x) for eid, (t, x) in world.documents.items()]
    write_corpus(docs, paths["corpus"])
    for split in SPLITS:
        paths[split] = out / split_file(split)
        write_flashrag_jsonl(qa_examples(world, split), paths[split])
    write_json(paths["world"], world_to_dict(world))
    return paths


def world_to_dict(world: World) -> dict[str, Any]:
    """A JSON-ready form of ``world`` (``world_from_dict`` inverts it)."""
    return {
        "seed": world.seed,
        "size": world.size,
        "entities": [asdict(e) for e in world.entities.values()],
        "documents": {eid: list(doc) for eid, doc in world.documents.items()},
        "questions": {s: [asdict(q) for q in qs] for s, qs in world.questions.items()},
    }


def world_from_dict(data: dict[str, Any]) -> World:
    entities = {e["id"]: Entity(**e) for e in data["entities"]}
    documents = {eid: (doc[0], doc[1]) for eid, doc in data["documents"].items()}
    questions = {s: [WorldQuestion(**q) for q in qs] for s, qs in data["questions"].items()}
    return World(data["seed"], data["size"], entities, documents, questions)


def load_world(out_dir: str | Path) -> World:
    """The world written by ``write_world`` into ``out_dir``."""
    path = Path(out_dir) / WORLD_FILE
    if not path.is_file():
        raise TSPOError(f"{path}: no world here; build one with `tspo data world --out {out_dir}`")
    try:
        return world_from_dict(json.loads(path.read_text(encoding="utf-8")))
    except (ValueError, KeyError, TypeError) as err:
        raise TSPOError(f"{path}: not a valid world file ({err})") from err

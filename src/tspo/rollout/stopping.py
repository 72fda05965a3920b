"""Turn-ending checks on decoded text, so they work for any tokenizer.

A stop string may be one token (our tiny tokenizer) or several (SmolLM2 spells ``</search>`` in
pieces). The first time a stop string appears in a turn, its last character lies in the newest
token, so only rows whose newest token can produce that character are decoded, and only over a
short window of recent tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


class StopChecker:
    """Finds the rows whose turn text now contains a stop string."""

    def __init__(self, tokenizer: Any, stop_strings: Sequence[str], vocab_size: int):
        self.tokenizer = tokenizer
        self.stop_strings = tuple(stop_strings)
        # Every token of a stop string adds at least one character, plus one for decoders that
        # drop a leading space at the start of a window.
        self.window = max(len(s) for s in self.stop_strings) + 1
        last_chars = {s[-1] for s in self.stop_strings}
        size = max(vocab_size, len(tokenizer))
        pieces = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
        may_end = torch.zeros(size, dtype=torch.bool)
        may_end[: len(pieces)] = torch.tensor([any(c in p for c in last_chars) for p in pieces])
        # Byte-level pieces of a multi-byte character decode to U+FFFD alone; they cannot end an
        # ASCII stop string, and non-ASCII stop strings are checked on every token.
        if any(not s.isascii() for s in self.stop_strings):
            may_end[:] = True
        self.may_end = may_end

    def to(self, device: torch.device) -> StopChecker:
        self.may_end = self.may_end.to(device)
        return self

    def stopped(self, new_tokens: torch.Tensor, turn_tokens: list[list[int]], rows: list[int]):
        """The subset of ``rows`` whose turn text (``turn_tokens[row]``) holds a stop string.

        ``new_tokens`` (B,) holds the token just appended to each row's ``turn_tokens``.
        """
        candidates = self.may_end[new_tokens].nonzero().flatten().tolist()
        wanted = set(rows)
        candidates = [r for r in candidates if r in wanted]
        if not candidates:
            return []
        texts = self.tokenizer.batch_decode(
            [turn_tokens[r][-self.window :] for r in candidates], skip_special_tokens=False
        )
        return [r for r, text in zip(candidates, texts, strict=True) if self._has_stop(text)]

    def _has_stop(self, text: str) -> bool:
        return any(s in text for s in self.stop_strings)

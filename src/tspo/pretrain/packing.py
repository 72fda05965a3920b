"""Pack pre-training items into fixed-length rows, resumably.

Whole items are packed greedily into rows of ``seq_len`` tokens (an item that does not fit starts
the next row; the rest of the row is padding with weight 0). Attention crosses items inside a row,
which is harmless here and keeps every position busy. The stream's position is two integers (the
practice world and the item within it), so a resumed run sees exactly the rows it would have seen.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tspo.pretrain.items import Item, PretrainMix, practice_world_items


@dataclass
class StreamPosition:
    """Where the stream stands: the practice world and the next item in it."""

    world: int = 0
    item: int = 0


def encode_item(tokenizer: Any, item: Item) -> tuple[list[int], list[float]]:
    """Token ids of an item (then end-of-text) and the loss weight of each token."""
    ids: list[int] = []
    weights: list[float] = []
    for text, weight in item:
        piece = tokenizer.encode(text, add_special_tokens=False)
        ids += piece
        weights += [weight] * len(piece)
    ids.append(tokenizer.eos_token_id)
    weights.append(1.0)
    return ids, weights


@dataclass
class PackedStream:
    """Batches of packed rows from an endless sequence of practice worlds.

    ``next_batch()`` returns ``(input_ids, weights)``, both (batch_size, seq_len); ``weights`` is 0
    on padding. Items longer than ``seq_len`` are skipped.
    """

    tokenizer: Any
    mix: PretrainMix
    seq_len: int
    batch_size: int
    position: StreamPosition = field(default_factory=StreamPosition)
    items_of_world: Callable[[int, PretrainMix], list[Item]] = practice_world_items
    _cache: tuple[int, list[tuple[list[int], list[float]]]] | None = None

    def _encoded(self, world: int) -> list[tuple[list[int], list[float]]]:
        if self._cache is None or self._cache[0] != world:
            items = self.items_of_world(world, self.mix)
            encoded = [encode_item(self.tokenizer, item) for item in items]
            self._cache = (world, [e for e in encoded if len(e[0]) <= self.seq_len])
        return self._cache[1]

    def _peek(self) -> tuple[list[int], list[float]]:
        while True:
            encoded = self._encoded(self.position.world)
            if self.position.item < len(encoded):
                return encoded[self.position.item]
            self.position = StreamPosition(self.position.world + 1, 0)

    def next_row(self) -> tuple[list[int], list[float]]:
        ids: list[int] = []
        weights: list[float] = []
        while True:
            item_ids, item_weights = self._peek()
            if ids and len(ids) + len(item_ids) > self.seq_len:
                break
            ids += item_ids
            weights += item_weights
            self.position = StreamPosition(self.position.world, self.position.item + 1)
        pad = self.seq_len - len(ids)
        return ids + [self.tokenizer.pad_token_id] * pad, weights + [0.0] * pad

    def next_batch(self) -> tuple[Any, Any]:
        import torch

        rows = [self.next_row() for _ in range(self.batch_size)]
        input_ids = torch.tensor([r[0] for r in rows], dtype=torch.long)
        weights = torch.tensor([r[1] for r in rows], dtype=torch.float)
        return input_ids, weights

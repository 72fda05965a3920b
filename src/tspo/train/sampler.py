"""Which questions each step trains on: seeded epochs, with a position a checkpoint can restore."""

from __future__ import annotations

from typing import Any, Generic, TypeVar

import torch

from tspo.errors import TSPOError

T = TypeVar("T")


class PromptSampler(Generic[T]):
    """Hands out ``batch_size`` items per call, epoch after epoch.

    Each epoch visits every item once, in an order drawn from ``seed`` and the epoch number (or in
    file order without shuffling). The whole state is (epoch, cursor), so resuming from a
    checkpoint continues with exactly the questions an uninterrupted run would have seen.
    """

    def __init__(self, items: list[T], batch_size: int, *, seed: int, shuffle: bool = True):
        if not items:
            raise ValueError("PromptSampler needs at least one item")
        self.items = items
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.cursor = 0
        self._order = self._epoch_order(0)

    def _epoch_order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(len(self.items)))
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.items), generator=generator).tolist()

    def next_batch(self) -> list[T]:
        batch: list[T] = []
        while len(batch) < self.batch_size:
            if self.cursor == len(self._order):
                self.epoch += 1
                self.cursor = 0
                self._order = self._epoch_order(self.epoch)
            take = min(self.batch_size - len(batch), len(self._order) - self.cursor)
            batch.extend(self.items[i] for i in self._order[self.cursor : self.cursor + take])
            self.cursor += take
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "cursor": self.cursor, "num_items": len(self.items)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["num_items"] != len(self.items):
            raise TSPOError(
                f"the checkpoint's data had {state['num_items']} questions, now there are "
                f"{len(self.items)}"
            )
        self.epoch = int(state["epoch"])
        self.cursor = int(state["cursor"])
        self._order = self._epoch_order(self.epoch)

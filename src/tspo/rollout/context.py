"""A batch of token streams held in one KV cache, each stream growing at its own pace.

Columns of the cache are shared by the batch; a row that has nothing to add in a forward pass gets
a *hole*: a column whose attention-mask entry is 0. Position ids count only a row's real tokens,
so RoPE sees every stream as if it were alone and unpadded. ``compact`` squeezes the holes out of
the cache between turns (keys already carry their rotary positions, so moving columns is exact).

Keys and values live in preallocated buffers (`BufferedLayer`) that new columns are written into,
instead of transformers' default of concatenating the whole cache again at every decoding step.
`BufferedLayer` subclasses an internal transformers class through `tspo.rollout.hf_cache`, the
one module that touches those internals.
"""

from __future__ import annotations

from typing import cast

import torch
from transformers import DynamicCache

from tspo.rollout.hf_cache import CACHE_KWARG, CacheLayer, cache_with_layers, shared_kv_attention


class BufferedLayer(CacheLayer):
    """A full-attention cache layer over a (B, H, capacity, D) buffer; ``keys`` is a view of it.

    ``reserve`` grows the capacity ahead of a known number of columns, so decoding a turn writes
    in place; an unexpected overflow grows the buffer by half again.
    """

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.length = 0
        self.spare = 0
        self._keys = key_states.new_empty((*key_states.shape[:2], 0, key_states.shape[3]))
        self._values = value_states.new_empty((*value_states.shape[:2], 0, value_states.shape[3]))
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        width = key_states.shape[-2]
        if self.length + width > self._keys.shape[2]:
            self._resize(max(self.length + width + self.spare, self._keys.shape[2] * 3 // 2))
        self._keys[:, :, self.length : self.length + width] = key_states
        self._values[:, :, self.length : self.length + width] = value_states
        self.length += width
        self._refresh()
        return self.keys, self.values

    def reserve(self, columns: int) -> None:
        """Make room for ``columns`` more columns (and remember it for later growth)."""
        self.spare = columns
        if self.is_initialized and self.length + columns > self._keys.shape[2]:
            self._resize(self.length + columns)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self._keys = self._keys.index_select(0, indices)
            self._values = self._values.index_select(0, indices)
            self._refresh()

    def gather_columns(self, index: torch.Tensor) -> None:
        """Keep, for each row b, the columns ``index[b]`` (B, W) in that order."""
        width = index.shape[1]
        expand = (-1, self._keys.shape[1], -1, self._keys.shape[3])
        keys = self._keys[:, :, : self.length].gather(2, index[:, None, :, None].expand(*expand))
        values = self._values[:, :, : self.length].gather(
            2, index[:, None, :, None].expand(*expand)
        )
        self._keys = keys.new_empty((*keys.shape[:2], width + self.spare, keys.shape[3]))
        self._values = values.new_empty((*values.shape[:2], width + self.spare, values.shape[3]))
        self._keys[:, :, :width] = keys
        self._values[:, :, :width] = values
        self.length = width
        self._refresh()

    def copy_rows(self, rows: torch.Tensor) -> BufferedLayer:
        """A new layer holding a copy of ``rows`` (same columns, same spare room)."""
        layer = BufferedLayer()
        layer.device, layer.length, layer.spare = self.device, self.length, self.spare
        layer._keys = self._keys.index_select(0, rows)
        layer._values = self._values.index_select(0, rows)
        layer.is_initialized = True
        layer._refresh()
        return layer

    def take_columns(self, rows: torch.Tensor, child: BufferedLayer) -> None:
        """Append ``child``'s columns past our length: rows ``rows`` get its values, others zeros.

        ``child`` must be a `copy_rows` of this layer that has only grown since.
        """
        start, end = self.length, child.length
        if end > self._keys.shape[2]:
            self._resize(end + self.spare)
        # Zeros, not stale memory: a masked column still meets its (zero) weight in P @ V.
        self._keys[:, :, start:end] = 0
        self._values[:, :, start:end] = 0
        self._keys[rows, :, start:end] = child._keys[:, :, start:end]
        self._values[rows, :, start:end] = child._values[:, :, start:end]
        self.length = end
        self._refresh()

    def _resize(self, capacity: int) -> None:
        shape = (*self._keys.shape[:2], capacity, self._keys.shape[3])
        keys, values = self._keys.new_empty(shape), self._values.new_empty(shape)
        keys[:, :, : self.length] = self._keys[:, :, : self.length]
        values[:, :, : self.length] = self._values[:, :, : self.length]
        self._keys, self._values = keys, values

    def _refresh(self) -> None:
        self.keys = self._keys[:, :, : self.length]
        self.values = self._values[:, :, : self.length]


def new_cache(config, layers: list[BufferedLayer] | None = None) -> DynamicCache:
    """A `DynamicCache` of ``layers``, or of empty `BufferedLayer`s (full-attention models only)."""
    if layers is not None:
        return cache_with_layers(config, lambda _: layers)
    return cache_with_layers(config, lambda count: [BufferedLayer() for _ in range(count)])


class CachedContext:
    """The KV cache, attention mask and next position of B token streams.

    ``mask`` is (B, L) long over the cache's L columns; ``positions`` (B,) is the number of real
    tokens of each row, i.e. the position id its next token gets.
    """

    def __init__(self, model: torch.nn.Module, pad_id: int, batch_size: int):
        self.model = model
        self.pad_id = pad_id
        self.device = next(model.parameters()).device
        self.cache = new_cache(model.config)
        self.mask = torch.zeros(batch_size, 0, dtype=torch.long, device=self.device)
        self.positions = torch.zeros(batch_size, dtype=torch.long, device=self.device)

    @property
    def batch_size(self) -> int:
        return self.mask.shape[0]

    @property
    def layers(self) -> list[BufferedLayer]:
        """The cache's layers: `new_cache` made every one a `BufferedLayer`."""
        return cast("list[BufferedLayer]", self.cache.layers)

    @torch.no_grad()
    def extend(self, chunks: list[list[int]]) -> torch.Tensor:
        """Append ``chunks[b]`` to row b (left-padded with holes) and return (B, V) logits.

        The logits of row b predict the token after its last real token; rows with an empty chunk
        get only holes and garbage logits.
        """
        width = max(len(c) for c in chunks)
        ids = torch.full((self.batch_size, width), self.pad_id, dtype=torch.long)
        new_mask = torch.zeros(self.batch_size, width, dtype=torch.long)
        for row, chunk in enumerate(chunks):
            if chunk:
                ids[row, width - len(chunk) :] = torch.tensor(chunk, dtype=torch.long)
                new_mask[row, width - len(chunk) :] = 1
        return self._forward(ids.to(self.device), new_mask.to(self.device))

    @torch.no_grad()
    def step(self, tokens: torch.Tensor, fed: torch.Tensor) -> torch.Tensor:
        """Append one token per row where ``fed`` (B,) is set, a hole elsewhere; (B, V) logits."""
        ids = torch.where(fed, tokens, torch.full_like(tokens, self.pad_id))
        return self._forward(ids[:, None], fed.long()[:, None])

    def _forward(self, ids: torch.Tensor, new_mask: torch.Tensor) -> torch.Tensor:
        # Real tokens take consecutive positions after the row's last real token; holes repeat
        # the current position (their value is never attended to).
        position_ids = self.positions[:, None] + (new_mask.cumsum(dim=1) - new_mask).clamp_(min=0)
        self.mask = torch.cat([self.mask, new_mask], dim=1)
        with shared_kv_attention(self.model):
            out = self.model(
                input_ids=ids,
                attention_mask=self.mask,
                position_ids=position_ids,
                use_cache=True,
                **{CACHE_KWARG: self.cache},
                logits_to_keep=1,
            )
        self.positions = self.positions + new_mask.sum(dim=1)
        return out.logits[:, -1, :]

    def select(self, rows: torch.Tensor) -> None:
        """Keep only ``rows`` (1-D long index), in that order."""
        rows = rows.to(self.device)
        self.cache.batch_select_indices(rows)
        self.mask = self.mask.index_select(0, rows)
        self.positions = self.positions.index_select(0, rows)

    def split(self, rows: torch.Tensor) -> CachedContext:
        """A new context with a copy of ``rows`` (1-D long index), to decode them on their own.

        Leave this context untouched until ``merge`` brings the copy's new columns back.
        """
        rows = rows.to(self.device)
        child = CachedContext.__new__(CachedContext)
        child.model, child.pad_id, child.device = self.model, self.pad_id, self.device
        child.cache = new_cache(self.model.config, [layer.copy_rows(rows) for layer in self.layers])
        child.mask = self.mask.index_select(0, rows)
        child.positions = self.positions.index_select(0, rows)
        return child

    def merge(self, child: CachedContext, rows: torch.Tensor) -> None:
        """Take back what ``child = self.split(rows)`` appended; other rows get holes there."""
        rows = rows.to(self.device)
        start = self.mask.shape[1]
        for layer, child_layer in zip(self.layers, child.layers, strict=True):
            layer.take_columns(rows, child_layer)
        extra = self.mask.new_zeros(self.batch_size, child.mask.shape[1] - start)
        self.mask = torch.cat([self.mask, extra], dim=1)
        self.mask[rows, start:] = child.mask[:, start:]
        self.positions[rows] = child.positions

    def reserve(self, columns: int) -> None:
        """Preallocate room for ``columns`` more columns in every layer."""
        for layer in self.layers:
            layer.reserve(columns)

    def compact(self) -> None:
        """Move each row's real columns to the right; drop columns that are holes in every row."""
        if self.mask.shape[1] == 0:
            return
        width = int(self.positions.max())
        if width == self.mask.shape[1]:
            return
        # Stable sort on the mask puts holes first and keeps real columns in order.
        order = self.mask.sort(dim=1, stable=True).indices[:, -width:]
        for layer in self.layers:
            layer.gather_columns(order)
        self.mask = self.mask.gather(1, order)

"""``tspo pretrain``: pre-train a tiny base LM that can read and copy, from random weights.

The base never sees the search protocol or any evaluation world: it learns from generated practice
worlds (documents, one-hop reading-comprehension items, name-copy drills). The protocol comes
later, in SFT. See docs/pretraining.md.
"""

from tspo.pretrain.items import PretrainMix, items_for_world, practice_seed
from tspo.pretrain.packing import PackedStream

__all__ = ["PackedStream", "PretrainMix", "items_for_world", "practice_seed"]

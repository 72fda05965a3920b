"""The one place tspo touches transformers' cache internals (`tspo.rollout.context` builds on it).

`CachedContext` keeps its keys and values in its own cache layers. transformers has no public API
for that, so this adapter subclasses its internal ``transformers.cache_utils.DynamicLayer`` and
swaps the layers of a ``DynamicCache``. What tspo relies on is listed in ``LAYER_CONTRACT`` and
checked by `check_cache_api` the first time a cache is built: a transformers release that changes
it fails there, with one error naming the versions this adapter was checked against, instead of
deep inside a rollout. ``tests/test_rollout_hf_cache.py`` fails on any transformers version not in
``CHECKED_TRANSFORMERS``: re-run the rollout tests on the new version, then add it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from functools import cache
from typing import TYPE_CHECKING

import transformers
from transformers import DynamicCache, LlamaForCausalLM
from transformers.cache_utils import DynamicLayer

from tspo.errors import TSPOError

if TYPE_CHECKING:
    from transformers import PreTrainedConfig

CHECKED_TRANSFORMERS = ("5.24.0",)

# transformers renamed ``past_key_values`` to ``cache`` during 5.x; use whichever this version has
# (decided once from a stock model class, so wrapped models with ``**kwargs`` forwards work too).
CACHE_KWARG = (
    "cache"
    if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters
    else "past_key_values"
)

# Methods of ``DynamicLayer`` tspo's layer overrides or inherits, with the leading parameters of
# each: transformers calls the first group, and reads ``keys``, ``values``, ``is_initialized`` and
# ``device`` (set by tspo's layer) through the inherited ones.
LAYER_CONTRACT: dict[str, tuple[str, ...]] = {
    "lazy_initialization": ("self", "key_states", "value_states"),
    "update": ("self", "key_states", "value_states"),
    "batch_select_indices": ("self", "indices"),
    "get_seq_length": ("self",),
    "get_mask_sizes": ("self", "query_length"),
}

CacheLayer = DynamicLayer
"""The base class of tspo's cache layers (transformers' internal full-attention layer)."""


@cache
def check_cache_api() -> None:
    """Raise `TSPOError` if transformers' cache internals differ from what tspo was built on."""
    problems = []
    for name, params in LAYER_CONTRACT.items():
        method = getattr(DynamicLayer, name, None)
        if method is None:
            problems.append(f"DynamicLayer.{name} is gone")
            continue
        have = tuple(inspect.signature(method).parameters)[: len(params)]
        if have != params:
            problems.append(f"DynamicLayer.{name}{have} (expected {params})")
    if "config" not in inspect.signature(DynamicCache.__init__).parameters:
        problems.append("DynamicCache(config=...) is gone")
    if problems:
        raise TSPOError(
            f"transformers {transformers.__version__} changed the cache internals tspo's rollouts "
            f"build on (tspo.rollout.hf_cache, checked against {', '.join(CHECKED_TRANSFORMERS)}): "
            + "; ".join(problems)
        )


def cache_with_layers(
    config: PreTrainedConfig, make_layers: Callable[[int], Sequence[CacheLayer]]
) -> DynamicCache:
    """A ``DynamicCache`` for a model of ``config`` whose layers are ``make_layers(count)``.

    Holes would shift a sliding window (it counts columns, not tokens), so only models whose
    layers all use full attention are supported.
    """
    check_cache_api()
    built = DynamicCache(config=config)
    if any(type(layer) is not DynamicLayer for layer in built.layers):
        kinds = sorted({type(layer).__name__ for layer in built.layers})
        raise TSPOError(f"rollouts need full-attention layers only; this model has {kinds}")
    layers = list(make_layers(len(built.layers)))
    if len(layers) != len(built.layers):
        raise TSPOError(f"{len(layers)} cache layers for a model of {len(built.layers)}")
    built.layers[:] = layers
    return built

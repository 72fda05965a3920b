"""The one place tspo touches transformers' cache internals (`tspo.rollout.context` builds on it).

`CachedContext` keeps its keys and values in its own cache layers. transformers has no public API
for that, so this adapter subclasses its internal ``transformers.cache_utils.DynamicLayer`` and
swaps the layers of a ``DynamicCache``; `shared_kv_attention` runs SDPA with grouped-query K/V
heads shared instead of copied while a `CachedContext` calls the model. What tspo relies on is
listed in ``LAYER_CONTRACT`` and checked by `check_cache_api` the first time a cache is built: a
transformers release that changes it fails there, with one error naming the versions this adapter
was checked against, instead of deep inside a rollout. ``tests/test_rollout_hf_cache.py`` fails
on any transformers version not in ``CHECKED_TRANSFORMERS``: re-run the rollout tests on the new
version, then add it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import cache
from typing import TYPE_CHECKING

import torch
import transformers
from transformers import AttentionInterface, DynamicCache, LlamaForCausalLM
from transformers.cache_utils import DynamicLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from tspo.errors import TSPOError

if TYPE_CHECKING:
    from transformers import PreTrainedConfig

CHECKED_TRANSFORMERS = ("5.24.0", "5.25.0")

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


SHARED_KV_SDPA = "tspo_sdpa_shared_kv"


def _sdpa_shared_kv(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: object,
) -> tuple[torch.Tensor, None]:
    """transformers' SDPA attention, except that grouped-query K/V heads are shared by SDPA's
    ``enable_gqa`` instead of copied for every query head (transformers copies them whenever
    there is a mask, on CPU: a copy of the whole cache per layer and decoding step)."""
    plain = query.shape[1] == key.shape[1] or any(
        kwargs.get(name) is not None for name in ("softcap", "position_bias", "sinks", "s_aux")
    )
    if plain:
        return sdpa_attention_forward(
            module,
            query,
            key,
            value,
            attention_mask,
            dropout,
            scaling,
            is_causal,
            **kwargs,  # type: ignore[arg-type]  # transformers passes mixed-type keyword options through
        )
    if attention_mask is not None:
        attention_mask = attention_mask[:, :, :, : key.shape[-2]]
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    causal = bool(causal) and attention_mask is None and query.shape[2] > 1
    out = torch.nn.functional.scaled_dot_product_attention(
        query,
        key,
        value,
        attn_mask=attention_mask,
        dropout_p=dropout,
        scale=scaling,
        is_causal=causal,
        enable_gqa=True,
    )
    return out.transpose(1, 2).contiguous(), None


@cache
def _register_shared_kv() -> None:
    AttentionInterface.register(SHARED_KV_SDPA, _sdpa_shared_kv)
    AttentionMaskInterface.register(SHARED_KV_SDPA, sdpa_mask)


@contextmanager
def shared_kv_attention(model: torch.nn.Module) -> Iterator[None]:
    """Run ``model``'s SDPA attention with shared K/V heads (`_sdpa_shared_kv`) inside the block.

    The same sums as transformers' SDPA up to float rounding; models on any other attention
    implementation are left alone.
    """
    config = getattr(model, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) != "sdpa":
        yield
        return
    _register_shared_kv()
    config._attn_implementation = SHARED_KV_SDPA
    try:
        yield
    finally:
        config._attn_implementation = "sdpa"

"""The adapter over transformers' cache internals (`tspo.rollout.hf_cache`).

An upgrade of transformers fails here first: the installed version must be one the adapter was
checked against. To add a version, run this file and tests/test_rollout_kv.py on it (KV reuse
equals re-encoding, greedily and sampled), then append it to ``CHECKED_TRANSFORMERS``.
"""

from __future__ import annotations

import pytest
import torch
import transformers

from tspo.errors import TSPOError
from tspo.rollout import hf_cache
from tspo.rollout.context import BufferedLayer, CachedContext, new_cache

CHECKED = ("5.24.0", "5.25.0")  # the versions named in the adapter, repeated here on purpose


def test_the_installed_transformers_is_one_the_adapter_was_checked_against() -> None:
    assert hf_cache.CHECKED_TRANSFORMERS == CHECKED
    assert transformers.__version__ in CHECKED, (
        f"transformers {transformers.__version__} is not among the versions tspo.rollout.hf_cache "
        f"was checked against ({', '.join(CHECKED)}): run tests/test_rollout_hf_cache.py and "
        "tests/test_rollout_kv.py on it, then add it to CHECKED_TRANSFORMERS"
    )


def test_the_cache_api_the_adapter_relies_on_is_there() -> None:
    hf_cache.check_cache_api.cache_clear()
    hf_cache.check_cache_api()  # raises on a missing method or a changed signature


def test_a_changed_api_fails_loudly_naming_the_checked_versions(monkeypatch) -> None:
    monkeypatch.setitem(hf_cache.LAYER_CONTRACT, "update", ("self", "keys_renamed"))
    hf_cache.check_cache_api.cache_clear()
    try:
        with pytest.raises(TSPOError, match=r"checked against 5\.24\.0.*DynamicLayer\.update"):
            hf_cache.check_cache_api()
    finally:
        hf_cache.check_cache_api.cache_clear()


def test_cached_decoding_equals_one_forward_pass() -> None:
    """The buffered layers, used by a stock Llama through the adapter, give the logits of the
    uncached forward pass: prefill, then one token at a time."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
    )
    model = LlamaForCausalLM(config).eval()
    cache = new_cache(config)
    assert all(isinstance(layer, BufferedLayer) for layer in cache.layers)
    ids = torch.randint(1, 64, (2, 9))
    context = CachedContext(model, pad_id=0, batch_size=2)
    logits = [context.extend([row[:5].tolist() for row in ids])]
    for col in range(5, 9):
        logits.append(context.step(ids[:, col], torch.ones(2, dtype=torch.bool)))
    with torch.no_grad():
        full = model(input_ids=ids).logits
    for step, got in enumerate(logits):
        torch.testing.assert_close(got, full[:, 4 + step], atol=1e-5, rtol=1e-5)


def test_shared_kv_attention_equals_transformers_sdpa() -> None:
    """Grouped-query heads shared by SDPA give transformers' SDPA logits, with a padding mask,
    and the model is back on ``sdpa`` afterwards."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        attn_implementation="sdpa",
    )
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(1, 64, (3, 7))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
        with hf_cache.shared_kv_attention(model):
            assert model.config._attn_implementation == hf_cache.SHARED_KV_SDPA
            got = model(input_ids=ids, attention_mask=mask).logits
    assert model.config._attn_implementation == "sdpa"
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], atol=1e-5, rtol=1e-5)

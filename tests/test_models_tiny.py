"""Tiny tokenizer and random-weight model built in code."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM, AutoTokenizer

from tspo.errors import TSPOError
from tspo.models.tiny import build_tiny_model, count_parameters, train_tokenizer
from tspo.protocol import PROTOCOL_TAGS, build_prompt, wrap_information

SAMPLE = (
    build_prompt("Who wrote Hamlet?")
    + "<think> I should look it up. </think>\n<search> hamlet author </search>"
    + wrap_information("Doc 1(Title: Hamlet) Hamlet is a tragedy by William Shakespeare.")
    + "<answer> William Shakespeare </answer>"
)


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer([SAMPLE] * 10 + ["Paris is the capital of France.\n"] * 5, 600)


def test_protocol_tags_are_single_non_special_tokens(tokenizer):
    for tag in PROTOCOL_TAGS:
        ids = tokenizer.encode(tag, add_special_tokens=False)
        assert len(ids) == 1, tag
        assert tokenizer.decode(ids, skip_special_tokens=True) == tag
    assert tokenizer.pad_token == "<|pad|>" and tokenizer.eos_token == "<|endoftext|>"
    assert tokenizer.pad_token_id != tokenizer.eos_token_id


def test_round_trip_of_protocol_text(tokenizer):
    ids = tokenizer.encode(SAMPLE, add_special_tokens=False)
    assert tokenizer.decode(ids) == SAMPLE


@settings(max_examples=40, deadline=None)
@given(st.text(max_size=60))
def test_round_trip_of_any_text(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text


def test_save_and_load_with_auto_classes(tokenizer, tmp_path):
    model = build_tiny_model(tokenizer, "micro", seed=0)
    tokenizer.save_pretrained(tmp_path)
    model.save_pretrained(tmp_path)
    loaded_tok = AutoTokenizer.from_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert loaded_tok.encode(SAMPLE) == tokenizer.encode(SAMPLE)
    assert loaded_tok.pad_token_id == tokenizer.pad_token_id
    ids = torch.tensor([tokenizer.encode(SAMPLE)[:20]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)


def test_presets_sizes_and_seed(tokenizer):
    micro = build_tiny_model(tokenizer, "micro", seed=1)
    assert micro.config.vocab_size >= len(tokenizer)
    assert micro.config.pad_token_id == tokenizer.pad_token_id
    assert count_parameters(micro) < 1_000_000
    again = build_tiny_model(tokenizer, "micro", seed=1)
    assert all(
        torch.equal(a, b) for a, b in zip(micro.parameters(), again.parameters(), strict=True)
    )
    wide = build_tiny_model(tokenizer, "micro", hidden_size=32, num_attention_heads=2)
    assert wide.config.hidden_size == 32


def test_bad_arguments_raise_tspo_error(tokenizer):
    with pytest.raises(TSPOError, match="preset"):
        build_tiny_model(tokenizer, "enormous")
    with pytest.raises(TSPOError, match="vocab_size"):
        train_tokenizer(["abc"], vocab_size=100)

"""Tiny tokenizers and random-weight models built in code, for tests, the quickstart and benchmarks.

Nothing here downloads anything: the tokenizer is trained on the caller's texts with HF
``tokenizers`` and the model is a randomly initialised ``LlamaForCausalLM`` from a small config.
Llama rather than Qwen2: transformers 5 loads any checkpoint whose config says ``qwen2`` with its
own Qwen2 tokenizer class (a different pre-tokenizer), which would silently change our tokenizer's
encodings after ``AutoTokenizer.from_pretrained``. The "qwen2.5-0.5b-shape" preset turns on the
q/k/v biases, so it matches Qwen2.5-0.5B's shape and cost.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from tspo.errors import TSPOError
from tspo.protocol import PROTOCOL_TAGS

PAD_TOKEN = "<|pad|>"
EOS_TOKEN = "<|endoftext|>"

# Shapes of the random-weight models. "micro" is for unit tests, "tiny" (~7M parameters with a 4k
# vocabulary) for the CPU quickstart, "qwen2.5-0.5b-shape" matches Qwen2.5-0.5B for GPU benchmarks.
MODEL_PRESETS: dict[str, dict[str, Any]] = {
    "micro": dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        max_position_embeddings=2048,
    ),
    "tiny": dict(
        hidden_size=256,
        num_hidden_layers=8,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=768,
        max_position_embeddings=4096,
    ),
    "qwen2.5-0.5b-shape": dict(
        hidden_size=896,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        intermediate_size=4864,
        max_position_embeddings=32768,
        vocab_size=151936,
        rope_theta=1_000_000.0,
        attention_bias=True,
    ),
}


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int = 4096,
    *,
    min_frequency: int = 2,
    extra_tokens: Iterable[str] = (),
    protocol_tags: bool = True,
) -> Any:
    """A byte-level BPE ``PreTrainedTokenizerFast`` trained on ``texts``.

    Byte-level pre-tokenisation keeps every character, white space included, so
    ``decode(encode(x)) == x`` for any text. The protocol tags (and ``extra_tokens``) are single
    added tokens that are *not* special, so decoding keeps them. ``<|pad|>`` pads and
    ``<|endoftext|>`` ends a sequence. Save with ``save_pretrained``, load with ``AutoTokenizer``.
    ``protocol_tags=False`` leaves the tags to BPE, so they span several tokens as in real LMs.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    special = [PAD_TOKEN, EOS_TOKEN]
    tags = list(dict.fromkeys([*(PROTOCOL_TAGS if protocol_tags else ()), *extra_tokens]))
    floor = len(special) + len(tags) + 256
    if vocab_size < floor:
        raise TSPOError(
            f"vocab_size={vocab_size} is too small: a byte-level tokenizer needs {floor}"
        )

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(tags),
        min_frequency=min_frequency,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    if tags:
        backend.add_tokens(
            [AddedToken(t, lstrip=False, rstrip=False, normalized=False) for t in tags]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD_TOKEN,
        eos_token=EOS_TOKEN,
        clean_up_tokenization_spaces=False,
        padding_side="left",
    )


def build_tiny_model(tokenizer: Any, preset: str = "tiny", *, seed: int | None = None, **overrides):
    """A random-weight ``LlamaForCausalLM`` shaped by ``preset`` (see ``MODEL_PRESETS``).

    The vocabulary covers ``tokenizer`` (at least ``len(tokenizer)``); pad/eos ids come from it.
    ``overrides`` replace any ``LlamaConfig`` field. ``seed`` makes the weights reproducible.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if preset not in MODEL_PRESETS:
        raise TSPOError(f"unknown model preset {preset!r}; choose one of {sorted(MODEL_PRESETS)}")
    fields = dict(MODEL_PRESETS[preset])
    fields["vocab_size"] = max(fields.get("vocab_size", 0), len(tokenizer))
    fields.setdefault("tie_word_embeddings", True)
    fields.update(
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    fields.update(overrides)
    config = LlamaConfig(**fields)
    if seed is None:
        return LlamaForCausalLM(config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(config)


def count_parameters(model: Any) -> int:
    """Number of distinct parameters (tied weights counted once)."""
    return sum(p.numel() for p in model.parameters())

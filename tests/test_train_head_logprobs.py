"""Chunked output-layer log-probs: the values and gradients of the whole (N, V) logits."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from train_helpers import single_thread

from tspo.train.forward import head_logprobs, plain_head


def full_head_logprobs(
    hidden: torch.Tensor, targets: torch.Tensor, head: torch.nn.Module, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    logits = head(hidden).float() / temperature
    logprobs = torch.log_softmax(logits, dim=-1)
    return (
        logprobs.gather(-1, targets[:, None]).squeeze(-1),
        -(logprobs.exp() * logprobs).sum(dim=-1),
    )


@settings(max_examples=25, deadline=None)
@given(
    rows=st.integers(0, 23),
    vocab=st.integers(2, 40),
    chunk_elements=st.integers(1, 200),
    temperature=st.sampled_from([1.0, 0.7]),
    seed=st.integers(0, 2**16),
)
def test_chunked_values_and_gradients_equal_the_whole_logits(
    rows: int, vocab: int, chunk_elements: int, temperature: float, seed: int
) -> None:
    generator = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(8, vocab, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(vocab, 8, generator=generator))
    hidden = torch.randn(rows, 8, generator=generator, requires_grad=True)
    targets = torch.randint(0, vocab, (rows,), generator=generator)
    weights = torch.randn(rows, generator=generator)

    results = []
    for chunked in (False, True):
        layer, states = copy.deepcopy(head), hidden.detach().clone().requires_grad_(True)
        if chunked:
            logprobs, entropy = head_logprobs(
                states,
                targets,
                layer,
                temperature=temperature,
                with_entropy=True,
                entropy_grad=True,
                chunk_elements=chunk_elements,
            )
        else:
            logprobs, entropy = full_head_logprobs(states, targets, layer, temperature)
        ((logprobs * weights).sum() + entropy.sum()).backward()
        results.append((logprobs.detach(), entropy.detach(), states.grad, layer.weight.grad))
    for reference, value in zip(results[0], results[1], strict=True):
        if value is None:  # no rows: no gradient reached the layer
            assert rows == 0 and torch.count_nonzero(reference) == 0
            continue
        torch.testing.assert_close(value, reference, atol=1e-5, rtol=1e-5)


def test_detached_entropy_gives_no_gradient_and_no_grad_mode_keeps_no_graph() -> None:
    head = torch.nn.Linear(4, 30, bias=False)
    hidden = torch.randn(10, 4, requires_grad=True)
    targets = torch.randint(0, 30, (10,))
    logprobs, entropy = head_logprobs(
        hidden, targets, head, with_entropy=True, entropy_grad=False, chunk_elements=60
    )
    assert logprobs.requires_grad and entropy is not None and not entropy.requires_grad
    with torch.no_grad():
        logprobs, entropy = head_logprobs(hidden, targets, head, chunk_elements=60)
    assert not logprobs.requires_grad and entropy is None


def test_plain_head_finds_the_decoder_and_output_layer_of_llama_shaped_models() -> None:
    from tspo.models.tiny import build_tiny_model, train_tokenizer

    with single_thread():
        tokenizer = train_tokenizer(["a b c d e f g"] * 4, 280)
        model = build_tiny_model(tokenizer, "micro", seed=0)
    split = plain_head(model)
    assert split is not None
    decoder, head = split
    assert head is model.lm_head and decoder is model.model
    model.config.model_type = "gemma2"  # logit soft-capping: not a plain head
    assert plain_head(model) is None


@pytest.mark.parametrize("with_entropy", [False, True])
def test_empty_selection(with_entropy: bool) -> None:
    head = torch.nn.Linear(4, 7, bias=False)
    logprobs, entropy = head_logprobs(
        torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), head, with_entropy=with_entropy
    )
    assert logprobs.shape == (0,)
    assert (entropy is not None) == with_entropy

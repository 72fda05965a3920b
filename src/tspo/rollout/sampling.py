"""Choosing the next token from logits: greedy, or temperature + nucleus (top-p) sampling."""

from __future__ import annotations

import torch


def next_tokens(
    logits: torch.Tensor,
    *,
    greedy: bool,
    temperature: float = 1.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick one token per row and return it with its log-probability under the policy.

    Args:
        logits: (B, V) next-token logits.
        greedy: argmax (ties go to the lowest id) instead of sampling.
        temperature, top_p: the sampling distribution is ``softmax(logits / temperature)``
            restricted to the smallest set of most likely tokens whose mass reaches ``top_p``.
        generator: drives the uniform draws (inverse-CDF sampling); it may live on any device.

    Returns:
        tokens (B,) long, and logprobs (B,) float32: ``log_softmax(logits)[token]``, the policy's
        own log-probability at temperature 1 without top-p, which is what a PPO update recomputes.
    """
    logits = logits.float()
    logprobs_all = torch.log_softmax(logits, dim=-1)
    if greedy:
        tokens = logits.argmax(dim=-1)
    else:
        probs = torch.softmax(logits / temperature, dim=-1)
        if top_p < 1.0:
            probs, order = probs.sort(dim=-1, descending=True)
            mass_before = probs.cumsum(dim=-1) - probs
            probs = probs.masked_fill(mass_before >= top_p, 0.0)
        else:
            order = None
        cdf = probs.cumsum(dim=-1)
        device = generator.device if generator is not None else logits.device
        uniform = torch.rand(logits.shape[0], 1, generator=generator, device=device)
        draws = uniform.to(logits.device) * cdf[:, -1:]
        picked = torch.searchsorted(cdf, draws, right=True).clamp_(max=logits.shape[-1] - 1)
        tokens = (picked if order is None else order.gather(-1, picked)).squeeze(-1)
    return tokens, logprobs_all.gather(-1, tokens[:, None]).squeeze(-1)

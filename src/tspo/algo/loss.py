"""PPO clipped surrogate with a KL penalty to a frozen reference and an optional entropy bonus.

docs/algorithm.md §5. The clipped surrogate is PPO's (arXiv 1707.06347), the dual clip is from
Dual-Clip PPO (arXiv 1912.09729), and the ``low_var_kl`` estimate is k3 from J. Schulman,
"Approximating KL Divergence" (joschu.net/blog/kl-approx.html), as used by GRPO (arXiv 2402.03300).
The formulas follow veRL 0.9.1's ``compute_policy_loss_vanilla`` (dual-clip included),
``kl_penalty`` and ``agg_loss`` so that numbers are comparable across the two trainers. Every term
is masked by ``loss_mask``: prompt, ``<information>`` blocks, corrective messages and padding
contribute nothing, not even a NaN.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from tspo.errors import TSPOError

KL_TYPES = ("low_var_kl", "kl", "abs", "mse")
AGG_MODES = ("token-mean", "seq-mean-token-mean")
# veRL clamps log-ratios before exponentiating, and the k3 estimate after it, for stability.
LOG_RATIO_CLAMP = 20.0
LOW_VAR_KL_CLAMP = 10.0


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, kl_type: str = "low_var_kl") -> Tensor:
    """Per-token KL estimate of the policy against the reference. (B, T), (B, T) -> (B, T).

    ``kl``: log p - log p_ref (k1). ``abs``: |k1|. ``mse``: (k1)^2 / 2 (k2).
    ``low_var_kl`` (k3): exp(log p_ref - log p) - (log p_ref - log p) - 1, with the log-ratio
    clamped to [-20, 20] and the result to [-10, 10].
    """
    log_ratio = logprobs - ref_logprobs
    if kl_type == "kl":
        return log_ratio
    if kl_type == "abs":
        return log_ratio.abs()
    if kl_type == "mse":
        return 0.5 * log_ratio.square()
    if kl_type == "low_var_kl":
        reverse = (-log_ratio).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        return (reverse.exp() - reverse - 1).clamp(-LOW_VAR_KL_CLAMP, LOW_VAR_KL_CLAMP)
    raise TSPOError(f"kl_type must be one of {', '.join(KL_TYPES)}, got {kl_type!r}")


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``values`` where ``mask`` is true; 0 for an empty mask. (B, T), (B, T) -> ()."""
    total = torch.where(mask, values, 0.0).sum()
    return total / mask.sum().clamp(min=1)


def aggregate(values: Tensor, mask: Tensor, agg: str = "token-mean") -> Tensor:
    """Reduce a (B, T) per-token loss to a scalar over ``mask`` (bool, (B, T)).

    ``token-mean``: every loss token weighs the same. ``seq-mean-token-mean``: mean over tokens
    within each sequence, then over the sequences that have at least one loss token.
    """
    if agg == "token-mean":
        return masked_mean(values, mask)
    if agg == "seq-mean-token-mean":
        tokens_per_seq = mask.sum(dim=-1)
        seq_means = torch.where(mask, values, 0.0).sum(dim=-1) / tokens_per_seq.clamp(min=1)
        has_tokens = tokens_per_seq > 0
        return torch.where(has_tokens, seq_means, 0.0).sum() / has_tokens.sum().clamp(min=1)
    raise TSPOError(f"agg must be one of {', '.join(AGG_MODES)}, got {agg!r}")


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    ref_logprobs: Tensor | None,
    advantages: Tensor,
    loss_mask: Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    clip_ratio_c: float | None = 3.0,
    kl_coef: float = 0.001,
    kl_type: str = "low_var_kl",
    entropy: Tensor | None = None,
    entropy_coef: float = 0.0,
    agg: str = "token-mean",
) -> tuple[Tensor, dict[str, float]]:
    """The policy loss to minimise and its metrics.

    Args:
        logprobs: (B, T) log-probs of the taken tokens under the current policy (with grad).
        old_logprobs: (B, T) log-probs under the policy that sampled them.
        ref_logprobs: (B, T) log-probs under the frozen reference; ``None`` allowed if kl_coef is 0.
        advantages: (B, T) token advantages.
        loss_mask: (B, T) bool or 0/1, the tokens the model generated.
        clip_low, clip_high: the ratio is clipped to [1 - clip_low, 1 + clip_high].
        clip_ratio_c: dual-clip bound for negative advantages (veRL's default 3.0); ``None`` = off.
        kl_coef, kl_type: weight and estimator of the KL penalty (see :func:`kl_penalty`).
        entropy: (B, T) per-token policy entropies, needed when ``entropy_coef`` is not 0.
        entropy_coef: weight of the entropy bonus (subtracted from the loss).
        agg: "token-mean" or "seq-mean-token-mean" (see :func:`aggregate`).

    Returns:
        ``(loss, metrics)``: the scalar loss, and floats ``pg_loss``, ``clip_frac`` (share of loss
        tokens whose clipped term was active), ``clip_frac_lower`` (dual clip active),
        ``approx_kl`` (mean of log p_old - log p), ``kl_ref`` (aggregated KL to the reference,
        NaN without ``ref_logprobs``), ``entropy`` (aggregated, NaN without ``entropy``).
    """
    if ref_logprobs is None and kl_coef != 0:
        raise ValueError("policy_loss needs ref_logprobs when kl_coef is not 0")
    if entropy is None and entropy_coef != 0:
        raise ValueError("policy_loss needs per-token entropy when entropy_coef is not 0")
    if clip_ratio_c is not None and clip_ratio_c <= 1.0:
        raise TSPOError(f"clip_ratio_c must be > 1, got {clip_ratio_c}")
    mask = loss_mask.bool()

    log_ratio = (logprobs - old_logprobs).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = log_ratio.exp()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_low, 1 + clip_high)
    pg_losses = torch.maximum(unclipped, clipped)
    clip_frac = masked_mean((clipped > unclipped).float(), mask)
    clip_frac_lower = torch.zeros((), device=logprobs.device)
    if clip_ratio_c is not None:
        dual_bound = -advantages * clip_ratio_c
        negative = advantages < 0
        clip_frac_lower = masked_mean(((pg_losses > dual_bound) & negative).float(), mask)
        pg_losses = torch.where(negative, torch.minimum(pg_losses, dual_bound), pg_losses)
    pg_loss = aggregate(pg_losses, mask, agg)
    loss = pg_loss

    kl_ref = torch.full((), math.nan)
    if ref_logprobs is not None:
        kl_ref = aggregate(kl_penalty(logprobs, ref_logprobs, kl_type), mask, agg)
        if kl_coef != 0:
            loss = loss + kl_coef * kl_ref
    mean_entropy = torch.full((), math.nan)
    if entropy is not None:
        mean_entropy = aggregate(entropy, mask, agg)
        if entropy_coef != 0:
            loss = loss - entropy_coef * mean_entropy

    metrics = {
        "pg_loss": pg_loss.item(),
        "clip_frac": clip_frac.item(),
        "clip_frac_lower": clip_frac_lower.item(),
        "approx_kl": masked_mean(-log_ratio, mask).item(),
        "kl_ref": kl_ref.item(),
        "entropy": mean_entropy.item(),
    }
    return loss, metrics

"""Per-step diagnostics that make the paper's two claims measurable (docs/algorithm.md §6).

FOLR should (a) credit trajectories whose search surfaced the answer even when the final answer was
wrong (near misses) and (b) leave fewer GRPO groups with zero learning signal. Everything here is
a plain number (or a dict of counts) ready for a log line.
"""

from __future__ import annotations

import torch
from torch import Tensor

from tspo.algo.advantages import DEFAULT_EPS, group_moments, group_zscore
from tspo.algo.loss import masked_mean

# An advantage this close to 0 carries no gradient worth the name.
ZERO_SIGNAL_ATOL = 1e-8


def _share_of_silent_groups(per_row_signal: Tensor, group_index: Tensor, num_groups: int) -> float:
    """Share of groups where no row carries signal. (B,) bool, (B,) long -> float."""
    loud = torch.zeros(num_groups, dtype=torch.bool, device=group_index.device)
    loud = loud.index_put((group_index,), per_row_signal, accumulate=True)
    return float((~loud).double().mean())


def _mean_group_std(values: Tensor, group_index: Tensor, num_groups: int) -> float:
    """Mean unbiased within-group std over groups of two or more (0.0 if there are none)."""
    counts, _, stds = group_moments(values, group_index, num_groups)
    multi = counts > 1
    return float(stds[multi].mean()) if bool(multi.any()) else 0.0


def group_diagnostics(
    outcome: Tensor,
    first_hit_turn: Tensor,
    group_ids: Tensor,
    advantages: Tensor,
    loss_mask: Tensor,
) -> dict[str, float | int | dict[int, int]]:
    """Reward, FOLR and signal statistics of one batch.

    Args:
        outcome: (B,) float, the outcome reward R.
        first_hit_turn: (B,) long, k* or -1.
        group_ids: (B,) long, one id per question group.
        advantages: (B, T) float, the advantages the update will use.
        loss_mask: (B, T) bool or 0/1.

    Returns:
        ``num_trajectories``, ``num_groups``; ``reward_mean`` and ``reward_std`` (population std
        over the batch); ``hit_rate`` (share with k* >= 0); ``near_miss_rate`` (k* >= 0 and R = 0);
        ``zero_signal_groups_grpo`` (share of groups whose outcome-only GRPO advantages are all 0)
        and ``zero_signal_groups`` (share whose given advantages are 0 on every loss token);
        ``mean_group_reward_std`` and ``mean_group_hit_std`` (mean unbiased within-group std of R
        and of 1[k* >= 0], over groups of two or more); ``mean_abs_advantage`` over loss tokens;
        ``first_hit_histogram`` {k*: count}, -1 = the answer never surfaced.
    """
    if outcome.numel() == 0:
        raise ValueError("group_diagnostics needs at least one trajectory")
    reward = outcome.to(torch.float64)
    hit = first_hit_turn >= 0
    group_values, group_index = torch.unique(group_ids, return_inverse=True)
    num_groups = group_values.numel()
    mask = loss_mask.bool()

    grpo = group_zscore(reward, group_index, num_groups, DEFAULT_EPS)
    token_signal = (advantages.abs() > ZERO_SIGNAL_ATOL) & mask
    turns, counts = torch.unique(first_hit_turn, return_counts=True)

    return {
        "num_trajectories": int(reward.numel()),
        "num_groups": int(num_groups),
        "reward_mean": float(reward.mean()),
        "reward_std": float(reward.std(unbiased=False)),
        "hit_rate": float(hit.double().mean()),
        "near_miss_rate": float((hit & (reward == 0)).double().mean()),
        "zero_signal_groups_grpo": _share_of_silent_groups(
            grpo.abs() > ZERO_SIGNAL_ATOL, group_index, num_groups
        ),
        "zero_signal_groups": _share_of_silent_groups(
            token_signal.any(dim=-1), group_index, num_groups
        ),
        "mean_group_reward_std": _mean_group_std(reward, group_index, num_groups),
        "mean_group_hit_std": _mean_group_std(hit.double(), group_index, num_groups),
        "mean_abs_advantage": float(masked_mean(advantages.abs(), mask)),
        "first_hit_histogram": dict(zip(turns.tolist(), counts.tolist(), strict=True)),
    }

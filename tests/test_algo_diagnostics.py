"""Group diagnostics: hit and near-miss rates, zero-signal groups, k* histogram, spreads."""

from __future__ import annotations

import math

import pytest
import torch
from algo_helpers import Traj, build_batch

from tspo.algo import compute_advantages, group_diagnostics

TRAJS = [
    # group 0: all wrong, two found the answer (two near misses)
    Traj(0, 0.0, 1, (2, 2)),
    Traj(0, 0.0, -1, (2, 2)),
    Traj(0, 0.0, 0, (2, 2)),
    Traj(0, 0.0, -1, (2, 2)),
    # group 1: mixed outcomes, one near miss
    Traj(1, 1.0, 0, (2, 2)),
    Traj(1, 0.0, 1, (2, 2)),
    Traj(1, 0.0, -1, (2, 2)),
    Traj(1, 1.0, -1, (2, 2)),
    # group 2: all right without evidence; group 3: a single wrong trajectory
    Traj(2, 1.0, -1, (2,)),
    Traj(2, 1.0, -1, (2,)),
    Traj(3, 0.0, -1, (2,)),
]


def diagnose(name: str) -> dict:
    batch = build_batch(TRAJS)
    advantages = compute_advantages(name, **batch)
    return group_diagnostics(
        batch["outcome"],
        batch["first_hit_turn"],
        batch["group_ids"],
        advantages,
        batch["turn_ids"] >= 0,
    )


def test_reward_and_folr_rates():
    stats = diagnose("tspo")
    assert stats["num_trajectories"] == 11 and stats["num_groups"] == 4
    assert stats["reward_mean"] == pytest.approx(4 / 11)
    assert stats["reward_std"] == pytest.approx(math.sqrt(4 / 11 * 7 / 11))
    assert stats["hit_rate"] == pytest.approx(4 / 11)
    assert stats["near_miss_rate"] == pytest.approx(3 / 11)
    assert stats["first_hit_histogram"] == {-1: 7, 0: 2, 1: 2}


def test_zero_signal_groups_under_grpo_and_under_the_given_advantages():
    tspo = diagnose("tspo")
    # GRPO: groups 0 (all 0), 2 (all 1) and 3 (single R = 0) are silent.
    assert tspo["zero_signal_groups_grpo"] == pytest.approx(3 / 4)
    # TSPO gives group 0 a signal through its two near misses.
    assert tspo["zero_signal_groups"] == pytest.approx(2 / 4)
    grpo = diagnose("grpo")
    assert grpo["zero_signal_groups"] == pytest.approx(grpo["zero_signal_groups_grpo"])


def test_within_group_spreads():
    stats = diagnose("grpo")
    sd = math.sqrt(1 / 3)  # unbiased std of {1, 1, 0, 0}
    assert stats["mean_group_reward_std"] == pytest.approx((0 + sd + 0) / 3)
    assert stats["mean_group_hit_std"] == pytest.approx((sd + sd + 0) / 3)


def test_mean_abs_advantage_is_over_loss_tokens():
    batch = build_batch(TRAJS)
    advantages = compute_advantages("tspo", **batch)
    mask = batch["turn_ids"] >= 0
    expected = advantages.abs()[mask].mean().item()
    assert diagnose("tspo")["mean_abs_advantage"] == pytest.approx(expected)


def test_empty_batch_is_an_error():
    empty = torch.zeros(0)
    with pytest.raises(ValueError, match="at least one"):
        group_diagnostics(empty, empty.long(), empty.long(), torch.zeros(0, 3), torch.zeros(0, 3))

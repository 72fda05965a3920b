"""Shared builders for the algo tests: rollout-shaped tensors from per-trajectory descriptions."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from hypothesis import strategies as st


@dataclass(frozen=True)
class Traj:
    """One trajectory: its group, outcome R, k*, and the loss tokens of each turn."""

    group: int
    outcome: float
    first_hit: int
    tokens_per_turn: tuple[int, ...]
    observation_tokens: int = 1  # non-loss tokens after every turn but the last


def build_batch(trajs: list[Traj], *, extra_padding: int = 2) -> dict[str, torch.Tensor]:
    """``compute_advantages`` keyword arguments; turn ids are -1 on observations and padding."""
    rows = []
    for traj in trajs:
        row: list[int] = []
        for turn, count in enumerate(traj.tokens_per_turn):
            row += [turn] * count
            if turn < len(traj.tokens_per_turn) - 1:
                row += [-1] * traj.observation_tokens
        rows.append(row)
    width = max(len(row) for row in rows) + extra_padding
    turn_ids = torch.tensor([row + [-1] * (width - len(row)) for row in rows], dtype=torch.long)
    return {
        "outcome": torch.tensor([t.outcome for t in trajs], dtype=torch.float64),
        "first_hit_turn": torch.tensor([t.first_hit for t in trajs], dtype=torch.long),
        "turn_ids": turn_ids,
        "group_ids": torch.tensor([t.group for t in trajs], dtype=torch.long),
    }


@st.composite
def trajectory_groups(
    draw,
    *,
    min_group_size: int = 1,
    max_group_size: int = 5,
    outcomes=st.sampled_from([0.0, 1.0]),
    max_turns: int = 4,
) -> list[Traj]:
    """Several groups (arbitrary, distinct labels) of random trajectories, grouped together."""
    labels = draw(st.lists(st.integers(-1000, 1000), min_size=1, max_size=4, unique=True))
    trajs = []
    for label in labels:
        for _ in range(draw(st.integers(min_group_size, max_group_size))):
            turns = draw(st.integers(1, max_turns))
            trajs.append(
                Traj(
                    group=label,
                    outcome=draw(outcomes),
                    first_hit=draw(st.integers(-1, turns - 1)),
                    tokens_per_turn=tuple(
                        draw(st.lists(st.integers(1, 3), min_size=turns, max_size=turns))
                    ),
                    observation_tokens=draw(st.integers(0, 2)),
                )
            )
    return trajs

"""veRL-shaped batches from trajectory specs and the matching tspo.algo inputs."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from tspo.integrations.verl import encode_score


@dataclass(frozen=True)
class Spec:
    """One trajectory: its loss runs and the masked tokens after each, outcome R and k*.

    ``segments`` alternates (loss tokens of turn k, masked tokens after turn k); a masked count
    may be 0 only after the last turn. ``leading_masked`` tokens come before turn 0.
    """

    uid: str
    segments: tuple[tuple[int, int], ...]
    outcome: float
    first_hit_turn: int
    leading_masked: int = 0

    @property
    def length(self) -> int:
        return self.leading_masked + sum(loss + masked for loss, masked in self.segments)

    def mask_and_turns(self, width: int) -> tuple[list[int], list[int]]:
        mask = [0] * self.leading_masked
        turns = [-1] * self.leading_masked
        for turn, (loss, masked) in enumerate(self.segments):
            mask += [1] * loss + [0] * masked
            turns += [turn] * loss + [-1] * masked
        padding = width - len(mask)
        return mask + [0] * padding, turns + [-1] * padding


def verl_batch(specs: list[Spec], width: int | None = None) -> dict[str, object]:
    """The keyword arguments veRL's ``compute_advantage`` hands an estimator.

    As veRL's agent loop does, the encoded score sits on the last valid response token (the last
    position of the row when the row has no valid token).
    """
    width = width or max(max(spec.length for spec in specs), 1)
    rewards = torch.zeros(len(specs), width)
    masks = []
    for row, spec in enumerate(specs):
        masks.append(spec.mask_and_turns(width)[0])
        rewards[row, spec.length - 1] = encode_score(spec.outcome, spec.first_hit_turn)
    return {
        "token_level_rewards": rewards,
        "response_mask": torch.tensor(masks, dtype=torch.long),
        "index": np.array([spec.uid for spec in specs], dtype=object),
    }


def algo_inputs(specs: list[Spec], width: int | None = None) -> dict[str, torch.Tensor]:
    """The same trajectories as ``tspo.algo.compute_advantages`` keyword arguments."""
    width = width or max(max(spec.length for spec in specs), 1)
    group_of = {uid: i for i, uid in enumerate(dict.fromkeys(spec.uid for spec in specs))}
    return {
        "outcome": torch.tensor([spec.outcome for spec in specs], dtype=torch.float32),
        "first_hit_turn": torch.tensor([spec.first_hit_turn for spec in specs]),
        "turn_ids": torch.tensor([spec.mask_and_turns(width)[1] for spec in specs]),
        "group_ids": torch.tensor([group_of[spec.uid] for spec in specs]),
    }


def random_specs(rng: np.random.Generator, num_groups: int, max_turns: int = 4) -> list[Spec]:
    """Groups of size 1 to 5 (some all-equal), 0 to ``max_turns`` turns, k* anywhere or -1."""
    specs = []
    for group in range(num_groups):
        size = int(rng.choice([1, 2, 3, 5]))
        all_equal = rng.random() < 0.25
        shared = (float(rng.integers(0, 2)), -1)
        for _ in range(size):
            num_turns = int(rng.integers(0, max_turns + 1))
            segments = tuple(
                (int(rng.integers(1, 6)), int(rng.integers(1, 6)) if k < num_turns - 1 else 0)
                for k in range(num_turns)
            )
            if segments and rng.random() < 0.5:  # ended on an observation (turn budget spent)
                segments = (*segments[:-1], (segments[-1][0], int(rng.integers(1, 6))))
            if all_equal or num_turns == 0:
                outcome, hit = shared if all_equal else (0.0, -1)
            else:
                outcome = float(rng.integers(0, 2))
                hit = int(rng.integers(-1, num_turns))
            specs.append(Spec(f"uid-{group}", segments, outcome, hit, int(rng.integers(0, 2))))
    order = rng.permutation(len(specs))  # veRL does not keep a group's rows together
    return [specs[i] for i in order]

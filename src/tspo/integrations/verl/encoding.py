"""How TSPO's per-trajectory facts travel through veRL's reward tensor. Pure functions, no veRL.

veRL 0.9.1 gives an advantage estimator only ``token_level_rewards`` (bs, L), ``response_mask``
(bs, L), ``index`` (the group uid of each row) and ``config``. Its reward loop, in turn, lets a
reward function return exactly one float per trajectory, which it writes on the last valid
response token (the agent loop's streaming path never calls a reward manager's
``assemble_rm_scores``, so no per-token placement survives). Hence everything the estimator needs
must be recoverable from that single float plus the response mask:

**Score.** ``score = R + HIT_STRIDE * (k* + 1)`` with the outcome ``R`` in ``[-1, 1]``, the
first-hit turn ``k*`` in ``{-1, 0, 1, ...}`` (-1 = no hit) and ``HIT_STRIDE = 4``.

**Decoding.** ``s`` = the sum of the row of ``token_level_rewards`` (so it does not matter which
token veRL wrote the score on); ``j = round(s / HIT_STRIDE)``; ``k* = j - 1``; ``R = s - 4 j``.
This is unambiguous: ``s / 4 = j + R / 4`` with ``|R / 4| <= 1/4 < 1/2``, so rounding returns ``j``
for every admissible ``(R, k*)``, and ``(R, k*) -> s`` is one-to-one. A hit in the last turn, a hit
in turn 0 and no hit all decode alike: ``k*`` lives in the integer part, ``R`` in the remainder,
and no token position is shared with anything else. For ``R`` in ``{-1, 0, 1}`` (exact match) and
``k* < 2**20`` every score is an integer below ``2**24``, hence exact in float32; a fractional
``R`` (F1) comes back within float32 rounding of the score.

**Turns.** Turn ``k`` of a row is the ``k``-th maximal run of 1s in ``response_mask`` (0-based);
observations, chat-template glue and padding are the 0 runs between and after them. This holds
for veRL's tool agent loop, where every assistant turn contributes at least one token and every
tool response is masked out.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from tspo.errors import TSPOError

HIT_STRIDE = 4.0
MAX_ABS_OUTCOME = 1.0


def encode_score(outcome: float, first_hit_turn: int) -> float:
    """The one float a veRL reward function returns for outcome R and first-hit turn k*."""
    if not -MAX_ABS_OUTCOME <= outcome <= MAX_ABS_OUTCOME:
        raise TSPOError(f"the outcome must lie in [-1, 1] to be encoded for veRL, got {outcome}")
    if first_hit_turn < -1:
        raise TSPOError(f"the first-hit turn must be >= 0, or -1 for no hit, got {first_hit_turn}")
    return float(outcome) + HIT_STRIDE * (first_hit_turn + 1)


def decode_scores(token_level_rewards: Tensor) -> tuple[Tensor, Tensor]:
    """Outcome and first-hit turn of each row: (bs, L) float -> ((bs,) float64, (bs,) long)."""
    scores = token_level_rewards.to(torch.float64).sum(dim=-1)
    if not bool(torch.isfinite(scores).all()):
        raise TSPOError("token_level_rewards holds a NaN or infinite score")
    strides = torch.round(scores / HIT_STRIDE)
    return scores - HIT_STRIDE * strides, strides.long() - 1


def turn_ids_from_response_mask(response_mask: Tensor) -> Tensor:
    """Turn index of every loss token: (bs, L) 0/1 -> (bs, L) long, -1 where the mask is 0.

    Turn k is the k-th maximal run of 1s in the row.
    """
    in_loss = response_mask.bool()
    before = torch.zeros_like(in_loss[:, :1])
    run_starts = in_loss & ~torch.cat([before, in_loss[:, :-1]], dim=1)
    turn_ids = run_starts.long().cumsum(dim=1) - 1
    return torch.where(in_loss, turn_ids, torch.full_like(turn_ids, -1))


def group_ids_from_index(index: Sequence[object] | np.ndarray, device: torch.device) -> Tensor:
    """veRL's ``index`` (one uid per row, usually strings) -> (bs,) long dense group ids."""
    uids = np.asarray(index, dtype=object)
    if uids.ndim != 1:
        raise TSPOError(f"index must hold one uid per row, got shape {uids.shape}")
    _, group_ids = np.unique(uids.astype(str), return_inverse=True)
    return torch.as_tensor(group_ids.reshape(-1), dtype=torch.long, device=device)


def decode_batch(
    token_level_rewards: Tensor, response_mask: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Everything ``tspo.algo.compute_advantages`` needs besides the groups.

    Shapes: (bs, L), (bs, L) -> outcome (bs,) float64, first_hit_turn (bs,) long,
    turn_ids (bs, L) long. A decoded ``k*`` must name a turn the row has.
    """
    if token_level_rewards.shape != response_mask.shape or token_level_rewards.dim() != 2:
        raise TSPOError(
            "token_level_rewards and response_mask must both be (bs, L), got "
            f"{tuple(token_level_rewards.shape)} and {tuple(response_mask.shape)}"
        )
    outcome, first_hit_turn = decode_scores(token_level_rewards)
    turn_ids = turn_ids_from_response_mask(response_mask)
    if turn_ids.shape[1]:
        num_turns = turn_ids.max(dim=1).values + 1  # 0 for a row without loss tokens
    else:
        num_turns = torch.zeros_like(first_hit_turn)
    invalid = (first_hit_turn >= num_turns) | (first_hit_turn < -1)
    if bool(invalid.any()):
        row = int(invalid.nonzero()[0, 0])
        score = float(token_level_rewards[row].sum())
        raise TSPOError(
            f"row {row}: the score {score:g} encodes first-hit turn {int(first_hit_turn[row])}, "
            f"but its response mask has {int(num_turns[row])} turn(s); the TSPO estimators need "
            "the scores of tspo.integrations.verl.reward.compute_score"
        )
    return outcome, first_hit_turn, turn_ids

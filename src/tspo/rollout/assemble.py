"""Packing per-rollout token segments into the padded tensors of a `RolloutBatch`."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tspo.rollout.batch import RolloutBatch, Trajectory


@dataclass
class Segment:
    """A run of response tokens: the model's generation of one turn, or text the environment added.

    ``logprobs`` is None for environment text (observations, corrective messages).
    """

    token_ids: list[int]
    turn: int
    logprobs: list[float] | None = None

    @property
    def generated(self) -> bool:
        return self.logprobs is not None


def assemble_batch(
    prompt_ids: list[list[int]],
    responses: list[list[Segment]],
    trajectories: list[Trajectory],
    pad_id: int,
) -> RolloutBatch:
    """Left-pad prompts and right-pad responses into a `RolloutBatch` (shapes in its docstring).

    Generated tokens get ``loss_mask`` 1, their turn in ``turn_ids`` and their log-prob in
    ``old_logprobs``; environment tokens and padding get 0, -1 and 0.
    """
    batch = len(prompt_ids)
    prompt_len = max(len(p) for p in prompt_ids)
    response_len = max(1, max(sum(len(s.token_ids) for s in segs) for segs in responses))
    out_prompt = torch.full((batch, prompt_len), pad_id, dtype=torch.long)
    out_prompt_mask = torch.zeros(batch, prompt_len, dtype=torch.long)
    out_ids = torch.full((batch, response_len), pad_id, dtype=torch.long)
    out_mask = torch.zeros(batch, response_len, dtype=torch.long)
    loss_mask = torch.zeros(batch, response_len, dtype=torch.float32)
    turn_ids = torch.full((batch, response_len), -1, dtype=torch.long)
    old_logprobs = torch.zeros(batch, response_len, dtype=torch.float32)
    for row, (prompt, segments) in enumerate(zip(prompt_ids, responses, strict=True)):
        out_prompt[row, prompt_len - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        out_prompt_mask[row, prompt_len - len(prompt) :] = 1
        start = 0
        for seg in segments:
            end = start + len(seg.token_ids)
            out_ids[row, start:end] = torch.tensor(seg.token_ids, dtype=torch.long)
            out_mask[row, start:end] = 1
            if seg.generated:
                loss_mask[row, start:end] = 1.0
                turn_ids[row, start:end] = seg.turn
                old_logprobs[row, start:end] = torch.tensor(seg.logprobs, dtype=torch.float32)
            start = end
    return RolloutBatch(
        prompt_ids=out_prompt,
        prompt_mask=out_prompt_mask,
        response_ids=out_ids,
        response_mask=out_mask,
        loss_mask=loss_mask,
        turn_ids=turn_ids,
        old_logprobs=old_logprobs,
        outcome=torch.tensor([t.outcome for t in trajectories], dtype=torch.float32),
        first_hit_turn=torch.tensor([t.first_hit_turn for t in trajectories], dtype=torch.long),
        group_ids=torch.tensor([t.group_id for t in trajectories], dtype=torch.long),
        trajectories=trajectories,
    )

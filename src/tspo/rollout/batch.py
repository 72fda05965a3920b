"""`RolloutBatch`: what a rollout hands to rewards, advantages and the loss.

Where it sits in one RL step: docs/architecture.md, "One RL step".
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

import torch


@dataclass
class Trajectory:
    """The text-side record of one multi-turn rollout."""

    example_id: str
    question: str
    golds: list[str]
    data_source: str
    group_id: int
    generated: list[str] = field(default_factory=list)  # the model's text, one entry per turn
    queries: list[str | None] = field(default_factory=list)  # the search query of each turn
    observations: list[str | None] = field(default_factory=list)  # None when turn k did not search
    response_text: str = ""  # everything after the prompt: generations, <information>, messages
    final_answer: str | None = None
    outcome: float = 0.0  # EM of the last <answer> in the response
    f1: float = 0.0
    first_hit_turn: int = -1  # k*, or -1

    @property
    def num_turns(self) -> int:
        return len(self.generated)

    @property
    def num_searches(self) -> int:
        return sum(o is not None for o in self.observations)

    @property
    def num_invalid(self) -> int:
        """Turns whose generation held neither a complete search nor a complete answer."""
        from tspo.protocol import parse_action

        return sum(parse_action(text).kind == "invalid" for text in self.generated)


@dataclass
class TokenBatch:
    """The token tensors a rollout produces and the update consumes, row-aligned.

    Prompts are left-padded, responses right-padded. `RolloutBatch` adds the rollout's scores;
    ``tspo.train.forward.UpdateBatch`` adds advantages and reference log-probs.
    """

    prompt_ids: torch.Tensor  # (B, P) long
    prompt_mask: torch.Tensor  # (B, P) long, 1 = real token
    response_ids: torch.Tensor  # (B, T) long: generated + observation/message tokens, contiguous
    response_mask: torch.Tensor  # (B, T) long, 1 = real (non-pad) token
    loss_mask: torch.Tensor  # (B, T) float, 1 = token the model generated
    # (B, T) float: log_softmax(logits) of each generated token under the policy that sampled it,
    # at temperature 1 and without top-p whatever the sampling settings; 0 off the loss mask.
    old_logprobs: torch.Tensor

    def __len__(self) -> int:
        return self.prompt_ids.shape[0]

    @property
    def input_ids(self) -> torch.Tensor:
        """(B, P+T) prompt then response."""
        return torch.cat([self.prompt_ids, self.response_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        """(B, P+T) 1 on real tokens."""
        return torch.cat([self.prompt_mask, self.response_mask], dim=1)

    def token_fields(self) -> dict[str, torch.Tensor]:
        """The `TokenBatch` fields by name (to build another batch kind from this one)."""
        return {f.name: getattr(self, f.name) for f in fields(TokenBatch)}


@dataclass
class RolloutBatch(TokenBatch):
    """B scored rollouts as tensors (the engine returns them on the CPU).

    Shapes: the `TokenBatch` fields, ``turn_ids`` (B, T); ``outcome``/``first_hit_turn``/
    ``group_ids`` (B,).
    """

    turn_ids: torch.Tensor  # (B, T) long, turn index of loss tokens, -1 elsewhere
    outcome: torch.Tensor  # (B,) float
    first_hit_turn: torch.Tensor  # (B,) long
    group_ids: torch.Tensor  # (B,) long
    trajectories: list[Trajectory] = field(default_factory=list)

    def to(self, device: torch.device | str) -> RolloutBatch:
        moved = {
            f.name: getattr(self, f.name).to(device)
            for f in fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }
        return replace(self, **moved)

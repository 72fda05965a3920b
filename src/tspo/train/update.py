"""The PPO update of one step: epochs over shuffled mini-batches, gradient accumulation over
micro-batches, gradient clipping, one optimizer step per mini-batch."""

from __future__ import annotations

import math
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import torch

from tspo.algo import policy_loss
from tspo.train.config import AlgoConfig
from tspo.train.forward import UpdateBatch, micro_batches, micro_logprobs


@dataclass
class UpdateSettings:
    """The knobs of :func:`ppo_update` (from ``train``, ``optim``, ``rollout`` and ``algo``)."""

    ppo_epochs: int
    mini_batch_size: int
    micro_batch_size: int
    max_grad_norm: float
    temperature: float
    algo: AlgoConfig
    # Micro-batches of rows sorted by length, run left-aligned without an attention mask
    # (`packed_logprobs`); False runs the padded reference path (`response_logprobs`) in the
    # shuffled order, kept to measure and test the packed one against.
    packed: bool = True
    # Take the old log-probs from the update's own forward pass (detached) instead of
    # ``batch.old_logprobs``: exact when the batch gets one optimizer step (`old_from_update`).
    old_from_update: bool = False


@dataclass
class UpdateStats:
    """Loss metrics averaged over the step (weighted as the loss is), and what it cost."""

    sums: dict[str, float] = field(default_factory=dict)
    weight: float = 0.0
    grad_norms: list[float] = field(default_factory=list)
    optimizer_steps: int = 0
    skipped_steps: int = 0
    tokens: int = 0

    def add(self, metrics: dict[str, float], weight: float) -> None:
        for name, value in metrics.items():
            self.sums[name] = self.sums.get(name, 0.0) + value * weight
        self.weight += weight

    def summary(self) -> dict[str, float]:
        out = (
            {name: total / self.weight for name, total in self.sums.items()} if self.weight else {}
        )
        finite_norms = [n for n in self.grad_norms if math.isfinite(n)]
        out["grad_norm"] = sum(finite_norms) / len(finite_norms) if finite_norms else math.nan
        out["optimizer_steps"] = self.optimizer_steps
        out["skipped_optimizer_steps"] = self.skipped_steps
        out["update_tokens"] = self.tokens
        return out


def _loss_normaliser(batch: UpdateBatch, agg: str) -> torch.Tensor:
    """(B,) per-row share of the aggregated loss's denominator: loss tokens for token-mean, one
    per row with loss tokens for seq-mean-token-mean."""
    tokens = batch.loss_mask.bool().sum(dim=1).float()
    return tokens if agg == "token-mean" else (tokens > 0).float()


def old_from_update(*, recompute: bool, ppo_epochs: int, mini_batch_size: int, rows: int) -> bool:
    """Whether the update can take the old log-probs from its own forward pass: they are to be
    recomputed under the current weights (``recompute``), and the ``rows`` trajectories get one
    optimizer step (one epoch, one mini-batch), so no weight changes before any micro-batch's
    forward pass. The ratio is then exactly 1, as with a separate pass, at one forward pass less.
    """
    return recompute and ppo_epochs == 1 and mini_batch_size >= rows


def ppo_update(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: UpdateBatch,
    settings: UpdateSettings,
    *,
    generator: torch.Generator,
    autocast: AbstractContextManager[Any],
) -> dict[str, float]:
    """Run ``ppo_epochs`` passes over ``batch`` and return the step's loss metrics.

    Each mini-batch's loss is accumulated over micro-batches weighted by their share of the
    mini-batch's normaliser, so the gradient equals that of the whole mini-batch at once.
    """
    algo = settings.algo
    need_entropy_grad = algo.entropy_coef != 0
    normaliser = _loss_normaliser(batch, algo.agg)
    lengths = batch.attention_mask.long().sum(dim=1).cpu()
    params = [p for p in model.parameters() if p.requires_grad]
    stats = UpdateStats()
    model.train()
    for _ in range(settings.ppo_epochs):
        order = torch.randperm(len(batch), generator=generator)
        for mini_rows in micro_batches(order, settings.mini_batch_size):
            if settings.packed:
                # Rows of similar length share micro-batches (less padding); the mini-batch's
                # gradient is the same sum in another order.
                mini_rows = mini_rows[lengths[mini_rows].argsort(stable=True)]
            mini_total = float(normaliser[mini_rows].sum())
            if mini_total == 0:
                continue
            optimizer.zero_grad(set_to_none=True)
            for rows in micro_batches(mini_rows, settings.micro_batch_size):
                micro = batch.select(rows).trimmed()
                weight = float(normaliser[rows].sum()) / mini_total
                if weight == 0:
                    continue
                with autocast:
                    logprobs, entropy = micro_logprobs(
                        model,
                        micro,
                        temperature=settings.temperature,
                        with_entropy=True,
                        entropy_grad=need_entropy_grad,
                        packed=settings.packed,
                    )
                old = logprobs.detach() if settings.old_from_update else micro.old_logprobs
                loss, metrics = policy_loss(
                    logprobs,
                    old,
                    micro.ref_logprobs,
                    micro.advantages,
                    micro.loss_mask,
                    entropy=entropy,
                    **algo.loss_options(),
                )
                (loss * weight).backward()
                stats.add({"loss": loss.item(), **metrics}, weight)
                stats.tokens += int(micro.attention_mask.sum())
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm))
            stats.grad_norms.append(grad_norm)
            if math.isfinite(grad_norm):
                optimizer.step()
                stats.optimizer_steps += 1
            else:
                stats.skipped_steps += 1
    optimizer.zero_grad(set_to_none=True)
    model.eval()
    return stats.summary()

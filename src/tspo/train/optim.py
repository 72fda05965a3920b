"""AdamW and the learning-rate schedule (linear warm-up, then constant, linear or cosine)."""

from __future__ import annotations

import math

import torch

from tspo.train.config import OptimConfig


def build_optimizer(model: torch.nn.Module, config: OptimConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; biases and norm weights get no weight decay."""
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.dim() >= 2 else no_decay).append(param)
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=config.lr, betas=config.betas, eps=config.adam_eps)


def warmup_steps(config: OptimConfig, total_steps: int) -> int:
    if config.warmup_steps is not None:
        return config.warmup_steps
    return int(config.warmup_ratio * total_steps)


def lr_factor(step: int, *, total_steps: int, warmup: int, schedule: str, floor: float) -> float:
    """Multiplier of the peak LR for training step ``step`` (0-based).

    Warm-up rises linearly to 1 over ``warmup`` steps, starting at 1/warmup (never 0, so the first
    step learns something); afterwards ``constant`` stays at 1 while ``linear`` and ``cosine`` decay
    to ``floor`` at the last step.
    """
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    decay_steps = max(total_steps - warmup - 1, 1)
    progress = min((step - warmup) / decay_steps, 1.0)
    if schedule == "linear":
        shape = 1.0 - progress
    elif schedule == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        raise ValueError(f"unknown schedule {schedule!r}")
    return floor + (1.0 - floor) * shape


def build_scheduler(
    optimizer: torch.optim.Optimizer, config: OptimConfig, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """A scheduler stepped once per training step."""
    warmup = warmup_steps(config, total_steps)

    def factor(step: int) -> float:
        return lr_factor(
            step,
            total_steps=total_steps,
            warmup=warmup,
            schedule=config.schedule,
            floor=config.min_lr_ratio,
        )

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)

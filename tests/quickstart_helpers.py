"""A miniature quickstart configuration: tiny world, micro model, a couple of RL steps."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import replace

from tspo.quickstart.settings import EvalStage, PolicyStage, QuickstartSettings, RLStage, WorldStage


def mini_settings(**rl_overrides) -> QuickstartSettings:
    """Settings that run every stage end to end in seconds, from the shipped base."""
    rl = dict(
        steps=2,
        prompts_per_step=2,
        group_size=2,
        max_turns=2,
        max_turn_tokens=12,
        max_obs_tokens=48,
        topk=2,
        eval_examples=4,
    )
    rl.update(rl_overrides)
    return QuickstartSettings(
        threads=1,
        world=WorldStage(seed=0, size="tiny"),
        policy=PolicyStage(
            expert_passes=1,
            practice_worlds=0,
            sft=replace(PolicyStage().sft, epochs=1, batch_size=32, max_obs_tokens=48),
        ),
        rl=RLStage(**rl),
        eval=EvalStage(max_examples=4, batch_size=4),
    )


@contextmanager
def torch_threads(count: int):
    """Run with ``count`` torch CPU threads, then restore: tiny models are fastest on one."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)

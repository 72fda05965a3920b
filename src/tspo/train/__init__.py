"""tspo.train: the RL trainer (config, loop, PPO update, checkpoints, logs) and the SFT warm start
it starts from (`tspo.train.sft`).

::

    from tspo.train import load_config, train

    config = load_config("configs/smollm2-wiki.yaml", ["algo.estimator=grpo", "train.steps=2"])
    result = train(config)  # TrainResult(output_dir, final_step, last_checkpoint, metrics)

The names below are loaded on first use: ``tspo.train.config`` must stay importable without
torch (the CLI validates a config before it loads a model), and importing this package must not
change that. The loop is described in docs/training.md, the map of the package in
docs/architecture.md.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tspo.train.checkpoint import latest_checkpoint, list_checkpoints, save_checkpoint
    from tspo.train.config import (
        AlgoConfig,
        RolloutSection,
        TrainConfig,
        config_from_dict,
        load_config,
    )
    from tspo.train.forward import UpdateBatch, batch_logprobs
    from tspo.train.loop import TrainInterrupted, TrainResult, run_step, train
    from tspo.train.update import UpdateSettings, ppo_update

_EXPORTS = {
    "AlgoConfig": "tspo.train.config",
    "RolloutSection": "tspo.train.config",
    "TrainConfig": "tspo.train.config",
    "config_from_dict": "tspo.train.config",
    "load_config": "tspo.train.config",
    "train": "tspo.train.loop",
    "run_step": "tspo.train.loop",
    "TrainResult": "tspo.train.loop",
    "TrainInterrupted": "tspo.train.loop",
    "UpdateBatch": "tspo.train.forward",
    "batch_logprobs": "tspo.train.forward",
    "UpdateSettings": "tspo.train.update",
    "ppo_update": "tspo.train.update",
    "latest_checkpoint": "tspo.train.checkpoint",
    "list_checkpoints": "tspo.train.checkpoint",
    "save_checkpoint": "tspo.train.checkpoint",
}

__all__ = [
    "AlgoConfig",
    "RolloutSection",
    "TrainConfig",
    "TrainInterrupted",
    "TrainResult",
    "UpdateBatch",
    "UpdateSettings",
    "batch_logprobs",
    "config_from_dict",
    "latest_checkpoint",
    "list_checkpoints",
    "load_config",
    "ppo_update",
    "run_step",
    "save_checkpoint",
    "train",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'tspo.train' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))

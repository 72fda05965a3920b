"""TSPO's advantage estimators as veRL 0.9.1 estimators: thin wrappers over ``tspo.algo``.

Each wrapper decodes the outcome, the first-hit turn and the turns from veRL's tensors
(:mod:`tspo.integrations.verl.encoding`), maps veRL's uids to group ids and calls
:func:`tspo.algo.compute_advantages`. Options come from the ``tspo`` node of veRL's
``algorithm`` config (``+algorithm.tspo.lam=0.5`` on the command line).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor
from verl.trainer.ppo.core_algos import register_adv_est

from tspo.algo import compute_advantages
from tspo.errors import TSPOError
from tspo.integrations.verl.encoding import decode_batch, group_ids_from_index

# veRL estimator name -> tspo.algo estimator name. ``tspo_grpo`` is outcome-only GRPO on the
# decoded R: veRL's own ``grpo`` would standardise the encoded score, k* included.
VERL_ESTIMATORS = {
    "tspo": "tspo",
    "tspo_switch": "tspo_switch",
    "folr_scalar": "folr_scalar",
    "tspo_grpo": "grpo",
}
OPTIONS_NODE = "tspo"


def estimator_options(config: Any) -> dict[str, Any]:
    """The ``tspo`` options of veRL's ``algorithm`` config (a DictConfig, AlgoConfig or dict)."""
    if config is None:
        return {}
    if config.get("use_kl_in_reward", False):
        raise TSPOError(
            "algorithm.use_kl_in_reward=True adds a KL term to every token of token_level_rewards, "
            "which breaks the TSPO score encoding; use actor_rollout_ref.actor.use_kl_loss=True"
        )
    node = config.get(OPTIONS_NODE, None)
    if node is None:
        return {}
    if not isinstance(node, Mapping):  # a DictConfig is a Mapping too
        raise TSPOError(f"algorithm.{OPTIONS_NODE} must be a mapping of estimator options")
    return {str(key): value for key, value in node.items()}


def verl_advantages(
    algo_name: str,
    token_level_rewards: Tensor,
    response_mask: Tensor,
    index: np.ndarray | None,
    config: Any = None,
) -> tuple[Tensor, Tensor]:
    """(bs, L), (bs, L), (bs,) uids -> advantages and returns, both (bs, L), 0 off the mask."""
    if index is None:
        raise TSPOError("the TSPO estimators need veRL's group uids (non_tensor_batch['uid'])")
    outcome, first_hit_turn, turn_ids = decode_batch(token_level_rewards, response_mask)
    with torch.no_grad():
        advantages = compute_advantages(
            algo_name,
            outcome=outcome.to(token_level_rewards.dtype),
            first_hit_turn=first_hit_turn,
            turn_ids=turn_ids,
            group_ids=group_ids_from_index(index, token_level_rewards.device),
            **estimator_options(config),
        )
    return advantages, advantages


def make_estimator(algo_name: str) -> Callable[..., tuple[Tensor, Tensor]]:
    """A function with veRL's estimator signature that runs ``tspo.algo``'s ``algo_name``."""

    def estimator(
        token_level_rewards: Tensor,
        response_mask: Tensor,
        index: np.ndarray | None = None,
        config: Any = None,
        reward_baselines: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        # reward_baselines (ReMax) has no role in group-relative estimators.
        return verl_advantages(algo_name, token_level_rewards, response_mask, index, config)

    estimator.__name__ = f"compute_{algo_name}_advantage"
    estimator.__doc__ = (
        f"veRL estimator running tspo.algo's {algo_name!r}: token_level_rewards (bs, L) with "
        "encoded scores, response_mask (bs, L), index (bs,) -> (advantages, returns), (bs, L)."
    )
    return estimator


REGISTERED = {name: make_estimator(algo) for name, algo in VERL_ESTIMATORS.items()}


def register_estimators() -> None:
    """Register every TSPO estimator with veRL; calling it again is harmless."""
    for name, fn in REGISTERED.items():
        register_adv_est(name)(fn)

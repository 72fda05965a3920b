"""The TSPO estimators registered with veRL 0.9.1 equal tspo.algo on the same trajectories."""

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from ray._common.utils import load_class
from verl import DataProto
from verl.trainer.ppo.core_algos import (
    ADV_ESTIMATOR_REGISTRY,
    compute_grpo_outcome_advantage,
    get_adv_estimator_fn,
)
from verl.trainer.ppo.ray_trainer import compute_advantage
from verl_helpers import Spec, algo_inputs, random_specs, verl_batch

from tspo.algo import compute_advantages
from tspo.errors import TSPOError
from tspo.integrations.verl import VERL_ESTIMATORS, turn_ids_from_response_mask

pytestmark = pytest.mark.verl

SEEDS = range(6)


def test_importing_the_adapter_registers_every_estimator():
    for name in ("tspo", "tspo_switch", "folr_scalar", "tspo_grpo"):
        assert name in ADV_ESTIMATOR_REGISTRY
        assert get_adv_estimator_fn(name).__module__ == "tspo.integrations.verl.estimators"


def test_the_ray_setup_hook_resolves_and_registering_again_is_harmless():
    # Ray runs this string as worker_process_setup_hook in every worker, the trainer's included.
    before = dict(ADV_ESTIMATOR_REGISTRY)
    load_class("tspo.integrations.verl.register_estimators")()
    assert ADV_ESTIMATOR_REGISTRY == before


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("verl_name", list(VERL_ESTIMATORS))
def test_verl_estimator_equals_tspo_algo_on_the_same_trajectories(verl_name, seed):
    specs = random_specs(np.random.default_rng(seed), num_groups=6)
    advantages, returns = get_adv_estimator_fn(verl_name)(**verl_batch(specs), config=None)
    expected = compute_advantages(VERL_ESTIMATORS[verl_name], **algo_inputs(specs))
    assert advantages.dtype == torch.float32
    assert torch.equal(advantages, expected)
    assert torch.equal(returns, advantages)


def test_every_edge_case_in_one_batch_matches_tspo_algo():
    specs = [
        Spec("hit-last", ((2, 3), (1, 2)), 1.0, 1),  # hit in the last turn, ended on it
        Spec("hit-last", ((2, 3), (2, 0)), 0.0, 0),  # hit in turn 0
        Spec("hit-last", ((3, 0),), 0.0, -1),  # single turn, no hit
        Spec("alone", ((2, 2), (2, 0)), 1.0, 0),  # a group of size 1
        Spec("flat", ((2, 0),), 1.0, -1),  # an all-equal group
        Spec("flat", ((1, 1), (1, 0)), 1.0, -1),
        Spec("empty", (), 0.0, -1, leading_masked=2),  # zero loss tokens
        Spec("empty", ((2, 0),), 1.0, 0),
    ]
    batch = verl_batch(specs)
    for verl_name, algo_name in VERL_ESTIMATORS.items():
        advantages, _ = get_adv_estimator_fn(verl_name)(**batch)
        assert torch.equal(advantages, compute_advantages(algo_name, **algo_inputs(specs)))
        assert bool((advantages[batch["response_mask"] == 0] == 0).all())
        assert torch.isfinite(advantages).all()
    tspo_advantages, _ = get_adv_estimator_fn("tspo")(**batch)
    assert torch.equal(tspo_advantages[4:6], torch.zeros_like(tspo_advantages[4:6]))


def test_the_trainers_own_dispatch_runs_a_tspo_estimator_with_options_from_the_config():
    specs = random_specs(np.random.default_rng(7), num_groups=5)
    batch = verl_batch(specs)
    data = DataProto.from_dict(
        tensors={
            "token_level_rewards": batch["token_level_rewards"],
            "response_mask": batch["response_mask"],
        },
        non_tensors={"uid": batch["index"]},
    )
    config = OmegaConf.create(
        {"adv_estimator": "tspo", "use_kl_in_reward": False, "tspo": {"lam": 0.5}}
    )
    data = compute_advantage(data, adv_estimator="tspo", config=config)
    expected = compute_advantages("tspo", lam=0.5, **algo_inputs(specs))
    assert torch.equal(data.batch["advantages"], expected)
    assert not torch.equal(expected, compute_advantages("tspo", **algo_inputs(specs)))


def test_unknown_options_and_kl_in_reward_are_errors():
    batch = verl_batch([Spec("g", ((2, 0),), 1.0, 0), Spec("g", ((2, 0),), 0.0, -1)])
    estimator = get_adv_estimator_fn("tspo")
    with pytest.raises(TSPOError, match="no option"):
        estimator(**batch, config=OmegaConf.create({"tspo": {"lamda": 0.5}}))
    with pytest.raises(TSPOError, match="mapping"):
        estimator(**batch, config=OmegaConf.create({"tspo": 0.5}))
    with pytest.raises(TSPOError, match="use_kl_in_reward"):
        estimator(**batch, config=OmegaConf.create({"use_kl_in_reward": True}))
    with pytest.raises(TSPOError, match="uid"):
        estimator(batch["token_level_rewards"], batch["response_mask"], index=None)


def random_outcome_batch(rng: np.random.Generator, binary: bool):
    """Random masks, one outcome per row on a random token, groups of size 1 to 5."""
    sizes = rng.choice([1, 2, 3, 5], size=8)
    index = np.array([f"q{g}" for g, size in enumerate(sizes) for _ in range(size)], dtype=object)
    rng.shuffle(index)
    rows, width = len(index), 24
    mask = torch.from_numpy(rng.random((rows, width)) < 0.6).long()
    outcomes = rng.integers(0, 2, size=rows) if binary else rng.random(rows)
    if binary:  # two all-equal groups (continuous ones: see the test below)
        for group in np.unique(index)[:2]:
            outcomes[index == group] = outcomes[index == group][0]
    rewards = torch.zeros(rows, width)
    rewards[torch.arange(rows), torch.from_numpy(rng.integers(0, width, size=rows))] = (
        torch.from_numpy(outcomes.astype(np.float32))
    )
    return rewards, mask, index


@pytest.mark.parametrize("binary", [True, False])
@pytest.mark.parametrize("seed", SEEDS)
def test_tspo_algo_grpo_equals_verls_own_grpo(seed, binary):
    rewards, mask, index = random_outcome_batch(np.random.default_rng(seed), binary)
    expected, _ = compute_grpo_outcome_advantage(rewards, mask, index)
    _, group_ids = np.unique(index.astype(str), return_inverse=True)
    ours = compute_advantages(
        "grpo",
        outcome=rewards.sum(dim=-1),
        first_hit_turn=torch.full((len(index),), -1),
        turn_ids=turn_ids_from_response_mask(mask),
        group_ids=torch.from_numpy(group_ids),
    )
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("seed", SEEDS)
def test_tspo_grpo_on_encoded_scores_equals_verls_grpo_on_the_plain_outcome(seed):
    specs = random_specs(np.random.default_rng(seed), num_groups=6)
    batch = verl_batch(specs)
    plain = algo_inputs(specs)
    plain_rewards = torch.zeros_like(batch["token_level_rewards"])
    plain_rewards[:, -1] = plain["outcome"]
    expected, _ = compute_grpo_outcome_advantage(
        plain_rewards, batch["response_mask"], batch["index"]
    )
    ours, _ = get_adv_estimator_fn("tspo_grpo")(**batch)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


def test_an_all_equal_group_is_exactly_zero_where_verls_grpo_keeps_a_rounding_residue():
    # The one deliberate difference: veRL divides float32 rounding noise by (std + 1e-6).
    rewards = torch.zeros(3, 2)
    rewards[:, 1] = 0.4553418755531311  # float32 mean of three copies is not the value itself
    mask, index = torch.ones(3, 2, dtype=torch.long), np.array(["q", "q", "q"], dtype=object)
    theirs, _ = compute_grpo_outcome_advantage(rewards, mask, index)
    ours = compute_advantages(
        "grpo",
        outcome=rewards.sum(dim=-1),
        first_hit_turn=torch.full((3,), -1),
        turn_ids=turn_ids_from_response_mask(mask),
        group_ids=torch.zeros(3, dtype=torch.long),
    )
    assert torch.equal(ours, torch.zeros(3, 2))
    assert 0 < theirs.abs().max() < 0.1

"""The veRL example config composes with veRL 0.9.1's own trainer config, and what it names exists.

This is as far as a CPU gets: the run itself needs GPUs and vLLM (docs/scaling-with-verl.md).
"""

import runpy
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from ray._common.utils import load_class
from verl.experimental.agent_loop.tool_parser import ToolParser
from verl.trainer import config as verl_configs
from verl.trainer.ppo.core_algos import ADV_ESTIMATOR_REGISTRY, get_adv_estimator_fn
from verl.trainer.ppo.utils import need_critic, need_reference_policy
from verl.utils.config import validate_config
from verl.utils.import_utils import load_extern_object
from verl_helpers import Spec, algo_inputs, verl_batch

import tspo.integrations.verl.tool  # noqa: F401  (registers the tspo_search format)
from tspo.algo import compute_advantages
from tspo.data.qa import QAExample, write_flashrag_jsonl
from tspo.integrations.verl.reward import compute_score

pytestmark = pytest.mark.verl

REPO_ROOT = Path(__file__).parents[2]
EXAMPLE_DIR = REPO_ROOT / "examples" / "verl"
# Keys the example adds on purpose; every other key it sets must exist in veRL's config.
NEW_KEYS = {
    "algorithm.tspo",
    "reward.custom_reward_function.reward_kwargs",
    "ray_kwargs.ray_init.runtime_env.worker_process_setup_hook",
}


@pytest.fixture(scope="module")
def configs():
    with initialize_config_dir(config_dir=str(EXAMPLE_DIR), version_base=None):
        example = compose(config_name="tspo_search_r1")
    with initialize_config_dir(
        config_dir=str(Path(verl_configs.__file__).parent), version_base=None
    ):
        base = compose(config_name="ppo_trainer")
    return example, base


def leaf_keys(node, prefix=""):
    for key, value in node.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and path not in NEW_KEYS:
            yield from leaf_keys(value, f"{path}.")
        else:
            yield path


def has_key(config, dotted_key):
    parent, _, leaf = dotted_key.rpartition(".")
    node = OmegaConf.select(config, parent) if parent else config
    return node is not None and leaf in list(node.keys())  # "in node" skips ??? values


def test_every_key_the_example_sets_exists_in_verls_trainer_config(configs):
    _, base = configs
    raw = OmegaConf.to_container(OmegaConf.load(EXAMPLE_DIR / "tspo_search_r1.yaml"))
    raw.pop("hydra"), raw.pop("defaults")
    unknown = [key for key in leaf_keys(raw) if key not in NEW_KEYS and not has_key(base, key)]
    assert unknown == []


def test_verls_own_validation_accepts_the_example(configs):
    example, _ = configs
    validate_config(
        config=example,
        use_reference_policy=need_reference_policy(example),
        use_critic=need_critic(example),
    )
    assert need_reference_policy(example) and not need_critic(example)


def test_everything_the_example_names_resolves(configs):
    example, _ = configs
    assert example.algorithm.adv_estimator in ADV_ESTIMATOR_REGISTRY
    assert not example.algorithm.use_kl_in_reward
    reward = example.reward.custom_reward_function
    assert load_extern_object(reward.path, reward.name) is compute_score
    load_class(example.ray_kwargs.ray_init.runtime_env.worker_process_setup_hook)()
    rollout = example.actor_rollout_ref.rollout
    assert (REPO_ROOT / rollout.multi_turn.function_tool_path).is_file()
    assert rollout.multi_turn.format in ToolParser._registry
    assert rollout.agent.default_agent_loop == "tool_agent"


def test_the_estimator_reads_its_options_from_the_examples_algorithm_node(configs):
    example, _ = configs
    specs = [
        Spec("q", ((2, 3), (2, 0)), 1.0, 0),
        Spec("q", ((2, 3), (2, 0)), 0.0, -1),
        Spec("q", ((3, 0),), 0.0, 0),
    ]
    config = OmegaConf.merge(example.algorithm, {"tspo": {"lam": 0.25}})
    advantages, _ = get_adv_estimator_fn("tspo")(**verl_batch(specs), config=config)
    expected = compute_advantages("tspo", lam=0.25, eps=1e-6, **algo_inputs(specs))
    assert torch.equal(advantages, expected)


def test_prepared_rows_carry_the_question_the_reward_function_needs(tmp_path, monkeypatch):
    source, out = tmp_path / "train.jsonl", tmp_path / "verl" / "train.parquet"
    write_flashrag_jsonl([QAExample("q1", "Capital of Australia?", ["Canberra"], "nq", {})], source)
    monkeypatch.setattr(sys, "argv", ["prepare_data.py", str(source), str(out)])
    runpy.run_path(str(EXAMPLE_DIR / "prepare_data.py"), run_name="__main__")
    (row,) = pq.read_table(out).to_pylist()
    assert row["extra_info"]["question"] == "Capital of Australia?"
    assert row["prompt"][0]["content"].endswith("Question: Capital of Australia?\n")
    result = compute_score(
        row["data_source"],
        "<search>capital</search>\n\n<information>Doc 1(Title: Canberra) Canberra</information>",
        row["reward_model"]["ground_truth"],
        row["extra_info"],
    )
    assert result["score"] == 4.0

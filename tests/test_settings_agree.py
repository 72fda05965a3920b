"""Settings that live in more than one place agree: a default changed in one copy fails here.

Each copy exists for a reason (``tspo.train.config`` must validate without importing torch;
``tspo.rollout``, ``tspo.algo`` and ``create_app`` are usable without a config; the CLI shows
defaults in ``--help``), so the copies are compared instead of merged. What is translated from
one to another (``RolloutSection.to_rollout_config``, ``rl_train_config``) goes by field name, so a
field added to one side is carried or fails here.
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from typing import Any

import pytest
from typer.main import get_command

from tspo.algo import BUILTIN_ESTIMATORS, DETECT_IN, first_occurrence_turn, policy_loss
from tspo.algo.advantages import DEFAULT_ALPHA, DEFAULT_EPS, DEFAULT_LAM
from tspo.algo.loss import AGG_MODES, KL_TYPES
from tspo.cli import app
from tspo.quickstart.pipeline import RunPaths, eval_rollout_config, rl_train_config
from tspo.quickstart.settings import RL_STAGE_OWN_FIELDS, PolicyStage, RLStage, WorldStage
from tspo.retrieval.server import ServerLimits, create_app
from tspo.rollout import RolloutConfig
from tspo.train import config as train_config
from tspo.train.config import (
    EVAL_ROLLOUT_FIELDS,
    AlgoConfig,
    ModelConfig,
    RolloutSection,
    TrainConfig,
    sections_of,
)
from tspo.train.sft import SFTConfig


def _keyword_defaults(fn: Any) -> dict[str, Any]:
    return {
        name: parameter.default
        for name, parameter in inspect.signature(fn).parameters.items()
        if parameter.default is not inspect.Parameter.empty
    }


def _flag_defaults(*words: str) -> dict[str, Any]:
    """Defaults of ``tspo <words…>``'s options, by parameter name."""
    command: Any = get_command(app)
    for word in words:
        command = command.commands[word]
    return {param.name: param.default for param in command.params}


def _literal_choices(model: type, field: str) -> tuple[str, ...]:
    return typing.get_args(model.model_fields[field].annotation)


def _differences(pairs: dict[str, tuple[Any, Any]]) -> dict[str, tuple[Any, Any]]:
    return {name: pair for name, pair in pairs.items() if pair[0] != pair[1]}


def test_rollout_config_and_the_trainer_sections_share_defaults() -> None:
    rollout = RolloutConfig()
    section = RolloutSection()
    shared = {f.name for f in dataclasses.fields(RolloutConfig)} & set(RolloutSection.model_fields)
    assert {"max_turns", "max_turn_tokens", "max_obs_tokens", "topk", "kv_cache"} <= shared
    pairs = {name: (getattr(rollout, name), getattr(section, name)) for name in sorted(shared)}
    algo = AlgoConfig()
    for name in ("detect_in", "min_answer_chars"):
        pairs[f"algo.{name}"] = (getattr(rollout, name), getattr(algo, name))
    assert not _differences(pairs), "RolloutConfig vs TrainConfig defaults (rollout, algo)"


def test_every_rollout_setting_comes_from_the_trainer_config() -> None:
    """Each RolloutConfig field is a field of the rollout or algo section, and is carried."""
    names = [f.name for f in dataclasses.fields(RolloutConfig)]
    missing = [n for n in names if n not in RolloutSection.model_fields | AlgoConfig.model_fields]
    assert not missing, "RolloutConfig fields the trainer config cannot set"
    algo = AlgoConfig(detect_in="both", min_answer_chars=4)
    section = RolloutSection(
        max_turns=2, max_turn_tokens=7, max_obs_tokens=9, topk=5, temperature=0.5, top_p=0.8,
        use_chat_template=True, kv_cache=False,
    )  # fmt: skip
    rollout = section.to_rollout_config(
        detect_in=algo.detect_in, min_answer_chars=algo.min_answer_chars
    )
    for name in names:
        owner = section if name in RolloutSection.model_fields else algo
        assert getattr(rollout, name) == getattr(owner, name), name
    greedy = section.to_rollout_config(EVAL_ROLLOUT_FIELDS)
    for name in names:
        source = section if name in EVAL_ROLLOUT_FIELDS else RolloutConfig()
        assert getattr(greedy, name) == getattr(source, name), name
    assert set(EVAL_ROLLOUT_FIELDS) <= set(names) & set(RolloutSection.model_fields)


def test_algo_config_defaults_are_the_functions_defaults() -> None:
    algo = AlgoConfig()
    loss = _keyword_defaults(policy_loss)
    folr = _keyword_defaults(first_occurrence_turn)
    pairs = {
        "alpha": (algo.alpha, DEFAULT_ALPHA),
        "lam": (algo.lam, DEFAULT_LAM),
        "eps": (algo.eps, DEFAULT_EPS),
        "detect_in": (algo.detect_in, folr["detect_in"]),
        "min_answer_chars": (algo.min_answer_chars, folr["min_answer_chars"]),
    }
    for name in ("clip_low", "clip_high", "kl_coef", "kl_type", "entropy_coef", "agg"):
        pairs[name] = (getattr(algo, name), loss[name])
    assert not _differences(pairs), "AlgoConfig vs tspo.algo function defaults"


def test_algo_config_choices_are_the_algo_choices() -> None:
    assert set(_literal_choices(AlgoConfig, "detect_in")) == set(DETECT_IN)
    assert set(_literal_choices(AlgoConfig, "kl_type")) == set(KL_TYPES)
    assert set(_literal_choices(AlgoConfig, "agg")) == set(AGG_MODES)


def test_the_torch_free_estimator_names_are_the_registry_builtins() -> None:
    assert tuple(train_config.BUILTIN_ESTIMATORS) == BUILTIN_ESTIMATORS
    assert _flag_defaults("compare")["estimators"] == ",".join(BUILTIN_ESTIMATORS)


def test_server_limits_create_app_and_serve_share_defaults() -> None:
    limits = dataclasses.asdict(ServerLimits())
    app_defaults = _keyword_defaults(create_app)
    serve = _flag_defaults("serve")
    pairs = {}
    for name, value in limits.items():
        pairs[f"create_app {name}"] = (value, app_defaults[name])
        pairs[f"tspo serve --{name.replace('_', '-')}"] = (value, serve[name])
    pairs["topk"] = (app_defaults["default_topk"], serve["topk"])
    assert not _differences(pairs), "ServerLimits vs create_app vs tspo serve"


def test_search_budgets_agree() -> None:
    """SFT cuts observations like the rollout; the server's default top-k is the rollout's."""
    pairs = {
        "max_obs_tokens": (SFTConfig().max_obs_tokens, RolloutConfig().max_obs_tokens),
        "topk": (_keyword_defaults(create_app)["default_topk"], RolloutConfig().topk),
    }
    assert not _differences(pairs), "SFTConfig / create_app vs RolloutConfig"


def test_sft_flags_are_the_policy_stage_defaults() -> None:
    flags = _flag_defaults("sft")
    sft, stage = SFTConfig(), PolicyStage()
    pairs = {
        "epochs": (flags["epochs"], sft.epochs),
        "epochs (--world)": (flags["epochs"], stage.sft.epochs),
        "batch_size": (flags["batch_size"], sft.batch_size),
        "max_obs_tokens": (flags["max_obs_tokens"], sft.max_obs_tokens),
        "topk": (flags["topk"], RolloutSection().topk),
        "bf16": (flags["bf16"], sft.bf16),
        "device": (flags["device"], ModelConfig().device),
        "seed": (flags["seed"], stage.seed),
        "seed (SFT)": (flags["seed"], sft.seed),
        "early_answer": (flags["early_answer"], stage.early_answer),
        "wrong_query": (flags["wrong_query"], stage.wrong_query),
        "practice_worlds": (flags["practice_worlds"], stage.practice_worlds),
    }
    assert not _differences(pairs), "tspo sft flags vs SFTConfig / PolicyStage"


@pytest.mark.parametrize(
    ("words", "flag", "expected"),
    [
        (("quickstart",), "estimator", RLStage().estimator),
        (("quickstart",), "base", PolicyStage().base),
        (("quickstart",), "size", WorldStage().size),
        (("data", "world"), "size", WorldStage().size),
    ],
)
def test_quickstart_flags_are_the_settings_defaults(
    words: tuple[str, ...], flag: str, expected: Any
) -> None:
    assert _flag_defaults(*words)[flag] == expected


# RLStage fields whose defaults are the trainer's (they must stay equal) and the quickstart's own
# choices for a tiny policy on a 2-core CPU (free to differ; docs/results.md says why).
RL_TRAINER_DEFAULTS = {"estimator", "alpha", "temperature", "max_turns", "topk", "seed"}
RL_QUICKSTART_CHOICES = {
    "steps", "prompts_per_step", "group_size", "lr", "kl_coef", "invalid_penalty", "top_p",
    "max_turn_tokens", "max_obs_tokens", "micro_batch_size",
}  # fmt: skip


def _rl_trainer_fields() -> dict[str, object]:
    return {
        name: value
        for name, value in dataclasses.asdict(RLStage()).items()
        if name not in RL_STAGE_OWN_FIELDS
    }


def test_every_rl_stage_field_is_classified() -> None:
    assert not RL_TRAINER_DEFAULTS & RL_QUICKSTART_CHOICES
    assert set(_rl_trainer_fields()) == RL_TRAINER_DEFAULTS | RL_QUICKSTART_CHOICES, (
        "a new RLStage field: add it to RL_TRAINER_DEFAULTS or RL_QUICKSTART_CHOICES"
    )


def test_rl_stage_defaults_that_are_the_trainers_agree() -> None:
    trainer = TrainConfig()
    pairs = {
        f"{section}.{name}": (value, getattr(getattr(trainer, section), name))
        for section, values in sections_of(_rl_trainer_fields()).items()
        for name, value in values.items()
        if name in RL_TRAINER_DEFAULTS
    }
    assert set(name.split(".")[1] for name in pairs) == RL_TRAINER_DEFAULTS
    assert not _differences(pairs), "RLStage vs TrainConfig defaults"


def test_rl_train_config_carries_every_rl_stage_field(tmp_path: Any) -> None:
    config = rl_train_config(RunPaths(tmp_path), RLStage(), output_dir=tmp_path / "rl")
    pairs = {
        f"{section}.{name}": (value, getattr(getattr(config, section), name))
        for section, values in sections_of(_rl_trainer_fields()).items()
        for name, value in values.items()
    }
    assert len(pairs) == len(_rl_trainer_fields())
    assert not _differences(pairs), "rl_train_config vs RLStage"
    rollout = eval_rollout_config(RLStage())
    for name in EVAL_ROLLOUT_FIELDS:
        assert getattr(rollout, name) == getattr(config.rollout, name), name


def test_sections_of_refuses_unknown_and_ambiguous_names() -> None:
    assert sections_of({"lr": 1e-5, "topk": 2}) == {"optim": {"lr": 1e-5}, "rollout": {"topk": 2}}
    for name in ("every", "no_such_field"):
        with pytest.raises(ValueError, match="exactly one section"):
            sections_of({name: 1})

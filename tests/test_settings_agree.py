"""Settings that live in more than one place agree: a default changed in one copy fails here.

Each copy exists for a reason (``tspo.train.config`` must validate without importing torch;
``tspo.rollout``, ``tspo.algo`` and ``create_app`` are usable without a config; the CLI shows
defaults in ``--help``), so the copies are compared instead of merged.
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
from tspo.quickstart.settings import PolicyStage, RLStage, WorldStage
from tspo.retrieval.server import ServerLimits, create_app
from tspo.rollout import RolloutConfig
from tspo.train import config as train_config
from tspo.train.config import AlgoConfig, RolloutSection
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
        "batch_size": (flags["batch_size"], sft.batch_size),
        "max_obs_tokens": (flags["max_obs_tokens"], sft.max_obs_tokens),
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

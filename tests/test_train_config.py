"""TrainConfig: YAML + dotted overrides, field-named errors, presets; LR schedule; data sampler."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st
from typer.testing import CliRunner

from tspo.errors import TSPOError
from tspo.train.config import TrainConfig, config_from_dict, load_config, parse_overrides
from tspo.train.optim import lr_factor
from tspo.train.sampler import PromptSampler

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_overrides_are_parsed_as_yaml_and_nested() -> None:
    tree = parse_overrides(["algo.estimator=grpo", "train.steps=2", "model.lora.enabled=true"])
    assert tree == {
        "algo": {"estimator": "grpo"},
        "train": {"steps": 2},
        "model": {"lora": {"enabled": True}},
    }
    config = load_config(None, ["data.train_files=[a.jsonl, b.parquet]", "optim.lr=3e-6"])
    assert config.data.train_files == ["a.jsonl", "b.parquet"] and config.optim.lr == 3e-6


def test_yaml_file_then_overrides(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("algo: {estimator: grpo, lam: 0.5}\ntrain: {steps: 9}\n")
    config = load_config(path, ["train.steps=2"])
    assert (config.algo.estimator, config.algo.lam, config.train.steps) == ("grpo", 0.5, 2)
    assert config.algo.kl_coef == 0.001 and config.algo.kl_type == "low_var_kl"  # defaults


def test_config_round_trips_through_yaml() -> None:
    config = load_config(None, ["algo.estimator=tspo_switch", "model.lora.r=4"])
    assert config_from_dict(yaml.safe_load(config.to_yaml())) == config


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("algo.estimator=nonsense", "algo.estimator"),
        ("algo.clip_low=1.5", "algo.clip_low"),
        ("algo.kl_type=k9", "algo.kl_type"),
        ("algo.agg=sum", "algo.agg"),
        ("algo.detect_in=nowhere", "algo.detect_in"),
        ("train.steps=0", "train.steps"),
        ("train.steps=many", "train.steps"),
        ("rollout.top_p=1.5", "rollout.top_p"),
        ("model.device=gpu", "model.device"),
        ("model.lora.r=0", "model.lora.r"),
        ("optim.schedule=exp", "optim.schedule"),
        ("algo.typo=1", "algo.typo"),
        ("nosection.x=1", "nosection"),
    ],
)
def test_invalid_values_name_the_field(override: str, field: str) -> None:
    with pytest.raises(TSPOError, match=f"field '{field}'"):
        load_config(None, [override])


def test_unknown_yaml_field_names_file_and_field(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("rollout:\n  group_sise: 4\n")
    with pytest.raises(TSPOError, match=r"bad\.yaml field 'rollout\.group_sise': unknown field"):
        load_config(path)


@pytest.mark.parametrize("override", ["noequals", "=3", "a..b=1", "train.steps=[unclosed"])
def test_malformed_overrides(override: str) -> None:
    with pytest.raises(TSPOError, match="override"):
        parse_overrides([override])


def test_runnable_checks_name_the_field() -> None:
    with pytest.raises(TSPOError, match="'data.train_files'"):
        TrainConfig().check_runnable()
    with pytest.raises(TSPOError, match="'retriever'"):
        load_config(None, ["data.train_files=q.jsonl"]).check_runnable()
    with pytest.raises(TSPOError, match="only one of"):
        load_config(None, ["retriever.url=http://x", "retriever.index=idx"])
    uneven = ["data.train_files=q.jsonl", "retriever.url=http://x", "train.mini_batch_size=3"]
    with pytest.raises(TSPOError, match="'train.mini_batch_size'"):
        load_config(None, uneven).check_runnable()


def test_cli_reports_config_errors_as_one_line(tmp_path: Path) -> None:
    from tspo.cli import app

    result = CliRunner().invoke(app, ["train", "algo.clip_high=-1"])
    assert isinstance(result.exception, TSPOError)
    assert "'algo.clip_high'" in str(result.exception)


@pytest.mark.parametrize("name", ["smollm2-wiki.yaml", "qwen2.5-3b-nq-hotpotqa.yaml"])
def test_presets_are_valid(name: str) -> None:
    config = load_config(CONFIGS / name)
    config.check_runnable()
    assert config.algo.estimator == "tspo"


def test_paper_preset_matches_the_search_r1_recipe() -> None:
    config = load_config(CONFIGS / "qwen2.5-3b-nq-hotpotqa.yaml")
    assert (config.rollout.group_size, config.rollout.max_turns, config.rollout.topk) == (5, 4, 3)
    assert (config.optim.lr, config.optim.warmup_ratio) == (1e-6, 0.285)
    assert (config.algo.kl_coef, config.algo.kl_type) == (0.001, "low_var_kl")
    assert config.train.prompts_per_step == 512
    assert config.train.mini_batch_size == 256 * config.rollout.group_size


def test_lr_schedule_warms_up_then_follows_its_shape() -> None:
    def factors(schedule: str) -> list[float]:
        return [
            lr_factor(s, total_steps=6, warmup=2, schedule=schedule, floor=0.1) for s in range(6)
        ]

    assert factors("constant") == [0.5, 1.0, 1.0, 1.0, 1.0, 1.0]
    assert factors("linear") == pytest.approx([0.5, 1.0, 1.0, 0.7, 0.4, 0.1])
    # cos(pi/3) = 0.5 and cos(2pi/3) = -0.5 on the two steps inside the decay.
    assert factors("cosine") == pytest.approx([0.5, 1.0, 1.0, 0.775, 0.325, 0.1])


@given(
    n_items=st.integers(1, 12),
    batch_size=st.integers(1, 7),
    split=st.integers(0, 6),
    shuffle=st.booleans(),
)
def test_sampler_covers_epochs_and_resumes_exactly(
    n_items: int, batch_size: int, split: int, shuffle: bool
) -> None:
    items = list(range(n_items))
    straight = PromptSampler(items, batch_size, seed=3, shuffle=shuffle)
    drawn = [straight.next_batch() for _ in range(7)]
    flat = [i for batch in drawn for i in batch]
    for epoch_start in range(0, len(flat) - n_items + 1, n_items):
        assert sorted(flat[epoch_start : epoch_start + n_items]) == items

    first = PromptSampler(items, batch_size, seed=3, shuffle=shuffle)
    head = [first.next_batch() for _ in range(split)]
    resumed = PromptSampler(items, batch_size, seed=3, shuffle=shuffle)
    resumed.load_state_dict(first.state_dict())
    assert head + [resumed.next_batch() for _ in range(7 - split)] == drawn


def test_sampler_refuses_a_changed_dataset() -> None:
    state = PromptSampler([1, 2, 3], 2, seed=0).state_dict()
    with pytest.raises(TSPOError, match="3 questions"):
        PromptSampler([1, 2], 2, seed=0).load_state_dict(state)


def _field_paths(model: type, prefix: str = "") -> list[str]:
    from pydantic import BaseModel

    paths = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            paths += _field_paths(annotation, f"{prefix}{name}.")
        else:
            paths.append(f"{prefix}{name}")
    return paths


def test_every_config_field_is_documented() -> None:
    reference = (CONFIGS.parent / "docs" / "training.md").read_text(encoding="utf-8")
    missing = [path for path in _field_paths(TrainConfig) if f"`{path}`" not in reference]
    assert not missing, f"docs/training.md lacks {missing}"

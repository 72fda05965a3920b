"""Trainer: steps run with finite losses, resume is exact, a killed save loses nothing, LoRA."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import MOVING, TinyWorld, build_tiny_world, single_thread, tiny_config

from tspo.train import checkpoint as checkpoint_module
from tspo.train.checkpoint import latest_checkpoint, list_checkpoints
from tspo.train.loop import CHECKPOINT_DIR, train


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    with single_thread():
        yield


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> TinyWorld:
    return build_tiny_world(tmp_path_factory.mktemp("world"))


def weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return load_file(checkpoint / "model.safetensors")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_four_steps_equal_two_steps_plus_resume(world: TinyWorld, tmp_path: Path) -> None:
    straight = train(tiny_config(world, tmp_path / "straight", "train.steps=4", *MOVING))

    first_half = train(
        tiny_config(world, tmp_path / "resumed", "train.steps=2", "checkpoint.every=2", *MOVING)
    )
    assert [m["step"] for m in first_half.metrics] == [1, 2]
    for metrics in first_half.metrics:
        assert math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"])
        assert metrics["optimizer_steps"] == 1
        assert metrics["num_trajectories"] == 4  # 2 questions x group of 2
    second_half = train(
        tiny_config(world, tmp_path / "resumed", "train.steps=4", "train.resume=auto", *MOVING)
    )
    assert [m["step"] for m in second_half.metrics] == [3, 4]
    assert second_half.final_step == 4

    resumed_weights = weights(second_half.last_checkpoint)
    straight_weights = weights(straight.last_checkpoint)
    initial = weights(world.model_dir)
    assert resumed_weights.keys() == straight_weights.keys()
    for name, value in straight_weights.items():
        assert torch.equal(resumed_weights[name], value), name
    assert any(not torch.equal(initial[n], v) for n, v in straight_weights.items())

    # The logs of the resumed run read as one run of four steps, with the same numbers.
    resumed_log = read_jsonl(tmp_path / "resumed" / "metrics.jsonl")
    straight_log = read_jsonl(tmp_path / "straight" / "metrics.jsonl")
    assert [m["step"] for m in resumed_log] == [1, 2, 3, 4]
    assert [m["loss"] for m in resumed_log] == [m["loss"] for m in straight_log]
    samples = read_jsonl(tmp_path / "resumed" / "samples.jsonl")
    assert len(samples) == 4 * 2 and {"response", "outcome", "first_hit_turn"} <= samples[0].keys()


def test_metrics_carry_the_diagnostics(world: TinyWorld, tmp_path: Path) -> None:
    result = train(tiny_config(world, tmp_path, "train.steps=1", "logging.tensorboard=true"))
    (logged,) = read_jsonl(tmp_path / "metrics.jsonl")
    expected = {
        "reward_mean", "reward_std", "hit_rate", "near_miss_rate", "zero_signal_groups_grpo",
        "zero_signal_groups", "first_hit_histogram", "turns_mean", "searches_mean",
        "response_tokens_mean", "kl_ref", "clip_frac", "entropy", "loss", "lr",
        "rollout_tokens_per_s", "update_tokens_per_s", "peak_rss_mb",
    }  # fmt: skip
    assert expected <= logged.keys()
    assert sum(logged["first_hit_histogram"].values()) == 4
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert result.last_checkpoint is not None


def test_killed_save_leaves_previous_checkpoint(
    world: TinyWorld, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tiny_config(world, tmp_path, "train.steps=1", "checkpoint.every=1")
    train(config)
    root = tmp_path / CHECKPOINT_DIR
    saved_step_one = weights(root / "step-00000001")

    def die_after_partial_writes(path, obj):  # the model and trainer state are on disk by now
        raise KeyboardInterrupt("killed while saving")

    monkeypatch.setattr(checkpoint_module, "write_json", die_after_partial_writes)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(world, tmp_path, "train.steps=2", "train.resume=auto"))
    monkeypatch.undo()

    # A hard kill would also leave the half-written folder behind: it must be ignored.
    stray = root / ".tmp-step-00000002-killed"
    stray.mkdir()
    (stray / "model.safetensors").write_bytes(b"half a file")
    assert list_checkpoints(root) == [root / "step-00000001"]
    assert latest_checkpoint(root) == root / "step-00000001"

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(root / "step-00000001")
    for name, value in saved_step_one.items():
        assert torch.equal(model.state_dict()[name], value)

    resumed = train(tiny_config(world, tmp_path, "train.steps=2", "train.resume=auto"))
    assert [m["step"] for m in resumed.metrics] == [2]
    assert not stray.exists()
    assert [p.name for p in list_checkpoints(root)] == ["step-00000001", "step-00000002"]


def test_keep_last_prunes_old_checkpoints(world: TinyWorld, tmp_path: Path) -> None:
    train(
        tiny_config(
            world, tmp_path, "train.steps=3", "checkpoint.every=1", "checkpoint.keep_last=2"
        )
    )
    root = tmp_path / CHECKPOINT_DIR
    assert [p.name for p in list_checkpoints(root)] == ["step-00000002", "step-00000003"]


def test_lora_trains_adapters_against_the_disabled_adapter_reference(
    world: TinyWorld, tmp_path: Path
) -> None:
    overrides = ("train.steps=1", "model.lora.enabled=true", "model.lora.r=4", *MOVING)
    result = train(tiny_config(world, tmp_path, *overrides))
    (metrics,) = result.metrics
    assert math.isfinite(metrics["loss"]) and math.isfinite(metrics["kl_ref"])
    assert (result.last_checkpoint / "adapter_config.json").is_file()
    adapters = load_file(result.last_checkpoint / "adapter_model.safetensors")
    assert adapters and all("lora_" in name for name in adapters)


def test_validation_runs_at_step_zero_every_n_steps_and_at_the_end(
    world: TinyWorld, tmp_path: Path
):
    out = tmp_path / "run"
    train(
        tiny_config(
            world,
            out,
            "train.steps=3",
            f"eval.files=[{world.qa}]",
            "eval.every=2",
            "eval.max_examples=3",
        )
    )
    rows = read_jsonl(out / "validation.jsonl")
    assert [row["step"] for row in rows] == [0, 2, 3]
    for row in rows:
        assert row["count"] == 3 and 0.0 <= row["em"] <= 1.0 and 0.0 <= row["invalid_rate"] <= 1.0
        assert sum(source["count"] for source in row["by_source"].values()) == 3


def test_validation_needs_files(world: TinyWorld, tmp_path: Path):
    from tspo.errors import TSPOError

    with pytest.raises(TSPOError, match="eval.files"):
        train(tiny_config(world, tmp_path / "run", "eval.every=2"))


def test_format_penalty_lowers_the_reward_of_trajectories_with_an_invalid_turn():
    from tspo.rollout.batch import Trajectory
    from tspo.train.loop import shaped_outcome

    def trajectory(generated: list[str]) -> Trajectory:
        return Trajectory("q", "q?", ["x"], "src", 0, generated=generated)

    class Batch:
        outcome = torch.tensor([1.0, 1.0, 0.0])
        trajectories = [
            trajectory(["<answer> x </answer>"]),
            trajectory(["<answer> x </search>", "<answer> x </answer>"]),
            trajectory(["<search> q </search>", "<answer> y </answer>"]),
        ]

    assert shaped_outcome(Batch, 0.0) is Batch.outcome
    assert shaped_outcome(Batch, 0.5).tolist() == [1.0, 0.5, 0.0]


def test_bf16_auto_follows_the_hardware():
    from contextlib import nullcontext

    from tspo.train.forward import autocast_context, cpu_has_native_bf16

    cpu = torch.device("cpu")
    assert isinstance(autocast_context(cpu, False), nullcontext)
    assert isinstance(autocast_context(cpu, True), torch.autocast)
    auto = autocast_context(cpu, "auto")
    assert isinstance(auto, torch.autocast) == cpu_has_native_bf16()


@pytest.mark.parametrize("release", [False, True])
def test_release_freed_memory_sets_the_heap_policy_of_a_cpu_run(
    world: TinyWorld, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, release: bool
) -> None:
    calls: list[str] = []
    monkeypatch.setattr(
        "tspo.train.loop.limit_heap_retention", lambda: calls.append("policy") or True
    )
    monkeypatch.setattr("tspo.train.loop.release_free_heap", lambda: calls.append("trim"))
    train(tiny_config(world, tmp_path, "train.steps=2", f"train.release_freed_memory={release}"))
    assert calls == (["policy", "trim", "trim"] if release else [])

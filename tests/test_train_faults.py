"""Trainer faults: an existing run is never overwritten, a dead or wrong retriever stops the run
in seconds with one line, the retriever token never reaches the disk, non-finite training stops
loudly.

The retriever tests run `tspo serve` as a real process on a free loopback port and the trainer
in this process through the CLI's `main` (so exit status and stderr are the user's). Every HTTP
client has a short timeout and few retries, so a hung server fails the test in seconds.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import shutil
import time
from pathlib import Path

import pytest
import torch
from fault_helpers import (
    ServeProcess,
    make_searching_model,
    run_cli,
    tree_hashes,
    write_config,
)
from retrieval_helpers import free_port
from safetensors.torch import load_file
from train_helpers import MOVING, TinyWorld, build_tiny_world, single_thread, tiny_config

from tspo.algo.advantages import ESTIMATORS
from tspo.retrieval.index import build_index
from tspo.train import loop as loop_module
from tspo.train import update as update_module
from tspo.train.checkpoint import checkpoint_problem, list_checkpoints, load_trainer_state
from tspo.train.loop import CHECKPOINT_DIR, train

SHORT_RETRIES = ("retriever.retries=2", "retriever.timeout=2")
TOKEN = "tok-9f3c1d5e-secret"


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    with single_thread():
        yield


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> TinyWorld:
    return build_tiny_world(tmp_path_factory.mktemp("world"))


@pytest.fixture(scope="module")
def searching_world(world: TinyWorld, tmp_path_factory: pytest.TempPathFactory) -> TinyWorld:
    folder = tmp_path_factory.mktemp("searching")
    return dataclasses.replace(world, model_dir=make_searching_model(world, folder / "model"))


@pytest.fixture(scope="module")
def index_dir(world: TinyWorld, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("index") / "bm25"
    return build_index(world.corpus, "bm25", out, show_progress=False)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return load_file(checkpoint / "model.safetensors")


def assert_same_weights(a: Path, b: Path) -> None:
    left, right = weights(a), weights(b)
    assert left.keys() == right.keys()
    for name, value in left.items():
        assert torch.equal(value, right[name]), name


def http_overrides(url: str) -> tuple[str, ...]:
    return ("retriever.corpus=null", f"retriever.url={url}", *SHORT_RETRIES)


# --- 1. An existing run is never overwritten ---


@pytest.mark.parametrize("left", ["whole run", "checkpoints only", "metrics only"])
def test_train_refuses_a_folder_holding_a_run(
    world: TinyWorld,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    left: str,
) -> None:
    out = tmp_path / "run"
    train(tiny_config(world, out, "train.steps=1", "checkpoint.every=1"))
    if left == "checkpoints only":
        for name in ("metrics.jsonl", "samples.jsonl"):
            (out / name).unlink()
    elif left == "metrics only":
        for folder in (out / CHECKPOINT_DIR).iterdir():
            shutil.rmtree(folder)
    before = tree_hashes(out)
    config = write_config(world, tmp_path / "run.yaml", out, "train.steps=2")

    import tspo.models.loading

    def no_model(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was loaded before the refusal")

    monkeypatch.setattr(tspo.models.loading, "load_policy", no_model)
    code, err = run_cli(["train", "--config", str(config)], capsys)
    assert code == 2
    assert len(err) == 1, err
    assert err[0].startswith(f"error: {out} already holds a run")
    assert "pass --resume auto" in err[0] and "choose a new train.output_dir" in err[0]
    assert tree_hashes(out) == before

    monkeypatch.undo()
    code, err = run_cli(["train", "--config", str(config), "--resume", "auto"], capsys)
    assert code == 0, err
    assert read_jsonl(out / "metrics.jsonl")[-1]["step"] == 2


def test_an_empty_or_unrelated_folder_is_fine(world: TinyWorld, tmp_path: Path) -> None:
    out = tmp_path / "run"
    (out / CHECKPOINT_DIR / ".tmp-step-00000001-stray").mkdir(parents=True)
    (out / "notes.txt").write_text("mine")
    result = train(tiny_config(world, out, "train.steps=1"))
    assert result.final_step == 1
    assert (out / "notes.txt").read_text() == "mine"


def test_pruning_never_deletes_the_checkpoint_just_written(
    world: TinyWorld, tmp_path: Path
) -> None:
    train(tiny_config(world, tmp_path, "train.steps=3", "checkpoint.every=1"))
    root = tmp_path / CHECKPOINT_DIR
    later = weights(root / "step-00000003")
    result = train(
        tiny_config(
            world,
            tmp_path,
            "train.steps=2",
            f"train.resume={root / 'step-00000001'}",
            "checkpoint.every=1",
            "checkpoint.keep_last=1",
        )
    )
    assert result.last_checkpoint == root / "step-00000002"
    # The new step 2 survives keep_last=1; the later step 3 (not ours to delete) stays too.
    assert [p.name for p in list_checkpoints(root)] == ["step-00000002", "step-00000003"]
    assert checkpoint_problem(root / "step-00000002") is None
    load_trainer_state(root / "step-00000002")
    for name, value in weights(root / "step-00000003").items():
        assert torch.equal(value, later[name])


def test_sft_refuses_a_non_empty_out_folder_without_overwrite(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "sft"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"earlier weights")
    before = tree_hashes(out)
    missing_world = tmp_path / "no-world"

    code, err = run_cli(["sft", "--world", str(missing_world), "--out", str(out)], capsys)
    assert code == 2
    assert err == [f"error: {out} already exists and is not empty; pass --overwrite to replace it"]
    assert tree_hashes(out) == before

    # With --overwrite (or an empty folder) the command goes on, here to the missing world.
    for args in (["--overwrite"], []):
        if not args:
            (out / "model.safetensors").unlink()
        code, err = run_cli(
            ["sft", "--world", str(missing_world), "--out", str(out), *args], capsys
        )
        assert code == 2 and len(err) == 1 and "already exists" not in err[0], err
        assert str(missing_world) in err[0]


# --- 2. A dead or wrong retriever ---


def test_killing_the_retriever_mid_run_stops_cleanly_and_resumes_exactly(
    searching_world: TinyWorld,
    index_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    server = ServeProcess(index_dir).start()
    try:
        overrides = (*http_overrides(server.url), "checkpoint.every=1", *MOVING)
        straight_cfg = write_config(
            searching_world, tmp_path / "a.yaml", tmp_path / "straight", "train.steps=4", *overrides
        )
        code, err = run_cli(["train", "--config", str(straight_cfg)], capsys)
        assert code == 0, err
        straight_log = read_jsonl(tmp_path / "straight" / "metrics.jsonl")
        assert all(m["searches_mean"] > 0 for m in straight_log)  # every step needs the server

        out = tmp_path / "killed"
        config = write_config(
            searching_world, tmp_path / "b.yaml", out, "train.steps=4", *overrides
        )
        save = loop_module.save_checkpoint
        killed_at: list[float] = []

        def save_then_kill_after_step_2(root, **kwargs):
            path = save(root, **kwargs)
            if kwargs["state"].step == 2:
                server.kill9()
                killed_at.append(time.monotonic())
            return path

        monkeypatch.setattr(loop_module, "save_checkpoint", save_then_kill_after_step_2)
        code, err = run_cli(["train", "--config", str(config)], capsys)
        seconds = time.monotonic() - killed_at[0]
        monkeypatch.undo()
        assert code == 2
        assert len(err) == 1, err
        url = f"{server.url}/retrieve"
        assert re.fullmatch(
            rf"error: retriever at {re.escape(url)} failed after 3 attempts; "
            r"last error: \w+Error: .+",
            err[0],
        ), err
        assert seconds < 60, seconds  # retries=2, timeout=2: ~2 s on a quiet machine

        assert [m["step"] for m in read_jsonl(out / "metrics.jsonl")] == [1, 2]
        root = out / CHECKPOINT_DIR
        assert [p.name for p in list_checkpoints(root)] == ["step-00000001", "step-00000002"]
        assert not list(root.glob(".tmp-*"))
        assert checkpoint_problem(root / "step-00000002") is None
        assert load_trainer_state(root / "step-00000002").step == 2
        from transformers import AutoModelForCausalLM

        AutoModelForCausalLM.from_pretrained(root / "step-00000002")

        server.start()  # the same port again
        code, err = run_cli(["train", "--config", str(config), "--resume", "auto"], capsys)
        assert code == 0, err
        assert_same_weights(
            root / "step-00000004", tmp_path / "straight" / CHECKPOINT_DIR / "step-00000004"
        )
        resumed_log = read_jsonl(out / "metrics.jsonl")
        assert [m["step"] for m in resumed_log] == [1, 2, 3, 4]
        assert [m["loss"] for m in resumed_log] == [m["loss"] for m in straight_log]
        print(f"\nkill -9 after step 2: exit 2 {seconds:.2f} s later")
    finally:
        server.stop()


def test_no_server_at_the_url_fails_before_the_model_loads(
    world: TinyWorld,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import tspo.models.loading

    def no_model(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was loaded before the retriever was checked")

    monkeypatch.setattr(tspo.models.loading, "load_policy", no_model)
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    out = tmp_path / "run"
    config = write_config(world, tmp_path / "run.yaml", out, *http_overrides(url))
    started = time.monotonic()
    code, err = run_cli(["train", "--config", str(config)], capsys)
    seconds = time.monotonic() - started
    assert code == 2
    assert len(err) == 1, err
    assert re.fullmatch(
        rf"error: retriever at {re.escape(url)}/health failed after 3 attempts; "
        r"last error: ConnectError: .+",
        err[0],
    ), err
    assert seconds < 60, seconds  # ~2 s on a quiet machine
    assert not out.exists()


@pytest.mark.parametrize(
    ("token", "path", "message"),
    [
        ("wrong", "", r"refused the token \(HTTP 401\): invalid bearer token; set retriever.token"),
        (None, "", r"refused the token \(HTTP 401\): missing bearer token"),
        (TOKEN, "/elsewhere", r"no retriever at .*/elsewhere/retrieve \(HTTP 404"),
    ],
    ids=["wrong token", "no token", "wrong path"],
)
def test_a_wrong_token_or_path_fails_before_the_model_loads(
    world: TinyWorld,
    index_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    token: str | None,
    path: str,
    message: str,
) -> None:
    import tspo.models.loading

    def no_model(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was loaded before the retriever was checked")

    monkeypatch.setattr(tspo.models.loading, "load_policy", no_model)
    monkeypatch.delenv("TSPO_RETRIEVER_TOKEN", raising=False)
    with ServeProcess(index_dir, "--token", TOKEN) as server:
        config = write_config(
            world, tmp_path / "run.yaml", tmp_path / "run", *http_overrides(server.url + path)
        )
        args = ["train", "--config", str(config)]
        if token is not None:
            args.append(f"retriever.token={token}")
        code, err = run_cli(args, capsys)
    assert code == 2
    assert len(err) == 1 and re.search(message, err[0]), err
    assert TOKEN not in err[0]


# --- 3. The retriever token never reaches the disk ---


def test_the_retriever_token_is_never_written_and_resume_reads_it_from_the_environment(
    searching_world: TinyWorld,
    index_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("TSPO_RETRIEVER_TOKEN", raising=False)
    out = tmp_path / "run"
    with ServeProcess(index_dir, "--token", TOKEN) as server:
        config = write_config(
            searching_world,
            tmp_path / "run.yaml",
            out,
            *http_overrides(server.url),
            "checkpoint.every=1",
            "logging.tensorboard=true",
        )
        code, err = run_cli(["train", "--config", str(config), f"retriever.token={TOKEN}"], capsys)
        assert code == 0, err
        files = sorted(p for p in out.rglob("*") if p.is_file())
        assert len(files) > 10 and (out / "config.yaml") in files
        leaked = [p for p in files if TOKEN.encode() in p.read_bytes()]
        assert not leaked, leaked

        monkeypatch.setenv("TSPO_RETRIEVER_TOKEN", TOKEN)
        code, err = run_cli(
            ["train", "--config", str(config), "--resume", "auto", "train.steps=3"], capsys
        )
        assert code == 0, err
    log = read_jsonl(out / "metrics.jsonl")
    assert [m["step"] for m in log] == [1, 2, 3]
    assert log[-1]["searches_mean"] > 0  # the resumed step searched with the token from the env
    leaked = [p for p in out.rglob("*") if p.is_file() and TOKEN.encode() in p.read_bytes()]
    assert not leaked, leaked


# --- 5. Non-finite training stops loudly ---


def _poison_one_parameter(monkeypatch: pytest.MonkeyPatch) -> None:
    build = loop_module.build_policy

    def build_with_a_nan(*args, **kwargs):
        policy = build(*args, **kwargs)
        with torch.no_grad():
            policy.model.get_parameter("model.norm.weight")[0] = math.nan
        return policy

    monkeypatch.setattr(loop_module, "build_policy", build_with_a_nan)


def test_a_nan_parameter_skips_updates_then_stops_after_max_skipped_steps(
    world: TinyWorld,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _poison_one_parameter(monkeypatch)
    out = tmp_path / "run"
    config = write_config(world, tmp_path / "run.yaml", out, "train.steps=6", "checkpoint.every=10")
    code, err = run_cli(["train", "--config", str(config)], capsys)
    assert code == 2
    warnings = [line for line in err if line.startswith("warning:")]
    errors = [line for line in err if line.startswith("error:")]
    assert len(warnings) == 3 and len(errors) == 1 and len(err) == 4, err
    for step, line in enumerate(warnings, start=1):
        assert line.startswith(f"warning: step {step}: skipped 1 of 1 optimizer update(s)")
    assert errors[0] == (
        "error: step 3: 3 steps in a row skipped their optimizer update (parameter "
        "model.norm.weight holds NaN or inf; train.max_skipped_steps=3); stopping"
    )
    log = read_jsonl(out / "metrics.jsonl")
    assert [(m["step"], m["skipped_optimizer_steps"]) for m in log] == [(1, 1), (2, 1), (3, 1)]
    assert not (out / CHECKPOINT_DIR).exists()


def test_a_checkpoint_with_a_nan_is_never_written(
    world: TinyWorld,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    out = tmp_path / "run"
    train(tiny_config(world, out, "train.steps=1", "checkpoint.every=1"))
    before = tree_hashes(out / CHECKPOINT_DIR)
    _poison_one_parameter(monkeypatch)
    config = write_config(world, tmp_path / "run.yaml", out, "train.steps=3", "checkpoint.every=1")
    code, err = run_cli(["train", "--config", str(config), "--resume", "auto"], capsys)
    assert code == 2
    assert err[-1].startswith(
        "error: step 2: parameter model.norm.weight holds NaN or inf; not writing checkpoint "
    ), err
    assert len(err) == 2 and err[0].startswith("warning: step 2: skipped"), err
    assert tree_hashes(out / CHECKPOINT_DIR) == before  # only the finite step 1, untouched


def _nan_loss_on_update(monkeypatch: pytest.MonkeyPatch, poisoned: set[int]) -> None:
    """Make the loss NaN in the ``poisoned`` calls (1-based) of the PPO update."""
    real_update, real_loss = loop_module.ppo_update, update_module.policy_loss
    calls = [0]

    def nan_loss(*args, **kwargs):
        loss, metrics = real_loss(*args, **kwargs)
        return loss * math.nan, metrics

    def update(*args, **kwargs):
        calls[0] += 1
        if calls[0] in poisoned:
            with pytest.MonkeyPatch.context() as patch:
                patch.setattr(update_module, "policy_loss", nan_loss)
                return real_update(*args, **kwargs)
        return real_update(*args, **kwargs)

    monkeypatch.setattr(loop_module, "ppo_update", update)


def test_a_nan_loss_skips_one_update_and_the_run_goes_on(
    world: TinyWorld,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _nan_loss_on_update(monkeypatch, {2})
    out = tmp_path / "run"
    config = write_config(
        world, tmp_path / "run.yaml", out, "train.steps=4", "checkpoint.every=1", *MOVING
    )
    code, err = run_cli(["train", "--config", str(config)], capsys)
    assert code == 0, err
    assert [line for line in err if line.startswith("warning:")] == [
        "warning: step 2: skipped 1 of 1 optimizer update(s): the gradient norm is not finite "
        "(1 step(s) in a row)"
    ]
    log = read_jsonl(out / "metrics.jsonl")
    assert [m["skipped_optimizer_steps"] for m in log] == [0, 1, 0, 0]
    assert log[1]["loss"] is None  # NaN is logged as null
    for checkpoint in list_checkpoints(out / CHECKPOINT_DIR):
        assert all(bool(torch.isfinite(v).all()) for v in weights(checkpoint).values())

    # Two NaN losses in a row with max_skipped_steps=2: the run stops at the second.
    monkeypatch.undo()
    _nan_loss_on_update(monkeypatch, {2, 3})
    config = write_config(
        world, tmp_path / "b.yaml", tmp_path / "b", "train.steps=4", "train.max_skipped_steps=2"
    )
    code, err = run_cli(["train", "--config", str(config)], capsys)
    assert code == 2
    assert err[-1].startswith("error: step 3: 2 steps in a row skipped their optimizer update"), err


def test_a_non_finite_advantage_is_an_error_naming_the_step(
    world: TinyWorld,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def nan_estimator(batch, **options):
        return torch.full((len(batch.outcome), batch.num_turns), math.nan, dtype=torch.float64)

    monkeypatch.setitem(ESTIMATORS, "nan_test", nan_estimator)
    out = tmp_path / "run"
    config = write_config(world, tmp_path / "run.yaml", out, "algo.estimator=nan_test")
    code, err = run_cli(["train", "--config", str(config)], capsys)
    assert code == 2
    assert len(err) == 1, err
    assert re.fullmatch(
        r"error: step 1: the 'nan_test' estimator gave \d+ non-finite advantage\(s\); "
        r"stopping before the update",
        err[0],
    ), err
    assert not (out / "metrics.jsonl").exists()

"""Damaged checkpoints, a full disk and durable saves.

A damaged newest checkpoint (zeroed, truncated or garbled ``trainer_state.pt``, garbled weights of
the same size, a key missing from ``tspo_state.json``) is passed over with a warning by
``--resume auto``, which resumes exactly from the previous one; with no whole checkpoint left, or
when named by path, it is one ``error:`` line naming the file. A disk that fills up during a save is
one line and leaves the previous checkpoint loadable. Saves fsync every file and folder before the
rename that publishes them.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from fault_helpers import run_cli, tree_hashes, write_config
from safetensors.torch import load_file
from train_helpers import MOVING, TinyWorld, build_tiny_world, single_thread, tiny_config

from tspo.errors import TSPOError
from tspo.train import checkpoint as checkpoint_module
from tspo.train.checkpoint import (
    checkpoint_problem,
    list_checkpoints,
    load_trainer_state,
    resolve_resume,
)
from tspo.train.loop import CHECKPOINT_DIR, train
from tspo.train.run_log import RunLog


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    with single_thread():
        yield


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> TinyWorld:
    return build_tiny_world(tmp_path_factory.mktemp("world"))


@pytest.fixture(scope="module")
def two_steps(world: TinyWorld, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A pristine run of two steps with a checkpoint after each; copy it before damaging it."""
    out = tmp_path_factory.mktemp("two-steps") / "run"
    train(tiny_config(world, out, "train.steps=2", "checkpoint.every=1", *MOVING))
    return out


def copy_run(source: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(source, out)
    return out


def weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return load_file(checkpoint / "model.safetensors")


def zero(path: Path) -> None:
    path.write_bytes(b"\0" * path.stat().st_size)


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def garble(path: Path) -> None:
    """Flip 64 bytes in the middle: same size, and a zip reader may not notice."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(b ^ 0xFF for b in data[middle : middle + 64])
    path.write_bytes(bytes(data))


def drop_key(key: str):
    def damage(path: Path) -> None:
        state = json.loads(path.read_text())
        del state[key]
        path.write_text(json.dumps(state))

    return damage


DAMAGES = {
    "zeroed trainer_state.pt": ("trainer_state.pt", zero),
    "truncated trainer_state.pt": ("trainer_state.pt", truncate),
    "garbled trainer_state.pt": ("trainer_state.pt", garble),
    "garbled model.safetensors": ("model.safetensors", garble),
    "tspo_state.json without step": ("tspo_state.json", drop_key("step")),
    "tspo_state.json without sampler": ("tspo_state.json", drop_key("sampler")),
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_resume_auto_passes_over_a_damaged_newest_checkpoint(
    world: TinyWorld,
    two_steps: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    damage: str,
) -> None:
    out = copy_run(two_steps, tmp_path)
    root = out / CHECKPOINT_DIR
    name, hurt = DAMAGES[damage]
    hurt(root / "step-00000002" / name)
    config = write_config(
        world, tmp_path / "run.yaml", out, "train.steps=2", "checkpoint.every=1", *MOVING
    )
    code, err = run_cli(["train", "--config", str(config), "--resume", "auto"], capsys)
    assert code == 0, err
    (warning,) = [line for line in err if line.startswith("warning:")]
    assert warning.startswith("warning: checkpoint step-00000002 is damaged: ")
    assert str(root / "step-00000002" / name) in warning
    assert warning.endswith("; resuming from step-00000001 instead")
    assert not any("Traceback" in line or line.startswith("error:") for line in err)
    # Step 2 was trained again from step 1: the same weights as the first time.
    assert checkpoint_problem(root / "step-00000002") is None
    redone, original = (
        weights(root / "step-00000002"),
        weights(two_steps / CHECKPOINT_DIR / "step-00000002"),
    )
    for key, value in original.items():
        assert torch.equal(redone[key], value), key
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]


@pytest.mark.parametrize("damage", ["zeroed trainer_state.pt", "tspo_state.json without step"])
def test_no_whole_checkpoint_left_is_one_line_naming_the_file(
    world: TinyWorld,
    two_steps: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    damage: str,
) -> None:
    out = copy_run(two_steps, tmp_path)
    root = out / CHECKPOINT_DIR
    name, hurt = DAMAGES[damage]
    for folder in list_checkpoints(root):
        hurt(folder / name)
    before = tree_hashes(out)
    config = write_config(world, tmp_path / "run.yaml", out, "train.steps=3")
    code, err = run_cli(["train", "--config", str(config), "--resume", "auto"], capsys)
    assert code == 2
    assert len(err) == 1, err
    assert err[0].startswith(f"error: no whole checkpoint to resume from in {root}: ")
    assert str(root / "step-00000002" / name) in err[0]
    assert tree_hashes(out) == before

    # Named by path: refused at once, naming the file.
    folder = root / "step-00000001"
    code, err = run_cli(["train", "--config", str(config), "--resume", str(folder)], capsys)
    assert code == 2
    assert len(err) == 1 and err[0].startswith(f"error: checkpoint {folder} is damaged: "), err
    assert str(folder / name) in err[0]


def test_a_checkpoint_without_hashes_is_still_checked_when_loaded(
    two_steps: Path, tmp_path: Path
) -> None:
    """Checkpoints written before hashes were recorded: torch.load's failure is one line."""
    out = copy_run(two_steps, tmp_path)
    folder = out / CHECKPOINT_DIR / "step-00000002"
    state_path = folder / "tspo_state.json"
    state = json.loads(state_path.read_text())
    del state["files"]
    state_path.write_text(json.dumps(state))
    assert checkpoint_problem(folder) is None
    assert load_trainer_state(folder).step == 2
    for hurt in (zero, truncate):
        hurt(folder / "trainer_state.pt")
        with pytest.raises(TSPOError, match=r"checkpoint file .*trainer_state.pt cannot be read"):
            load_trainer_state(folder)
    torch.save({"optimizer": {}}, folder / "trainer_state.pt")
    with pytest.raises(TSPOError, match=r"trainer_state.pt lacks scheduler, sampler"):
        load_trainer_state(folder)
    assert resolve_resume(str(folder), folder.parent) == folder


def _disk_full(*args: object, **kwargs: object) -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("writer", ["torch.save", "safetensors"])
def test_a_full_disk_during_a_save_is_one_line_and_keeps_the_previous_checkpoint(
    world: TinyWorld,
    two_steps: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    writer: str,
) -> None:
    out = copy_run(two_steps, tmp_path)
    root = out / CHECKPOINT_DIR
    before = tree_hashes(root)
    if writer == "torch.save":
        monkeypatch.setattr(checkpoint_module.torch, "save", _disk_full)
    else:
        import transformers.modeling_utils

        monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", _disk_full)
    config = write_config(world, tmp_path / "run.yaml", out, "train.steps=3", *MOVING)
    code, err = run_cli(["train", "--config", str(config), "--resume", "auto"], capsys)
    monkeypatch.undo()
    assert code == 2
    assert err == [
        f"error: step 3: could not write checkpoint {root / 'step-00000003'}: "
        f"No space left on device [ENOSPC]; {root / 'step-00000002'} is intact"
    ]
    assert tree_hashes(root) == before  # no half checkpoint, no staging folder left
    assert checkpoint_problem(root / "step-00000002") is None

    # Once there is room again, the run resumes from step 2.
    code, err = run_cli(["train", "--config", str(config), "--resume", "auto"], capsys)
    assert code == 0, err
    assert [p.name for p in list_checkpoints(root)][-1] == "step-00000003"


def test_a_full_disk_while_logging_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = RunLog(tmp_path)

    class FullDisk:
        def __enter__(self):
            return self

        def __exit__(self, *exc: object) -> None:
            pass

        def write(self, text: str) -> None:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Path, "open", lambda self, *a, **k: FullDisk())
    with pytest.raises(TSPOError, match=r"cannot append to .*metrics.jsonl: No space left"):
        log.log_step({"step": 1}, [])


def test_a_save_fsyncs_files_and_folders_before_the_rename(
    world: TinyWorld, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    events: list[tuple[str, str]] = []
    real_fsync, real_rename = os.fsync, Path.rename

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def rename(self: Path, target: Path) -> Path:
        events.append(("rename", f"{self} -> {target}"))
        return real_rename(self, target)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(Path, "rename", rename)
    result = train(tiny_config(world, tmp_path, "train.steps=1"))
    monkeypatch.undo()

    final = result.last_checkpoint
    renames = [
        i
        for i, (kind, what) in enumerate(events)
        if kind == "rename" and what.endswith(f" -> {final}")
    ]
    assert len(renames) == 1
    publish = renames[0]
    staging = events[publish][1].split(" -> ")[0]
    synced_before = {what for kind, what in events[:publish] if kind == "fsync"}
    for path in final.rglob("*"):
        staged = f"{staging}/{path.relative_to(final).as_posix()}"
        assert staged in synced_before, staged
    assert staging in synced_before
    synced_after = {what for kind, what in events[publish:] if kind == "fsync"}
    assert str(final.parent) in synced_after

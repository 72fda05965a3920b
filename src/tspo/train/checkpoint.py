"""Checkpoints: a Hugging Face model folder plus everything needed to continue the run exactly.

Layout of ``<output_dir>/checkpoints/step-00000012/``:

- the model (``config.json``, ``model.safetensors``, or the LoRA adapter files) and the tokenizer,
  so ``AutoModelForCausalLM.from_pretrained(folder)`` loads the trained policy;
- ``trainer_state.pt``: optimizer, LR scheduler, every RNG state (Python, NumPy, torch CPU and
  CUDA, and the run's own generators) and the data position;
- ``config.yaml``: the run's config;
- ``tspo_state.json``: step, data position, and the size and SHA-256 of every other file; written
  last.

A checkpoint is written into a hidden temporary folder, fsynced and renamed into place, so a run
killed mid-save leaves at most a stray ``.tmp-…`` folder (never listed, removed by the next save)
and the previous checkpoints intact. A save that fails (a full disk) is a one-line
:class:`TSPOError` that names the previous checkpoint, which stays loadable. Weights or optimizer
state that are not finite are never written.

Resuming checks the checkpoint against the sizes and hashes in ``tspo_state.json`` first: with
``auto``, a damaged newest checkpoint is passed over (with a warning) for the newest whole one.
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from tspo.errors import TSPOError
from tspo.utils import atomic_directory, file_sha256, write_json

TRAINER_STATE_FILE = "trainer_state.pt"
STATE_FILE = "tspo_state.json"
CONFIG_FILE = "config.yaml"
_NAME = re.compile(r"^step-(\d+)$")
_STAGING_PREFIX = ".tmp-step-"
_STATE_KEYS = ("optimizer", "scheduler", "sampler", "generators", "rng")


def warn(message: str) -> None:
    """One ``warning: …`` line on stderr."""
    print(f"warning: {message}", file=sys.stderr, flush=True)


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def capture_rng_state() -> dict[str, Any]:
    """The global RNG states, as plain containers and tensors (safe for ``weights_only`` loads)."""
    # The legacy tuple (numpy's stub types the default call as a dict).
    np_state = cast("tuple[Any, ...]", np.random.get_state())
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (np_state[0], np_state[1].tolist(), *np_state[2:]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    python = state["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class TrainerState:
    """What a checkpoint restores besides the model weights."""

    step: int
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    sampler: dict[str, Any]
    generators: dict[str, torch.Tensor]
    rng: dict[str, Any]


def save_checkpoint(
    root: str | Path,
    *,
    model: Any,
    tokenizer: Any,
    state: TrainerState,
    config_yaml: str,
    keep_last: int,
) -> Path:
    """Write the checkpoint of ``state.step`` under ``root`` atomically; keep the newest
    ``keep_last`` checkpoints up to this step (never the one just written's later ones, never it).

    Raises :class:`TSPOError` (one line) when the weights or the optimizer state hold NaN or inf,
    and when the disk refuses a write; the previous checkpoints are then left as they were.
    """
    root = Path(root)
    final = root / checkpoint_name(state.step)
    bad = first_non_finite(model, state.optimizer)
    if bad is not None:
        raise TSPOError(
            f"step {state.step}: {bad} holds NaN or inf; not writing checkpoint {final} "
            "(resume from an earlier checkpoint, e.g. with a lower optim.lr)"
        )
    previous = latest_checkpoint(root)
    try:
        root.mkdir(parents=True, exist_ok=True)
        remove_stale_staging(root)
        prefix = f"{_STAGING_PREFIX}{state.step:08d}-"
        with atomic_directory(final, staging_prefix=prefix) as staging:
            model.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
            torch.save(
                {
                    "optimizer": state.optimizer,
                    "scheduler": state.scheduler,
                    "sampler": state.sampler,
                    "generators": state.generators,
                    "rng": state.rng,
                },
                staging / TRAINER_STATE_FILE,
            )
            (staging / CONFIG_FILE).write_text(config_yaml, encoding="utf-8")
            meta = {"step": state.step, "sampler": state.sampler, "files": _file_records(staging)}
            write_json(staging / STATE_FILE, meta)
    except Exception as err:  # noqa: BLE001 - only disk errors are turned into one line
        if not _is_disk_error(err):
            raise
        kept = f"{previous} is intact" if previous else "no earlier checkpoint exists"
        raise TSPOError(
            f"step {state.step}: could not write checkpoint {final}: {_describe(err)}; {kept}"
        ) from None
    prune_checkpoints(root, final, keep_last)
    return final


def prune_checkpoints(root: Path, kept: Path, keep_last: int) -> None:
    """Delete checkpoints older than ``kept`` beyond the newest ``keep_last`` (``kept`` counts).

    ``kept`` (just written) is never deleted, and neither are checkpoints of later steps: they
    belong to a run resumed from an earlier checkpoint, and are not ours to throw away.
    """
    step = _step_of(kept)
    older = [p for p in list_checkpoints(root) if _step_of(p) < step]
    for old in older[: max(len(older) - (keep_last - 1), 0)]:
        shutil.rmtree(old, ignore_errors=True)


def first_non_finite(model: Any, optimizer_state: dict[str, Any] | None = None) -> str | None:
    """The name of the first parameter (or optimizer state tensor) holding NaN or inf, or None."""
    for name, param in model.named_parameters():
        if param.is_floating_point() and not bool(torch.isfinite(param).all()):
            return f"parameter {name}"
    for index, entry in (optimizer_state or {}).get("state", {}).items():
        for key, value in entry.items():
            if (
                isinstance(value, torch.Tensor)
                and value.is_floating_point()
                and not bool(torch.isfinite(value).all())
            ):
                return f"optimizer state {key} of parameter #{index}"
    return None


def _file_records(folder: Path) -> dict[str, dict[str, Any]]:
    """Size and SHA-256 of every file under ``folder`` (relative POSIX paths)."""
    return {
        path.relative_to(folder).as_posix(): {
            "bytes": path.stat().st_size,
            "sha256": file_sha256(path),
        }
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def _is_disk_error(err: BaseException) -> bool:
    if isinstance(err, OSError):
        return True
    # safetensors reports I/O failures as its own error type, with the OS message inside.
    return type(err).__name__ == "SafetensorError" and "os error" in str(err).lower()


def _describe(err: BaseException) -> str:
    if isinstance(err, KeyError):
        return f"missing key {err}"
    if isinstance(err, OSError) and err.errno is not None:
        where = f" ({err.filename})" if err.filename else ""
        return f"{os.strerror(err.errno)} [{errno.errorcode.get(err.errno, err.errno)}]{where}"
    return " ".join(str(err).split()) or type(err).__name__


def _step_of(folder: Path) -> int:
    match = _NAME.match(folder.name)
    return int(match.group(1)) if match else -1


def remove_stale_staging(root: Path) -> None:
    """Delete temporary folders left by a save that never finished."""
    for stale in root.glob(f"{_STAGING_PREFIX}*"):
        shutil.rmtree(stale, ignore_errors=True)


def is_complete(folder: Path) -> bool:
    return (
        _NAME.match(folder.name) is not None
        and (folder / STATE_FILE).is_file()
        and (folder / TRAINER_STATE_FILE).is_file()
    )


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and is_complete(p)]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))  # type: ignore[union-attr]


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest complete checkpoint under ``root``, or None."""
    found = list_checkpoints(root)
    return found[-1] if found else None


def resolve_resume(resume: str | None, root: Path) -> Path | None:
    """``None`` -> None; ``auto`` -> the newest whole checkpoint or None; a path -> that checkpoint.

    Checkpoints are checked with :func:`checkpoint_problem` first. ``auto`` passes over damaged
    ones with a warning and resumes from the newest whole one; it raises :class:`TSPOError`
    naming the damaged file when none is whole. A damaged checkpoint given by path is refused.
    """
    if resume is None:
        return None
    if resume == "auto":
        problems: list[str] = []
        for folder in reversed(list_checkpoints(root)):
            problem = checkpoint_problem(folder)
            if problem is None:
                for damaged in problems:
                    warn(f"{damaged}; resuming from {folder.name} instead")
                return folder
            problems.append(f"checkpoint {folder.name} is damaged: {problem}")
        if problems:
            raise TSPOError(f"no whole checkpoint to resume from in {root}: {problems[0]}")
        return None
    folder = Path(resume)
    if not is_complete(folder):
        raise TSPOError(f"config field 'train.resume': {folder} is not a complete checkpoint")
    problem = checkpoint_problem(folder)
    if problem is not None:
        raise TSPOError(f"checkpoint {folder} is damaged: {problem}")
    return folder


def checkpoint_problem(folder: str | Path) -> str | None:
    """None when the checkpoint is whole, else what is wrong with it (naming the file).

    Reads ``tspo_state.json`` (step and data position present) and compares every file with the
    size and SHA-256 recorded there. Checkpoints written before hashes were recorded are only
    checked by :func:`load_trainer_state`.
    """
    folder = Path(folder)
    state_path = folder / STATE_FILE
    try:
        meta = json.loads(state_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        return f"{state_path} cannot be read ({_describe(err)})"
    if not isinstance(meta, dict):
        return f"{state_path} is not a JSON object"
    missing = [key for key in ("step", "sampler") if key not in meta]
    if missing:
        return f"{state_path} lacks {', '.join(repr(key) for key in missing)}"
    step = meta["step"]
    if isinstance(step, bool) or not isinstance(step, int) or step != _step_of(folder):
        return f"{state_path} names step {step!r}, not the folder's {_step_of(folder)}"
    files = meta.get("files")
    if files is None:
        return None
    if not isinstance(files, dict) or TRAINER_STATE_FILE not in files:
        return f"{state_path} has no valid 'files' record"
    for name, record in files.items():
        path = folder / name
        if not isinstance(record, dict) or not {"bytes", "sha256"} <= record.keys():
            return f"{state_path} has no valid 'files' record for {name}"
        if not path.is_file():
            return f"{path} is missing"
        size = path.stat().st_size
        if size != record["bytes"]:
            return f"{path} has {size} bytes, {record['bytes']} were written"
        if file_sha256(path) != record["sha256"]:
            return f"{path} does not match the SHA-256 recorded when it was written"
    return None


def load_trainer_state(folder: str | Path) -> TrainerState:
    """Read the non-model part of a checkpoint; a damaged one is a one-line TSPOError."""
    folder = Path(folder)
    path, state_path = folder / TRAINER_STATE_FILE, folder / STATE_FILE
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - zip, pickle, EOF and OS errors alike
        raise TSPOError(f"checkpoint file {path} cannot be read: {_describe(err)}") from None
    try:
        meta = json.loads(state_path.read_text(encoding="utf-8"))
        step = int(meta["step"])
    except (OSError, UnicodeDecodeError, ValueError, TypeError, KeyError) as err:
        raise TSPOError(f"checkpoint file {state_path} cannot be read: {_describe(err)}") from None
    missing = [key for key in _STATE_KEYS if not isinstance(saved, dict) or key not in saved]
    if missing:
        raise TSPOError(f"checkpoint file {path} lacks {', '.join(missing)}")
    return TrainerState(step=step, **{key: saved[key] for key in _STATE_KEYS})

"""Checkpoints: a Hugging Face model folder plus everything needed to continue the run exactly.

Layout of ``<output_dir>/checkpoints/step-00000012/``:

- the model (``config.json``, ``model.safetensors``, or the LoRA adapter files) and the tokenizer,
  so ``AutoModelForCausalLM.from_pretrained(folder)`` loads the trained policy;
- ``trainer_state.pt``: optimizer, LR scheduler, every RNG state (Python, NumPy, torch CPU and
  CUDA, and the run's own generators) and the data position;
- ``config.yaml``: the run's config;
- ``tspo_state.json``: step and data position, written last.

A checkpoint is written into a hidden temporary folder and renamed into place, so a run killed
mid-save leaves at most a stray ``.tmp-…`` folder (never listed, removed by the next save) and the
previous checkpoints intact.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tspo.errors import TSPOError
from tspo.utils import atomic_directory, write_json

TRAINER_STATE_FILE = "trainer_state.pt"
STATE_FILE = "tspo_state.json"
CONFIG_FILE = "config.yaml"
_NAME = re.compile(r"^step-(\d+)$")
_STAGING_PREFIX = ".tmp-step-"


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def capture_rng_state() -> dict[str, Any]:
    """The global RNG states, as plain containers and tensors (safe for ``weights_only`` loads)."""
    np_state = np.random.get_state()
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
    ``keep_last`` checkpoints."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(root)
    final = root / checkpoint_name(state.step)
    with atomic_directory(final, staging_prefix=f"{_STAGING_PREFIX}{state.step:08d}-") as staging:
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
        write_json(staging / STATE_FILE, {"step": state.step, "sampler": state.sampler})
    for old in list_checkpoints(root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


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
    """``None`` -> None; ``auto`` -> the newest checkpoint or None; a path -> that checkpoint."""
    if resume is None:
        return None
    if resume == "auto":
        return latest_checkpoint(root)
    folder = Path(resume)
    if not is_complete(folder):
        raise TSPOError(f"config field 'train.resume': {folder} is not a complete checkpoint")
    return folder


def load_trainer_state(folder: str | Path) -> TrainerState:
    """Read the non-model part of a checkpoint."""
    folder = Path(folder)
    try:
        saved = torch.load(folder / TRAINER_STATE_FILE, map_location="cpu", weights_only=True)
        meta = json.loads((folder / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, RuntimeError, ValueError) as err:
        raise TSPOError(f"checkpoint {folder} cannot be read: {err}") from None
    return TrainerState(
        step=int(meta["step"]),
        optimizer=saved["optimizer"],
        scheduler=saved["scheduler"],
        sampler=saved["sampler"],
        generators=saved["generators"],
        rng=saved["rng"],
    )

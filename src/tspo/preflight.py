"""Cheap checks that run before anything expensive: no torch import, no model load, no network.

Every long command (``tspo train``, ``eval``, ``quickstart``, ``compare``) checks what it can in
well under a second first, so a wrong path, model name, device or output folder is one
``error: …`` line (exit status 2) instead of a traceback after minutes of loading. Each function
raises :class:`tspo.errors.TSPOError` naming the field or flag given as ``label``.
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Iterable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from tspo.errors import TSPOError

RUN_FILES = ("metrics.jsonl", "samples.jsonl", "validation.jsonl")  # as in tspo.train.run_log


def model_name(name: str, label: str, *, tokenizer_only: bool = False) -> str:
    """The folder or cached hub id ``name`` stands for (aliases stay aliases, unconverted)."""
    from tspo.models.loading import ALIASES, resolve_model_path

    if name in ALIASES:
        return name
    try:
        return resolve_model_path(name, tokenizer_only=tokenizer_only)
    except TSPOError as err:
        raise TSPOError(f"{label}: {err}") from None


def _cpu_only_torch() -> bool:
    """True when the installed torch is a CPU-only build (checked without importing it)."""
    try:
        return "+cpu" in version("torch")
    except PackageNotFoundError:
        return False


def device(value: str, label: str) -> None:
    """Refuse a malformed device, and a CUDA device on a CPU-only torch build."""
    if not (
        value in ("auto", "cpu", "cuda") or (value.startswith("cuda:") and value[5:].isdigit())
    ):
        raise TSPOError(f"{label}: device {value!r}: expected auto, cpu, cuda or cuda:N")
    if value.startswith("cuda") and _cpu_only_torch():
        raise TSPOError(
            f"{label}: device {value!r} asked for, but this torch is a CPU-only build "
            "(use cpu or auto)"
        )


def _model_folder(name: str) -> Path | None:
    """The local folder of a model name, when there is one already (aliases included)."""
    from tspo.models.loading import TINY_BASE_ALIAS, tiny_base_path
    from tspo.models.smollm2 import ALIAS as SMOLLM2_ALIAS
    from tspo.models.smollm2 import cache_root

    if name == TINY_BASE_ALIAS:
        return tiny_base_path()
    if name == SMOLLM2_ALIAS:
        folder = cache_root() / SMOLLM2_ALIAS
        return folder if folder.is_dir() else None  # converted on first use; it has a template
    return Path(name) if Path(name).is_dir() else None


def chat_template(name: str, label: str) -> None:
    """Refuse a tokenizer folder that has no chat template (when one is asked for)."""
    folder = _model_folder(name)
    if folder is None or not (folder / "tokenizer_config.json").is_file():
        return  # a hub id in the cache, or a folder checked elsewhere
    if (folder / "chat_template.jinja").is_file() or (folder / "chat_template.json").is_file():
        return
    try:
        settings = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # the tokenizer load reports it
    if isinstance(settings, dict) and settings.get("chat_template"):
        return
    raise TSPOError(
        f"{label}: the tokenizer of {name} has no chat template; turn the chat template off "
        "(rollout.use_chat_template=false, or --no-chat-template)"
    )


def data_files(paths: Iterable[str | Path], label: str) -> None:
    """Every QA file exists and has a format we read."""
    for path in paths:
        path = Path(path)
        if not path.is_file():
            what = "a folder, not a file" if path.is_dir() else "no such file"
            raise TSPOError(f"{label}: {path}: {what}")
        if path.suffix not in (".jsonl", ".parquet"):
            raise TSPOError(f"{label}: {path}: expected a .jsonl (FlashRAG) or .parquet file")


def index_dir(path: str | Path, label: str) -> None:
    """``path`` is a finished index folder."""
    from tspo.retrieval.index import read_manifest

    path = Path(path)
    if not path.is_dir():
        raise TSPOError(f"{label}: no such folder {path}")
    if not (path / "manifest.json").is_file():
        raise TSPOError(
            f"{label}: {path} is not an index folder (no manifest.json); build one with "
            "tspo index build"
        )
    try:
        read_manifest(path)
    except TSPOError as err:
        raise TSPOError(f"{label}: {err}") from None


def corpus_file(path: str | Path, label: str) -> None:
    if not Path(path).is_file():
        raise TSPOError(f"{label}: no such file {path}")


def output_dir(path: str | Path, label: str) -> None:
    """``path`` is a folder (or can become one) that this process may write to."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise TSPOError(f"{label}: {path} is a file, not a folder")
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        raise TSPOError(f"{label}: cannot create {path}: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise TSPOError(f"{label}: cannot write to {existing} (permission denied)")


def empty_output(path: str | Path, overwrite: bool) -> None:
    """``path`` is absent or an empty folder, or ``--overwrite`` says to replace what it holds."""
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())) and not overwrite:
        raise TSPOError(f"{path} already exists and is not empty; pass --overwrite to replace it")


def fresh_run_folder(path: str | Path) -> None:
    """Refuse a folder that already holds a training run (mirrors ``refuse_existing_run``)."""
    path = Path(path)
    held = [name for name in RUN_FILES if (path / name).is_file()]
    checkpoints = path / "checkpoints"
    if checkpoints.is_dir() and any(p.name.startswith("step-") for p in checkpoints.iterdir()):
        held.append("checkpoints/")
    if held:
        raise TSPOError(
            f"{path} already holds a run ({', '.join(held)}); pass --resume auto "
            "(train.resume=auto) to continue it, or choose a new train.output_dir"
        )


def wandb_installed(label: str) -> None:
    if importlib.util.find_spec("wandb") is None:
        raise TSPOError(
            f"{label}: Weights & Biases is not installed; pip install 'tspo[wandb]' (or wandb)"
        )


def train_config(config: object) -> None:
    """Everything of a ``TrainConfig`` that can be checked before torch and the model load."""
    from tspo.train.config import TrainConfig

    assert isinstance(config, TrainConfig)
    config.check_runnable()
    data_files(config.data.train_files, "config field 'data.train_files'")
    data_files(config.eval.files, "config field 'eval.files'")
    if config.retriever.index:
        index_dir(config.retriever.index, "config field 'retriever.index'")
    if config.retriever.corpus:
        corpus_file(config.retriever.corpus, "config field 'retriever.corpus'")
    model_name(config.model.name, "config field 'model.name'")
    if config.model.tokenizer:
        model_name(config.model.tokenizer, "config field 'model.tokenizer'", tokenizer_only=True)
    device(config.model.device, "config field 'model.device'")
    if config.rollout.use_chat_template:
        chat_template(
            config.model.tokenizer or config.model.name, "config field 'rollout.use_chat_template'"
        )
    output_dir(config.train.output_dir, "config field 'train.output_dir'")
    resume = config.train.resume
    if resume is None:
        fresh_run_folder(config.train.output_dir)
    elif resume != "auto" and not Path(resume).is_dir():
        raise TSPOError(f"config field 'train.resume': no checkpoint folder {resume}")
    if config.logging.wandb:
        wandb_installed("config field 'logging.wandb'")

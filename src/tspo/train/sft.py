"""Supervised fine-tuning on multi-turn episodes, with the loss on the model's own tokens only.

An episode is a question, the text the agent generated each turn and the observation each search
returned. It is tokenised segment by segment, the way a rollout builds its sequence: the prompt,
then per turn the generated text (loss mask 1) and the ``<information>`` block (loss mask 0).
Prompt, observations and padding never enter the loss (docs/algorithm.md §1), so SFT teaches the
policy what to write, never to predict what the retriever returns."""

from __future__ import annotations

import math
import random
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tspo.errors import TSPOError
from tspo.protocol import (
    ANSWER_CLOSE,
    ANSWER_OPEN,
    PROTOCOL_TAGS,
    SEARCH_CLOSE,
    SEARCH_OPEN,
    build_prompt,
    truncate_to_tokens,
    wrap_information,
)
from tspo.utils import atomic_directory

ACTION_TAGS = (SEARCH_OPEN, SEARCH_CLOSE, ANSWER_OPEN, ANSWER_CLOSE)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from tspo.data.expert import ExpertTrajectory
    from tspo.data.qa import QAExample
    from tspo.retrieval.base import Retriever


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
    # Loss weight of the tokens of the action tags (<search>, </search>, <answer>, </answer>);
    # 1 = plain SFT. See action_tag_weights.
    action_tag_weight: float = 1.0
    # Start SFT by giving the protocol tags fresh, distinct embeddings
    # (tspo.models.embeddings.resample_token_embeddings): for a base that never saw them as
    # single tokens, as the shipped tiny base.
    resample_tag_embeddings: bool = False
    use_chat_template: bool = False
    bf16: bool | str = "auto"  # bf16 autocast (fp32 weights); auto: CUDA or a CPU with native bf16
    seed: int = 0


@dataclass(frozen=True)
class SFTExample:
    """One tokenised episode: ids and the loss weight of each token (0 off the tokens the model
    generated; 1 on them, or more on up-weighted action tags)."""

    input_ids: list[int]
    loss_mask: list[float]


def encode_episode(
    tokenizer: Any,
    question: str,
    generated: Sequence[str],
    observations: Sequence[str | None],
    *,
    max_obs_tokens: int = 500,
    use_chat_template: bool = False,
    action_tag_weight: float = 1.0,
) -> SFTExample:
    """Tokenise one episode; ``observations[k]`` follows ``generated[k]`` (None: no search).

    Generated tokens get loss weight 1, those of an action tag ``action_tag_weight``
    (:func:`action_tag_weights`); prompt and observations 0."""
    if len(generated) != len(observations):
        raise TSPOError(
            f"episode for {question!r}: {len(generated)} generations but "
            f"{len(observations)} observations"
        )
    prompt = build_prompt(question, tokenizer, use_chat_template=use_chat_template)
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    mask = [0.0] * len(ids)
    for text, observation in zip(generated, observations, strict=True):
        turn, weights = action_tag_weights(tokenizer, text, action_tag_weight)
        ids += turn
        mask += weights
        if observation is not None:
            block = wrap_information(truncate_to_tokens(observation, tokenizer, max_obs_tokens))
            obs = tokenizer.encode(block, add_special_tokens=False)
            ids += obs
            mask += [0.0] * len(obs)
    return SFTExample(ids, mask)


def action_tag_weights(tokenizer: Any, text: str, weight: float) -> tuple[list[int], list[float]]:
    """(token ids of ``text``, loss weight of each): ``weight`` on every token that overlaps an
    action tag (``<search>``, ``</search>``, ``<answer>``, ``</answer>``), 1 elsewhere.

    Why: the closing tag must repeat the opening one a few tokens back, but in expert episodes it
    is also predictable from the turn's content (a name read in a document is usually answered), so
    a small policy learns that shortcut instead, writes ``<search> Gesto </answer>`` and loses the
    turn. These few tokens carry little of a plain mean loss; up-weighting them, together with
    distinct tag embeddings (``SFTConfig.resample_tag_embeddings``), makes SFT learn the copy.
    The ids are exactly ``tokenizer.encode(text, add_special_tokens=False)``.
    """
    ids = tokenizer.encode(text, add_special_tokens=False)
    if weight == 1.0:
        return ids, [1.0] * len(ids)
    spans = [
        (match.start(), match.end())
        for tag in ACTION_TAGS
        for match in re.finditer(re.escape(tag), text)
    ]
    try:
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError:  # a slow (Python) tokenizer has no offsets
        raise TSPOError("action_tag_weight needs a fast tokenizer (with offsets)") from None
    if list(encoded["input_ids"]) != ids:
        raise TSPOError("action_tag_weight needs a tokenizer whose offsets match its encode()")
    weights = [
        weight if any(start < end_tag and begin < end for begin, end_tag in spans) else 1.0
        for start, end in encoded["offset_mapping"]
    ]
    return ids, weights


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


def model_loss(model: Any, batch: dict[str, Any]) -> Any:
    """:func:`masked_lm_loss` of ``model`` on a :func:`collate` batch.

    For a plain-head architecture (:func:`tspo.train.forward.plain_head`: SmolLM2, Qwen)
    only the positions that predict a loss token reach the output layer: the same value (tested)
    at a fraction of the cost when, as in search episodes, most tokens are prompt and
    observations. Other models go through their full forward pass.
    """
    import torch.nn.functional as F

    from tspo.train.forward import plain_head

    input_ids, weights_all = batch["input_ids"], batch["loss_mask"]
    split = plain_head(model)
    if split is None:
        logits = model(input_ids=input_ids, attention_mask=batch["attention_mask"]).logits
        return masked_lm_loss(logits, input_ids, weights_all)
    decoder, head = split
    hidden = decoder(input_ids=input_ids, attention_mask=batch["attention_mask"])[0]
    weights = weights_all[:, 1:]
    chosen = weights > 0
    logits = head(hidden[:, :-1][chosen])
    per_token = F.cross_entropy(logits.float(), input_ids[:, 1:][chosen], reduction="none")
    return (per_token * weights[chosen]).sum() / weights.sum().clamp(min=1.0)


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
                loss = model_loss(model, batch)
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


def single_token_ids(tokenizer: Any, texts: Sequence[str]) -> list[int]:
    """The id of each of ``texts``, each of which must be one token of ``tokenizer``."""
    ids = []
    for text in texts:
        encoded = tokenizer.encode(text, add_special_tokens=False)
        if len(encoded) != 1:
            raise TSPOError(f"{text!r} is {len(encoded)} tokens of this tokenizer, not one")
        ids += encoded
    return ids


def save_policy(
    model: Any, tokenizer: Any, out_dir: str | Path, *, info: dict[str, Any] | None = None
) -> Path:
    """Save model and tokenizer in Hugging Face format, atomically (temporary folder, rename).

    ``AutoModelForCausalLM.from_pretrained(out_dir)`` and ``AutoTokenizer.from_pretrained(out_dir)``
    load the result. ``info`` goes into the folder as ``tspo_sft.json`` (written before the rename,
    so its presence means the folder is complete).
    """
    from tspo.utils import write_json

    out = Path(out_dir)
    with atomic_directory(out) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if info is not None:
            write_json(staging / SFT_INFO_FILE, info)
    return out


SFT_INFO_FILE = "tspo_sft.json"


def sft_info(model_dir: str | Path) -> dict[str, Any] | None:
    """What ``tspo sft`` recorded in a folder it wrote (``tspo_sft.json``), else None."""
    import json

    path = Path(model_dir) / SFT_INFO_FILE
    if not path.is_file():
        return None
    try:
        loaded = json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        return None
    return loaded if isinstance(loaded, dict) else None


def wants_chat_template(tokenizer: Any, requested: bool | None) -> bool:
    """``requested`` when given; else True exactly when the tokenizer has a chat template (an
    instruct model). Asking for a template the tokenizer lacks is a user error."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if requested and not has_template:
        raise TSPOError("--chat-template: this tokenizer has no chat template")
    return has_template if requested is None else requested


def fine_tune_causal_lm(
    base: str,
    episodes: Sequence[Any],
    config: SFTConfig,
    out_dir: str | Path,
    *,
    device: str = "auto",
    lora: bool = False,
    info: dict[str, Any] | None = None,
    show_progress: bool = True,
) -> dict[str, Any]:
    """SFT of any Hugging Face causal LM (folder, offline hub id or alias) on expert episodes.

    ``episodes`` have ``example.question``, ``generated`` and ``observations`` (the experts'
    ``ExpertTrajectory``). Full fine-tuning by default; ``lora`` trains rank-16 adapters on the
    attention projections and merges them, so the output is a plain model folder either way.
    Weights stay float32; ``config.bf16`` sets bf16 autocast (``auto``: where the hardware has
    it). A progress bar with ETA goes to stderr. Returns what was recorded in ``tspo_sft.json``.
    """
    import time

    from tspo.models.embeddings import resample_token_embeddings
    from tspo.models.loading import load_policy
    from tspo.models.tiny import count_parameters
    from tspo.utils import apply_thread_policy, progress_bar, set_seed

    if not episodes:
        raise TSPOError("SFT needs at least one expert episode")
    set_seed(config.seed)
    model, tokenizer = load_policy(base, device=device)
    model_device = next(model.parameters()).device
    if model_device.type == "cpu":
        apply_thread_policy()
    if config.resample_tag_embeddings:
        resample_token_embeddings(
            model, single_token_ids(tokenizer, PROTOCOL_TAGS), seed=config.seed
        )
    if lora:
        model = _with_lora(model)
    examples = [
        encode_episode(
            tokenizer,
            episode.example.question,
            episode.generated,
            episode.observations,
            max_obs_tokens=config.max_obs_tokens,
            use_chat_template=config.use_chat_template,
            action_tag_weight=config.action_tag_weight,
        )
        for episode in episodes
    ]
    started = time.perf_counter()
    log_lines = LogLines("SFT", enabled=show_progress)
    with progress_bar(disable=not show_progress, stderr=True) as progress:
        task = progress.add_task("SFT", total=None)

        def on_step(step: int, total: int, loss: float) -> None:
            progress.update(task, completed=step, total=total, description=f"SFT (loss {loss:.3f})")
            log_lines.update(step, total, f"loss {loss:.3f}")

        losses = train_sft(model, examples, config, pad_id=tokenizer.pad_token_id, on_step=on_step)
    seconds = time.perf_counter() - started
    if lora:
        model = model.merge_and_unload()
    tokens = sum(len(e.input_ids) for e in examples)
    record = {
        **(info or {}),
        "base": base,
        "parameters": count_parameters(model),
        "vocab_size": len(tokenizer),
        "episodes": len(examples),
        "lora": lora,
        "use_chat_template": config.use_chat_template,
        "max_obs_tokens": config.max_obs_tokens,
        "epochs": config.epochs,
        "batch_size": config.batch_size,
        "lr": config.lr,
        "action_tag_weight": config.action_tag_weight,
        "resample_tag_embeddings": config.resample_tag_embeddings,
        "bf16": _bf16_used(model_device, config.bf16),
        "seed": config.seed,
        "steps": len(losses),
        "tokens_per_epoch": tokens,
        "loss_tokens_per_epoch": sum(sum(e.loss_mask) for e in examples),
        "loss_first": losses[0],
        "loss_last": sum(losses[-10:]) / len(losses[-10:]),
        "losses": [round(loss, 4) for loss in losses],
        "train_seconds": round(seconds, 1),
    }
    save_policy(model, tokenizer, out_dir, info=record)
    return record


class LogLines:
    """Progress as plain stderr lines (done/total, elapsed, ETA) every ``every`` seconds, for when
    stderr is not a terminal (``nohup … > log``), where a live progress bar shows nothing."""

    def __init__(self, label: str, *, enabled: bool = True, every: float = 30.0) -> None:
        import sys
        import time

        self.label = label
        self.enabled = enabled and not sys.stderr.isatty()
        self.every = every
        self.started = self.last = time.monotonic()

    def update(self, done: int, total: int | None, note: str = "") -> None:
        import sys
        import time

        now = time.monotonic()
        if not self.enabled or (now - self.last < self.every and done != total):
            return
        self.last = now
        elapsed = now - self.started
        eta = elapsed / done * (total - done) if total and done else None
        parts = [f"{self.label} {done}/{total if total is not None else '?'}", note]
        parts.append(f"elapsed {_clock(elapsed)}")
        if eta is not None:
            parts.append(f"ETA {_clock(eta)}")
        print(", ".join(part for part in parts if part), file=sys.stderr, flush=True)


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


def _bf16_used(device: Any, bf16: bool | str) -> bool:
    from contextlib import nullcontext

    from tspo.train.forward import autocast_context

    return not isinstance(autocast_context(device, bf16), nullcontext)


def _with_lora(model: Any) -> Any:
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise TSPOError("--lora needs the peft package (pip install peft)") from None
    config = LoraConfig(
        r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]
    )
    return get_peft_model(model, config)


def _play_wiki_expert(
    questions: list[QAExample],
    retriever: Retriever,
    tokenizer: PreTrainedTokenizerBase,
    episodes: int,
    *,
    topk: int,
    max_obs_tokens: int,
) -> tuple[list[ExpertTrajectory], int, dict[str, str]]:
    """The expert's first ``episodes`` episodes over ``questions`` in file order, how many
    questions that took, and why each skipped question was skipped (question id -> reason)."""
    from tspo.data.wiki_expert import run_wiki_expert

    played = 0
    solved: list[ExpertTrajectory] = []
    skipped: dict[str, str] = {}
    while len(solved) < episodes and played < len(questions):
        # Play about as many more questions as episodes are missing (plus a margin for skips).
        chunk = questions[played : played + max(64, int((episodes - len(solved)) * 1.25))]
        result = run_wiki_expert(
            chunk, retriever, tokenizer=tokenizer, topk=topk, max_obs_tokens=max_obs_tokens
        )
        played += len(chunk)
        solved += result.episodes
        skipped.update(result.skipped)
    if len(solved) > episodes:  # the questions after the last kept episode count as unplayed
        solved = solved[:episodes]
        last = solved[-1].example.id
        played = next(i for i, q in enumerate(questions) if q.id == last) + 1
    return solved, played, skipped


def wiki_sft(
    data_dir: str | Path,
    out_dir: str | Path,
    *,
    base: str,
    episodes: int,
    config: SFTConfig,
    use_chat_template: bool | None = None,
    topk: int = 3,
    index: str | Path | None = None,
    device: str = "auto",
    lora: bool = False,
    show_progress: bool = True,
    log: Callable[[str], None] = lambda line: None,
) -> dict[str, Any]:
    """SFT of any causal LM on expert episodes for the ``tspo data wiki`` training questions.

    The expert (:func:`tspo.data.wiki_expert.run_wiki_expert`) plays training questions in file
    order through BM25 over ``DATA/corpus.jsonl`` (or ``index``) with ``topk`` documents and
    ``config.max_obs_tokens`` tokens per observation, until it has ``episodes`` episodes; the
    questions it cannot answer are skipped and counted. ``use_chat_template=None`` uses the
    tokenizer's chat template when it has one. Writes the model folder with ``tspo_sft.json``.
    """
    from dataclasses import replace

    from tspo.data.qa import read_qa
    from tspo.models.loading import load_tokenizer
    from tspo.retrieval.index import open_retriever

    data_dir = Path(data_dir)
    train_file = data_dir / "train.jsonl"
    if not train_file.is_file():
        raise TSPOError(f"--data {data_dir}: no train.jsonl; run `tspo data wiki --out {data_dir}`")
    if episodes < 1:
        raise TSPOError("--episodes must be at least 1")
    corpus = data_dir / "corpus.jsonl"
    if index is None and not corpus.is_file():
        raise TSPOError(f"--data {data_dir}: no corpus.jsonl (or pass --index)")
    questions = read_qa(train_file)
    tokenizer = load_tokenizer(base)
    chat = wants_chat_template(tokenizer, use_chat_template)
    config = replace(config, use_chat_template=chat)
    with open_retriever(
        index=str(index) if index else None, corpus=None if index else str(corpus)
    ) as retriever:
        solved, played, skipped = _play_wiki_expert(
            questions,
            retriever,
            tokenizer,
            episodes,
            topk=topk,
            max_obs_tokens=config.max_obs_tokens,
        )
    reasons = Counter(skipped[q.id] for q in questions[:played] if q.id in skipped)
    by_kind = Counter(e.example.metadata.get("kind", "?") for e in solved)
    played_kind = Counter(q.metadata.get("kind", "?") for q in questions[:played])
    log(
        f"expert: {len(solved)} episodes from {played} training questions ("
        + ", ".join(f"{kind} {by_kind[kind]}/{played_kind[kind]}" for kind in sorted(played_kind))
        + f"); skipped {played - len(solved)}"
        + "".join(f"; {reason}: {count}" for reason, count in reasons.most_common())
    )
    info = {
        "data": str(data_dir),
        "questions_played": played,
        "episodes_by_kind": dict(by_kind),
        "questions_by_kind": dict(played_kind),
        "skipped": played - len(solved),
        "skip_reasons": dict(reasons),
        "topk": topk,
    }
    return fine_tune_causal_lm(
        base,
        solved,
        config,
        out_dir,
        device=device,
        lora=lora,
        info=info,
        show_progress=show_progress,
    )

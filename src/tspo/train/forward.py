"""Per-token log-probs of a response under a causal LM, and the batch they are computed on."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from tspo.rollout.batch import TokenBatch


@dataclass
class UpdateBatch(TokenBatch):
    """Everything the policy update needs, row-aligned: a rollout's `TokenBatch` fields plus
    ``advantages`` (B, T) and ``ref_logprobs`` (B, T), None when no reference model is used."""

    advantages: Tensor
    ref_logprobs: Tensor | None = None

    @classmethod
    def from_rollout(cls, rollout: TokenBatch, advantages: Tensor) -> UpdateBatch:
        """The update batch of ``rollout`` (its tensors, not copies) with ``advantages``."""
        return cls(**rollout.token_fields(), advantages=advantages)

    def _tensors(self) -> dict[str, Tensor]:
        return {
            f.name: value
            for f in fields(self)
            if isinstance(value := getattr(self, f.name), torch.Tensor)
        }

    def select(self, rows: Tensor) -> UpdateBatch:
        """The rows at ``rows`` ((N,) long)."""
        return replace(self, **{name: t[rows.to(t.device)] for name, t in self._tensors().items()})

    def trimmed(self) -> UpdateBatch:
        """Without prompt columns that are padding in every row (left) and response columns that
        are padding in every row (right): a micro-batch costs what its longest row costs."""
        prompt_used = self.prompt_mask.bool().any(dim=0).nonzero()
        first = int(prompt_used[0]) if len(prompt_used) else self.prompt_mask.shape[1]
        response_used = self.response_mask.bool().any(dim=0).nonzero()
        end = int(response_used[-1]) + 1 if len(response_used) else 0
        trimmed = {}
        for name, tensor in self._tensors().items():
            trimmed[name] = tensor[:, first:] if name.startswith("prompt_") else tensor[:, :end]
        return replace(self, **trimmed)


def position_ids(attention_mask: Tensor) -> Tensor:
    """(B, L) 0/1 mask -> (B, L) positions counting real tokens only (left padding gets 0)."""
    return (attention_mask.long().cumsum(dim=-1) - 1).clamp(min=0)


def response_logprobs(
    model: torch.nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    response_length: int,
    *,
    temperature: float = 1.0,
    with_entropy: bool = False,
    entropy_grad: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Log-probs (and optionally entropies) of the last ``response_length`` tokens.

    ``input_ids``/``attention_mask`` (B, P+T) with T = ``response_length`` -> (B, T) float32
    log-probs of each response token given everything before it, with logits divided by the
    sampling ``temperature``; entropies (B, T) of the same distributions, detached unless
    ``entropy_grad``. Only the T+1 last positions' logits are materialised.
    """
    if response_length == 0:
        empty = input_ids.new_zeros((input_ids.shape[0], 0), dtype=torch.float32)
        return empty, (empty if with_entropy else None)
    output = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids(attention_mask),
        logits_to_keep=response_length + 1,
        use_cache=False,
    )
    return token_logprobs(
        output.logits[:, :-1],
        input_ids[:, -response_length:],
        temperature=temperature,
        with_entropy=with_entropy,
        entropy_grad=entropy_grad,
    )


def token_logprobs(
    logits: Tensor,
    targets: Tensor,
    *,
    temperature: float = 1.0,
    with_entropy: bool = False,
    entropy_grad: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """(..., V) logits and (...) target ids -> (...) float32 log-probs of the targets under the
    logits divided by ``temperature``, and (...) entropies of the same distributions (detached
    unless ``entropy_grad``; None without ``with_entropy``)."""
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    normaliser = torch.logsumexp(logits, dim=-1)
    logprobs = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - normaliser
    if not with_entropy:
        return logprobs, None
    source = logits if entropy_grad else logits.detach()
    norm = normaliser if entropy_grad else normaliser.detach()
    return logprobs, norm - (torch.softmax(source, dim=-1) * source).sum(dim=-1)


def left_aligned(input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Each row's real tokens moved to the front, in order: (B, W) ids and, for every original
    column, its column in the new layout ((B, P+T); padding columns land past the row's end).

    W is the longest row's real length. With every row starting at column 0 and padding only at
    the end, a plain causal mask is exact for the real tokens (padding comes after them, so no
    real token attends to it) and position ids are just 0..W-1: the model needs no attention
    mask, and SDPA runs its causal kernel, which skips the masked upper triangle.
    """
    order = torch.sort(attention_mask.long().eq(0).long(), dim=1, stable=True).indices
    width = int(attention_mask.long().sum(dim=1).max())
    ids = input_ids.gather(1, order)[:, :width]
    where = torch.empty_like(order)
    where.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    return ids, where


def packed_logprobs(
    model: torch.nn.Module,
    batch: UpdateBatch,
    *,
    temperature: float = 1.0,
    with_entropy: bool = False,
    entropy_grad: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """`response_logprobs` of ``batch``'s responses, computed on left-aligned rows.

    The same (B, T) float32 log-probs (and entropies) as ``response_logprobs(model,
    batch.input_ids, batch.attention_mask, T)`` on the tokens of ``batch.loss_mask``, up to float
    rounding (tested in ``tests/test_train_update.py``); values on other columns (observations,
    padding) are 0 for a plain-head model and meaningless otherwise. The rows run through the
    model without padding in front and without an attention mask (see `left_aligned`). A
    plain-head model (`plain_head`) projects only the hidden states of loss tokens onto the
    vocabulary, in chunks (`head_logprobs`); another model's output layer runs from the earliest
    position that predicts a response token, and the normaliser is gathered at the target tokens.
    """
    width_t = batch.response_ids.shape[1]
    if width_t == 0:
        empty = batch.response_ids.new_zeros((len(batch), 0), dtype=torch.float32)
        return empty, (empty if with_entropy else None)
    ids, where = left_aligned(batch.input_ids, batch.attention_mask)
    # Column (in the new layout) of the logits that predict each response token.
    source = where[:, -width_t:] - 1
    split = plain_head(model)
    if split is not None:
        decoder, head = split
        hidden = decoder(input_ids=ids, use_cache=False)[0]  # (B, W, H)
        rows, cols = batch.loss_mask.bool().nonzero(as_tuple=True)
        picked_lp, picked_entropy = head_logprobs(
            hidden[rows, source[rows, cols]],
            batch.response_ids[rows, cols],
            head,
            temperature=temperature,
            with_entropy=with_entropy,
            entropy_grad=entropy_grad,
        )
        zeros = torch.zeros(batch.response_ids.shape, dtype=torch.float32, device=ids.device)
        logprobs = zeros.index_put((rows, cols), picked_lp)
        entropy = None if picked_entropy is None else zeros.index_put((rows, cols), picked_entropy)
        return logprobs, entropy
    first = int(batch.prompt_mask.long().sum(dim=1).min()) - 1
    first = max(first, 0)
    keep = ids.shape[1] - first
    output = model(input_ids=ids, logits_to_keep=keep, use_cache=False)
    logits = output.logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    index = (source - first).clamp_(0, keep - 1)  # padding columns point anywhere valid
    normaliser = torch.logsumexp(logits, dim=-1)  # (B, keep)
    targets = batch.response_ids
    flat = logits.reshape(-1, logits.shape[-1])
    rows = torch.arange(len(batch), device=ids.device)[:, None] * keep + index
    picked = flat[rows.reshape(-1), targets.reshape(-1)].view_as(targets)
    logprobs = picked - normaliser.gather(1, index)
    entropy = None
    if with_entropy:
        src = logits if entropy_grad else logits.detach()
        norm = normaliser if entropy_grad else normaliser.detach()
        full = norm - (torch.softmax(src, dim=-1) * src).sum(dim=-1)
        entropy = full.gather(1, index)
    return logprobs, entropy


# Architectures whose logits are exactly ``lm_head(last_hidden_state)`` (no soft-capping or
# scaling): for them only the positions that matter need reach the output layer, which skips most
# of the largest matrix product and the (B, L, V) logits tensor.
PLAIN_HEAD_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3"})

# Positions x vocabulary of the float32 logits one chunk of `head_logprobs` holds at once (128 MiB):
# ~680 generated tokens of SmolLM2 (49k vocabulary), so its preset's micro-batches (4 rows of at
# most 128) need one chunk and no recomputation; 33k tokens of the tiny policy (1k).
HEAD_CHUNK_ELEMENTS = 32 * 2**20


def plain_head(model: torch.nn.Module) -> tuple[Any, Any] | None:
    """(decoder, output layer) of a plain-head model (:data:`PLAIN_HEAD_MODEL_TYPES`, SmolLM2,
    Qwen and the tiny policy among them; LoRA-wrapped too), or None for other architectures."""
    config = getattr(model, "config", None)
    decoder = getattr(model, "get_decoder", None)
    head = getattr(model, "get_output_embeddings", None)
    if getattr(config, "model_type", None) not in PLAIN_HEAD_MODEL_TYPES:
        return None
    if decoder is None or head is None or head() is None:
        return None
    return decoder(), head()


def _head_chunk(
    hidden: Tensor,
    targets: Tensor,
    head: Any,
    temperature: float,
    with_entropy: bool,
    entropy_grad: bool,
) -> tuple[Tensor, Tensor]:
    """`token_logprobs` of ``head(hidden)``; tensors only (what `checkpoint` may return)."""
    logprobs, entropy = token_logprobs(
        head(hidden),
        targets,
        temperature=temperature,
        with_entropy=with_entropy,
        entropy_grad=entropy_grad,
    )
    return logprobs, (logprobs.new_zeros(()) if entropy is None else entropy)


def head_logprobs(
    hidden: Tensor,
    targets: Tensor,
    head: Any,
    *,
    temperature: float = 1.0,
    with_entropy: bool = False,
    entropy_grad: bool = False,
    chunk_elements: int = HEAD_CHUNK_ELEMENTS,
) -> tuple[Tensor, Tensor | None]:
    """Log-probs (and entropies) of ``targets`` under ``head``'s logits of ``hidden``, chunked.

    ``hidden`` (N, H) final hidden states, ``targets`` (N,) the tokens they predict -> (N,) float32
    log-probs with logits divided by ``temperature``, and (N,) entropies (detached unless
    ``entropy_grad``). About ``chunk_elements`` logits exist at a time: with gradients each chunk
    is recomputed in the backward pass instead of kept, so the (N, V) logits, their softmax and
    their gradient are never all in memory, whatever N is.
    """
    if len(hidden) == 0:
        empty = hidden.float().sum(dim=-1)  # (0,), still part of the graph
        return empty, (empty if with_entropy else None)
    rows = max(1, chunk_elements // head.weight.shape[0])
    checkpointed = torch.is_grad_enabled() and hidden.requires_grad and len(hidden) > rows
    logprob_parts, entropy_parts = [], []
    for start in range(0, len(hidden), rows):
        args = (hidden[start : start + rows], targets[start : start + rows], head, temperature)
        if checkpointed:
            logprobs, entropy = checkpoint(
                _head_chunk, *args, with_entropy, entropy_grad, use_reentrant=False
            )
        else:
            logprobs, entropy = _head_chunk(*args, with_entropy, entropy_grad)
        logprob_parts.append(logprobs)
        entropy_parts.append(entropy)
    logprobs = torch.cat(logprob_parts)
    return logprobs, (torch.cat(entropy_parts) if with_entropy else None)


def micro_logprobs(
    model: torch.nn.Module,
    micro: UpdateBatch,
    *,
    temperature: float,
    with_entropy: bool = False,
    entropy_grad: bool = False,
    packed: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """(B, T) log-probs (and entropies) of a trimmed micro-batch's responses, by the packed path
    (`packed_logprobs`) or the padded reference (`response_logprobs`)."""
    if packed:
        return packed_logprobs(
            model,
            micro,
            temperature=temperature,
            with_entropy=with_entropy,
            entropy_grad=entropy_grad,
        )
    return response_logprobs(
        model,
        micro.input_ids,
        micro.attention_mask,
        micro.response_ids.shape[1],
        temperature=temperature,
        with_entropy=with_entropy,
        entropy_grad=entropy_grad,
    )


def micro_batches(rows: Tensor, size: int) -> Iterator[Tensor]:
    """Consecutive chunks of ``rows`` ((N,) long) of at most ``size``."""
    for start in range(0, len(rows), size):
        yield rows[start : start + size]


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX), where autocast pays off."""
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def autocast_context(device: torch.device, bf16: bool | str) -> AbstractContextManager[Any]:
    """bf16 autocast (weights stay fp32) or full precision.

    ``bf16``: True forces autocast; False turns it off; ``"auto"`` uses it on CUDA and on CPUs
    with native bf16 (there it made training steps 1.6-2.9x faster), never on other CPUs, where
    emulated bf16 is slower than fp32.
    """
    if bf16 == "auto":
        bf16 = device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16())
    if bf16 and device.type in ("cuda", "cpu"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


@torch.no_grad()
def batch_logprobs(
    model: torch.nn.Module,
    batch: UpdateBatch,
    *,
    micro_batch_size: int,
    temperature: float,
    autocast: AbstractContextManager[Any] | None = None,
    packed: bool = True,
) -> Tensor:
    """(B, T) log-probs of every response token, computed in trimmed micro-batches, 0 on padding."""
    width = batch.response_ids.shape[1]
    result = torch.zeros(
        batch.response_ids.shape, dtype=torch.float32, device=batch.response_ids.device
    )
    for rows in micro_batches(torch.arange(len(batch)), micro_batch_size):
        micro = batch.select(rows).trimmed()
        length = micro.response_ids.shape[1]
        with autocast or nullcontext():
            logprobs, _ = micro_logprobs(model, micro, temperature=temperature, packed=packed)
        padded = torch.zeros((len(rows), width), dtype=torch.float32, device=result.device)
        padded[:, :length] = logprobs * micro.response_mask[:, :length]
        result[rows.to(result.device)] = padded
    return result

"""The frozen KL reference in bf16 (``model.ref_dtype``): less memory, the same log-probs.

With bf16 autocast on, the reference copy stores its linear layers' weights in bf16 (autocast
casts them to bf16 before every matmul anyway); the tied input embedding and the norms stay as
loaded. Its log-probs under autocast must match those of the float32 copy under autocast within
``TOLERANCE`` (in fact they are equal up to kernel rounding), and the policy itself must stay
float32 and trainable.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from train_helpers import TinyWorld, build_tiny_world, single_thread

from tspo.errors import TSPOError
from tspo.train.components import autocast_weights, build_policy
from tspo.train.config import ModelConfig
from tspo.train.forward import UpdateBatch, autocast_context, packed_logprobs

# Largest allowed |log p_bf16-ref - log p_fp32-ref| on any response token, both under autocast.
TOLERANCE = 1e-3


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> TinyWorld:
    return build_tiny_world(tmp_path_factory.mktemp("world"))


@pytest.fixture(scope="module")
def sharp_model_dir(world: TinyWorld, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The micro model with weights scaled up so its next-token distributions are far from
    uniform: rounding a weight then moves log-probs by an amount the tolerance can see."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(world.model_dir, dtype=torch.float32)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" not in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    folder = tmp_path_factory.mktemp("sharp")
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(world.model_dir).save_pretrained(folder)
    return folder


def _policy(model_dir: Path, ref_dtype: str, bf16: bool, resume: Path | None = None):  # noqa: ANN202
    config = ModelConfig(name=str(model_dir), device="cpu", ref_dtype=ref_dtype)  # type: ignore[arg-type]
    return build_policy(config, kl_coef=0.001, weights_from=resume, bf16=bf16)


def _batch(vocab: int, rows: int = 4, prompt: int = 12, response: int = 20) -> UpdateBatch:
    generator = torch.Generator().manual_seed(0)
    prompt_ids = torch.randint(3, vocab, (rows, prompt), generator=generator)
    response_ids = torch.randint(3, vocab, (rows, response), generator=generator)
    prompt_mask = torch.ones_like(prompt_ids)
    prompt_mask[1, :4] = 0  # a left-padded prompt
    response_mask = torch.ones_like(response_ids)
    response_mask[2, 15:] = 0  # a shorter response
    return UpdateBatch(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        response_ids=response_ids,
        response_mask=response_mask,
        loss_mask=response_mask.float(),
        old_logprobs=torch.zeros(rows, response),
        advantages=torch.zeros(rows, response),
    )


def _param_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _reference_logprobs(policy, batch: UpdateBatch, autocast: bool) -> torch.Tensor:  # noqa: ANN001
    context = autocast_context(torch.device("cpu"), autocast)
    with torch.no_grad(), context, single_thread():
        logprobs, _ = packed_logprobs(policy.reference_model(), batch)
    return logprobs * batch.response_mask


def test_auto_with_autocast_stores_the_linear_weights_in_bf16(world: TinyWorld) -> None:
    fp32 = _policy(world.model_dir, "model", bf16=True)
    bf16 = _policy(world.model_dir, "auto", bf16=True)
    reference = bf16.reference
    cast = autocast_weights(reference)
    assert cast, "the micro model has linear layers"
    assert all(w.dtype == torch.bfloat16 for w in cast)
    embedding = reference.get_input_embeddings().weight
    assert embedding.dtype == torch.float32  # looked up, not cast by autocast
    assert reference.get_output_embeddings().weight is embedding  # still tied
    assert all(not p.requires_grad for p in reference.parameters())
    # Every cast weight halves: the reference is that much smaller than the float32 copy.
    saved = sum(w.numel() * 2 for w in cast)
    assert _param_bytes(reference) == _param_bytes(fp32.reference) - saved
    # The policy is untouched: float32, trainable, sharing no storage with the reference.
    assert all(p.dtype == torch.float32 and p.requires_grad for p in bf16.model.parameters())
    policy_storages = {p.untyped_storage().data_ptr() for p in bf16.model.parameters()}
    assert not policy_storages & {p.untyped_storage().data_ptr() for p in reference.parameters()}
    for (name, a), b in zip(fp32.model.named_parameters(), bf16.model.parameters(), strict=True):
        assert torch.equal(a, b), name


def test_bf16_reference_log_probs_match_the_float32_reference_under_autocast(
    sharp_model_dir: Path,
) -> None:
    fp32 = _policy(sharp_model_dir, "model", bf16=True)
    bf16 = _policy(sharp_model_dir, "bfloat16", bf16=True)
    batch = _batch(fp32.model.config.vocab_size)
    expected = _reference_logprobs(fp32, batch, autocast=True)
    got = _reference_logprobs(bf16, batch, autocast=True)
    assert torch.isfinite(got).all()
    assert (got - expected).abs().max().item() <= TOLERANCE
    # The tolerance is tight enough to see a real change: bf16 autocast itself moves these
    # log-probs by more than it, against full float32.
    full = _reference_logprobs(fp32, batch, autocast=False)
    assert (expected - full).abs().max().item() > TOLERANCE


def test_resumed_reference_is_cast_the_same_way(world: TinyWorld, tmp_path: Path) -> None:
    fresh = _policy(world.model_dir, "auto", bf16=True)
    # A checkpoint of other weights: the reference must still come from model.name.
    with torch.no_grad():
        for param in fresh.model.parameters():
            param.add_(0.5)
    fresh.model.save_pretrained(tmp_path)
    fresh.tokenizer.save_pretrained(tmp_path)
    resumed = _policy(world.model_dir, "auto", bf16=True, resume=tmp_path)
    original = _policy(world.model_dir, "auto", bf16=True)
    for (name, a), b in zip(
        original.reference.named_parameters(), resumed.reference.parameters(), strict=True
    ):
        assert a.dtype == b.dtype and torch.equal(a, b), name


def test_without_autocast_the_reference_keeps_the_model_dtype(world: TinyWorld) -> None:
    for ref_dtype in ("auto", "model"):
        policy = _policy(world.model_dir, ref_dtype, bf16=False)
        assert all(p.dtype == torch.float32 for p in policy.reference.parameters())
    assert all(
        p.dtype == torch.float32
        for p in _policy(world.model_dir, "model", bf16=True).reference.parameters()
    )


def test_bf16_reference_without_autocast_is_refused(world: TinyWorld) -> None:
    with pytest.raises(TSPOError, match=r"model\.ref_dtype.*needs bf16 autocast"):
        _policy(world.model_dir, "bfloat16", bf16=False)

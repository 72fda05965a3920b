"""The update's maths on a real micro model: padding-free log-probs, exact gradient accumulation."""

from __future__ import annotations

import copy

import pytest
import torch
from train_helpers import single_thread

from tspo.models.tiny import build_tiny_model, train_tokenizer
from tspo.train.config import AlgoConfig
from tspo.train.forward import UpdateBatch, batch_logprobs, response_logprobs
from tspo.train.update import UpdateSettings, ppo_update

PROMPT_LENGTHS = [5, 3, 7, 4]
RESPONSE_LENGTHS = [6, 2, 4, 9]


@pytest.fixture(scope="module")
def model():
    with single_thread():
        tokenizer = train_tokenizer(["the quick brown fox jumps over the lazy dog"] * 8, 300)
        yield build_tiny_model(tokenizer, "micro", seed=1)


def padded_batch(vocab: int, pad: int = 0) -> UpdateBatch:
    """Left-padded prompts and right-padded responses of different lengths, fixed random ids."""
    generator = torch.Generator().manual_seed(0)
    rows, width_p, width_r = len(PROMPT_LENGTHS), max(PROMPT_LENGTHS), max(RESPONSE_LENGTHS)
    prompt_ids = torch.full((rows, width_p), pad)
    prompt_mask = torch.zeros((rows, width_p), dtype=torch.long)
    response_ids = torch.full((rows, width_r), pad)
    response_mask = torch.zeros((rows, width_r), dtype=torch.long)
    for row, (p, r) in enumerate(zip(PROMPT_LENGTHS, RESPONSE_LENGTHS, strict=True)):
        prompt_ids[row, width_p - p :] = torch.randint(1, vocab, (p,), generator=generator)
        prompt_mask[row, width_p - p :] = 1
        response_ids[row, :r] = torch.randint(1, vocab, (r,), generator=generator)
        response_mask[row, :r] = 1
    loss_mask = response_mask.float()
    loss_mask[0, 2:4] = 0  # an observation block inside the first response
    return UpdateBatch(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        response_ids=response_ids,
        response_mask=response_mask,
        loss_mask=loss_mask,
        old_logprobs=torch.zeros(rows, width_r),
        advantages=torch.randn(rows, width_r, generator=generator) * loss_mask,
    )


def test_padding_and_micro_batching_do_not_change_logprobs(model) -> None:
    batch = padded_batch(model.config.vocab_size)
    with single_thread():
        batched = batch_logprobs(model, batch, micro_batch_size=3, temperature=1.0)
        for row, (p, r) in enumerate(zip(PROMPT_LENGTHS, RESPONSE_LENGTHS, strict=True)):
            ids = torch.cat([batch.prompt_ids[row, -p:], batch.response_ids[row, :r]])[None]
            with torch.no_grad():
                alone, _ = response_logprobs(model, ids, torch.ones_like(ids), r)
            # Generated tokens only: observations inside a response are never in the loss.
            generated = batch.loss_mask[row, :r].bool()
            torch.testing.assert_close(
                batched[row, :r][generated], alone[0][generated], atol=1e-5, rtol=1e-5
            )
            assert torch.all(batched[row, r:] == 0)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_gradient_accumulation_equals_one_big_batch(model, agg: str) -> None:
    batch = padded_batch(model.config.vocab_size)
    with single_thread():
        batch.old_logprobs = batch_logprobs(model, batch, micro_batch_size=4, temperature=1.0)
        updated = []
        for micro_batch_size in (1, 4):
            policy = copy.deepcopy(model)
            optimizer = torch.optim.SGD(policy.parameters(), lr=1.0)
            settings = UpdateSettings(
                ppo_epochs=1,
                mini_batch_size=len(batch),
                micro_batch_size=micro_batch_size,
                max_grad_norm=1e9,
                temperature=1.0,
                algo=AlgoConfig(kl_coef=0.0, agg=agg),
            )
            metrics = ppo_update(
                policy,
                optimizer,
                batch,
                settings,
                generator=torch.Generator().manual_seed(0),
                autocast=torch.autocast("cpu", enabled=False),
            )
            assert metrics["optimizer_steps"] == 1 and metrics["clip_frac"] == 0.0
            updated.append(dict(policy.named_parameters()))
    moved = False
    for name, value in updated[0].items():
        torch.testing.assert_close(value, updated[1][name], atol=1e-5, rtol=1e-4)
        moved |= not torch.equal(value, dict(model.named_parameters())[name])
    assert moved


def test_mini_batches_give_one_optimizer_step_each(model) -> None:
    batch = padded_batch(model.config.vocab_size)
    with single_thread():
        batch.old_logprobs = batch_logprobs(model, batch, micro_batch_size=4, temperature=1.0)
        policy = copy.deepcopy(model)
        settings = UpdateSettings(
            ppo_epochs=2,
            mini_batch_size=2,
            micro_batch_size=1,
            max_grad_norm=1.0,
            temperature=1.0,
            algo=AlgoConfig(kl_coef=0.0),
        )
        metrics = ppo_update(
            policy,
            torch.optim.AdamW(policy.parameters(), lr=1e-3),
            batch,
            settings,
            generator=torch.Generator().manual_seed(0),
            autocast=torch.autocast("cpu", enabled=False),
        )
    assert metrics["optimizer_steps"] == 4  # 2 epochs x (4 rows / 2 per mini-batch)
    assert metrics["update_tokens"] == 2 * sum(PROMPT_LENGTHS + RESPONSE_LENGTHS)


# The packed path (left-aligned rows, causal kernel, no mask) against the padded fp32 reference:
# same loss within 1e-6 absolute, same gradients within atol 1e-6 + rtol 1e-4 (float32 sums in
# another order), on rows of different prompt and response lengths.
PACKED_LOSS_ATOL = 1e-6
PACKED_GRAD_TOL = {"atol": 1e-6, "rtol": 1e-4}


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_packed_loss_and_gradients_equal_the_padded_fp32_path(model, temperature: float) -> None:
    from tspo.algo import policy_loss
    from tspo.train.forward import micro_logprobs

    batch = padded_batch(model.config.vocab_size).trimmed()
    with single_thread():
        batch.old_logprobs = batch_logprobs(
            model, batch, micro_batch_size=4, temperature=temperature, packed=False
        )
        results = []
        for packed in (False, True):
            policy = copy.deepcopy(model)
            logprobs, entropy = micro_logprobs(
                policy,
                batch,
                temperature=temperature,
                with_entropy=True,
                entropy_grad=True,
                packed=packed,
            )
            loss, _ = policy_loss(
                logprobs,
                batch.old_logprobs + 0.01 * batch.loss_mask,  # ratios away from 1
                None,
                batch.advantages,
                batch.loss_mask,
                entropy=entropy,
                **AlgoConfig(kl_coef=0.0, entropy_coef=0.01).loss_options(),
            )
            loss.backward()
            mask = batch.loss_mask.bool()
            results.append(
                (loss.detach(), logprobs[mask], entropy[mask], dict(policy.named_parameters()))
            )
    (loss_ref, lp_ref, ent_ref, params_ref), (loss_new, lp_new, ent_new, params_new) = results
    assert abs(loss_ref.item() - loss_new.item()) <= PACKED_LOSS_ATOL
    torch.testing.assert_close(lp_new, lp_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent_new, ent_ref, atol=1e-5, rtol=1e-5)
    for name, param in params_ref.items():
        assert param.grad is not None
        torch.testing.assert_close(params_new[name].grad, param.grad, **PACKED_GRAD_TOL)


def test_packed_and_padded_updates_move_the_weights_alike(model) -> None:
    batch = padded_batch(model.config.vocab_size)
    with single_thread():
        batch.old_logprobs = batch_logprobs(model, batch, micro_batch_size=2, temperature=1.0)
        updated = []
        for packed in (False, True):
            policy = copy.deepcopy(model)
            settings = UpdateSettings(
                ppo_epochs=1,
                mini_batch_size=len(batch),
                micro_batch_size=2,
                max_grad_norm=1e9,
                temperature=1.0,
                algo=AlgoConfig(kl_coef=0.0),
                packed=packed,
            )
            ppo_update(
                policy,
                torch.optim.SGD(policy.parameters(), lr=1.0),
                batch,
                settings,
                generator=torch.Generator().manual_seed(0),
                autocast=torch.autocast("cpu", enabled=False),
            )
            updated.append(dict(policy.named_parameters()))
    for name, value in updated[0].items():
        torch.testing.assert_close(updated[1][name], value, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kl_coef", [0.0, 0.1])
def test_old_logprobs_from_the_update_pass_move_the_weights_as_a_separate_pass(
    model, kl_coef: float
) -> None:
    """One optimizer step per batch: old log-probs taken (detached) from the update's forward
    pass give the same step as recomputing them first, and the ratio is exactly 1."""
    batch = padded_batch(model.config.vocab_size)
    with single_thread():
        recomputed = batch_logprobs(model, batch, micro_batch_size=2, temperature=1.0)
        batch.ref_logprobs = recomputed - 0.05 * batch.loss_mask  # a reference apart from it
        updated = []
        for reuse in (False, True):
            policy = copy.deepcopy(model)
            batch.old_logprobs = torch.full_like(recomputed, -50.0) if reuse else recomputed
            settings = UpdateSettings(
                ppo_epochs=1,
                mini_batch_size=len(batch),
                micro_batch_size=2,
                max_grad_norm=1e9,
                temperature=1.0,
                algo=AlgoConfig(kl_coef=kl_coef),
                old_from_update=reuse,
            )
            metrics = ppo_update(
                policy,
                torch.optim.SGD(policy.parameters(), lr=1.0),
                batch,
                settings,
                generator=torch.Generator().manual_seed(0),
                autocast=torch.autocast("cpu", enabled=False),
            )
            assert metrics["clip_frac"] == 0.0
            updated.append(dict(policy.named_parameters()))
    for name, value in updated[0].items():
        torch.testing.assert_close(updated[1][name], value, atol=1e-5, rtol=1e-4)


def test_the_update_pass_gives_old_logprobs_only_for_one_optimizer_step() -> None:
    from tspo.train.update import old_from_update

    assert old_from_update(recompute=True, ppo_epochs=1, mini_batch_size=8, rows=8)
    assert not old_from_update(recompute=False, ppo_epochs=1, mini_batch_size=8, rows=8)
    assert not old_from_update(recompute=True, ppo_epochs=2, mini_batch_size=8, rows=8)
    assert not old_from_update(recompute=True, ppo_epochs=1, mini_batch_size=4, rows=8)

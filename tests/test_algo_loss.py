"""PPO policy loss: clipping, dual clip, KL estimators, aggregation, masking, gradients."""

from __future__ import annotations

import math

import pytest
import torch

from tspo.algo import kl_penalty, policy_loss
from tspo.errors import TSPOError


def row(*values: float) -> torch.Tensor:
    return torch.tensor([list(values)], dtype=torch.float64)


@pytest.mark.parametrize(
    ("kl_type", "policy_above", "policy_below"),
    [
        # log p - log p_ref = +0.5 and -0.5
        ("kl", 0.5, -0.5),
        ("abs", 0.5, 0.5),
        ("mse", 0.125, 0.125),
        # k3 = exp(-d) + d - 1
        ("low_var_kl", math.exp(-0.5) + 0.5 - 1, math.exp(0.5) - 0.5 - 1),
    ],
)
def test_kl_estimators_against_hand_values(kl_type, policy_above, policy_below):
    estimate = kl_penalty(row(-1.0, -1.5), row(-1.5, -1.0), kl_type)
    torch.testing.assert_close(estimate, row(policy_above, policy_below))


def test_low_var_kl_is_clamped_like_verl():
    estimate = kl_penalty(row(0.0, -40.0, -3.0), row(-40.0, 0.0, -3.0), "low_var_kl")
    torch.testing.assert_close(estimate, row(10.0, 10.0, 0.0))


def five_clipping_cases():
    """One token per case: (advantage, ratio). The loss and gradient of each are worked below."""
    advantages = row(1.0, 1.0, -1.0, -1.0, -1.0)
    ratios = row(1.5, 0.5, 1.5, 0.5, 5.0)
    old = torch.zeros_like(ratios)
    logprobs = ratios.log().requires_grad_(True)
    return logprobs, old, advantages, torch.ones_like(ratios, dtype=torch.bool)


def test_clipped_surrogate_values_metrics_and_gradients():
    logprobs, old, advantages, mask = five_clipping_cases()
    loss, metrics = policy_loss(logprobs, old, None, advantages, mask, kl_coef=0.0)
    # Per token, max(-A r, -A clip(r, 0.8, 1.2)), then min(., 3 |A|) where A < 0:
    #   A=+1 r=1.5 -> -1.2 (clipped)    A=+1 r=0.5 -> -0.5    A=-1 r=1.5 -> 1.5
    #   A=-1 r=0.5 -> 0.8 (clipped)     A=-1 r=5.0 -> 5.0, dual clip -> 3.0
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 1.5 + 0.8 + 3.0) / 5)
    assert metrics["pg_loss"] == pytest.approx(loss.item())
    assert metrics["clip_frac"] == pytest.approx(2 / 5)
    assert metrics["clip_frac_lower"] == pytest.approx(1 / 5)
    expected_kl = -sum(math.log(r) for r in (1.5, 0.5, 1.5, 0.5, 5.0)) / 5
    assert metrics["approx_kl"] == pytest.approx(expected_kl)
    loss.backward()
    # d(-A r)/d log p = -A r / N where the unclipped term is active, 0 where a clip is.
    torch.testing.assert_close(logprobs.grad, row(0.0, -0.5 / 5, 1.5 / 5, 0.0, 0.0))


def test_dual_clip_can_be_switched_off():
    logprobs, old, advantages, mask = five_clipping_cases()
    loss, metrics = policy_loss(
        logprobs, old, None, advantages, mask, kl_coef=0.0, clip_ratio_c=None
    )
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 1.5 + 0.8 + 5.0) / 5)
    assert metrics["clip_frac_lower"] == 0.0
    loss.backward()
    assert logprobs.grad[0, 4].item() == pytest.approx(5.0 / 5)
    with pytest.raises(TSPOError, match="clip_ratio_c"):
        policy_loss(logprobs, old, None, advantages, mask, kl_coef=0.0, clip_ratio_c=1.0)


def test_clip_low_and_clip_high_are_separate():
    logprobs = row(math.log(1.25), math.log(0.75))
    advantages = row(1.0, -1.0)
    mask = torch.ones_like(logprobs, dtype=torch.bool)
    zeros = torch.zeros_like(logprobs)
    symmetric, _ = policy_loss(logprobs, zeros, None, advantages, mask, kl_coef=0.0)
    assert symmetric.item() == pytest.approx((-1.2 + 0.8) / 2)
    wide_high, _ = policy_loss(logprobs, zeros, None, advantages, mask, kl_coef=0.0, clip_high=0.28)
    assert wide_high.item() == pytest.approx((-1.25 + 0.8) / 2)
    wide_low, _ = policy_loss(logprobs, zeros, None, advantages, mask, kl_coef=0.0, clip_low=0.3)
    assert wide_low.item() == pytest.approx((-1.2 + 0.75) / 2)


def test_aggregation_modes():
    # At ratio 1 each token's loss is -A. Row 0: four tokens of A=1; row 1: one token of A=-2;
    # row 2: no loss tokens at all.
    advantages = torch.tensor([[1.0, 1, 1, 1], [-2, 9, 9, 9], [5, 5, 5, 5]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0], [0, 0, 0, 0]])
    logprobs = torch.zeros_like(advantages, requires_grad=True)
    old = torch.zeros_like(advantages)
    token_mean, _ = policy_loss(logprobs, old, None, advantages, mask, kl_coef=0.0)
    assert token_mean.item() == pytest.approx((-4 + 2) / 5)
    token_mean.backward()
    torch.testing.assert_close(logprobs.grad, -advantages * mask / 5)

    logprobs.grad = None
    seq_mean, _ = policy_loss(
        logprobs, old, None, advantages, mask, kl_coef=0.0, agg="seq-mean-token-mean"
    )
    assert seq_mean.item() == pytest.approx((-1 + 2) / 2)
    seq_mean.backward()
    per_token_weight = torch.tensor([[1 / 4] * 4, [1, 0, 0, 0], [0] * 4], dtype=torch.float64)
    torch.testing.assert_close(logprobs.grad, -advantages * per_token_weight / 2)


def test_masked_tokens_change_nothing():
    torch.manual_seed(0)
    logprobs = -torch.rand(3, 6, dtype=torch.float64)
    old = logprobs + 0.1 * torch.randn(3, 6, dtype=torch.float64)
    ref = logprobs + 0.1 * torch.randn(3, 6, dtype=torch.float64)
    advantages = torch.randn(3, 6, dtype=torch.float64)
    entropy = torch.rand(3, 6, dtype=torch.float64)
    mask = torch.rand(3, 6) > 0.4
    garbage = ~mask

    def run(lp, old, ref, adv, ent):
        lp = lp.clone().requires_grad_(True)
        loss, metrics = policy_loss(lp, old, ref, adv, mask, entropy=ent, entropy_coef=0.01)
        loss.backward()
        return loss, metrics, lp.grad

    clean = run(logprobs, old, ref, advantages, entropy)
    noisy = run(
        torch.where(garbage, 30.0, logprobs),
        torch.where(garbage, -30.0, old),
        torch.where(garbage, -50.0, ref),
        torch.where(garbage, 1e6, advantages),
        torch.where(garbage, 1e6, entropy),
    )
    torch.testing.assert_close(noisy[0], clean[0])
    assert noisy[1] == pytest.approx(clean[1])
    assert (noisy[2][garbage] == 0).all()
    torch.testing.assert_close(noisy[2], clean[2])


def test_kl_penalty_enters_the_loss_with_its_gradient():
    logprobs = row(-1.0).requires_grad_(True)
    old = row(-1.0)
    ref = row(-1.5)
    mask = torch.ones_like(old, dtype=torch.bool)
    loss, metrics = policy_loss(logprobs, old, ref, row(0.0), mask, kl_coef=0.1)
    k3 = math.exp(-0.5) + 0.5 - 1
    assert metrics["kl_ref"] == pytest.approx(k3)
    assert loss.item() == pytest.approx(0.1 * k3)
    loss.backward()
    # d k3 / d log p = 1 - exp(log p_ref - log p)
    assert logprobs.grad.item() == pytest.approx(0.1 * (1 - math.exp(-0.5)))


def test_kl_to_the_reference_is_reported_even_when_not_penalised():
    logprobs, old, advantages, mask = five_clipping_cases()
    with_ref, metrics = policy_loss(logprobs, old, old, advantages, mask, kl_coef=0.0)
    without_ref, no_ref_metrics = policy_loss(logprobs, old, None, advantages, mask, kl_coef=0.0)
    assert with_ref.item() == pytest.approx(without_ref.item())
    assert metrics["kl_ref"] > 0
    assert math.isnan(no_ref_metrics["kl_ref"])
    assert math.isnan(no_ref_metrics["entropy"])


def test_entropy_bonus_lowers_the_loss():
    logprobs, old, advantages, mask = five_clipping_cases()
    entropy = row(1.0, 2.0, 3.0, 4.0, 5.0)
    plain, _ = policy_loss(logprobs, old, None, advantages, mask, kl_coef=0.0)
    bonus, metrics = policy_loss(
        logprobs, old, None, advantages, mask, kl_coef=0.0, entropy=entropy, entropy_coef=0.1
    )
    assert metrics["entropy"] == pytest.approx(3.0)
    assert bonus.item() == pytest.approx(plain.item() - 0.1 * 3.0)


def test_missing_inputs_and_bad_options_are_reported():
    logprobs, old, advantages, mask = five_clipping_cases()
    with pytest.raises(ValueError, match="ref_logprobs"):
        policy_loss(logprobs, old, None, advantages, mask)
    with pytest.raises(ValueError, match="entropy"):
        policy_loss(logprobs, old, old, advantages, mask, entropy_coef=0.01)
    with pytest.raises(TSPOError, match="kl_type"):
        policy_loss(logprobs, old, old, advantages, mask, kl_type="k9")
    with pytest.raises(TSPOError, match="agg"):
        policy_loss(logprobs, old, old, advantages, mask, agg="seq-sum")


def test_an_empty_mask_gives_a_zero_loss_not_nan():
    logprobs, old, advantages, mask = five_clipping_cases()
    for agg in ("token-mean", "seq-mean-token-mean"):
        loss, metrics = policy_loss(logprobs, old, old, advantages, ~mask, agg=agg)
        assert loss.item() == 0.0
        assert metrics["clip_frac"] == 0.0 and metrics["kl_ref"] == 0.0

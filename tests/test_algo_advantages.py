"""Advantage estimators: hand-worked groups, a loop reference, veRL's grpo rule, and properties."""

from __future__ import annotations

import math
import statistics
from collections import defaultdict

import pytest
import torch
from algo_helpers import Traj, build_batch, trajectory_groups
from hypothesis import given, settings
from hypothesis import strategies as st

from tspo.algo import (
    ESTIMATORS,
    TurnBatch,
    compute_advantages,
    register_estimator,
)
from tspo.errors import TSPOError

BUILT_IN = ("grpo", "folr_scalar", "tspo", "tspo_switch")
PROPERTY_SETTINGS = settings(max_examples=100, deadline=None)


def per_turn_values(advantages: torch.Tensor, turn_ids: torch.Tensor) -> list[list[float]]:
    """The advantage of each turn of each trajectory, checking it is constant within the turn."""
    rows = []
    for adv_row, turn_row in zip(advantages.tolist(), turn_ids.tolist(), strict=True):
        by_turn: dict[int, set[float]] = defaultdict(set)
        for value, turn in zip(adv_row, turn_row, strict=True):
            if turn >= 0:
                by_turn[turn].add(value)
        assert all(len(values) == 1 for values in by_turn.values())
        rows.append([by_turn[k].pop() for k in sorted(by_turn)])
    return rows


def assert_nested_close(
    got: list[list[float]], expected: list[list[float]], atol: float = 1e-5
) -> None:
    assert len(got) == len(expected)
    for got_row, expected_row in zip(got, expected, strict=True):
        assert got_row == pytest.approx(expected_row, abs=atol)


def group_of_four(outcomes, first_hits) -> dict[str, torch.Tensor]:
    """Four trajectories of three turns (two tokens each, one observation token between)."""
    trajs = [Traj(7, r, k, (2, 2, 2)) for r, k in zip(outcomes, first_hits, strict=True)]
    return build_batch(trajs)


# --- hand-worked examples (eps = 1e-6 shifts these by at most 2e-6) ------------------------------
# With G = 4 and values {1, 1, 0, 0}: mean 0.5, unbiased std sqrt(1/3) = 0.57735, z = +-0.866025.
# With values {1, 1, 1, 0}: mean 0.75, unbiased std 0.5, z = +0.5 / -1.5.


def test_all_wrong_but_two_of_four_found_the_answer():
    batch = group_of_four(outcomes=[0, 0, 0, 0], first_hits=[1, -1, 0, -1])
    # Outcome-only GRPO sees four identical rewards: no signal at all.
    assert (
        per_turn_values(compute_advantages("grpo", **batch), batch["turn_ids"]) == [[0.0] * 3] * 4
    )
    z = 0.866025
    tspo = per_turn_values(compute_advantages("tspo", **batch), batch["turn_ids"])
    expected = [[z, z, 0.0], [-z, -z, -z], [z, 0.0, 0.0], [-z, -z, -z]]
    assert_nested_close(tspo, expected)
    switch = per_turn_values(compute_advantages("tspo_switch", **batch), batch["turn_ids"])
    assert_nested_close(switch, expected)
    # R + 0.5 f = {0.5, 0, 0.5, 0}: the same +-0.866 on every turn.
    scalar = per_turn_values(compute_advantages("folr_scalar", **batch), batch["turn_ids"])
    assert_nested_close(scalar, [[z] * 3, [-z] * 3, [z] * 3, [-z] * 3])


def test_mixed_group():
    batch = group_of_four(outcomes=[1, 0, 0, 1], first_hits=[0, 1, -1, -1])
    z = 0.866025
    grpo = per_turn_values(compute_advantages("grpo", **batch), batch["turn_ids"])
    assert_nested_close(grpo, [[z] * 3, [-z] * 3, [-z] * 3, [z] * 3])
    # z(R) = (+z, -z, -z, +z), z(f) = (+z, +z, -z, -z); f-term on turns k <= k* (all if k* = -1).
    tspo = per_turn_values(compute_advantages("tspo", **batch), batch["turn_ids"])
    expected = [[2 * z, z, z], [0.0, 0.0, -z], [-2 * z] * 3, [0.0] * 3]
    assert_nested_close(tspo, expected)
    # Mixed outcomes: tspo_switch is plain GRPO.
    switch = per_turn_values(compute_advantages("tspo_switch", **batch), batch["turn_ids"])
    assert_nested_close(switch, grpo, atol=1e-6)
    # R + 0.5 f = {1.5, 0.5, 0, 1}: mean 0.75, std sqrt(1.25 / 3) = 0.645497.
    scalar = per_turn_values(compute_advantages("folr_scalar", **batch), batch["turn_ids"])
    z_scalar = [1.161895, -0.387298, -1.161895, 0.387298]
    assert_nested_close(scalar, [[v] * 3 for v in z_scalar])
    # alpha = 2 ranks a correct answer without evidence (R + 2f = 1) below a near miss (2).
    scalar = compute_advantages("folr_scalar", **batch, alpha=2.0)
    assert scalar[1, 0] > scalar[3, 0]


def test_all_right_rewards_the_trajectories_whose_search_found_the_answer():
    batch = group_of_four(outcomes=[1, 1, 1, 1], first_hits=[0, 0, 2, -1])
    assert (
        per_turn_values(compute_advantages("grpo", **batch), batch["turn_ids"]) == [[0.0] * 3] * 4
    )
    tspo = per_turn_values(compute_advantages("tspo", **batch), batch["turn_ids"])
    expected = [[0.5, 0.0, 0.0], [0.5, 0.0, 0.0], [0.5, 0.5, 0.5], [-1.5, -1.5, -1.5]]
    assert_nested_close(tspo, expected)
    switch = per_turn_values(compute_advantages("tspo_switch", **batch), batch["turn_ids"])
    assert_nested_close(switch, expected)
    scalar = per_turn_values(compute_advantages("folr_scalar", **batch), batch["turn_ids"])
    assert_nested_close(scalar, [[0.5] * 3] * 3 + [[-1.5] * 3])


def test_lam_scales_the_folr_term():
    batch = group_of_four(outcomes=[1, 0, 0, 1], first_hits=[0, 1, -1, -1])
    grpo = compute_advantages("grpo", **batch)
    half = compute_advantages("tspo", **batch, lam=0.5) - grpo
    full = compute_advantages("tspo", **batch, lam=1.0) - grpo
    torch.testing.assert_close(half * 2, full)


# --- references ------------------------------------------------------------------------------


def loop_zscore(values: dict[int, float], groups: dict[int, list[int]], eps: float):
    """Row -> z-score within its group, with veRL's rule for one-member groups."""
    out = {}
    for rows in groups.values():
        members = [values[row] for row in rows]
        if len(members) == 1:
            mean, std = 0.0, 1.0
        else:
            mean, std = statistics.fmean(members), statistics.stdev(members)
        for row in rows:
            flat = len(members) > 1 and len(set(members)) == 1
            out[row] = 0.0 if flat else (values[row] - mean) / (std + eps)
    return out


def loop_advantages(name, batch, *, alpha=0.5, lam=1.0, eps=1e-6, per_turn_norm=False):
    """A plain-Python reading of docs/algorithm.md §4, one trajectory and one token at a time."""
    outcome = batch["outcome"].tolist()
    k_star = batch["first_hit_turn"].tolist()
    turn_ids = batch["turn_ids"].tolist()
    groups: dict[int, list[int]] = defaultdict(list)
    for row, group in enumerate(batch["group_ids"].tolist()):
        groups[group].append(row)
    rows = range(len(outcome))
    hit = {i: 1.0 if k_star[i] >= 0 else 0.0 for i in rows}
    z_outcome = loop_zscore(dict(enumerate(outcome)), groups, eps)
    z_hit = loop_zscore(hit, groups, eps)
    z_scalar = loop_zscore({i: outcome[i] + alpha * hit[i] for i in rows}, groups, eps)
    mixed = {}
    for members in groups.values():
        for i in members:
            mixed[i] = len({outcome[j] for j in members}) > 1

    def turn_value(i: int, k: int) -> float:
        stage1 = k_star[i] == -1 or k <= k_star[i]
        if name == "grpo":
            return z_outcome[i]
        if name == "folr_scalar":
            return z_scalar[i]
        if name == "tspo":
            return z_outcome[i] + (lam * z_hit[i] if stage1 else 0.0)
        if name == "tspo_switch":
            if mixed[i]:
                return z_outcome[i]
            return lam * z_hit[i] if stage1 else 0.0
        raise AssertionError(name)

    values = {(i, k): turn_value(i, k) for i in rows for k in set(turn_ids[i]) if k >= 0}
    if per_turn_norm:
        cells: dict[tuple[int, int], list[tuple[int, int]]] = defaultdict(list)
        for group, members in groups.items():
            for i in members:
                for k in {k for k in turn_ids[i] if k >= 0}:
                    cells[(group, k)].append((i, k))
        values = loop_zscore(values, cells, eps)
    return [[values[(i, k)] if k >= 0 else 0.0 for k in turn_ids[i]] for i in rows]


def verl_style_grpo(outcome: torch.Tensor, group_ids: list, mask: torch.Tensor, eps=1e-6):
    """veRL 0.9.1's grpo rule restated: torch.mean/torch.std per group, singletons 0 and 1."""
    by_group = defaultdict(list)
    for row, group in enumerate(group_ids):
        by_group[group].append(outcome[row])
    stats = {}
    for group, scores in by_group.items():
        if len(scores) == 1:
            zero, one = torch.zeros((), dtype=outcome.dtype), torch.ones((), dtype=outcome.dtype)
            stats[group] = (zero, one)
        else:
            stacked = torch.stack(scores)
            stats[group] = (torch.mean(stacked), torch.std(stacked))
    scores = torch.stack(
        [(outcome[i] - stats[g][0]) / (stats[g][1] + eps) for i, g in enumerate(group_ids)]
    )
    return scores.unsqueeze(-1) * mask


@PROPERTY_SETTINGS
@given(trajs=trajectory_groups(), per_turn_norm=st.booleans(), name=st.sampled_from(BUILT_IN))
def test_vectorised_estimators_equal_the_loop_reference(trajs, per_turn_norm, name):
    batch = build_batch(trajs)
    options = {"alpha": 0.7, "lam": 1.3, "eps": 1e-6}
    got = compute_advantages(name, **batch, per_turn_norm=per_turn_norm, **options)
    expected = torch.tensor(loop_advantages(name, batch, per_turn_norm=per_turn_norm, **options))
    torch.testing.assert_close(got, expected.to(got.dtype), rtol=1e-6, atol=1e-6)


@PROPERTY_SETTINGS
@given(trajs=trajectory_groups(min_group_size=1, outcomes=st.floats(0, 1)))
def test_grpo_matches_the_verl_rule(trajs):
    # Both sides in float64: this checks the rule (eps placement, unbiased std, singletons), not
    # veRL's float32 rounding, which alone differs by ~1e-7 / std from an exact computation.
    batch = build_batch(trajs)
    got = compute_advantages("grpo", **batch)
    mask = (batch["turn_ids"] >= 0).double()
    expected = verl_style_grpo(batch["outcome"], batch["group_ids"].tolist(), mask)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)


def test_single_member_group_is_not_normalised_as_in_verl():
    batch = build_batch([Traj(1, 1.0, 0, (2,)), Traj(2, 0.0, -1, (2,))])
    grpo = compute_advantages("grpo", **batch)
    assert grpo[0, 0].item() == pytest.approx(1 / (1 + 1e-6), abs=1e-12)
    assert grpo[1, 0].item() == 0.0


@st.composite
def zero_spread_groups(draw):
    """Groups of two or more whose members share R and whether they found the answer."""
    trajs = []
    for label in range(draw(st.integers(1, 4))):
        outcome = draw(st.floats(0, 1))
        found = draw(st.booleans())
        for _ in range(draw(st.integers(2, 5))):
            turns = draw(st.integers(1, 4))
            first_hit = draw(st.integers(0, turns - 1)) if found else -1
            trajs.append(Traj(label, outcome, first_hit, (2,) * turns))
    return trajs


@PROPERTY_SETTINGS
@given(
    trajs=zero_spread_groups(),
    name=st.sampled_from(BUILT_IN),
    per_turn_norm=st.booleans(),
    eps=st.sampled_from([1e-6, 0.0]),
)
def test_zero_spread_gives_exact_zeros(trajs, name, per_turn_norm, eps):
    batch = build_batch(trajs)
    advantages = compute_advantages(name, **batch, per_turn_norm=per_turn_norm, eps=eps)
    assert torch.isfinite(advantages).all()
    assert (advantages == 0).all()


@PROPERTY_SETTINGS
@given(
    trajs=trajectory_groups(outcomes=st.floats(0, 1)),
    name=st.sampled_from(BUILT_IN),
    per_turn_norm=st.booleans(),
)
def test_non_loss_tokens_are_exactly_zero_and_all_values_finite(trajs, name, per_turn_norm):
    batch = build_batch(trajs)
    advantages = compute_advantages(name, **batch, per_turn_norm=per_turn_norm)
    assert torch.isfinite(advantages).all()
    assert (advantages[batch["turn_ids"] < 0] == 0).all()


@PROPERTY_SETTINGS
@given(
    trajs=trajectory_groups(),
    name=st.sampled_from(BUILT_IN),
    per_turn_norm=st.booleans(),
    data=st.data(),
)
def test_order_of_groups_and_of_trajectories_does_not_matter(trajs, name, per_turn_norm, data):
    order = data.draw(st.permutations(range(len(trajs))))
    relabel = data.draw(st.integers(1, 50))
    batch = build_batch(trajs)
    shuffled = build_batch([trajs[i] for i in order])
    shuffled["group_ids"] = shuffled["group_ids"] * relabel + 3
    original = compute_advantages(name, **batch, per_turn_norm=per_turn_norm)
    permuted = compute_advantages(name, **shuffled, per_turn_norm=per_turn_norm)
    torch.testing.assert_close(permuted, original[list(order)], rtol=1e-9, atol=1e-9)


@PROPERTY_SETTINGS
@given(trajs=trajectory_groups())
def test_ablation_limits_reduce_to_grpo(trajs):
    batch = build_batch(trajs)
    grpo = compute_advantages("grpo", **batch)
    assert torch.equal(compute_advantages("tspo", **batch, lam=0.0), grpo)
    assert torch.equal(compute_advantages("folr_scalar", **batch, alpha=0.0), grpo)


@PROPERTY_SETTINGS
@given(trajs=trajectory_groups())
def test_tspo_turns_after_the_hit_carry_only_the_outcome_term(trajs):
    batch = build_batch(trajs)
    tspo = compute_advantages("tspo", **batch)
    grpo = compute_advantages("grpo", **batch)
    after_hit = batch["turn_ids"] > batch["first_hit_turn"].unsqueeze(1)
    after_hit &= (batch["first_hit_turn"] >= 0).unsqueeze(1)
    assert torch.equal(tspo[after_hit], grpo[after_hit])


# --- registry and arguments ------------------------------------------------------------------


def test_registry_holds_the_built_in_estimators():
    assert set(BUILT_IN) <= set(ESTIMATORS)


def test_user_estimators_join_the_registry():
    @register_estimator("test_hit_only")
    def hit_only(batch: TurnBatch, *, bonus: float = 1.0) -> torch.Tensor:
        return batch.every_turn(batch.hit * bonus)

    try:
        batch = group_of_four(outcomes=[0, 0, 0, 0], first_hits=[1, -1, 0, -1])
        advantages = compute_advantages("test_hit_only", **batch, bonus=2.0, lam=5.0)
        assert per_turn_values(advantages, batch["turn_ids"]) == [[2.0] * 3, [0.0] * 3] * 2
        with pytest.raises(ValueError, match="already registered"):
            register_estimator("test_hit_only")(lambda batch: batch.outcome)
        with pytest.raises(ValueError, match="returned shape"):
            register_estimator("test_bad_shape")(lambda batch: batch.outcome)
            compute_advantages("test_bad_shape", **batch)
    finally:
        ESTIMATORS.pop("test_hit_only", None)
        ESTIMATORS.pop("test_bad_shape", None)


def test_common_options_pass_to_any_estimator_and_typos_are_reported():
    batch = group_of_four(outcomes=[1, 0, 0, 1], first_hits=[0, 1, -1, -1])
    torch.testing.assert_close(
        compute_advantages("grpo", **batch, alpha=0.3, lam=2.0), compute_advantages("grpo", **batch)
    )
    with pytest.raises(TSPOError, match="no option.*lamda"):
        compute_advantages("tspo", **batch, lamda=1.0)
    with pytest.raises(TSPOError, match="unknown advantage estimator 'ppo'.*grpo"):
        compute_advantages("ppo", **batch)


def test_shapes_are_checked():
    batch = group_of_four(outcomes=[1, 0, 0, 1], first_hits=[0, 1, -1, -1])
    with pytest.raises(ValueError, match="outcome must be"):
        compute_advantages("grpo", **{**batch, "outcome": batch["outcome"][:3]})
    with pytest.raises(ValueError, match="turn_ids must be"):
        compute_advantages("grpo", **{**batch, "turn_ids": batch["turn_ids"][0]})
    with pytest.raises(ValueError, match="first_hit_turn"):
        compute_advantages("grpo", **{**batch, "first_hit_turn": torch.tensor([0, -2, 0, 0])})


def test_output_dtype_follows_the_outcome():
    batch = group_of_four(outcomes=[1, 0, 0, 1], first_hits=[0, 1, -1, -1])
    assert compute_advantages("tspo", **batch).dtype == torch.float64
    as_float32 = compute_advantages("tspo", **{**batch, "outcome": batch["outcome"].float()})
    assert as_float32.dtype == torch.float32
    as_long = compute_advantages("tspo", **{**batch, "outcome": batch["outcome"].long()})
    assert as_long.dtype == torch.float32


def test_per_turn_norm_compares_only_trajectories_that_reached_the_turn():
    # Turn 1 exists only for the two trajectories that searched again; within that pair the
    # outcome z-scores (+z, -z) are re-standardised to +-1/sqrt(2) * sqrt(2) = +-0.7071.
    trajs = [
        Traj(0, 1.0, -1, (2, 2)),
        Traj(0, 0.0, -1, (2, 2)),
        Traj(0, 1.0, -1, (2,)),
        Traj(0, 0.0, -1, (2,)),
    ]
    batch = build_batch(trajs)
    values = per_turn_values(
        compute_advantages("grpo", **batch, per_turn_norm=True), batch["turn_ids"]
    )
    assert values[0][1] == pytest.approx(1 / math.sqrt(2), abs=1e-5)
    assert values[1][1] == pytest.approx(-1 / math.sqrt(2), abs=1e-5)
    assert values[2] == pytest.approx([0.866025], abs=1e-5)


def test_public_contract_is_exported():
    import tspo.algo

    contract = {
        "normalize_answer",
        "exact_match",
        "f1_score",
        "first_occurrence_turn",
        "compute_advantages",
        "ESTIMATORS",
        "register_estimator",
        "policy_loss",
        "group_diagnostics",
    }
    assert contract <= set(tspo.algo.__all__)
    assert all(callable(getattr(tspo.algo, name)) for name in contract - {"ESTIMATORS"})

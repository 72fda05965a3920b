"""Advantage estimators (docs/algorithm.md §4): a registry of pure, vectorised tensor functions.

Estimators work at turn level. Each one maps per-trajectory facts (outcome R, first-hit turn k*,
group) to a (B, K) table holding one advantage per trajectory and turn; :func:`compute_advantages`
broadcasts the table onto the (B, T) response tokens through ``turn_ids`` and leaves exactly 0 on
every token outside the loss.

Group statistics follow veRL's ``grpo`` estimator (GRPO: DeepSeekMath, arXiv 2402.03300):
``(x - mean) / (std + eps)`` with the unbiased standard deviation, and a single-member group is
left un-normalised (mean 0, std 1). On top of that, a group of two or more whose values are all
equal yields exactly 0, never a rounding residue.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch
from torch import Tensor

from tspo.errors import TSPOError

DEFAULT_ALPHA = 0.5
DEFAULT_LAM = 1.0
DEFAULT_EPS = 1e-6
# Options every built-in estimator understands; an estimator that does not use one ignores it, so
# a trainer may pass its whole ``algo`` config to any estimator. Anything else must be accepted
# by the chosen estimator's signature, or it is reported as a typo.
COMMON_OPTIONS = frozenset({"alpha", "lam", "eps"})

EstimatorFn = Callable[..., Tensor]
ESTIMATORS: dict[str, EstimatorFn] = {}


def register_estimator(name: str) -> Callable[[EstimatorFn], EstimatorFn]:
    """Decorator: ``fn(batch: TurnBatch, **options) -> (B, K) Tensor`` joins :data:`ESTIMATORS`."""

    def decorator(fn: EstimatorFn) -> EstimatorFn:
        registered = ESTIMATORS.get(name)
        if registered is not None and registered is not fn:
            raise ValueError(f"advantage estimator {name!r} is already registered: {registered}")
        ESTIMATORS[name] = fn
        return fn

    return decorator


def group_moments(
    values: Tensor, group_index: Tensor, num_groups: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-group size, mean and unbiased std (0 for a single member), all float64.

    Shapes: ``values`` (N,) float, ``group_index`` (N,) long in [0, num_groups) -> three (G,).
    """
    x = values.to(torch.float64)
    counts = torch.bincount(group_index, minlength=num_groups).to(torch.float64)
    sums = torch.zeros(num_groups, dtype=torch.float64, device=x.device).index_add_(
        0, group_index, x
    )
    means = sums / counts.clamp(min=1)
    squared = (x - means[group_index]).square()
    sum_squares = torch.zeros_like(sums).index_add_(0, group_index, squared)
    stds = (sum_squares / (counts - 1).clamp(min=1)).sqrt()
    return counts, means, stds


def group_zscore(values: Tensor, group_index: Tensor, num_groups: int, eps: float) -> Tensor:
    """``values`` standardised within their group, in float64.

    Shapes: ``values`` (N,) float, ``group_index`` (N,) long in [0, num_groups) -> (N,) float64.
    """
    x = values.to(torch.float64)
    counts, means, stds = group_moments(x, group_index, num_groups)
    single = counts == 1
    means = torch.where(single, 0.0, means)
    stds = torch.where(single, 1.0, stds)
    flat = ~single & ~group_has_spread(x, group_index, num_groups)
    zscores = (x - means[group_index]) / (stds[group_index] + eps)
    return torch.where(flat[group_index], 0.0, zscores)


def group_has_spread(values: Tensor, group_index: Tensor, num_groups: int) -> Tensor:
    """(G,) bool: whether the group's values are not all equal. (N,), (N,) -> (G,)."""
    x = values.to(torch.float64)
    highest = torch.full((num_groups,), -torch.inf, dtype=x.dtype, device=x.device)
    lowest = torch.full((num_groups,), torch.inf, dtype=x.dtype, device=x.device)
    highest = highest.scatter_reduce(0, group_index, x, reduce="amax")
    lowest = lowest.scatter_reduce(0, group_index, x, reduce="amin")
    return highest > lowest


@dataclass(frozen=True)
class TurnBatch:
    """What an estimator sees: per-trajectory facts of B trajectories in G groups with K turns.

    ``outcome`` (B,) float64; ``first_hit_turn`` (B,) long, k* or -1; ``group_index`` (B,) long,
    dense in [0, num_groups); ``num_turns`` K = 1 + the largest turn index of any loss token.
    """

    outcome: Tensor
    first_hit_turn: Tensor
    group_index: Tensor
    num_groups: int
    num_turns: int

    @cached_property
    def hit(self) -> Tensor:
        """(B,) float64: f = 1[k* >= 0], the trajectory's search surfaced the answer."""
        return (self.first_hit_turn >= 0).to(torch.float64)

    def zscore(self, values: Tensor, eps: float) -> Tensor:
        """(B,) -> (B,) float64 group z-score (see :func:`group_zscore`)."""
        return group_zscore(values, self.group_index, self.num_groups, eps)

    def group_is_mixed(self, values: Tensor) -> Tensor:
        """(B,) -> (B,) bool: whether the trajectory's group holds unequal ``values``."""
        return group_has_spread(values, self.group_index, self.num_groups)[self.group_index]

    def stage1(self) -> Tensor:
        """(B, K) bool: turn k is in stage 1 (k <= k*, or every turn when k* = -1)."""
        turns = torch.arange(self.num_turns, device=self.first_hit_turn.device)
        k_star = self.first_hit_turn.unsqueeze(1)
        return (turns.unsqueeze(0) <= k_star) | (k_star < 0)

    def every_turn(self, values: Tensor) -> Tensor:
        """(B,) -> (B, K): the same value on every turn of a trajectory."""
        return values.unsqueeze(1).expand(-1, self.num_turns)


@register_estimator("grpo")
def grpo(batch: TurnBatch, *, eps: float = DEFAULT_EPS) -> Tensor:
    """Outcome-only GRPO: A_i = z(R)_i on every turn. -> (B, K)."""
    return batch.every_turn(batch.zscore(batch.outcome, eps))


@register_estimator("folr_scalar")
def folr_scalar(
    batch: TurnBatch, *, alpha: float = DEFAULT_ALPHA, eps: float = DEFAULT_EPS
) -> Tensor:
    """GRPO on the FOLR-shaped scalar reward: A_i = z(R + alpha * f)_i on every turn. -> (B, K)."""
    return batch.every_turn(batch.zscore(batch.outcome + alpha * batch.hit, eps))


@register_estimator("tspo")
def tspo(batch: TurnBatch, *, lam: float = DEFAULT_LAM, eps: float = DEFAULT_EPS) -> Tensor:
    """Stage-aware TSPO: A_ik = z(R)_i + lam * z(f)_i * 1[k in stage 1]. -> (B, K)."""
    outcome_term = batch.every_turn(batch.zscore(batch.outcome, eps))
    folr_term = batch.every_turn(batch.zscore(batch.hit, eps))
    return outcome_term + lam * folr_term * batch.stage1()


@register_estimator("tspo_switch")
def tspo_switch(batch: TurnBatch, *, lam: float = DEFAULT_LAM, eps: float = DEFAULT_EPS) -> Tensor:
    """GRPO in groups with mixed outcomes; lam * z(f) on stage-1 turns elsewhere. -> (B, K)."""
    outcome_term = batch.every_turn(batch.zscore(batch.outcome, eps))
    folr_term = lam * batch.every_turn(batch.zscore(batch.hit, eps)) * batch.stage1()
    mixed = batch.group_is_mixed(batch.outcome).unsqueeze(1)
    return torch.where(mixed, outcome_term, folr_term)


# The names registered above, read off the registry before any user estimator joins it.
# ``tspo.train.config`` keeps a torch-free copy for checking names early; a test keeps them equal.
BUILTIN_ESTIMATORS: tuple[str, ...] = tuple(ESTIMATORS)


def turn_presence(turn_ids: Tensor, num_turns: int) -> Tensor:
    """(B, T) turn ids (-1 off the loss) -> (B, K) bool: trajectory i has a loss token in turn k."""
    dump_column = torch.where(turn_ids >= 0, turn_ids, num_turns)
    present = torch.zeros(turn_ids.shape[0], num_turns + 1, device=turn_ids.device)
    present.scatter_(1, dump_column, 1.0)
    return present[:, :num_turns].bool()


def per_turn_normalize(table: Tensor, present: Tensor, batch: TurnBatch, eps: float) -> Tensor:
    """Re-standardise each turn index within each group, over the trajectories that reached it.

    Shapes: ``table`` (B, K) float, ``present`` (B, K) bool -> (B, K) float64; absent cells are 0.
    """
    rows, turns = present.nonzero(as_tuple=True)
    cell_group = batch.group_index[rows] * batch.num_turns + turns
    normalized = torch.zeros_like(table, dtype=torch.float64)
    normalized[rows, turns] = group_zscore(
        table[rows, turns], cell_group, batch.num_groups * batch.num_turns, eps
    )
    return normalized


def _estimator_options(name: str, fn: EstimatorFn, options: dict[str, Any]) -> dict[str, Any]:
    """The options ``fn`` accepts; unknown non-common options are a user error."""
    parameters = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return dict(options)
    unknown = sorted(set(options) - set(parameters) - COMMON_OPTIONS)
    if unknown:
        raise TSPOError(f"advantage estimator {name!r} has no option(s) {', '.join(unknown)}")
    return {key: value for key, value in options.items() if key in parameters}


def _check_shapes(
    outcome: Tensor, first_hit_turn: Tensor, turn_ids: Tensor, group_ids: Tensor
) -> None:
    if turn_ids.dim() != 2:
        raise ValueError(f"turn_ids must be (B, T), got shape {tuple(turn_ids.shape)}")
    batch_size = turn_ids.shape[0]
    for label, tensor in (
        ("outcome", outcome),
        ("first_hit_turn", first_hit_turn),
        ("group_ids", group_ids),
    ):
        if tuple(tensor.shape) != (batch_size,):
            raise ValueError(f"{label} must be ({batch_size},), got shape {tuple(tensor.shape)}")
    if first_hit_turn.numel() and int(first_hit_turn.min()) < -1:
        raise ValueError("first_hit_turn must be a turn index >= 0, or -1 for no hit")


def compute_advantages(
    name: str,
    *,
    outcome: Tensor,
    first_hit_turn: Tensor,
    turn_ids: Tensor,
    group_ids: Tensor,
    per_turn_norm: bool = False,
    **options: Any,
) -> Tensor:
    """Token advantages from the estimator registered as ``name``.

    Args:
        outcome: (B,) float, the outcome reward R.
        first_hit_turn: (B,) long, k* or -1.
        turn_ids: (B, T) long, turn index of each response token; -1 = not a loss token.
        group_ids: (B,) long, one id per question group (any integers).
        per_turn_norm: opt-in; after the estimator, re-standardise each turn index within each
            group over the trajectories that reached that turn (see :func:`per_turn_normalize`).
        **options: estimator options (``alpha``, ``lam``, ``eps``, ...).

    Returns:
        (B, T) float in ``outcome``'s dtype (float32 for integer outcomes), exactly 0 wherever
        ``turn_ids == -1``.
    """
    fn = ESTIMATORS.get(name)
    if fn is None:
        known = ", ".join(sorted(ESTIMATORS))
        raise TSPOError(f"unknown advantage estimator {name!r}; registered: {known}")
    _check_shapes(outcome, first_hit_turn, turn_ids, group_ids)
    out_dtype = outcome.dtype if outcome.is_floating_point() else torch.float32
    num_turns = max(int(turn_ids.max()) + 1 if turn_ids.numel() else 0, 1)
    group_values, group_index = torch.unique(group_ids, return_inverse=True)
    batch = TurnBatch(
        outcome=outcome.to(torch.float64),
        first_hit_turn=first_hit_turn.long(),
        group_index=group_index,
        num_groups=group_values.numel(),
        num_turns=num_turns,
    )
    table = fn(batch, **_estimator_options(name, fn, options))
    if tuple(table.shape) != (len(outcome), num_turns):
        raise ValueError(
            f"estimator {name!r} returned shape {tuple(table.shape)}, "
            f"expected ({len(outcome)}, {num_turns})"
        )
    if per_turn_norm:
        eps = float(options.get("eps", DEFAULT_EPS))
        table = per_turn_normalize(table, turn_presence(turn_ids, num_turns), batch, eps)
    padded = torch.cat([table.to(out_dtype), table.new_zeros(len(outcome), 1, dtype=out_dtype)], 1)
    token_turn = torch.where(turn_ids >= 0, turn_ids, num_turns)
    return padded.gather(1, token_turn)

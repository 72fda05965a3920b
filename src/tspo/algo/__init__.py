"""TSPO algorithm core: answer metrics, FOLR, advantage estimators, PPO loss, diagnostics.

Pure tensor/string functions: no model, no I/O (DESIGN.md §3).
"""

from tspo.algo.advantages import ESTIMATORS, TurnBatch, compute_advantages, register_estimator
from tspo.algo.diagnostics import group_diagnostics
from tspo.algo.folr import first_occurrence_turn
from tspo.algo.loss import kl_penalty, policy_loss
from tspo.algo.metrics import exact_match, f1_score, normalize_answer

__all__ = [
    "ESTIMATORS",
    "TurnBatch",
    "compute_advantages",
    "exact_match",
    "f1_score",
    "first_occurrence_turn",
    "group_diagnostics",
    "kl_penalty",
    "normalize_answer",
    "policy_loss",
    "register_estimator",
]

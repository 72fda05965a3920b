"""TSPO algorithm core: answer metrics, FOLR, advantage estimators, PPO loss, diagnostics.

Pure tensor/string functions: no model, no I/O. The formulas, and which parts are the paper's and
which are our reading, are in docs/algorithm.md.
"""

from tspo.algo.advantages import (
    BUILTIN_ESTIMATORS,
    ESTIMATORS,
    TurnBatch,
    compute_advantages,
    register_estimator,
)
from tspo.algo.diagnostics import group_diagnostics
from tspo.algo.folr import DETECT_IN, first_occurrence_turn
from tspo.algo.loss import kl_penalty, policy_loss
from tspo.algo.metrics import exact_match, f1_score, normalize_answer

__all__ = [
    "BUILTIN_ESTIMATORS",
    "DETECT_IN",
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

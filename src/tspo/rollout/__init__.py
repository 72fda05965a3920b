"""tspo.rollout: batched multi-turn rollouts (policy + environment + retriever) -> RolloutBatch."""

from tspo.rollout.batch import RolloutBatch, Trajectory
from tspo.rollout.config import RolloutConfig
from tspo.rollout.engine import RolloutEngine
from tspo.rollout.scoring import score_trajectory

__all__ = ["RolloutBatch", "RolloutConfig", "RolloutEngine", "Trajectory", "score_trajectory"]

"""Every knob of the quickstart in one typed place, with defaults sized for a 2-core CPU."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any

from tspo.train.sft import SFTConfig


@dataclass(frozen=True)
class WorldStage:
    """The synthetic world."""

    seed: int = 0
    size: str = "small"


@dataclass(frozen=True)
class PolicyStage:
    """The base model, the noisy expert and the SFT warm start."""

    base: str = "tspo-tiny-base"  # a model folder or alias; the shipped base by default
    # The expert answers a hop early this often (see tspo.data.expert): the mistake RL fixes. With
    # the plan in its notes, the greedy SFT start answers after one search at 0.45 (test EM 0.35)
    # and RL teaches it to search on; at 0.10-0.25 the start was already at 0.64-0.73 and RL gained
    # +0.00 to +0.08 (docs/results.md).
    early_answer: float = 0.45
    wrong_query: float = 0.15
    recover: float = 0.5
    # What the expert notes in its think lines (tspo.data.expert.EXPERT_NOTES). With no notes the
    # policy's search-or-answer choice ignored the question (P(search) 0.47 for 1-, 2- and 3-hop
    # alike). "plan" lists the kinds still to find ("Left: city, country."), so stopping is read
    # off one word; "goal" ("Goal: country. ... Found: city.") left the policy answering the city
    # on other worlds' 3-hop country chains (docs/results.md).
    expert_notes: str = "plan"
    expert_passes: int = 1  # noisy expert episodes per training question
    # Extra worlds whose questions only feed SFT (see pipeline). With the goal notes, 5 worlds and
    # batches of 8 gave an SFT start that gained +0.11 to +0.19 test EM over 20 RL steps in three
    # seeds; 9 took twice as long for +0.08 to +0.10. With the plan notes, 6 worlds and no episode
    # of the real world gained +0.233 against +0.283 (docs/results.md).
    practice_worlds: int = 5
    # The base never saw the protocol tags and holds them as one vector: SFT gives them distinct
    # embeddings and weighs their tokens 5x, or the policy closes `<search>` with `</answer>` on
    # most later hops (docs/results.md).
    sft: SFTConfig = field(
        default_factory=lambda: SFTConfig(
            lr=1e-3, batch_size=8, resample_tag_embeddings=True, action_tag_weight=5.0
        )
    )
    seed: int = 0


# RLStage's fields that are the quickstart's own; every other one is the TrainConfig field of that
# name (tspo.quickstart.pipeline.rl_train_config). tests/test_settings_agree.py says which of
# their defaults are the trainer's and which the quickstart's own choice.
RL_STAGE_OWN_FIELDS = ("checkpoint_every", "eval_every", "keep_best_dev", "eval_examples")


@dataclass(frozen=True)
class RLStage:
    """The RL run: fields of ``tspo.train.config.TrainConfig`` by name, and the quickstart's own
    (``RL_STAGE_OWN_FIELDS``)."""

    estimator: str = "tspo"
    # Dev EM peaked at step 15, 15, 20 and 25 in four seeds from the default SFT start.
    steps: int = 25
    prompts_per_step: int = 16
    group_size: int = 4
    # 3e-4 made the policy run away from its SFT start (KL > 1 within five steps) into mixed,
    # invalid tags; see docs/results.md. tests/test_quickstart.py guards it.
    lr: float = 5e-5
    kl_coef: float = 0.001
    # Format penalty on trajectories with an invalid turn: without it the tiny policy drifted into
    # mixed tags (<answer> X </search>) even at 5e-5 and lost 1-hop accuracy (docs/results.md).
    invalid_penalty: float = 0.5
    alpha: float = 0.5
    temperature: float = 1.0
    # Full sampling: with top-p 0.9 the policy's entropy rose every step (0.17 -> 0.76 in 25
    # steps at lr 1.5e-4), since the policy gradient pushes the mass that negative advantages take
    # off sampled tokens into a tail that is never sampled, so never corrected (docs/results.md).
    top_p: float = 1.0
    max_turns: int = 4
    max_turn_tokens: int = 64  # a think line with goal, fact and kind, then the action
    max_obs_tokens: int = 200
    topk: int = 3
    micro_batch_size: int = 16
    seed: int = 0
    checkpoint_every: int | None = None  # None: at every dev evaluation, else only the last step
    # Greedy EM on the dev split every N steps (the learning curve, and the checkpoints the final
    # policy is chosen from); 0: off. Every 5 rather than 10: the peak falls between.
    eval_every: int = 5
    # The final policy is the RL checkpoint with the best greedy dev EM (early stopping on dev;
    # the test split is never looked at): RL from the SFT start can overshoot, e.g. dev EM 0.45 ->
    # 0.67 at step 10 -> 0.32 at step 30 in one run (docs/results.md). False: the last step.
    keep_best_dev: bool = True
    eval_examples: int | None = None  # None: the whole dev split


@dataclass(frozen=True)
class EvalStage:
    """Greedy evaluation on held-out test entities."""

    max_examples: int | None = None  # None: the whole test split
    batch_size: int = 32
    transfer: bool = True  # also evaluate on another world's test split (seed + 1): unseen names


@dataclass(frozen=True)
class QuickstartSettings:
    """World -> policy (SFT) -> RL -> evaluation."""

    threads: int | None = None  # torch CPU threads; None leaves torch's default
    world: WorldStage = field(default_factory=WorldStage)
    policy: PolicyStage = field(default_factory=PolicyStage)
    rl: RLStage = field(default_factory=RLStage)
    eval: EvalStage = field(default_factory=EvalStage)


def fingerprint(*parts: Any) -> str:
    """A short stable hash of dataclasses/dicts: a stage is reused only if its inputs match."""
    blob = json.dumps(
        [asdict(p) if hasattr(p, "__dataclass_fields__") else p for p in parts],
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]

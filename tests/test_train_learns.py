"""End to end: the trainer learns a task that only the reward teaches, with every estimator.

The task: every question has the same gold answer, one of four colour words, and nothing in the
prompt, the corpus or the warm start points to it. A micro policy is warm-started by SFT on
episodes that answer ``<answer> W </answer>`` with W spread evenly over the four words, so it
starts at a sampled reward of about 0.25. `tspo train` (the real loop: rollout, EM scoring,
advantages, old and reference log-probs, clipped PPO with KL, AdamW) must then raise the mean
reward to at least 0.8 with each registered estimator, and the same run with every advantage
negated (a test-only estimator registered through ``tspo.algo.register_estimator``) must drive it
down instead. Together they check the update direction, the advantage signs and the loss mask end
to end: a flipped sign, an advantage landing on the wrong tokens or a loss that ignores it would
fail one side or the other.

The task is one turn (the SFT start answers at once; ``rollout.max_turns`` is 1, the smallest the
config allows, so a stray search is possible but rare). No search ever surfaces the gold, so k* is
-1 throughout and the FOLR terms vanish: here every estimator reduces to the outcome z-score
(``tspo_switch`` to 0 in flat groups), and the four runs give the same curve. The test is about
the trainer's plumbing, not about FOLR.

Settings: lr 5e-4 with 8 optimizer steps of 4 trajectories per training step reached 0.84-0.97
(mean of the last 3 steps) on 9 seeds in fp32 and in CPU bf16 autocast, and the control fell to
0.00-0.05. Larger steps (lr 1e-3 to 2e-3, or mini-batches of 8-16 at 1e-3) learn faster but
sometimes break the answer format for a step or two (Adam moving a 100k-parameter model too far),
which made the last-3 mean miss 0.8 on about 1 run in 10. ``train.bf16`` is left at its default
("auto"), so the test runs whichever precision the trainer picks on the machine.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from train_helpers import single_thread

from tspo.algo import ESTIMATORS, TurnBatch, register_estimator
from tspo.data.qa import QAExample, write_flashrag_jsonl
from tspo.train.config import BUILTIN_ESTIMATORS, config_from_dict
from tspo.train.loop import train

CANDIDATES = ("red", "blue", "green", "pink")
GOLD = "green"
# Two phrasings of different lengths, so prompts in a batch are left-padded.
QUESTIONS = [
    f"Which colour is the flag of land {i}?"
    if i % 2
    else f"What colour is the flag that flies over land {i} today?"
    for i in range(16)
]
SEED = 0
STEPS = 12
SFT_EPOCHS = 20
VOCAB = 400
SFT_LR = 5e-3
TARGET = 0.8
# Every estimator the registry knows, minus test-only ones (other tests register "test_*" names).
ESTIMATOR_NAMES = sorted(name for name in ESTIMATORS if not name.startswith("test_"))
FLIPPED = "test_flipped_grpo"


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread() -> Iterator[None]:
    with single_thread():
        yield


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def build_task(folder: Path) -> dict[str, Path]:
    """QA file, corpus and an SFT warm-started micro policy, written into ``folder``."""
    from tspo.models.tiny import build_tiny_model, train_tokenizer
    from tspo.protocol import build_prompt
    from tspo.train.sft import SFTConfig, encode_episode, save_policy, train_sft

    qa = folder / "train.jsonl"
    write_flashrag_jsonl(
        [QAExample(f"q{i}", q, [GOLD], "colours") for i, q in enumerate(QUESTIONS)], qa
    )
    corpus = folder / "corpus.jsonl"  # no document names a colour: search cannot find the gold
    corpus.write_text(
        "".join(
            json.dumps({"id": str(i), "contents": f"Land {i}\nLand number {i} is a small land."})
            + "\n"
            for i in range(len(QUESTIONS))
        ),
        encoding="utf-8",
    )

    answers = [f"<answer> {word} </answer>" for word in CANDIDATES]
    # The protocol's fixed instructions become one token, so a prompt is ~17 tokens instead of
    # ~100 and a training step costs a quarter as much; ``build_prompt`` is unchanged.
    instructions = build_prompt("{question}").split("{question}")[0]
    tokenizer = train_tokenizer(
        QUESTIONS + answers * len(QUESTIONS),
        vocab_size=VOCAB,
        min_frequency=1,
        extra_tokens=[instructions],
    )
    assert len(tokenizer.encode(build_prompt(QUESTIONS[0]), add_special_tokens=False)) < 24
    model = build_tiny_model(tokenizer, "micro", seed=SEED)
    # Each question is answered once with each word: the SFT target is exactly uniform over them.
    episodes = [
        encode_episode(tokenizer, question, [answer], [None])
        for question in QUESTIONS
        for answer in answers
    ]
    train_sft(
        model,
        episodes,
        SFTConfig(epochs=SFT_EPOCHS, batch_size=16, lr=SFT_LR, seed=SEED),
        pad_id=tokenizer.pad_token_id,
    )
    model_dir = save_policy(model, tokenizer, folder / "sft")
    return {"qa": qa, "corpus": corpus, "model": model_dir}


@pytest.fixture(scope="module")
def task(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_task(tmp_path_factory.mktemp("learns"))


def run(task: dict[str, Path], out: Path, estimator: str) -> list[float]:
    """Train from the SFT start with ``estimator``; the per-step mean rewards."""
    config = config_from_dict(
        {
            "model": {"name": str(task["model"])},
            "data": {"train_files": [str(task["qa"])]},
            "retriever": {"corpus": str(task["corpus"])},
            "rollout": {
                "group_size": 8,
                "max_turns": 1,
                "max_turn_tokens": 8,
                "max_obs_tokens": 16,
                "topk": 1,
            },
            "algo": {"estimator": estimator},  # kl_coef, clipping and the rest at their defaults
            "optim": {"lr": 5e-4},
            "train": {
                "steps": STEPS,
                "prompts_per_step": 4,
                "mini_batch_size": 4,  # 8 optimizer steps per training step
                "micro_batch_size": 4,
                "seed": SEED,
                "output_dir": str(out),
            },
            "logging": {"progress": False, "samples_per_step": 0},
        }
    )
    result = train(config)
    rewards = [m["reward_mean"] for m in result.metrics]
    assert [m["reward_mean"] for m in read_jsonl(out / "metrics.jsonl")] == rewards
    assert all(m["skipped_optimizer_steps"] == 0 for m in result.metrics)
    return rewards


def final(rewards: list[float]) -> float:
    return sum(rewards[-3:]) / 3


def test_the_registry_holds_the_builtin_estimators() -> None:
    assert set(BUILTIN_ESTIMATORS) <= set(ESTIMATOR_NAMES)


@pytest.mark.parametrize("estimator", ESTIMATOR_NAMES)
def test_reward_rises_to_the_target(task: dict[str, Path], tmp_path: Path, estimator: str) -> None:
    rewards = run(task, tmp_path, estimator)
    assert 0.05 <= rewards[0] <= 0.5, rewards  # the warm start is not already solved
    assert final(rewards) >= TARGET, rewards


@pytest.fixture
def flipped() -> Iterator[str]:
    """``grpo`` with every advantage negated, registered for one test."""

    def negated(batch: TurnBatch, *, eps: float) -> torch.Tensor:
        return -ESTIMATORS["grpo"](batch, eps=eps)

    register_estimator(FLIPPED)(negated)
    try:
        yield FLIPPED
    finally:
        ESTIMATORS.pop(FLIPPED, None)


def test_flipped_advantages_unlearn(task: dict[str, Path], tmp_path: Path, flipped: str) -> None:
    rewards = run(task, tmp_path, flipped)
    assert final(rewards) < TARGET, rewards
    assert final(rewards) <= 0.1 < rewards[0], rewards  # it unlearns the gold instead

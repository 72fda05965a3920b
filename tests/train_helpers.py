"""A tiny world for trainer and eval tests: a corpus, QA files, and a micro model saved to disk."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tspo.protocol import PROMPT_TEMPLATE

# The micro model rarely answers right, so the entropy bonus guarantees a gradient on every step:
# resumed and uninterrupted runs must then agree on weights that actually moved.
MOVING = ("algo.entropy_coef=0.01",)

FACTS = [
    ("Paris", "Paris is the capital of France.", "What is the capital of France?", ["Paris"]),
    ("Rome", "Rome is the capital of Italy.", "What is the capital of Italy?", ["Rome"]),
    ("Oslo", "Oslo is the capital of Norway.", "What is the capital of Norway?", ["Oslo"]),
    ("Lima", "Lima is the capital of Peru.", "What is the capital of Peru?", ["Lima"]),
    ("Nile", "The Nile is a river in Africa.", "Which river flows through Egypt?", ["Nile"]),
    ("Everest", "Everest is the highest mountain.", "What is the highest mountain?", ["Everest"]),
]


@contextmanager
def single_thread() -> Iterator[None]:
    """Run torch on one thread: on a loaded shared CPU, two threads make micro-model ops ~50x
    slower (they spin waiting for each other)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass
class TinyWorld:
    corpus: Path
    qa: Path
    model_dir: Path


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def build_tiny_world(folder: Path) -> TinyWorld:
    """Corpus jsonl, FlashRAG QA jsonl and a random-weight micro Llama with its tokenizer."""
    from tspo.models.tiny import build_tiny_model, train_tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    corpus = write_jsonl(
        folder / "corpus.jsonl",
        [
            {"id": str(i), "contents": f"{title}\n{text}"}
            for i, (title, text, _, _) in enumerate(FACTS)
        ],
    )
    qa = write_jsonl(
        folder / "qa.jsonl",
        [
            {"id": f"q{i}", "question": question, "golden_answers": golds}
            for i, (_, _, question, golds) in enumerate(FACTS)
        ],
    )
    texts = [PROMPT_TEMPLATE.format(question=q) for _, _, q, _ in FACTS]
    texts += [f"{title}\n{text}" for title, text, _, _ in FACTS]
    tokenizer = train_tokenizer(texts * 4, vocab_size=400, min_frequency=1)
    model = build_tiny_model(tokenizer, "micro", seed=0)
    model_dir = folder / "model"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    return TinyWorld(corpus=corpus, qa=qa, model_dir=model_dir)


def tiny_config(world: TinyWorld, output_dir: Path, *overrides: str) -> Any:
    """A config that trains the micro model in about a second per step."""
    from tspo.train.config import load_config

    base = [
        f"model.name={world.model_dir}",
        f"data.train_files=[{world.qa}]",
        f"retriever.corpus={world.corpus}",
        f"train.output_dir={output_dir}",
        "train.steps=2",
        "train.prompts_per_step=2",
        "train.micro_batch_size=2",
        "train.seed=7",
        "rollout.group_size=2",
        "rollout.max_turns=1",
        "rollout.max_turn_tokens=8",
        "rollout.max_obs_tokens=12",
        "rollout.topk=1",
        "optim.lr=0.001",
        "logging.progress=false",
        "logging.samples_per_step=2",
    ]
    return load_config(None, [*base, *overrides])

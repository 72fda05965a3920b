"""The base model's gates: copy a name, read one document, read past a near-duplicate twin.

Measured on worlds never trained on (seeds ``GATE_WORLD_SEED`` and the next), greedy decoding, in
the same layouts the pre-training items use:

- ``copy``: ``"Name: X. Repeat:"`` must continue with exactly ``X`` (cut at ``.`` or a newline);
- ``rc_one_doc``: the subject's document alone, then the question; EM against the gold aliases;
- ``rc_twin``: the subject's document and its near-duplicate twin's, in random order;
- ``rc_three_docs``: the subject's document among two random ones (reported, not gated);
- ``rc_question_first``: as ``rc_three_docs`` with the question before the documents, the layout
  the search agent reads in (reported, not gated).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from tspo.data.world import World, generate_world
from tspo.pretrain.items import (
    GATE_WORLD_SEED,
    copy_prompt,
    one_hop_items,
    reading_documents,
    reading_prompt,
)

GATE_TARGETS = {"copy": 0.95, "rc_one_doc": 0.70, "rc_twin": 0.50}


@dataclass(frozen=True)
class GateCase:
    prompt: str
    golds: list[str]
    stop: str  # the continuation is cut at the first of these characters


def gate_cases(world: World, items: int, seed: int = 0) -> dict[str, list[GateCase]]:
    """Up to ``items`` cases per gate from ``world`` (a fixed sample for a given seed)."""
    rng = random.Random(seed)
    names = sorted(entity.name for entity in world.entities.values())
    reading = one_hop_items(world)
    with_twin = [q for q in reading if world.entities[q.subject].twin is not None]

    def golds(entity_id: str) -> list[str]:
        return world.golds(entity_id)

    def read_cases(
        questions: list[Any], count: int, twin: bool, question_first: bool = False
    ) -> list[GateCase]:
        chosen = rng.sample(questions, min(items, len(questions)))
        return [
            GateCase(
                reading_prompt(
                    reading_documents(world, q, count, 1.0 if twin else 0.0, rng),
                    q.question,
                    question_first=question_first,
                ),
                golds(q.answer),
                "\n",
            )
            for q in chosen
        ]

    return {
        "copy": [
            GateCase(copy_prompt([name]), [name], ".\n")
            for name in rng.sample(names, min(items, len(names)))
        ],
        "rc_one_doc": read_cases(reading, 1, twin=False),
        "rc_twin": read_cases(with_twin, 2, twin=True),
        "rc_three_docs": read_cases(reading, 3, twin=False),
        "rc_question_first": read_cases(reading, 3, twin=False, question_first=True),
    }


def _cut(text: str, stop: str) -> str:
    ends = [i for i in (text.find(ch) for ch in stop) if i >= 0]
    return (text[: min(ends)] if ends else text).strip()


def greedy_continuations(
    model: Any, tokenizer: Any, prompts: list[str], *, max_new_tokens: int = 16, batch: int = 64
) -> list[str]:
    """Greedy continuations of ``prompts`` (left-padded batches), decoded."""
    import torch

    outputs: list[str] = []
    model.eval()
    for start in range(0, len(prompts), batch):
        chunk = prompts[start : start + batch]
        enc = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False)
        enc = {k: v.to(model.device) for k, v in enc.items()}
        with torch.no_grad():
            out = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
        new = out[:, enc["input_ids"].shape[1] :]
        outputs += tokenizer.batch_decode(new, skip_special_tokens=True)
    return outputs


GATE_WORLDS = (
    2  # gate worlds: seeds GATE_WORLD_SEED, GATE_WORLD_SEED + 1 (the twin gate needs both)
)


def pooled_gate_cases(items: int, seed: int = 0) -> dict[str, list[GateCase]]:
    """Up to ``items`` cases per gate, drawn from the gate worlds in turn until there are enough
    (one world holds fewer than 200 questions about entities that have a twin)."""
    pooled: dict[str, list[GateCase]] = {}
    for index in range(GATE_WORLDS):
        world = generate_world(GATE_WORLD_SEED + index, "small")
        for gate, cases in gate_cases(world, items, seed).items():
            have = pooled.setdefault(gate, [])
            have += cases[: items - len(have)]
    return pooled


def measure_gates(
    model: Any, tokenizer: Any, items: int, *, world: World | None = None, seed: int = 0
) -> dict[str, float]:
    """Accuracy per gate on ``items`` cases each (the gate worlds unless ``world`` is given)."""
    from tspo.algo import exact_match

    by_gate = gate_cases(world, items, seed) if world else pooled_gate_cases(items, seed)
    results: dict[str, float] = {}
    for gate, cases in by_gate.items():
        texts = greedy_continuations(model, tokenizer, [c.prompt for c in cases])
        hits = [
            (_cut(text, c.stop) == c.golds[0])
            if gate == "copy"
            else bool(exact_match(_cut(text, c.stop), c.golds))
            for text, c in zip(texts, cases, strict=True)
        ]
        results[gate] = sum(hits) / max(1, len(hits))
    return results


def gates_met(results: dict[str, float]) -> bool:
    return all(results.get(gate, 0.0) >= target for gate, target in GATE_TARGETS.items())

"""The model card of a pre-trained base: how it was made and what it measured."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tspo.pretrain.gates import GATE_TARGETS
from tspo.utils import atomic_write_text

GATE_NAMES = {
    "copy": "exact name copy",
    "rc_one_doc": "one-hop reading EM, one document",
    "rc_twin": "one-hop reading EM, gold document + near-duplicate twin",
    "rc_three_docs": "one-hop reading EM, gold document among three",
    "rc_question_first": "one-hop reading EM, question before three documents (agent layout)",
}


def model_card(facts: dict[str, Any]) -> str:
    config = facts["config"]
    mix = config["mix"]
    question_first = mix.get("question_first", 0.0)
    gate_rows = "\n".join(
        f"| {GATE_NAMES.get(gate, gate)} | {value:.3f} | "
        + (f">= {GATE_TARGETS[gate]:.2f}" if gate in GATE_TARGETS else "(reported)")
        + " |"
        for gate, value in facts["gates"].items()
    )
    return f"""---
license: apache-2.0
library_name: transformers
pipeline_tag: text-generation
---

# tspo-tiny-base

A {facts["parameters"]:,}-parameter Llama-shaped causal LM ({config["shape"]}: hidden x layers,
{config["vocab_size"]}-token byte-level BPE vocabulary), pre-trained {_origin(facts)} by
`tspo pretrain` on generated practice worlds. It reads short documents and copies names it has
never seen. It has never seen the search protocol (no `<search>`, `<answer>`… in its data) and
never any evaluation world: the search agent is made from it by SFT (`tspo quickstart`).

## How it was made

```
{_commands(facts)}
```
{_parent(facts)}
| setting | value |
|---|---|
| seed | {config["seed"]} |
| torch threads | {facts["threads"]} |
| steps | {facts["steps"]:,} (batch {config["batch_size"]} x {config["seq_len"]} packed tokens) |
| wall time | {facts["wall_minutes"]} min |
| practice worlds | {facts["practice_worlds"] - config.get("first_world", 0)} (seeds \
{2_000_000 + config.get("first_world", 0):,} and up) |
| data mix | {mix["rc_share"]:.0%} reading items ({question_first:.0%} of them with the question \
first), {mix["doc_share"]:.0%} documents, {mix["copy_share"]:.0%} copy drills; answer \
tokens weighted {mix["answer_weight"]:g} |
| optimiser | AdamW (0.9, 0.95), lr {config["lr"]:g}, {config["warmup_steps"]} warm-up steps, \
cosine to {config["min_lr_ratio"]:g}x, weight decay {config["weight_decay"]:g}, grad-clip \
{config["max_grad_norm"]:g} |
| precision | {"bf16 autocast, fp32 master weights" if config["bf16"] else "fp32"} |
| final training loss (EMA, weighted) | {facts["final_loss"]} |

## Gates

Greedy decoding on worlds never trained on (seeds 3,000,000 and 3,000,001), {facts["gate_items"]}
items each:

| gate | measured | target |
|---|---:|---:|
{gate_rows}

{_first_measurement(facts)}## Tokens it never saw

The protocol tags and the byte-level tokens that never occur in its data (392 of the 1,000,
`<search>` and `<answer>` among them) all hold one and the same embedding: pre-training moved every
unseen token the same way. Give the tags distinct embeddings before fine-tuning on the protocol, or
the model cannot tell which tag it opened; `tspo sft --world` and the quickstart do
(`tspo.models.embeddings.resample_token_embeddings`).

## Files

`model.safetensors` SHA-256: `{facts["sha256"]}`

Load it with `AutoModelForCausalLM.from_pretrained(folder)` and `AutoTokenizer.from_pretrained
(folder)`, or by its alias `tspo-tiny-base` wherever tspo accepts a model name.
"""


def _origin(facts: dict[str, Any]) -> str:
    parent = facts.get("parent")
    if parent:
        return "in two runs (from random weights, then continued from the first run's weights)"
    return "from random weights"


def _commands(facts: dict[str, Any]) -> str:
    parent = facts.get("parent")
    first = f"{parent['command']}\n" if parent and parent.get("command") else ""
    return first + facts["command"]


def _parent(facts: dict[str, Any]) -> str:
    """The starting base of a continued run: its weights' hash and how it was made."""
    parent = facts.get("parent")
    if not parent:
        return ""
    gates = ", ".join(f"{k} {v:.3f}" for k, v in (parent.get("gates") or {}).items())
    return (
        f"\nThe second command continued from `{parent['name']}` (`model.safetensors` SHA-256 "
        f"`{parent['sha256']}`), which the first made in {parent.get('steps')} steps "
        f"({parent.get('wall_minutes')} min); its gates: {gates}. The table below describes "
        "the second run.\n"
    )


def _first_measurement(facts: dict[str, Any]) -> str:
    first = facts.get("gates_first_measured")
    if not first:
        return ""
    figures = ", ".join(f"{gate} {value:.3f}" for gate, value in first.items())
    return (
        "The run itself measured the gates on the first gate world only, where fewer than 200\n"
        f"twin questions exist ({figures}); the table above re-measures them on both worlds.\n\n"
    )


def write_model_card(path: str | Path, facts: dict[str, Any]) -> None:
    atomic_write_text(path, model_card(facts))

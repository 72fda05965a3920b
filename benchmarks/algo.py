"""Benchmark: the algorithm core against one forward pass of a ~10M-parameter model.

Times ``compute_advantages`` for every registered estimator, ``policy_loss`` forward + backward,
``group_diagnostics`` and FOLR detection at B=512 trajectories x T=2048 response tokens, and one
forward pass of a random-weight Qwen2-style model (~10M parameters, 8k vocabulary) over the same
batch, all in one run. Target (issue 3): each estimator < 5% of that forward pass.

A 512 x 2048 forward does not fit a laptop (its logits alone are 34 GB in float32), so the forward
is timed on ``--forward-rows`` full-length rows and scaled linearly in the number of rows (rows are
independent; the per-row cost, quadratic attention included, is measured, not modelled).

    python benchmarks/algo.py                 # writes docs/bench/algo.json and docs/bench/algo.md
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from tspo.algo import (
    ESTIMATORS,
    compute_advantages,
    first_occurrence_turn,
    group_diagnostics,
    policy_loss,
)
from tspo.utils import atomic_write_text, machine_info, peak_memory_mb, set_seed, write_json

TARGET_SHARE = 0.05


def median_seconds(fn: Callable[[], object], repeats: int, warmup: int = 2) -> float:
    """Median wall time of ``fn`` over ``repeats`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def rollout_shaped_batch(batch: int, length: int, group_size: int, max_turns: int):
    """Random tensors shaped like a rollout: turns of generated tokens separated by observations."""
    generator = torch.Generator().manual_seed(0)
    turn_ids = torch.full((batch, length), -1, dtype=torch.long)
    num_turns = torch.randint(1, max_turns + 1, (batch,), generator=generator)
    for row in range(batch):
        position = 0
        for turn in range(int(num_turns[row])):
            generated = int(torch.randint(64, 400, (1,), generator=generator))
            turn_ids[row, position : position + generated] = turn
            position += generated + 300  # an <information> block follows each search
            if position >= length:
                break
    first_hit = torch.randint(-1, max_turns, (batch,), generator=generator)
    first_hit = torch.minimum(first_hit, num_turns - 1)
    return {
        "outcome": torch.randint(0, 2, (batch,), generator=generator).float(),
        "first_hit_turn": first_hit,
        "turn_ids": turn_ids,
        "group_ids": torch.arange(batch) // group_size,
    }


def build_forward_model(vocab_size: int):
    """A random-weight Qwen2-style causal LM of about 10M parameters."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from tspo.models.tiny import MODEL_PRESETS

    # The "tiny" preset's shape, in Qwen2 form.
    config = Qwen2Config(vocab_size=vocab_size, tie_word_embeddings=False, **MODEL_PRESETS["tiny"])
    model = Qwen2ForCausalLM(config).eval()
    return model, sum(p.numel() for p in model.parameters())


def folr_workload(batch: int, max_turns: int, words_per_observation: int):
    """Question, golds, observations of ``batch`` trajectories; the answer sits in the last one."""
    filler = " ".join(f"word{i % 997}" for i in range(words_per_observation))
    observations = [f"Doc 1(Title: Page) {filler}"] * (max_turns - 1) + [f"{filler} Ada Lovelace"]
    return [("Who wrote the first program?", ["Ada Lovelace", "Lovelace"], observations)] * batch


def run(args: argparse.Namespace) -> dict:
    set_seed(0)
    torch.set_num_threads(args.threads)
    inputs = rollout_shaped_batch(args.batch, args.length, args.group_size, args.max_turns)
    loss_mask = inputs["turn_ids"] >= 0
    rows: list[dict] = []

    def record(name: str, seconds: float, note: str = "") -> None:
        rows.append({"name": name, "seconds": seconds, "note": note})

    for name in sorted(ESTIMATORS):
        seconds = median_seconds(lambda n=name: compute_advantages(n, **inputs), args.repeats)
        record(f"compute_advantages[{name}]", seconds)
    seconds = median_seconds(
        lambda: compute_advantages("tspo", **inputs, per_turn_norm=True), args.repeats
    )
    record("compute_advantages[tspo, per_turn_norm]", seconds)

    shape = (args.batch, args.length)
    logprobs = (-torch.rand(shape)).requires_grad_(True)
    old_logprobs = logprobs.detach() + 0.05 * torch.randn(shape)
    ref_logprobs = logprobs.detach() + 0.05 * torch.randn(shape)
    advantages = compute_advantages("tspo", **inputs)

    def loss_step() -> None:
        logprobs.grad = None
        loss, _ = policy_loss(logprobs, old_logprobs, ref_logprobs, advantages, loss_mask)
        loss.backward()

    record("policy_loss forward+backward", median_seconds(loss_step, args.repeats))
    record(
        "group_diagnostics",
        median_seconds(
            lambda: group_diagnostics(
                inputs["outcome"],
                inputs["first_hit_turn"],
                inputs["group_ids"],
                advantages,
                loss_mask,
            ),
            args.repeats,
        ),
    )
    workload = folr_workload(args.batch, args.max_turns, args.words_per_observation)
    record(
        "first_occurrence_turn x B",
        median_seconds(
            lambda: [first_occurrence_turn(q, g, o) for q, g, o in workload], 3, warmup=1
        ),
        f"{args.max_turns} observations of {args.words_per_observation} words per trajectory",
    )

    model, num_parameters = build_forward_model(args.vocab_size)
    ids = torch.randint(0, args.vocab_size, (args.forward_rows, args.length))
    with torch.inference_mode():
        slice_seconds = median_seconds(lambda: model(input_ids=ids), args.forward_repeats, 1)
    forward_seconds = slice_seconds * args.batch / args.forward_rows

    for row in rows:
        row["share_of_forward"] = row["seconds"] / forward_seconds
    estimator_rows = [r for r in rows if r["name"].startswith("compute_advantages")]
    return {
        "benchmark": "algo",
        "batch": args.batch,
        "length": args.length,
        "group_size": args.group_size,
        "max_turns": args.max_turns,
        "loss_tokens": int(loss_mask.sum()),
        "repeats": args.repeats,
        "forward": {
            "model": "Qwen2ForCausalLM, random weights",
            "parameters": num_parameters,
            "vocab_size": args.vocab_size,
            "timed_rows": args.forward_rows,
            "seconds_for_timed_rows": slice_seconds,
            "seconds_scaled_to_batch": forward_seconds,
            "scaling": f"linear in rows: x {args.batch / args.forward_rows:g}",
        },
        "results": rows,
        "target_share": TARGET_SHARE,
        "all_estimators_meet_target": all(
            r["share_of_forward"] < TARGET_SHARE for r in estimator_rows
        ),
        "memory": peak_memory_mb(),
        "load_average": os.getloadavg()[0],
        "machine": machine_info(),
    }


def markdown(report: dict) -> str:
    forward = report["forward"]
    lines = [
        "# Algorithm core benchmark",
        "",
        f"B = {report['batch']} trajectories x T = {report['length']} response tokens "
        f"({report['loss_tokens']:,} loss tokens), groups of {report['group_size']}, "
        f"up to {report['max_turns']} turns; median of {report['repeats']} runs.",
        "",
        f"Reference: one forward pass of a {forward['parameters'] / 1e6:.1f}M-parameter "
        f"{forward['model']} (vocabulary {forward['vocab_size']}) over the same batch: "
        f"**{forward['seconds_scaled_to_batch']:.1f} s**, measured on {forward['timed_rows']} "
        f"rows of {report['length']} tokens ({forward['seconds_for_timed_rows']:.2f} s) and scaled "
        f"{forward['scaling']}.",
        "",
        "| operation | time (ms) | share of the forward pass | note |",
        "|---|---:|---:|---|",
    ]
    for row in report["results"]:
        lines.append(
            f"| `{row['name']}` | {row['seconds'] * 1e3:.2f} | "
            f"{row['share_of_forward'] * 100:.3f}% | {row['note']} |"
        )
    verdict = "met" if report["all_estimators_meet_target"] else "NOT met"
    machine = report["machine"]
    memory = ", ".join(f"{key} {value:.0f}" for key, value in report["memory"].items())
    lines += [
        "",
        f"Target (each estimator < {report['target_share']:.0%} of the forward pass): "
        f"**{verdict}**.",
        "",
        f"Machine: {machine['platform']}, {machine['cpu_count']} CPUs "
        f"({machine.get('torch_threads')} torch threads), Python {machine['python']}, "
        f"torch {machine.get('torch')}; 1-minute load average at the end "
        f"{report['load_average']:.1f} (a shared machine slows every row alike). "
        f"Peak memory (MiB): {memory}.",
        "",
        "Reproduce: `python benchmarks/algo.py`.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=512, help="trajectories")
    parser.add_argument("--length", type=int, default=2048, help="response tokens per trajectory")
    parser.add_argument("--group-size", type=int, default=8, help="trajectories per question")
    parser.add_argument("--max-turns", type=int, default=4, help="turns per trajectory, at most")
    parser.add_argument("--repeats", type=int, default=20, help="timed runs per operation")
    parser.add_argument("--forward-rows", type=int, default=2, help="rows in the timed forward")
    parser.add_argument("--forward-repeats", type=int, default=3, help="timed forward passes")
    parser.add_argument("--vocab-size", type=int, default=8192, help="vocabulary of the model")
    parser.add_argument("--words-per-observation", type=int, default=300, help="FOLR text size")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--out", type=Path, default=Path("docs/bench"), help="output folder")
    args = parser.parse_args()
    report = run(args)
    write_json(args.out / "algo.json", report)
    atomic_write_text(args.out / "algo.md", markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()

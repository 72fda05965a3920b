"""Policy-update throughput: TSPO's trainer update against TRL's ``GRPOTrainer``, same batch.

What is timed is one policy update of a step: for every micro-batch a forward pass with gradients,
the clipped-surrogate loss with the k3 KL term, the backward pass; then gradient clipping and one
AdamW step. Rollouts and the old/reference log-prob passes happen before and are not timed (both
trainers compute them outside their loss).

Both sides get the *same* batch: TRL's own ``_generate_and_score_completions`` samples it once from
the model (B = prompts x group size, completions of ``--completion-tokens``), then the same tensors
go to ``GRPOTrainer.compute_loss`` and to ``tspo.train.update.ppo_update``, starting from the same
weights.

Each variant (trainer x precision: ``tspo``/``trl`` in ``fp32`` and ``bf16`` autocast, plus
``tspo-padded``, tspo's previous padded path, to measure the packed path against) lives in its own
worker process for the whole run, so its peak memory is its own. The parent hands out one update
at a time, round-robin over the workers (the first worker of a round rotates), so never two run at
once and a change in machine load hits every variant alike. Each update is timed in wall seconds
and in the worker's CPU seconds; ratios are medians over rounds of the ratio within a round. The
headline is like for like: tspo fp32 vs TRL fp32, and tspo bf16 vs TRL bf16.

    python benchmarks/update.py                  # CPU, tiny model
    python benchmarks/update.py --device cuda --preset qwen2.5-0.5b-shape --precisions bf16

Needs ``trl`` (``pip install "trl==1.16.0"``; it works with transformers 5.x). Writes
``docs/bench/update.json`` and ``docs/bench/update.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = [
    "Who wrote the novel about the white whale?",
    "Which river flows through the capital of Egypt?",
    "What is the highest mountain on Earth?",
    "Which element has the chemical symbol Fe?",
    "Who painted the ceiling of the Sistine Chapel?",
    "What is the capital city of Australia?",
    "Which planet is known as the red planet?",
    "Who developed the theory of general relativity?",
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny", help="tspo.models.tiny preset of the model")
    parser.add_argument("--vocab", type=int, default=4096, help="vocabulary size at least this")
    parser.add_argument("--prompts", type=int, default=4, help="questions per step")
    parser.add_argument("--group-size", type=int, default=4, help="trajectories per question")
    parser.add_argument("--completion-tokens", type=int, default=128, help="tokens per completion")
    parser.add_argument("--micro-batch", type=int, default=4, help="trajectories per forward pass")
    parser.add_argument("--rounds", type=int, default=8, help="timed updates per variant")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument(
        "--precisions", default="fp32,bf16", help="comma list of fp32 and bf16 (autocast)"
    )
    parser.add_argument(
        "--ragged",
        action="store_true",
        help="completions of seeded lengths from 1/8 to all of --completion-tokens",
    )
    parser.add_argument(
        "--no-padded", action="store_true", help="skip the tspo-padded (previous path) variant"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0 = default)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "bench" / "update.json")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def build_trl_trainer(args: argparse.Namespace, workdir: Path, bf16: bool = False):
    """A GRPOTrainer over the saved model with the benchmark's batch shape.

    TRL loads the model (and its frozen reference copy) from the folder itself.
    """
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    batch = args.prompts * args.group_size
    config = GRPOConfig(
        output_dir=str(workdir / "trl"),
        per_device_train_batch_size=args.micro_batch,
        gradient_accumulation_steps=batch // args.micro_batch,
        num_generations=args.group_size,
        max_completion_length=args.completion_tokens,
        learning_rate=1e-6,
        beta=0.001,
        epsilon=0.2,
        loss_type="bnpo",  # token-mean over the micro-batch, like tspo's token-mean
        max_grad_norm=1.0,
        use_cpu=args.device == "cpu",
        bf16=bf16,
        report_to=[],
        logging_steps=1_000_000,
        save_strategy="no",
        disable_dropout=True,
    )
    dataset = Dataset.from_list([{"prompt": q} for q in QUESTIONS[: args.prompts]])

    def length_reward(completions: list[str], **_: Any) -> list[float]:
        return [float(len(c) % 7) for c in completions]  # any spread: non-zero advantages

    trainer = GRPOTrainer(
        model=str(workdir / "model"),
        reward_funcs=[length_reward],
        args=config,
        train_dataset=dataset,
        processing_class=AutoTokenizer.from_pretrained(workdir / "model"),
    )
    trainer.create_optimizer()
    return trainer, dataset


def prepare(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Build and save the model; sample one batch with TRL's own generation and save it."""
    import torch

    from tspo.models.tiny import (
        MODEL_PRESETS,
        build_tiny_model,
        count_parameters,
        train_tokenizer,
    )

    texts = [q for q in QUESTIONS for _ in range(50)]
    tokenizer = train_tokenizer(texts, vocab_size=4096, min_frequency=1)
    vocab = max(args.vocab, len(tokenizer), MODEL_PRESETS[args.preset].get("vocab_size", 0))
    model = build_tiny_model(tokenizer, args.preset, seed=0, vocab_size=vocab)
    model.save_pretrained(workdir / "model")
    tokenizer.save_pretrained(workdir / "model")
    trainer, dataset = build_trl_trainer(args, workdir)
    rows = [row for row in dataset for _ in range(args.group_size)]
    trainer.model.train()
    batch = trainer._generate_and_score_completions(rows)
    tensors = {k: v.cpu() for k, v in batch.items() if isinstance(v, torch.Tensor)}
    if tensors.get("old_per_token_logps") is None:
        tensors.pop("old_per_token_logps", None)
    if args.ragged:
        cut_completions(tensors, trainer.processing_class.pad_token_id)
    torch.save(tensors, workdir / "batch.pt")
    completion_mask = tensors["completion_mask"]
    return {
        "model_parameters": count_parameters(model),
        "vocab_size": model.config.vocab_size,
        "batch_trajectories": completion_mask.shape[0],
        "prompt_tokens_max": tensors["prompt_ids"].shape[1],
        "completion_tokens_max": completion_mask.shape[1],
        "completion_tokens_mean": float(completion_mask.sum(1).float().mean()),
    }


def cut_completions(tensors: dict[str, Any], pad_id: int) -> None:
    """End each completion at a seeded length in [completion_tokens / 8, completion_tokens], as
    if it had sampled its end-of-sequence token there (the random model never does)."""
    import torch

    mask = tensors["completion_mask"]
    width = mask.shape[1]
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(max(width // 8, 1), width + 1, (mask.shape[0],), generator=generator)
    keep = (torch.arange(width)[None] < lengths[:, None]).to(mask.dtype)
    tensors["completion_mask"] = mask * keep
    tensors["completion_ids"] = tensors["completion_ids"].masked_fill(keep == 0, pad_id)
    for name in ("ref_per_token_logps", "old_per_token_logps"):
        if name in tensors:
            tensors[name] = tensors[name] * keep


def load_batch(workdir: Path, device: str) -> dict[str, Any]:
    import torch

    batch = torch.load(workdir / "batch.pt", weights_only=True)
    return {k: v.to(device) for k, v in batch.items()}


def tspo_update_batch(batch: dict[str, Any], model: Any, micro: int):
    """The TRL batch as a tspo UpdateBatch (same ids, masks, advantages; old log-probs from a
    forward pass when TRL skipped them)."""
    from tspo.train.forward import UpdateBatch, batch_logprobs

    mask = batch["completion_mask"].float()
    update = UpdateBatch(
        prompt_ids=batch["prompt_ids"],
        prompt_mask=batch["prompt_mask"],
        response_ids=batch["completion_ids"],
        response_mask=batch["completion_mask"],
        loss_mask=mask,
        old_logprobs=mask * 0,
        advantages=batch["advantages"].float().unsqueeze(1) * mask,
        ref_logprobs=batch["ref_per_token_logps"].float(),
    )
    update.old_logprobs = batch.get("old_per_token_logps")
    if update.old_logprobs is None:
        update.old_logprobs = batch_logprobs(model, update, micro_batch_size=micro, temperature=1.0)
    return update


def tspo_updater(args: argparse.Namespace, workdir: Path, bf16: bool, packed: bool):
    """One tspo policy update per call, on the saved model and batch."""
    import torch
    from transformers import AutoModelForCausalLM

    from tspo.train.config import AlgoConfig, OptimConfig
    from tspo.train.forward import autocast_context
    from tspo.train.optim import build_optimizer
    from tspo.train.update import UpdateSettings, ppo_update

    model = AutoModelForCausalLM.from_pretrained(workdir / "model").to(args.device)
    batch = tspo_update_batch(load_batch(workdir, args.device), model, args.micro_batch)
    optimizer = build_optimizer(model, OptimConfig(lr=1e-6))
    settings = UpdateSettings(
        ppo_epochs=1,
        mini_batch_size=len(batch),
        micro_batch_size=args.micro_batch,
        max_grad_norm=1.0,
        temperature=1.0,
        algo=AlgoConfig(kl_coef=0.001, kl_type="low_var_kl"),
        packed=packed,
    )
    generator = torch.Generator().manual_seed(0)
    autocast = autocast_context(torch.device(args.device), bf16)

    def update() -> None:
        ppo_update(model, optimizer, batch, settings, generator=generator, autocast=autocast)

    return update


def trl_updater(args: argparse.Namespace, workdir: Path, bf16: bool):
    """One TRL policy update per call: compute_loss + backward per micro-batch, clip, AdamW."""
    import torch

    trainer, _ = build_trl_trainer(args, workdir, bf16)
    batch = load_batch(workdir, args.device)
    size = batch["completion_ids"].shape[0]
    micro_batches = [
        {k: (v[s : s + args.micro_batch] if v.dim() else v) for k, v in batch.items()}
        for s in range(0, size, args.micro_batch)
    ]
    # Trainer.train() sets this before its accumulation loop; the loss divides by it.
    trainer.current_gradient_accumulation_steps = len(micro_batches)
    model = trainer.model
    params = [p for p in model.parameters() if p.requires_grad]

    def update() -> None:
        model.train()
        for inputs in micro_batches:
            with trainer.compute_loss_context_manager():
                loss = trainer.compute_loss(model, inputs)
            trainer.accelerator.backward(loss)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)

    return update


def synchronize(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def worker(args: argparse.Namespace) -> None:
    """Serve one variant: warm up, then one timed update per ``run`` line read from stdin, each
    answered with one JSON line; ``exit`` answers with the peak memory and stops."""
    import torch

    from tspo.utils import peak_memory_mb

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    side, precision = args.worker.rsplit("-", 1)
    bf16 = precision == "bf16"
    if side == "trl":
        update = trl_updater(args, args.workdir, bf16)
    else:
        update = tspo_updater(args, args.workdir, bf16, packed=side == "tspo")
    update()  # warm-up, not counted
    synchronize(args.device)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        if line.strip() != "run":
            break
        wall, cpu = time.perf_counter(), time.process_time()
        update()
        synchronize(args.device)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        print(json.dumps({"wall": wall, "cpu": cpu}), flush=True)
    print(json.dumps(peak_memory_mb()), flush=True)


class Worker:
    """A running worker process of one variant."""

    def __init__(self, variant: str, argv: list[str], workdir: Path):
        self.variant = variant
        command = [sys.executable, __file__, *argv, "--worker", variant, "--workdir", str(workdir)]
        self.process = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        self.reply()  # ready

    def reply(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            raise SystemExit(f"{self.variant} worker failed (exit {self.process.wait()})")
        return json.loads(line)

    def send(self, command: str) -> dict[str, Any]:
        assert self.process.stdin is not None
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        return self.reply()

    def close(self) -> dict[str, Any]:
        peak = self.send("exit")
        self.process.wait()
        return peak


def variants(args: argparse.Namespace) -> list[str]:
    precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    if not precisions or set(precisions) - {"fp32", "bf16"}:
        raise SystemExit("--precisions takes fp32 and/or bf16")
    names = [f"{side}-{p}" for p in precisions for side in ("tspo", "trl")]
    if not args.no_padded and "fp32" in precisions:
        names.append("tspo-padded-fp32")
    return names


def interleaved(names: list[str], argv: list[str], workdir: Path, rounds: int) -> dict[str, Any]:
    """Per variant: the wall and CPU seconds of every round, and its peak memory."""
    workers = [Worker(name, argv, workdir) for name in names]
    measured: dict[str, Any] = {name: {"wall": [], "cpu": []} for name in names}
    try:
        for round_ in range(rounds):
            shift = round_ % len(workers)
            for worker_ in workers[shift:] + workers[:shift]:
                timing = worker_.send("run")
                measured[worker_.variant]["wall"].append(timing["wall"])
                measured[worker_.variant]["cpu"].append(timing["cpu"])
        for worker_ in workers:
            measured[worker_.variant]["memory"] = worker_.close()
    finally:
        for worker_ in workers:
            if worker_.process.poll() is None:
                worker_.process.kill()
    return measured


def paired(measured: dict[str, Any], fast: str, slow: str, clock: str) -> float:
    """Median over rounds of ``slow``'s seconds over ``fast``'s in the same round."""
    pairs = zip(measured[fast][clock], measured[slow][clock], strict=True)
    return statistics.median(b / a for a, b in pairs)


TARGET = 1.5
COMPARISONS = [  # (faster, slower, what it measures, target or None)
    ("tspo-fp32", "trl-fp32", "tspo vs TRL, both fp32 (like for like)", TARGET),
    ("tspo-bf16", "trl-bf16", "tspo vs TRL, both bf16 autocast (like for like)", TARGET),
    ("tspo-bf16", "trl-fp32", "tspo bf16 vs TRL fp32 (not like for like: precision differs)", None),
    ("tspo-bf16", "tspo-fp32", "bf16 autocast vs fp32, tspo", None),
    ("tspo-fp32", "tspo-padded-fp32", "packed path vs padded path (the lever), tspo fp32", None),
]


def markdown(report: dict[str, Any]) -> str:
    shape, settings, machine = report["shape"], report["settings"], report["machine"]
    lines = [
        "# Policy update: tspo vs TRL GRPOTrainer",
        "",
        f"Model `{settings['preset']}` ({shape['model_parameters'] / 1e6:.1f}M parameters, "
        f"vocabulary {shape['vocab_size']}), {shape['batch_trajectories']} trajectories "
        f"({settings['prompts']} prompts x group {settings['group_size']}), "
        f"completions of {shape['completion_tokens_mean']:.0f} tokens on average "
        f"(max {shape['completion_tokens_max']}"
        f"{', lengths cut at random: --ragged' if settings['ragged'] else ''}), "
        f"{shape['tokens_per_update']} tokens per update, "
        f"micro-batch {settings['micro_batch']}, device {settings['device']}, "
        f"{machine['cpu_count']} CPUs, {settings['threads'] or 'default'} torch thread(s)"
        f"{', ' + machine['gpu'] if 'gpu' in machine else ''}, torch {machine.get('torch')}, "
        f"trl {report['trl_version']}, transformers {report['transformers_version']}. "
        f"{settings['rounds']} rounds; in each round every variant runs one update, one at a "
        "time, each in its own long-lived worker process (peak memory is the worker's own).",
        "",
        "| variant | tokens/s (wall, median) | s per update, wall (median) | "
        "s per update, CPU (median) | peak RSS MiB | peak CUDA MiB |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, row in report["results"].items():
        cuda = row["peak_cuda_mb"]
        lines.append(
            f"| {name} | {row['tokens_per_s']:.0f} | {row['median_wall_s']:.3f} | "
            f"{row['median_cpu_s']:.3f} | {row['peak_rss_mb']:.0f} | "
            f"{'n/a' if cuda is None else f'{cuda:.0f}'} |"
        )
    lines += [
        "",
        "Ratios: median over rounds of the slower variant's seconds over the faster one's in the "
        "same round; wall clock, and the workers' CPU seconds (steadier when other jobs share "
        "the cores).",
        "",
        "| comparison | ratio (wall) | ratio (CPU) | target |",
        "|---|---:|---:|---|",
    ]
    for row in report["comparisons"]:
        target = row["target"]
        verdict = ""
        if target is not None:
            verdict = f">= {target}x: **{'met' if row['wall'] >= target else 'missed'}**"
        lines.append(f"| {row['what']} | **{row['wall']:.2f}x** | {row['cpu']:.2f}x | {verdict} |")
    lines += [
        "",
        f"1-minute load average: {report['load_average_1min'][0]:.1f} at the start, "
        f"{report['load_average_1min'][1]:.1f} at the end.",
        "",
        f"Reproduce: `{report['command']}`.",
        "",
    ]
    return "\n".join(lines)


def summarise(measured: dict[str, Any], tokens: int) -> dict[str, Any]:
    results = {}
    for name, row in measured.items():
        wall = statistics.median(row["wall"])
        results[name] = {
            "wall_s": row["wall"],
            "cpu_s": row["cpu"],
            "median_wall_s": wall,
            "median_cpu_s": statistics.median(row["cpu"]),
            "tokens_per_s": tokens / wall,
            **row["memory"],
        }
    return results


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return
    if (args.prompts * args.group_size) % args.micro_batch:
        raise SystemExit("--micro-batch must divide prompts x group size")
    import torch
    import transformers
    import trl

    from tspo.utils import machine_info, write_json

    if args.threads:
        torch.set_num_threads(args.threads)
    names = variants(args)
    load_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="tspo-bench-update-") as tmp:
        workdir = Path(tmp)
        shape = prepare(args, workdir)
        batch = torch.load(workdir / "batch.pt", weights_only=True)
        tokens = int(batch["prompt_mask"].sum() + batch["completion_mask"].sum())
        measured = interleaved(names, argv, workdir, args.rounds)
    comparisons = [
        {
            "faster": fast,
            "slower": slow,
            "what": what,
            "target": target,
            "wall": paired(measured, fast, slow, "wall"),
            "cpu": paired(measured, fast, slow, "cpu"),
        }
        for fast, slow, what, target in COMPARISONS
        if fast in measured and slow in measured
    ]
    report = {
        "benchmark": "policy update (forward+backward+optimizer step over one step's batch)",
        "settings": {k: v for k, v in vars(args).items() if k not in {"out", "worker", "workdir"}},
        "note": "seconds per update of every round; ratios are medians of per-round ratios",
        "shape": {**shape, "tokens_per_update": tokens},
        "trl_version": trl.__version__,
        "transformers_version": transformers.__version__,
        "results": summarise(measured, tokens),
        "comparisons": comparisons,
        "machine": machine_info(),
        "load_average_1min": [load_start, os.getloadavg()[0]],
        "command": "python benchmarks/update.py " + " ".join(a for a in argv if a),
    }
    write_json(args.out, report)
    args.out.with_suffix(".md").write_text(markdown(report), encoding="utf-8")
    print(markdown(report))


if __name__ == "__main__":
    main()

"""Policy-update throughput: TSPO's trainer update against TRL's ``GRPOTrainer``, same batch.

What is timed is one policy update of a step: for every micro-batch a forward pass with gradients,
the clipped-surrogate loss with the k3 KL term, the backward pass; then gradient clipping and one
AdamW step. Rollouts and the old/reference log-prob passes happen before and are not timed (both
trainers compute them outside their loss).

Both sides get the *same* batch: TRL's own ``_generate_and_score_completions`` samples it once from
the model (B = prompts x group size, completions of ``--completion-tokens``), then the same tensors
go to ``GRPOTrainer.compute_loss`` and to ``tspo.train.update.ppo_update``, starting from the same
weights. Each side runs in its own subprocesses (so its peak memory is its own), alternating
tspo, TRL, tspo, ... for ``--rounds`` rounds so a change in machine load hits both sides alike.

    python benchmarks/update.py                  # CPU, tiny model
    python benchmarks/update.py --device cuda --preset qwen2.5-0.5b-shape

Needs ``trl`` (``pip install "trl==1.16.0"``; it works with transformers 5.x). Writes
``docs/bench/update.json`` and ``docs/bench/update.md``.
"""

from __future__ import annotations

import argparse
import json
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
    parser.add_argument("--repeats", type=int, default=3, help="timed updates per worker run")
    parser.add_argument(
        "--rounds", type=int, default=3, help="worker runs per side, alternating tspo and TRL"
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (CUDA) on both sides")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "bench" / "update.json")
    parser.add_argument("--worker", choices=["tspo", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def build_trl_trainer(args: argparse.Namespace, workdir: Path):
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
        bf16=args.bf16,
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


def run_tspo(args: argparse.Namespace, workdir: Path) -> list[float]:
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
    )
    generator = torch.Generator().manual_seed(0)
    autocast = autocast_context(torch.device(args.device), args.bf16)
    seconds = []
    for repeat in range(args.repeats + 1):  # the first update warms up and is not counted
        synchronize(args.device)
        start = time.perf_counter()
        ppo_update(model, optimizer, batch, settings, generator=generator, autocast=autocast)
        synchronize(args.device)
        if repeat:
            seconds.append(time.perf_counter() - start)
    return seconds


def run_trl(args: argparse.Namespace, workdir: Path) -> list[float]:
    import torch

    trainer, _ = build_trl_trainer(args, workdir)
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
    seconds = []
    for repeat in range(args.repeats + 1):
        synchronize(args.device)
        start = time.perf_counter()
        model.train()
        for inputs in micro_batches:
            with trainer.compute_loss_context_manager():
                loss = trainer.compute_loss(model, inputs)
            trainer.accelerator.backward(loss)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)
        synchronize(args.device)
        if repeat:
            seconds.append(time.perf_counter() - start)
    return seconds


def synchronize(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def worker(args: argparse.Namespace) -> None:
    """Run one side and print its result as one JSON line."""
    import torch

    from tspo.utils import peak_memory_mb

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    seconds = (run_tspo if args.worker == "tspo" else run_trl)(args, args.workdir)
    print(json.dumps({"seconds": seconds, **peak_memory_mb()}))


def run_side(side: str, argv: list[str], workdir: Path) -> dict[str, Any]:
    command = [sys.executable, __file__, *argv, "--worker", side, "--workdir", str(workdir)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{side} worker failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def markdown(report: dict[str, Any]) -> str:
    shape, settings = report["shape"], report["settings"]
    lines = [
        "# Policy update: tspo vs TRL GRPOTrainer",
        "",
        f"Model `{settings['preset']}` ({shape['model_parameters'] / 1e6:.1f}M parameters, "
        f"vocabulary {shape['vocab_size']}), {shape['batch_trajectories']} trajectories "
        f"({report['settings']['prompts']} prompts x group {report['settings']['group_size']}), "
        f"completions of {shape['completion_tokens_mean']:.0f} tokens on average "
        f"(max {shape['completion_tokens_max']}), micro-batch {report['settings']['micro_batch']}, "
        f"device {settings['device']}{' (bf16 autocast)' if settings['bf16'] else ''}, "
        f"{report['machine']['cpu_count']} CPUs, {report['machine']['torch_threads']} torch "
        f"threads{', ' + report['machine']['gpu'] if 'gpu' in report['machine'] else ''}, "
        f"trl {report['trl_version']}. Median of {len(report['results']['tspo']['seconds'])} "
        f"timed updates per side over {settings['rounds']} alternating rounds.",
        "",
        "| trainer | update tokens/s (median) | seconds per update (median) | peak memory MiB |",
        "|---|---:|---:|---:|",
    ]
    for side in ("tspo", "trl"):
        row = report["results"][side]
        memory = row.get("peak_cuda_mb", row["peak_rss_mb"])
        lines.append(
            f"| {side} | {row['tokens_per_s']:.0f} | {row['median_seconds']:.3f} | {memory:.0f} |"
        )
    lines += ["", f"Speed-up of tspo over TRL: **{report['speedup']:.2f}x** (target >= 1.0x).", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return
    if (args.prompts * args.group_size) % args.micro_batch:
        raise SystemExit("--micro-batch must divide prompts x group size")
    import torch
    import trl

    from tspo.utils import machine_info, write_json

    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="tspo-bench-update-") as tmp:
        workdir = Path(tmp)
        shape = prepare(args, workdir)
        batch = torch.load(workdir / "batch.pt", weights_only=True)
        tokens = int(batch["prompt_mask"].sum() + batch["completion_mask"].sum())
        runs: dict[str, list[dict[str, Any]]] = {"tspo": [], "trl": []}
        for _ in range(args.rounds):
            for side in runs:
                runs[side].append(run_side(side, argv, workdir))
    results = {}
    for side, measured in runs.items():
        seconds = [s for run in measured for s in run["seconds"]]
        median = statistics.median(seconds)
        results[side] = {
            "seconds": seconds,
            "median_seconds": median,
            "tokens_per_s": tokens / median,
            **{
                key: max(run[key] for run in measured)
                for key in ("peak_rss_mb", "peak_cuda_mb")
                if key in measured[0]
            },
        }
    report = {
        "benchmark": "policy update (forward+backward+optimizer step over one step's batch)",
        "settings": {k: v for k, v in vars(args).items() if k not in {"out", "worker", "workdir"}},
        "note": "seconds per update of every timed update; medians over all rounds",
        "shape": {**shape, "tokens_per_update": tokens},
        "trl_version": trl.__version__,
        "results": results,
        "speedup": results["trl"]["median_seconds"] / results["tspo"]["median_seconds"],
        "machine": machine_info(),
    }
    write_json(args.out, report)
    args.out.with_suffix(".md").write_text(markdown(report), encoding="utf-8")
    print(markdown(report))


if __name__ == "__main__":
    main()

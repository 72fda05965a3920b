"""CLI command: ``tspo pretrain``."""

from __future__ import annotations

import shlex
import shutil
import sys
from pathlib import Path

import typer

from tspo.cli_apps import app


@app.command("pretrain")
def pretrain(
    out: Path = typer.Option(
        ..., "--out", help="Run folder: tokenizer/, state/, log.jsonl, model/."
    ),
    steps: int = typer.Option(4400, "--steps", min=1, help="Optimizer steps."),
    seed: int = typer.Option(0, "--seed", help="Seed of the initial weights."),
    shape: str = typer.Option("128x4", "--shape", help="HIDDENxLAYERS of the Llama-shaped model."),
    threads: int = typer.Option(1, "--threads", min=1, help="torch CPU threads."),
    bf16: bool = typer.Option(True, "--bf16/--no-bf16", help="bf16 autocast (fp32 weights)."),
    eval_every: int = typer.Option(400, "--eval-every", min=1, help="Measure the gates every N."),
    eval_items: int = typer.Option(100, "--eval-items", min=1, help="Items per gate in training."),
    final_items: int = typer.Option(300, "--final-items", min=1, help="Items per gate at the end."),
    checkpoint_every: int = typer.Option(
        200, "--checkpoint-every", min=1, help="Save state every N."
    ),
    init: str | None = typer.Option(
        None, "--init", help="Continue from this base (folder or alias) instead of random weights."
    ),
    question_first: float = typer.Option(
        0.0,
        "--question-first",
        min=0.0,
        max=1.0,
        help="Share of reading items with the question before the documents (the agent's layout).",
    ),
    first_world: int = typer.Option(
        0, "--first-world", min=0, help="Index of the first practice world to read."
    ),
    lr: float = typer.Option(1e-3, "--lr", min=0.0, help="Peak learning rate."),
    warmup_steps: int = typer.Option(100, "--warmup-steps", min=0, help="Linear warm-up steps."),
    seq_len: int = typer.Option(256, "--seq-len", min=32, help="Packed row length in tokens."),
    batch_size: int = typer.Option(32, "--batch-size", min=1, help="Packed rows per step."),
    fresh: bool = typer.Option(False, "--fresh", help="Delete the run folder and start over."),
) -> None:
    """Pre-train a tiny base LM from random weights (or --init) on generated practice worlds.

    The base learns to read documents and copy unseen names (documents, reading items, copy
    drills; never protocol tags, never an evaluation world). A killed run resumes from its last
    state when the same command is run again. The finished model, with its model card, is written
    to OUT/model.
    """
    import torch
    from rich.console import Console
    from transformers.utils import logging as hf_logging

    from tspo.errors import TSPOError
    from tspo.pretrain.items import PretrainMix
    from tspo.pretrain.loop import PretrainConfig
    from tspo.pretrain.loop import pretrain as run_pretrain
    from tspo.utils import progress_bar

    if out.exists() and not out.is_dir():
        raise TSPOError(f"--out {out}: exists and is not a folder")
    if fresh and out.exists():
        shutil.rmtree(out)
    torch.set_num_threads(threads)
    hf_logging.disable_progress_bar()
    if init is not None:
        from tspo.models.loading import resolve_model_path

        resolve_model_path(init)  # an unknown name fails here, before any work
    config = PretrainConfig(
        steps=steps,
        seed=seed,
        shape=shape,
        init=init,
        first_world=first_world,
        lr=lr,
        warmup_steps=warmup_steps,
        seq_len=seq_len,
        batch_size=batch_size,
        mix=PretrainMix(question_first=question_first),
        bf16=bf16,
        eval_every=eval_every,
        eval_items=eval_items,
        final_eval_items=final_items,
        checkpoint_every=checkpoint_every,
    )
    console = Console(stderr=True)
    command = "tspo pretrain " + " ".join(shlex.quote(a) for a in sys.argv[2:])
    with progress_bar() as progress:
        task = progress.add_task("pre-training", total=steps)

        def on_step(step: int, total: int, loss: float) -> None:
            progress.update(task, completed=step, description=f"pre-training (loss {loss:.3f})")

        facts = run_pretrain(
            out, config, command=command, threads=threads, on_step=on_step, say=console.print
        )
    gates = ", ".join(f"{k} {v:.2f}" for k, v in facts["gates"].items())
    console.print(f"{facts['steps']} steps in {facts['wall_minutes']} min; {gates} -> {out}/model")

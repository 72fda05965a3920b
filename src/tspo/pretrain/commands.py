"""CLI command: ``tspo pretrain``."""

from __future__ import annotations

import shlex
import shutil
import sys
from pathlib import Path
from typing import Annotated

import typer

from tspo.cli_apps import app


@app.command("pretrain")
def pretrain(
    out: Annotated[
        Path, typer.Option("--out", help="Run folder: tokenizer/, state/, log.jsonl, model/.")
    ],
    steps: Annotated[int, typer.Option("--steps", min=1, help="Optimizer steps.")] = 4400,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the initial weights.")] = 0,
    shape: Annotated[
        str, typer.Option("--shape", help="HIDDENxLAYERS of the Llama-shaped model.")
    ] = "128x4",
    threads: Annotated[int, typer.Option("--threads", min=1, help="torch CPU threads.")] = 1,
    bf16: Annotated[
        bool, typer.Option("--bf16/--no-bf16", help="bf16 autocast (fp32 weights).")
    ] = True,
    eval_every: Annotated[
        int, typer.Option("--eval-every", min=1, help="Measure the gates every N.")
    ] = 400,
    eval_items: Annotated[
        int, typer.Option("--eval-items", min=1, help="Items per gate in training.")
    ] = 100,
    final_items: Annotated[
        int, typer.Option("--final-items", min=1, help="Items per gate at the end.")
    ] = 300,
    checkpoint_every: Annotated[
        int, typer.Option("--checkpoint-every", min=1, help="Save state every N.")
    ] = 200,
    init: Annotated[
        str | None,
        typer.Option(
            "--init", help="Continue from this base (folder or alias) instead of random weights."
        ),
    ] = None,
    question_first: Annotated[
        float,
        typer.Option(
            "--question-first",
            min=0.0,
            max=1.0,
            help="Share of reading items with the question before the documents "
            "(the agent's layout).",
        ),
    ] = 0.0,
    first_world: Annotated[
        int, typer.Option("--first-world", min=0, help="Index of the first practice world to read.")
    ] = 0,
    lr: Annotated[float, typer.Option("--lr", min=0.0, help="Peak learning rate.")] = 1e-3,
    warmup_steps: Annotated[
        int, typer.Option("--warmup-steps", min=0, help="Linear warm-up steps.")
    ] = 100,
    seq_len: Annotated[
        int, typer.Option("--seq-len", min=32, help="Packed row length in tokens.")
    ] = 256,
    batch_size: Annotated[
        int, typer.Option("--batch-size", min=1, help="Packed rows per step.")
    ] = 32,
    fresh: Annotated[
        bool, typer.Option("--fresh", help="Delete the run folder and start over.")
    ] = False,
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

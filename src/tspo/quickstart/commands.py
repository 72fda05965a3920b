"""CLI commands: ``tspo data world``, ``tspo sft``, ``tspo quickstart``, ``tspo compare``."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import typer

from tspo.cli_apps import app, data_app
from tspo.quickstart.settings import PolicyStage

WORLD_SIZES = "tiny|small|medium|large"


@data_app.command("world")
def world(
    out: Path = typer.Option(..., "--out", help="Folder for corpus.jsonl, the splits, world.json."),
    seed: int = typer.Option(0, "--seed", help="Seed: the same seed always gives the same world."),
    size: str = typer.Option("small", "--size", help=f"World size: {WORLD_SIZES}."),
) -> None:
    """Generate the synthetic search world: made-up entities, a corpus, 1-3 hop questions.

    Writes corpus.jsonl (id, contents), train/dev/test.jsonl (FlashRAG) split by subject entity,
    and world.json (entities and question chains, for the scripted expert).
    """
    from rich.console import Console

    from tspo.data.world import generate_world, write_world

    generated = generate_world(seed, size)
    paths = write_world(generated, out)
    counts = ", ".join(f"{split} {len(qs)}" for split, qs in generated.questions.items())
    Console().print(
        f"{len(generated.documents)} documents -> {paths['corpus']}; questions: {counts} "
        f"-> {out}/{{train,dev,test}}.jsonl"
    )


@app.command("sft")
def sft(
    world_dir: Path = typer.Option(..., "--world", help="Folder written by `tspo data world`."),
    out: Path = typer.Option(..., "--out", help="Folder for the HF checkpoint (model+tokenizer)."),
    index: Path | None = typer.Option(
        None, "--index", help="BM25 index of the world's corpus; built in memory when omitted."
    ),
    epochs: int = typer.Option(1, "--epochs", help="Passes over the expert episodes."),
    lr: float = typer.Option(
        PolicyStage().sft.lr, "--lr", help="Peak learning rate (AdamW, cosine decay)."
    ),
    early_answer: float = typer.Option(
        PolicyStage.early_answer,
        "--early-answer",
        help="How often the expert answers one hop too early.",
    ),
    wrong_query: float = typer.Option(
        0.15, "--wrong-query", help="How often the expert searches a near-duplicate name."
    ),
    practice_worlds: int = typer.Option(
        PolicyStage.practice_worlds,
        "--practice-worlds",
        help="Extra worlds whose questions add SFT episodes.",
    ),
    base: str = typer.Option(
        PolicyStage.base, "--base", help="Base model folder or alias (the shipped tiny base)."
    ),
    seed: int = typer.Option(0, "--seed", help="Seed for the expert and SFT."),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace OUT when it already holds files."
    ),
) -> None:
    """Warm-start a search policy from a base model on the world's noisy scripted-expert episodes.

    Plays the noisy expert through the real retriever and protocol, then fine-tunes the base with
    the loss on the model's own tokens only (prompt and <information> blocks are masked). Saves
    model and tokenizer in Hugging Face format.
    """
    from rich.console import Console

    from tspo.data.world import CORPUS_FILE, load_world
    from tspo.quickstart.pipeline import train_policy
    from tspo.train.components import open_retriever

    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        from tspo.errors import TSPOError

        raise TSPOError(f"{out} already exists and is not empty; pass --overwrite to replace it")
    loaded = load_world(world_dir)
    retriever = open_retriever(
        index=str(index) if index else None,
        corpus=None if index else str(world_dir / CORPUS_FILE),
    )
    defaults = PolicyStage()
    settings = replace(
        defaults,
        base=base,
        practice_worlds=practice_worlds,
        early_answer=early_answer,
        wrong_query=wrong_query,
        sft=replace(defaults.sft, epochs=epochs, lr=lr, seed=seed),
        seed=seed,
    )
    info = train_policy(loaded, retriever, settings, out)
    retriever.close()
    Console().print(
        f"{info['parameters']:,} parameters, {info['episodes']} episodes (expert EM "
        f"{info['expert_em']:.2f}), loss {info['sft_loss_first']:.2f} -> "
        f"{info['sft_loss_last']:.2f} -> {out}"
    )


@app.command("quickstart")
def quickstart(
    out: Path = typer.Option(Path("runs/quickstart"), "--out", help="Run folder."),
    fresh: bool = typer.Option(False, "--fresh", help="Start over instead of reusing stages."),
    steps: int | None = typer.Option(None, "--steps", help="RL steps (default 40)."),
    size: str = typer.Option("small", "--size", help=f"World size: {WORLD_SIZES}."),
    estimator: str = typer.Option("tspo", "--estimator", help="Advantage estimator for RL."),
    seed: int = typer.Option(0, "--seed", help="Seed of the world, the policy and RL."),
    base: str = typer.Option(
        PolicyStage.base, "--base", help="Base model folder or alias that SFT starts from."
    ),
    threads: int | None = typer.Option(
        None, "--threads", help="torch CPU threads (default: $TSPO_THREADS, else the free cores)."
    ),
) -> None:
    """Train a small search agent end to end on CPU and write a report.

    world -> BM25 index -> SFT on a noisy expert -> RL -> greedy evaluation of the SFT start and
    the final policy on held-out test entities -> OUT/report.md with a before/after table, plots
    and example trajectories. Reruns reuse the world, index and SFT stages.
    """
    from tspo.quickstart.run import run_quickstart
    from tspo.quickstart.settings import QuickstartSettings

    settings = QuickstartSettings()
    rl = replace(settings.rl, estimator=estimator, seed=seed)
    if steps is not None:
        rl = replace(rl, steps=steps)
    settings = replace(
        settings,
        threads=threads,
        world=replace(settings.world, size=size, seed=seed),
        policy=replace(settings.policy, seed=seed, base=base),
        rl=rl,
    )
    run_quickstart(out, settings, fresh=fresh)


@app.command("compare")
def compare(
    estimators: str = typer.Option(
        "grpo,folr_scalar,tspo,tspo_switch", "--estimators", help="Comma-separated estimators."
    ),
    seeds: int = typer.Option(3, "--seeds", help="RL seeds per estimator (same SFT start)."),
    steps: int | None = typer.Option(None, "--steps", help="RL steps per run (default 40)."),
    eval_every: int = typer.Option(10, "--eval-every", help="Evaluate test EM every N steps."),
    eval_examples: int = typer.Option(
        90, "--eval-examples", help="Size of the fixed test subset evaluated along the way."
    ),
    size: str = typer.Option("small", "--size", help=f"World size: {WORLD_SIZES}."),
    out: Path = typer.Option(Path("runs/compare"), "--out", help="Run folder."),
    fresh: bool = typer.Option(False, "--fresh", help="Start over instead of reusing stages."),
    threads: int | None = typer.Option(
        None, "--threads", help="torch CPU threads (default: $TSPO_THREADS, else the free cores)."
    ),
) -> None:
    """Compare advantage estimators from one SFT start over several seeds.

    Writes OUT/report.md with mean ± std curves (test EM, reward std within groups, zero-signal
    groups, near-miss rate) and a table of final test EM and steps to reach GRPO's final EM.
    """
    from tspo.errors import TSPOError
    from tspo.quickstart.compare import run_compare
    from tspo.quickstart.settings import QuickstartSettings

    names = [name.strip() for name in estimators.split(",") if name.strip()]
    if not names:
        raise TSPOError("--estimators: give at least one estimator name")
    if seeds < 1:
        raise TSPOError("--seeds must be >= 1")
    settings = QuickstartSettings()
    settings = replace(
        settings,
        threads=threads,
        world=replace(settings.world, size=size),
        rl=replace(settings.rl, steps=steps or settings.rl.steps),
        eval=replace(settings.eval, max_examples=eval_examples),
    )
    run_compare(out, settings, names, seeds=seeds, eval_every=eval_every, fresh=fresh)

"""CLI commands: ``tspo data world``, ``tspo sft``, ``tspo quickstart``, ``tspo compare``."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import typer

from tspo.cli_apps import app, data_app
from tspo.quickstart.settings import PolicyStage, RLStage

WORLD_SIZES = "tiny|small|medium|large"
RL_STEPS_HELP = f"RL steps (default {RLStage.steps})."


def check_run_inputs(
    *,
    estimators: list[str],
    size: str,
    base: str,
    steps: int | None,
    out: Path,
    estimator_flag: str = "--estimator",
) -> None:
    """What quickstart and compare can check in a moment, before the world, index and SFT."""
    from tspo import preflight
    from tspo.data.world import SIZES
    from tspo.errors import TSPOError
    from tspo.train.config import check_estimator, did_you_mean

    for name in estimators:
        try:
            check_estimator(name)
        except ValueError as err:
            raise TSPOError(f"{estimator_flag}: {err}") from None
    if size not in SIZES:
        raise TSPOError(
            f"--size {size!r}: choose one of {', '.join(SIZES)}{did_you_mean(size, list(SIZES))}"
        )
    if steps is not None and steps < 1:
        raise TSPOError("--steps must be at least 1")
    preflight.model_name(base, "--base")
    preflight.output_dir(out, "--out")


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


WIKI_SFT_BASE = "smollm2-135m-instruct"
WIKI_SFT_LR = 1e-4
WIKI_SFT_EPISODES = 800
BF16_CHOICES: dict[str, bool | str] = {
    "auto": "auto",
    "on": True,
    "true": True,
    "off": False,
    "false": False,
}


@app.command("sft")
def sft(
    out: Path = typer.Option(..., "--out", help="Folder for the HF checkpoint (model+tokenizer)."),
    world_dir: Path | None = typer.Option(
        None, "--world", help="Folder written by `tspo data world` (the tiny-policy warm start)."
    ),
    data_dir: Path | None = typer.Option(
        None,
        "--data",
        help="Folder written by `tspo data wiki`: SFT any HF causal LM on its train questions.",
    ),
    index: Path | None = typer.Option(
        None, "--index", help="BM25 index of the corpus; built in memory when omitted."
    ),
    epochs: int = typer.Option(1, "--epochs", help="Passes over the expert episodes."),
    lr: float | None = typer.Option(
        None,
        "--lr",
        help=f"Peak learning rate (AdamW, cosine decay); default {PolicyStage().sft.lr:g} with "
        f"--world, {WIKI_SFT_LR:g} with --data.",
    ),
    episodes: int = typer.Option(
        WIKI_SFT_EPISODES, "--episodes", help="--data: expert episodes to train on."
    ),
    batch_size: int = typer.Option(16, "--batch-size", help="--data: episodes per step."),
    topk: int = typer.Option(
        3, "--topk", help="--data: documents per search (match the RL config's rollout.topk)."
    ),
    max_obs_tokens: int = typer.Option(
        500,
        "--max-obs-tokens",
        help="--data: tokens per <information> block (match rollout.max_obs_tokens).",
    ),
    chat_template: bool | None = typer.Option(
        None,
        "--chat-template/--no-chat-template",
        help="--data: wrap prompts in the chat template (default: when the tokenizer has one).",
    ),
    bf16: str = typer.Option(
        "auto", "--bf16", help="bf16 autocast, fp32 weights: auto (where supported), on or off."
    ),
    lora: bool = typer.Option(
        False, "--lora", help="--data: train LoRA adapters (merged on save) instead of all weights."
    ),
    device: str = typer.Option("auto", "--device", help="--data: auto, cpu, cuda or cuda:N."),
    threads: int | None = typer.Option(
        None, "--threads", help="torch CPU threads (default: $TSPO_THREADS, else the free cores)."
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
    base: str | None = typer.Option(
        None,
        "--base",
        "--model",
        help=f"Base model: folder, offline hub id or alias (default {PolicyStage.base} with "
        f"--world, {WIKI_SFT_BASE} with --data).",
    ),
    seed: int = typer.Option(0, "--seed", help="Seed for the expert and SFT."),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace OUT when it already holds files."
    ),
) -> None:
    """Warm-start a search policy: SFT on scripted-expert episodes played through the real
    retriever and protocol, loss on the model's own tokens only (prompt and <information> blocks
    are masked). Saves model and tokenizer in Hugging Face format.

    --world: the tiny policy on the synthetic world's noisy expert. --data: any HF causal LM
    (SmolLM2 by default) on the Wikipedia questions (single-hop: search, read, think, answer;
    bridge: two searches); the answer is the gold alias as written in the retrieved passage.
    """
    from rich.console import Console

    from tspo.errors import TSPOError

    if (world_dir is None) == (data_dir is None):
        raise TSPOError("give exactly one of --world DIR (synthetic world) or --data DIR (wiki)")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise TSPOError(f"{out} already exists and is not empty; pass --overwrite to replace it")
    if data_dir is not None:
        _wiki_sft(
            data_dir, out, base=base or WIKI_SFT_BASE, lr=lr or WIKI_SFT_LR, epochs=epochs,
            episodes=episodes, batch_size=batch_size, topk=topk, max_obs_tokens=max_obs_tokens,
            chat_template=chat_template, bf16=bf16, lora=lora, device=device, threads=threads,
            index=index, seed=seed,
        )  # fmt: skip
        return
    assert world_dir is not None
    base = base or PolicyStage.base
    lr = lr or PolicyStage().sft.lr

    from tspo.data.world import CORPUS_FILE, load_world
    from tspo.quickstart.pipeline import train_policy
    from tspo.retrieval.index import open_retriever

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
        f"{info['expert_em']:.2f}), loss {info['sft_loss_first']:.2f} (first step) "
        f"-> {info['sft_loss_last']:.2f} (mean of the last 10) -> {out}"
    )


def _wiki_sft(
    data_dir: Path,
    out: Path,
    *,
    base: str,
    lr: float,
    epochs: int,
    episodes: int,
    batch_size: int,
    topk: int,
    max_obs_tokens: int,
    chat_template: bool | None,
    bf16: str,
    lora: bool,
    device: str,
    threads: int | None,
    index: Path | None,
    seed: int,
) -> None:
    """`tspo sft --data`: the Wikipedia expert's episodes, then SFT of any causal LM."""
    import re

    from rich.console import Console

    from tspo.errors import TSPOError
    from tspo.models.loading import ALIASES, resolve_model_path
    from tspo.sft import SFTConfig, wiki_sft
    from tspo.utils import request_threads

    if bf16.lower() not in BF16_CHOICES:
        raise TSPOError(f"--bf16 {bf16!r}: expected auto, on or off")
    for name, value in (("--epochs", epochs), ("--batch-size", batch_size), ("--topk", topk)):
        if value < 1:
            raise TSPOError(f"{name} must be at least 1")
    if base not in ALIASES:
        try:
            resolve_model_path(base)
        except TSPOError as err:
            raise TSPOError(f"--base: {err}") from None
    if not (device in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", device)):
        raise TSPOError(f"--device {device!r}: expected auto, cpu, cuda or cuda:N")
    request_threads(threads)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our progress bar replaces the per-file loading bars
    hf_logging.set_verbosity_error()
    stderr = Console(stderr=True)
    stderr.print(f"tspo sft: {base} on the questions of {data_dir}…", highlight=False)
    config = SFTConfig(
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        max_obs_tokens=max_obs_tokens,
        bf16=BF16_CHOICES[bf16.lower()],
        seed=seed,
    )
    info = wiki_sft(
        data_dir,
        out,
        base=base,
        episodes=episodes,
        config=config,
        use_chat_template=chat_template,
        topk=topk,
        index=index,
        device=device,
        lora=lora,
        log=lambda line: stderr.print(line, highlight=False),
    )
    Console().print(
        f"{info['episodes']} episodes ({info['skipped']} questions skipped), {info['steps']} "
        f"steps in {info['train_seconds']:.0f} s (bf16 {'on' if info['bf16'] else 'off'}), loss "
        f"{info['loss_first']:.3f} -> {info['loss_last']:.3f} -> {out}",
        highlight=False,
    )


@app.command("quickstart")
def quickstart(
    out: Path = typer.Option(Path("runs/quickstart"), "--out", help="Run folder."),
    fresh: bool = typer.Option(False, "--fresh", help="Start over instead of reusing stages."),
    steps: int | None = typer.Option(None, "--steps", help=RL_STEPS_HELP),
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
    check_run_inputs(estimators=[estimator], size=size, base=base, steps=steps, out=out)
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
    steps: int | None = typer.Option(
        None, "--steps", help=f"RL steps per run (default {RLStage.steps})."
    ),
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
    check_run_inputs(
        estimators=names,
        size=size,
        base=settings.policy.base,
        steps=steps,
        out=out,
        estimator_flag="--estimators",
    )
    settings = replace(
        settings,
        threads=threads,
        world=replace(settings.world, size=size),
        rl=replace(settings.rl, steps=steps or settings.rl.steps),
        eval=replace(settings.eval, max_examples=eval_examples),
    )
    run_compare(out, settings, names, seeds=seeds, eval_every=eval_every, fresh=fresh)

"""`tspo train`, `tspo eval` and `tspo sft` (registered on tspo.cli_apps.app).

Heavy imports (torch, transformers) happen inside the commands so `tspo --help` stays fast.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from tspo.cli_apps import OverwriteOption, ThreadsOption, app
from tspo.errors import TSPOError
from tspo.quickstart.settings import PolicyStage
from tspo.train.sft import SFTConfig

console = Console(stderr=True)


def _quiet_transformers() -> None:
    """Our own progress bars replace transformers' per-file loading bars."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def _say(message: str) -> None:
    """Plain lines on stderr: no markup (paths hold brackets), no wrapping."""
    print(message, file=sys.stderr, flush=True)


THREADS_HELP = (
    "torch CPU threads (default: $TSPO_THREADS, else the cores other processes leave free)."
)


@app.command("train")
def train_command(
    overrides: Annotated[
        list[str] | None,
        typer.Argument(
            help="Config overrides as section.field=value, e.g. algo.estimator=grpo train.steps=2.",
            show_default=False,
        ),
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option("--config", "-c", help="YAML config (see configs/); defaults otherwise."),
    ] = None,
    resume: Annotated[
        str | None,
        typer.Option(
            "--resume",
            help="'auto' continues from the newest complete checkpoint in train.output_dir; "
            "or a checkpoint folder.",
        ),
    ] = None,
    seed: Annotated[
        int | None, typer.Option("--seed", help="Seed of the run (same as train.seed=N).")
    ] = None,
    threads: Annotated[int | None, typer.Option("--threads", help=THREADS_HELP)] = None,
) -> None:
    """Train a search agent with TSPO (or a baseline estimator) from a YAML config.

    Relative paths in the config file are read against the file's folder. Everything that can be
    checked cheaply (files, model name, device, output folder) is checked before the model loads.
    """
    from tspo import preflight
    from tspo.train.config import load_config

    if seed is not None:
        overrides = [*(overrides or []), f"train.seed={seed}"]
    if resume:
        overrides = [*(overrides or []), f"train.resume={resume}"]
    settings = load_config(config, overrides)
    preflight.train_config(settings)
    _say(
        f"tspo train: config {config if config else '(defaults)'}, seed {settings.train.seed}, "
        f"estimator {settings.algo.estimator}, {settings.train.steps} steps; loading "
        f"{settings.model.name}…"
    )
    from tspo.utils import request_threads

    request_threads(threads)
    _quiet_transformers()
    from tspo.train.loop import TrainInterrupted, train

    try:
        result = train(settings)
    except TrainInterrupted as stop:
        _say(stop.describe(continue_command(config, overrides)))
        raise typer.Exit(130) from None
    console.print(
        f"trained to step {result.final_step}; metrics in {result.output_dir / 'metrics.jsonl'}"
        + (f"; checkpoint {result.last_checkpoint}" if result.last_checkpoint else "")
    )


@app.command("eval")
def eval_command(
    model: Annotated[
        str, typer.Option("--model", "-m", help="Model folder (e.g. a checkpoint) or alias.")
    ],
    data: Annotated[
        list[Path],
        typer.Option(
            "--data", "-d", help="QA file, Search-R1 .parquet or FlashRAG .jsonl; repeatable."
        ),
    ],
    retriever: Annotated[
        str | None, typer.Option("--retriever", help="Retriever server URL.")
    ] = None,
    index: Annotated[
        Path | None, typer.Option("--index", help="Index folder from `tspo index build`.")
    ] = None,
    corpus: Annotated[
        Path | None, typer.Option("--corpus", help="Corpus jsonl; BM25 is built in memory.")
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="Folder for eval.json, eval.md and trajectories.jsonl."),
    ] = None,
    max_turns: Annotated[
        int | None, typer.Option(help="Search turns before the forced answer turn.")
    ] = None,
    max_turn_tokens: Annotated[int | None, typer.Option(help="Tokens per turn, at most.")] = None,
    max_obs_tokens: Annotated[
        int | None, typer.Option(help="Tokens per <information> block, at most.")
    ] = None,
    topk: Annotated[int | None, typer.Option(help="Documents per search.")] = None,
    chat_template: Annotated[
        bool | None,
        typer.Option(
            "--chat-template/--no-chat-template",
            help="Wrap prompts in the tokenizer's chat template (default: as the checkpoint was "
            "trained, else when the tokenizer has one).",
        ),
    ] = None,
    bf16: Annotated[
        str, typer.Option(help="bf16 autocast: auto (CUDA, CPUs with native bf16), on or off.")
    ] = "auto",
    json_output: Annotated[
        bool, typer.Option("--json", help="Print the scores as JSON instead of a table.")
    ] = False,
    batch_size: Annotated[int, typer.Option(help="Questions decoded together.")] = 16,
    limit: Annotated[
        int | None, typer.Option(help="Evaluate only the first N questions of each file.")
    ] = None,
    dtype: Annotated[str, typer.Option(help="float32, bfloat16 or float16.")] = "float32",
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    threads: Annotated[int | None, typer.Option("--threads", help=THREADS_HELP)] = None,
) -> None:
    """Evaluate a model with greedy decoding: EM and F1 per data source, turns and searches.

    Rollout settings default to those in the checkpoint's config.yaml (when MODEL is a
    `tspo train` checkpoint), else to the protocol's defaults; the flags override both.
    """
    from tspo import preflight

    model = preflight.model_name(model, "--model")
    preflight.data_files(data, "--data")
    if sum(bool(source) for source in (retriever, index, corpus)) != 1:
        raise TSPOError("give exactly one retriever: --retriever URL, --index DIR or --corpus FILE")
    if index is not None:
        preflight.index_dir(index, "--index")
    if corpus is not None:
        preflight.corpus_file(corpus, "--corpus")
    preflight.device(device, "--device")
    if chat_template:
        preflight.chat_template(model, "--chat-template")
    if out is not None:
        preflight.output_dir(out, "--out")
    if dtype not in ("float32", "bfloat16", "float16"):
        raise TSPOError(f"--dtype {dtype!r}: expected float32, bfloat16 or float16")
    bf16_modes: dict[str, bool | str] = {"auto": "auto", "on": True, "off": False}
    if bf16 not in bf16_modes:
        raise TSPOError(f"--bf16 {bf16!r}: expected auto, on or off")
    _say(f"tspo eval: loading {model}…")
    from tspo.utils import request_threads

    request_threads(threads)
    _quiet_transformers()
    from tspo.evaluation import markdown_table, run_eval
    from tspo.retrieval.index import open_retriever

    rollout = _eval_rollout_config(
        model,
        max_turns=max_turns,
        max_turn_tokens=max_turn_tokens,
        max_obs_tokens=max_obs_tokens,
        topk=topk,
        use_chat_template=chat_template,
    )
    with open_retriever(
        url=retriever, index=str(index) if index else None, corpus=str(corpus) if corpus else None
    ) as searcher:
        result = run_eval(
            model,
            data,
            retriever=searcher,
            out_dir=out,
            rollout=rollout,
            dtype=dtype,
            device=device,
            batch_size=batch_size,
            limit=limit,
            chat_template=chat_template,
            bf16=bf16_modes[bf16],
        )
    if json_output:
        import json

        typer.echo(json.dumps({"settings": result.settings, "scores": result.scores}, indent=2))
    else:
        typer.echo(markdown_table(result.scores), nl=False)
    if out is not None:
        console.print(f"wrote {out / 'eval.json'}, {out / 'eval.md'}, {out / 'trajectories.jsonl'}")


def continue_command(config: Path | None, overrides: list[str] | None) -> str:
    """The exact `tspo train` command that continues this run from its newest checkpoint."""
    import shlex

    parts = ["tspo", "train"]
    if config is not None:
        parts += ["--config", str(config)]
    parts += ["--resume", "auto"]
    parts += [item for item in overrides or [] if not item.startswith("train.resume=")]
    return shlex.join(parts)


def _eval_rollout_config(model: str, **flags: object):
    """RolloutConfig: flags, else the checkpoint's training config, else the defaults."""
    from tspo.rollout import RolloutConfig

    given = {name: value for name, value in flags.items() if value is not None}
    saved = Path(model) / "config.yaml"
    if saved.is_file():
        from tspo.train.config import EVAL_ROLLOUT_FIELDS, load_config

        try:
            section = load_config(saved).rollout
        except TSPOError:
            section = None  # a model's own config.yaml that is not a tspo config
        if section is not None:
            return section.to_rollout_config(EVAL_ROLLOUT_FIELDS, **given)
    return RolloutConfig(**given)  # type: ignore[arg-type]


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
    out: Annotated[
        Path, typer.Option("--out", help="Folder for the HF checkpoint (model+tokenizer).")
    ],
    world_dir: Annotated[
        Path | None,
        typer.Option(
            "--world", help="Folder written by `tspo data world` (the tiny-policy warm start)."
        ),
    ] = None,
    data_dir: Annotated[
        Path | None,
        typer.Option(
            "--data",
            help="Folder written by `tspo data wiki`: SFT any HF causal LM on its train questions.",
        ),
    ] = None,
    index: Annotated[
        Path | None,
        typer.Option("--index", help="BM25 index of the corpus; built in memory when omitted."),
    ] = None,
    epochs: Annotated[
        int, typer.Option("--epochs", help="Passes over the expert episodes.")
    ] = SFTConfig.epochs,
    lr: Annotated[
        float | None,
        typer.Option(
            "--lr",
            help=f"Peak learning rate (AdamW, cosine decay); default {PolicyStage().sft.lr:g} with "
            f"--world, {WIKI_SFT_LR:g} with --data.",
        ),
    ] = None,
    episodes: Annotated[
        int, typer.Option("--episodes", help="--data: expert episodes to train on.")
    ] = WIKI_SFT_EPISODES,
    batch_size: Annotated[
        int, typer.Option("--batch-size", help="--data: episodes per step.")
    ] = SFTConfig.batch_size,
    topk: Annotated[
        int,
        typer.Option(
            "--topk", help="--data: documents per search (match the RL config's rollout.topk)."
        ),
    ] = 3,
    max_obs_tokens: Annotated[
        int,
        typer.Option(
            "--max-obs-tokens",
            help="--data: tokens per <information> block (match rollout.max_obs_tokens).",
        ),
    ] = SFTConfig.max_obs_tokens,
    action_tag_weight: Annotated[
        float | None,
        typer.Option(
            "--action-tag-weight",
            help="Loss weight of the action tags' tokens (<search>, </search>, <answer>, "
            f"</answer>); default {PolicyStage().sft.action_tag_weight:g} with --world, "
            f"{SFTConfig.action_tag_weight:g} with --data.",
        ),
    ] = None,
    chat_template: Annotated[
        bool | None,
        typer.Option(
            "--chat-template/--no-chat-template",
            help="--data: wrap prompts in the chat template (default: when the tokenizer has one).",
        ),
    ] = None,
    bf16: Annotated[
        str,
        typer.Option(
            "--bf16", help="bf16 autocast, fp32 weights: auto (where supported), on or off."
        ),
    ] = "auto",
    lora: Annotated[
        bool,
        typer.Option(
            "--lora", help="--data: train LoRA adapters (merged on save) instead of all weights."
        ),
    ] = False,
    device: Annotated[
        str, typer.Option("--device", help="--data: auto, cpu, cuda or cuda:N.")
    ] = "auto",
    threads: ThreadsOption = None,
    early_answer: Annotated[
        float,
        typer.Option("--early-answer", help="How often the expert answers one hop too early."),
    ] = PolicyStage.early_answer,
    wrong_query: Annotated[
        float,
        typer.Option("--wrong-query", help="How often the expert searches a near-duplicate name."),
    ] = PolicyStage.wrong_query,
    practice_worlds: Annotated[
        int,
        typer.Option("--practice-worlds", help="Extra worlds whose questions add SFT episodes."),
    ] = PolicyStage.practice_worlds,
    expert_notes: Annotated[
        str,
        typer.Option(
            "--expert-notes",
            help="What the expert notes in its think lines: plan (kinds left to find), goal "
            "(goal and kind found) or none.",
        ),
    ] = PolicyStage.expert_notes,
    base: Annotated[
        str | None,
        typer.Option(
            "--base",
            "--model",
            help=f"Base model: folder, offline hub id or alias (default {PolicyStage.base} with "
            f"--world, {WIKI_SFT_BASE} with --data).",
        ),
    ] = None,
    seed: Annotated[
        int, typer.Option("--seed", help="Seed for the expert and SFT.")
    ] = PolicyStage.seed,
    overwrite: OverwriteOption = False,
) -> None:
    """Warm-start a search policy: SFT on scripted-expert episodes played through the real
    retriever and protocol, loss on the model's own tokens only (prompt and <information> blocks
    are masked). Saves model and tokenizer in Hugging Face format.

    --world: the tiny policy on the synthetic world's noisy expert. --data: any HF causal LM
    (SmolLM2 by default) on the Wikipedia questions (single-hop: search, read, think, answer;
    bridge: two searches); the answer is the gold alias as written in the retrieved passage.
    """
    if (world_dir is None) == (data_dir is None):
        raise TSPOError("give exactly one of --world DIR (synthetic world) or --data DIR (wiki)")
    from tspo import preflight

    preflight.empty_output(out, overwrite)
    if data_dir is not None:
        _wiki_sft(
            data_dir, out, base=base or WIKI_SFT_BASE, lr=lr or WIKI_SFT_LR, epochs=epochs,
            episodes=episodes, batch_size=batch_size, topk=topk, max_obs_tokens=max_obs_tokens,
            chat_template=chat_template, bf16=bf16, lora=lora, device=device, threads=threads,
            index=index, seed=seed,
            action_tag_weight=(
                SFTConfig.action_tag_weight if action_tag_weight is None else action_tag_weight
            ),
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
        expert_notes=expert_notes,
        early_answer=early_answer,
        wrong_query=wrong_query,
        sft=replace(
            defaults.sft,
            epochs=epochs,
            lr=lr,
            seed=seed,
            action_tag_weight=(
                defaults.sft.action_tag_weight if action_tag_weight is None else action_tag_weight
            ),
        ),
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
    action_tag_weight: float,
) -> None:
    """`tspo sft --data`: the Wikipedia expert's episodes, then SFT of any causal LM."""
    import re

    from tspo.models.loading import ALIASES, resolve_model_path
    from tspo.train.sft import SFTConfig, wiki_sft
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
    _quiet_transformers()
    stderr = Console(stderr=True)
    stderr.print(f"tspo sft: {base} on the questions of {data_dir}…", highlight=False)
    config = SFTConfig(
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        max_obs_tokens=max_obs_tokens,
        action_tag_weight=action_tag_weight,
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

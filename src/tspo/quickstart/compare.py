"""`tspo compare`: several advantage estimators x seeds from one SFT start, on one world.

Every run trains with the quickstart's RL settings and saves a checkpoint every ``eval_every``
steps; each checkpoint is then evaluated greedily on a fixed subset of the test split. The report
gives mean ± std over seeds of test EM, reward std within groups, zero-signal groups and near-miss
rate against step, and a table of final test EM and of the steps each estimator needs to reach
GRPO's final EM.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from rich.console import Console

from tspo.quickstart.pipeline import (
    RunPaths,
    ensure_index,
    ensure_policy,
    ensure_world,
    evaluate_folder,
    fingerprint,
    held_out_examples,
    is_done,
    mark_done,
    rl_train_config,
    stage_record,
    start_run,
)
from tspo.quickstart.settings import QuickstartSettings
from tspo.report import Curve, fmt, mean_std_curve, plot_curves, read_jsonl, steps_to_reach
from tspo.utils import atomic_write_text, machine_info

# (metrics.jsonl key or "test_em", plot file, title, y label)
COMPARE_PLOTS = (
    ("test_em", "compare-test-em.png", "Test EM (held-out entities, greedy)", "EM"),
    (
        "mean_group_reward_std",
        "compare-reward-std.png",
        "Outcome reward std within groups",
        "std of R in a group",
    ),
    (
        "zero_signal_groups",
        "compare-zero-signal.png",
        "Groups with zero learning signal (estimator used)",
        "share of groups",
    ),
    ("near_miss_rate", "compare-near-miss.png", "Near-miss rate", "share of trajectories"),
)


def _run_one(
    paths: RunPaths,
    settings: QuickstartSettings,
    estimator: str,
    seed: int,
    eval_every: int,
    sft_em: float,
    retriever: Any,
    examples: list[Any],
    console: Console,
) -> dict[str, Any]:
    """Train one (estimator, seed) run and evaluate its checkpoints; cached in ``result.json``."""
    from tspo.train.checkpoint import list_checkpoints
    from tspo.train.loop import CHECKPOINT_DIR, train

    rl = replace(settings.rl, estimator=estimator, seed=seed, checkpoint_every=eval_every)
    run_dir = paths.root / "runs" / f"{estimator}-seed{seed}"
    stage_fp = fingerprint(settings, rl, eval_every, len(examples))
    record = stage_record(run_dir)
    if is_done(run_dir, stage_fp) and record is not None:
        console.print(f"  reusing {run_dir}")
        return record["result"]
    if run_dir.exists():
        shutil.rmtree(run_dir)
    console.print(f"  [bold]{estimator}[/bold], seed {seed}")
    train(rl_train_config(paths, rl, output_dir=run_dir))
    test_em = [(0, sft_em)]
    for checkpoint in list_checkpoints(run_dir / CHECKPOINT_DIR):
        step = int(json.loads((checkpoint / "tspo_state.json").read_text())["step"])
        result = evaluate_folder(
            checkpoint, retriever, examples, settings, run_dir / "eval" / checkpoint.name
        )
        test_em.append((step, result.overall["em"]))
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    keys = [key for key, *_ in COMPARE_PLOTS if key != "test_em"]
    result = {
        "estimator": estimator,
        "seed": seed,
        "test_em": test_em,
        **{key: [(int(m["step"]), float(m[key])) for m in metrics] for key in keys},
    }
    shutil.rmtree(run_dir / CHECKPOINT_DIR, ignore_errors=True)  # evaluated; weights not needed
    mark_done(run_dir, stage_fp, result=result)
    return result


def run_compare(
    out: str | Path,
    settings: QuickstartSettings,
    estimators: list[str],
    *,
    seeds: int = 3,
    eval_every: int = 10,
    fresh: bool = False,
    console: Console | None = None,
) -> Path:
    """Run every estimator with ``seeds`` seeds and write ``report.md``; returns its path."""
    console = console or Console()
    paths = start_run(out, settings.threads, fresh=fresh)
    started = time.perf_counter()

    console.rule("[bold]world, index and SFT start (shared by every run)")
    world = ensure_world(paths, settings, console)
    retriever = ensure_index(paths, settings, console)
    ensure_policy(paths, world, retriever, settings, console)
    examples = held_out_examples(paths.world, settings.eval.max_examples)
    sft_fp = fingerprint(settings.world, settings.policy, settings.rl, len(examples))
    sft_eval_dir = paths.evals / "sft"
    if is_done(sft_eval_dir, sft_fp):
        sft_em = stage_record(sft_eval_dir)["em"]  # type: ignore[index]
    else:
        sft_em = evaluate_folder(paths.sft, retriever, examples, settings, sft_eval_dir).overall[
            "em"
        ]
        mark_done(sft_eval_dir, sft_fp, em=sft_em)
    console.print(f"  SFT start: test EM {sft_em:.3f} on {len(examples)} test questions")

    results: list[dict[str, Any]] = []
    for estimator in estimators:
        console.rule(f"[bold]{estimator}")
        for seed in range(seeds):
            results.append(
                _run_one(
                    paths,
                    settings,
                    estimator,
                    seed,
                    eval_every,
                    sft_em,
                    retriever,
                    examples,
                    console,
                )
            )
    retriever.close()
    report = write_compare_report(
        paths,
        results,
        estimators,
        settings=settings,
        seeds=seeds,
        eval_every=eval_every,
        eval_examples=len(examples),
        seconds=time.perf_counter() - started,
    )
    console.print(f"report: {report}")
    return report


def aggregate(results: list[dict[str, Any]], estimators: list[str]) -> dict[str, dict[str, Curve]]:
    """estimator -> metric -> mean ± std curve over seeds."""
    return {
        estimator: {
            key: mean_std_curve([r[key] for r in results if r["estimator"] == estimator])
            for key, *_ in COMPARE_PLOTS
        }
        for estimator in estimators
    }


def summary_table(curves: dict[str, dict[str, Curve]], baseline: str = "grpo") -> str:
    """Final test EM (mean ± std) and the first evaluated step reaching the baseline's final EM."""
    target = curves[baseline]["test_em"].mean[-1] if baseline in curves else None
    lines = [
        f"| estimator | final test EM (mean ± std) | steps to reach {baseline}'s final EM |",
        "|---|---:|---:|",
    ]
    for estimator, by_key in curves.items():
        curve = by_key["test_em"]
        if not curve.steps:
            continue
        reached = steps_to_reach(curve, target) if target is not None else None
        reach = "n/a" if target is None else ("not reached" if reached is None else str(reached))
        lines.append(f"| {estimator} | {fmt(curve.mean[-1])} ± {fmt(curve.std[-1])} | {reach} |")
    return "\n".join(lines) + "\n"


def write_compare_report(
    paths: RunPaths,
    results: list[dict[str, Any]],
    estimators: list[str],
    *,
    settings: QuickstartSettings,
    seeds: int,
    eval_every: int,
    eval_examples: int,
    seconds: float,
) -> Path:
    curves = aggregate(results, estimators)
    sections = []
    for key, filename, title, ylabel in COMPARE_PLOTS:
        plot_curves(
            {e: curves[e][key] for e in estimators},
            paths.img / filename,
            title=title,
            ylabel=ylabel,
        )
        sections += [f"![{title}](img/{filename})", ""]
    rl = settings.rl
    machine = machine_info()
    lines = [
        "# Estimator comparison",
        "",
        f"Estimators {', '.join(f'`{e}`' for e in estimators)}, {seeds} RL seeds each, all from "
        f"the same SFT start on the same world (seed {settings.world.seed}, size "
        f"`{settings.world.size}`). Test EM is greedy, on a fixed subset of {eval_examples} "
        f"held-out test questions, every {eval_every} steps; the other curves are training "
        "diagnostics of every step. Bands are ±1 std over seeds.",
        "",
        summary_table(curves),
        *sections,
        f"RL: {rl.steps} steps x {rl.prompts_per_step} questions x group {rl.group_size}, lr "
        f"{rl.lr}, KL {rl.kl_coef}, alpha {rl.alpha}, top-{rl.topk}, {rl.max_turns} turns. Took "
        f"{seconds / 60:.1f} min on {machine.get('cpu_count')} CPUs.",
        "",
    ]
    atomic_write_text(paths.report, "\n".join(lines))
    return paths.report

"""`tspo compare`: several advantage estimators x seeds from one SFT start, on one world.

Every run trains with the quickstart's RL settings and validates greedily on the dev split every
``eval_every`` steps (and at step 0); its final policy is then evaluated greedily on the test
split. The report gives mean ± std over seeds of dev EM, reward std within groups, zero-signal
groups and near-miss rate against step, and a table of final test and dev EM and of the steps each
estimator needs to reach GRPO's final dev EM.
"""

from __future__ import annotations

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
from tspo.quickstart.report import (
    Curve,
    fmt,
    mean_std_curve,
    plot_curves,
    read_jsonl,
    steps_to_reach,
)
from tspo.quickstart.settings import QuickstartSettings
from tspo.utils import atomic_write_text, machine_info

# (metrics.jsonl key or "test_em", plot file, title, y label)
COMPARE_PLOTS = (
    ("dev_em", "compare-dev-em.png", "Dev EM during RL (held-out entities, greedy)", "EM"),
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
    retriever: Any,
    examples: list[Any],
    console: Console,
) -> dict[str, Any]:
    """Train one (estimator, seed) run, validating as it goes, then evaluate its final policy on
    the test split; the result is cached in the run's ``stage.json``."""
    from tspo.train.loop import CHECKPOINT_DIR, train

    rl = replace(settings.rl, estimator=estimator, seed=seed, eval_every=eval_every)
    run_dir = paths.root / "runs" / f"{estimator}-seed{seed}"
    stage_fp = fingerprint(settings, rl, eval_every, len(examples))
    record = stage_record(run_dir)
    if is_done(run_dir, stage_fp) and record is not None:
        console.print(f"  reusing {run_dir}")
        return record["result"]
    if run_dir.exists():
        shutil.rmtree(run_dir)
    console.print(f"  [bold]{estimator}[/bold], seed {seed}")
    started = time.perf_counter()
    trained = train(rl_train_config(paths, rl, output_dir=run_dir, show_progress=False))
    final = evaluate_folder(
        Path(str(trained.last_checkpoint)),
        retriever,
        examples,
        settings,
        run_dir / "eval" / "final",
        show_progress=False,
    )
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    validation = read_jsonl(run_dir / "validation.jsonl")
    keys = [key for key, *_ in COMPARE_PLOTS if key != "dev_em"]
    result = {
        "estimator": estimator,
        "seed": seed,
        "dev_em": [(int(v["step"]), float(v["em"])) for v in validation],
        "test_em_final": final.overall["em"],
        "test_answered_final": final.overall["answered"],
        "seconds": time.perf_counter() - started,  # training and final evaluation
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
        sft_em = evaluate_folder(
            paths.sft, retriever, examples, settings, sft_eval_dir, show_progress=False
        ).overall["em"]
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
        sft_em=sft_em,
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


def final_test_em(results: list[dict[str, Any]], estimator: str) -> tuple[float, float]:
    """Mean and std over seeds of an estimator's final test EM."""
    values = [r["test_em_final"] for r in results if r["estimator"] == estimator]
    mean = sum(values) / len(values)
    return mean, (sum((v - mean) ** 2 for v in values) / len(values)) ** 0.5


def run_minutes(results: list[dict[str, Any]]) -> str:
    """The runs' summed wall time, e.g. ``75.3 min``; runs cached before it was recorded are
    counted as unknown."""
    known = [r["seconds"] for r in results if "seconds" in r]
    text = f"{sum(known) / 60:.1f} min"
    missing = len(results) - len(known)
    return text if not missing else f"{text} ({missing} of {len(results)} runs not timed)"


def summary_table(
    curves: dict[str, dict[str, Curve]], results: list[dict[str, Any]], baseline: str = "grpo"
) -> str:
    """Final test EM and dev EM (mean ± std over seeds), the first validated step at which the
    dev EM reaches the baseline's final dev EM, and mean diagnostics over training."""
    target = curves[baseline]["dev_em"].mean[-1] if baseline in curves else None
    lines = [
        "| estimator | final test EM | final dev EM | steps to reach "
        f"{baseline}'s final dev EM | reward std in groups | zero-signal groups | near misses |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for estimator, by_key in curves.items():
        curve = by_key["dev_em"]
        if not curve.steps:
            continue
        reached = steps_to_reach(curve, target) if target is not None else None
        reach = "n/a" if target is None else ("not reached" if reached is None else str(reached))
        test_mean, test_std = final_test_em(results, estimator)
        means = [
            sum(by_key[key].mean) / max(1, len(by_key[key].mean))
            for key in ("mean_group_reward_std", "zero_signal_groups", "near_miss_rate")
        ]
        lines.append(
            f"| {estimator} | {fmt(test_mean)} ± {fmt(test_std)} | {fmt(curve.mean[-1])} ± "
            f"{fmt(curve.std[-1])} | {reach} | " + " | ".join(fmt(m) for m in means) + " |"
        )
    return "\n".join(lines) + "\n"


def write_compare_report(
    paths: RunPaths,
    results: list[dict[str, Any]],
    estimators: list[str],
    *,
    sft_em: float,
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
        f"`{settings.world.size}`). Dev EM is greedy, on the dev split (held-out entities), every "
        f"{eval_every} steps; final test EM is greedy on {eval_examples} held-out test questions "
        f"(SFT start: {sft_em:.3f}). The other curves are training diagnostics of every step; "
        "the table's last three columns are their means over training. Bands are ±1 std over "
        "seeds.",
        "",
        summary_table(curves, results),
        *sections,
        f"RL: {rl.steps} steps x {rl.prompts_per_step} questions x group {rl.group_size}, lr "
        f"{rl.lr}, KL {rl.kl_coef}, alpha {rl.alpha}, top-{rl.topk}, {rl.max_turns} turns. This "
        f"invocation took {seconds / 60:.1f} min on {machine.get('cpu_count')} CPUs; the runs "
        f"themselves {run_minutes(results)} (training and final evaluation, summed).",
        "",
    ]
    atomic_write_text(paths.report, "\n".join(lines))
    return paths.report

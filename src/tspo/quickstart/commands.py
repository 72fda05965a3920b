"""CLI commands: ``tspo quickstart``, ``tspo compare``."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import typer

from tspo.cli_apps import app
from tspo.data.commands import WORLD_SIZES
from tspo.quickstart.settings import PolicyStage, RLStage

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

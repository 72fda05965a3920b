"""CLI commands: ``tspo quickstart``, ``tspo compare``."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer

from tspo.cli_apps import ThreadsOption, app
from tspo.data.commands import WorldSizeOption
from tspo.quickstart.settings import PolicyStage, RLStage

FreshOption = Annotated[bool, typer.Option("--fresh", help="Start over instead of reusing stages.")]
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
    out: Annotated[Path, typer.Option("--out", help="Run folder.")] = Path("runs/quickstart"),
    fresh: FreshOption = False,
    steps: Annotated[int | None, typer.Option("--steps", help=RL_STEPS_HELP)] = None,
    size: WorldSizeOption = "small",
    estimator: Annotated[
        str, typer.Option("--estimator", help="Advantage estimator for RL.")
    ] = "tspo",
    seed: Annotated[int, typer.Option("--seed", help="Seed of the world, the policy and RL.")] = 0,
    base: Annotated[
        str, typer.Option("--base", help="Base model folder or alias that SFT starts from.")
    ] = PolicyStage.base,
    threads: ThreadsOption = None,
    last: Annotated[
        bool,
        typer.Option(
            "--last",
            help="Evaluate the last RL step instead of the checkpoint with the best dev EM.",
        ),
    ] = False,
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
    rl = replace(settings.rl, estimator=estimator, seed=seed, keep_best_dev=not last)
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
    estimators: Annotated[
        str, typer.Option("--estimators", help="Comma-separated estimators.")
    ] = "grpo,folr_scalar,tspo,tspo_switch",
    seeds: Annotated[
        int, typer.Option("--seeds", help="RL seeds per estimator (same SFT start).")
    ] = 3,
    steps: Annotated[
        int | None, typer.Option("--steps", help=f"RL steps per run (default {RLStage.steps}).")
    ] = None,
    eval_every: Annotated[
        int, typer.Option("--eval-every", help="Evaluate test EM every N steps.")
    ] = 10,
    eval_examples: Annotated[
        int,
        typer.Option(
            "--eval-examples", help="Size of the fixed test subset evaluated along the way."
        ),
    ] = 90,
    size: WorldSizeOption = "small",
    out: Annotated[Path, typer.Option("--out", help="Run folder.")] = Path("runs/compare"),
    fresh: FreshOption = False,
    threads: ThreadsOption = None,
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

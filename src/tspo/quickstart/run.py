"""`tspo quickstart`: world -> index -> SFT -> TSPO RL -> before/after evaluation -> report.md."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console

from tspo.quickstart.pipeline import (
    RunPaths,
    best_dev_checkpoint,
    ensure_index,
    ensure_policy,
    ensure_transfer_world,
    ensure_world,
    evaluate_folder,
    held_out_examples,
    rl_train_config,
    start_run,
)
from tspo.quickstart.settings import QuickstartSettings
from tspo.utils import machine_info, peak_memory_mb, write_json

if TYPE_CHECKING:
    from tspo.data.qa import QAExample
    from tspo.evaluation import EvalResult
    from tspo.retrieval.base import Retriever

STAGES = ("world", "index", "SFT", "RL", "evaluation", "report")


def _evaluate_start_and_final(
    folders: dict[str, Path],
    retriever: Retriever,
    examples: list[QAExample],
    settings: QuickstartSettings,
    out: Path,
    show_progress: bool,
) -> dict[str, EvalResult]:
    """Greedy evaluation of each of ``folders`` (name -> policy) into ``out/<name>``."""
    return {
        name: evaluate_folder(
            folder, retriever, examples, settings, out / name, show_progress=show_progress
        )
        for name, folder in folders.items()
    }


def _transfer_scores(
    paths: RunPaths,
    folders: dict[str, Path],
    settings: QuickstartSettings,
    console: Console,
    show_progress: bool,
) -> dict[str, Any]:
    """EM/F1 of the SFT start and the final policy on another world (``settings.eval.transfer``)."""
    other = ensure_transfer_world(paths, settings, Console(quiet=True))
    other_examples = held_out_examples(paths.transfer / "world", settings.eval.max_examples)
    results = _evaluate_start_and_final(
        {f"transfer-{name}": folder for name, folder in folders.items()},
        other,
        other_examples,
        settings,
        paths.evals,
        show_progress,
    )
    other.close()
    transfer = {name: results[f"transfer-{name}"].overall for name in folders}
    console.print(
        f"  another world (seed {settings.world.seed + 1}): test EM "
        f"{transfer['sft']['em']:.3f} (SFT) -> {transfer['final']['em']:.3f} (after RL)"
    )
    return transfer


def _write_summary(
    path: Path,
    evals: dict[str, EvalResult],
    transfer: dict[str, Any],
    validation: list[dict[str, Any]],
    facts: dict[str, Any],
) -> None:
    """``summary.json``: test EM before and after RL, the scores, the dev curve and the facts."""
    write_json(
        path,
        {
            "test_em_sft": evals["sft"].overall["em"],
            "test_em_final": evals["final"].overall["em"],
            "test_em_gain": evals["final"].overall["em"] - evals["sft"].overall["em"],
            "before": evals["sft"].scores,
            "after": evals["final"].scores,
            "transfer": transfer,
            "dev_em_curve": [(v["step"], v["em"]) for v in validation],
            **{k: v for k, v in facts.items() if k != "settings"},
        },
    )


def run_quickstart(
    out: str | Path,
    settings: QuickstartSettings | None = None,
    *,
    fresh: bool = False,
    console: Console | None = None,
    show_progress: bool = True,
) -> Path:
    """Run every stage into ``out`` and return the path of ``report.md``."""
    import torch

    from tspo.evaluation import trajectory_record
    from tspo.quickstart.report import read_jsonl
    from tspo.train.loop import train

    settings = settings or QuickstartSettings()
    console = console or Console()
    paths = start_run(out, settings.threads, fresh=fresh)
    started = time.perf_counter()
    seconds: dict[str, float] = {}

    def stage(index: int) -> float:
        console.rule(f"[bold]{index + 1}/{len(STAGES)} {STAGES[index]}")
        return time.perf_counter()

    t = stage(0)
    world = ensure_world(paths, settings, console)
    seconds["world"] = time.perf_counter() - t

    t = stage(1)
    retriever = ensure_index(paths, settings, console)
    seconds["index"] = time.perf_counter() - t

    t = stage(2)
    policy_info = ensure_policy(paths, world, retriever, settings, console)
    seconds["sft"] = time.perf_counter() - t

    t = stage(3)
    config = rl_train_config(paths, settings.rl, output_dir=paths.rl, show_progress=show_progress)
    if paths.rl.exists():
        shutil.rmtree(paths.rl)
    result = train(config)
    seconds["rl"] = time.perf_counter() - t
    last_checkpoint = result.last_checkpoint
    assert last_checkpoint is not None, "the last RL step always writes a checkpoint"
    console.print(f"  {result.final_step} RL steps ({settings.rl.estimator}) -> {last_checkpoint}")
    validation_file = paths.rl / "validation.jsonl"
    validation = read_jsonl(validation_file) if validation_file.is_file() else []
    final_dir, final_step = Path(last_checkpoint), result.final_step
    best = best_dev_checkpoint(validation, final_dir.parent) if settings.rl.keep_best_dev else None
    if best is not None:
        final_dir, final_step = best
        console.print(f"  final policy: step {final_step}, the best greedy dev EM -> {final_dir}")

    t = stage(4)
    examples = held_out_examples(paths.world, settings.eval.max_examples)
    folders = {"sft": paths.sft, "final": final_dir}
    evals = _evaluate_start_and_final(
        folders, retriever, examples, settings, paths.evals, show_progress
    )
    for name, evaluated in evals.items():
        console.print(f"  {name}: test EM {evaluated.overall['em']:.3f}")
    retriever.close()
    transfer = (
        _transfer_scores(paths, folders, settings, console, show_progress)
        if settings.eval.transfer
        else {}
    )
    seconds["eval"] = time.perf_counter() - t

    t = stage(5)
    from tspo.quickstart.report_quickstart import write_quickstart_report

    metrics = read_jsonl(paths.rl / "metrics.jsonl")
    seconds["total"] = time.perf_counter() - started
    facts: dict[str, Any] = {
        "settings": settings,
        "policy": policy_info,
        "seconds": seconds,
        "machine": {**machine_info(), "torch_threads": torch.get_num_threads()},
        "memory": peak_memory_mb(),
        "world": {split: len(qs) for split, qs in world.questions.items()},
        "documents": len(world.documents),
        "final_step": final_step,
    }
    report = write_quickstart_report(
        paths,
        metrics=metrics,
        before=evals["sft"].scores,
        after=evals["final"].scores,
        before_records=[trajectory_record(tr) for tr in evals["sft"].trajectories],
        after_records=[trajectory_record(tr) for tr in evals["final"].trajectories],
        facts=facts,
        validation=validation,
        transfer=transfer,
    )
    _write_summary(paths.root / "summary.json", evals, transfer, validation, facts)
    console.print(
        f"test EM {evals['sft'].overall['em']:.3f} (SFT) -> {evals['final'].overall['em']:.3f} "
        f"(after RL) in {seconds['total'] / 60:.1f} min"
    )
    console.print(f"report: {report}")
    return report

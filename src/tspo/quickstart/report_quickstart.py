"""The quickstart's ``report.md``: before/after table, plots against step, example trajectories."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from tspo.quickstart.pipeline import RunPaths
from tspo.quickstart.report import (
    before_after_table,
    examples_section,
    plot_step_metrics,
)
from tspo.utils import atomic_write_text

if TYPE_CHECKING:
    from tspo.quickstart.settings import QuickstartSettings, RLStage

PLOTS = {
    "reward": "quickstart-reward.png",
    "zero_signal": "quickstart-zero-signal.png",
    "near_miss": "quickstart-near-miss.png",
}


def write_plots(
    paths: RunPaths,
    metrics: Sequence[Mapping[str, Any]],
    test_em: tuple[float, float],
    estimator: str,
    validation: Sequence[Mapping[str, Any]] = (),
    final_step: int | None = None,
) -> dict[str, str]:
    """The three PNGs under ``paths.img``; returns their paths relative to the report.

    The "after" test EM is drawn at ``final_step`` (the step of the evaluated policy), else at the
    last step."""
    if final_step is None:
        final_step = int(metrics[-1]["step"]) if metrics else 0
    points = {}
    if validation:
        points["dev EM (greedy)"] = (
            [int(v["step"]) for v in validation],
            [float(v["em"]) for v in validation],
        )
    points["test EM (held-out entities)"] = ([0, final_step], list(test_em))
    plot_step_metrics(
        metrics,
        ["reward_mean", "f1_mean"],
        paths.img / PLOTS["reward"],
        title=f"Reward and greedy EM while training ({estimator})",
        ylabel="share of questions",
        points=points,
    )
    plot_step_metrics(
        metrics,
        ["zero_signal_groups_grpo", "zero_signal_groups"],
        paths.img / PLOTS["zero_signal"],
        title=f"Groups with no learning signal: outcome-only view vs {estimator}",
        ylabel="share of groups",
    )
    plot_step_metrics(
        metrics,
        ["near_miss_rate", "hit_rate"],
        paths.img / PLOTS["near_miss"],
        title="Answer found by search: hit rate and near misses",
        ylabel="share of trajectories",
    )
    return {key: f"img/{name}" for key, name in PLOTS.items()}


def _mean(metrics: Sequence[Mapping[str, Any]], key: str, rows: slice) -> float:
    values = [float(m[key]) for m in metrics[rows] if m.get(key) is not None]
    return sum(values) / len(values) if values else float("nan")


def write_quickstart_report(
    paths: RunPaths,
    *,
    metrics: Sequence[Mapping[str, Any]],
    before: Mapping[str, Mapping[str, float]],
    after: Mapping[str, Mapping[str, float]],
    before_records: Sequence[Mapping[str, Any]],
    after_records: Sequence[Mapping[str, Any]],
    facts: Mapping[str, Any],
    validation: Sequence[Mapping[str, Any]] = (),
    transfer: Mapping[str, Any] | None = None,
) -> Any:
    """Write ``report.md`` (and its plots) and return its path."""
    settings = facts["settings"]
    rl, policy = settings.rl, facts["policy"]
    em_before, em_after = before["overall"]["em"], after["overall"]["em"]
    plots = write_plots(
        paths, metrics, (em_before, em_after), rl.estimator, validation, facts.get("final_step")
    )
    lines = [
        "# TSPO quickstart report",
        "",
        f"A {policy['parameters'] / 1e6:.1f}M-parameter policy was trained to search a synthetic "
        f"world of {facts['documents']} made-up entities. It started from SFT on a noisy scripted "
        f"expert, then trained {len(metrics)} RL steps with the `{rl.estimator}` estimator. "
        f"{_final_policy_sentence(facts.get('final_step'), len(metrics))} Both policies were "
        f"evaluated greedily on the **test split: {int(before['overall']['count'])} questions "
        "about entities that no training question asks about.**",
        "",
        f"**Test EM: {em_before:.3f} (SFT start) -> {em_after:.3f} (after RL), "
        f"{em_after - em_before:+.3f} absolute.**",
        "",
        *_transfer_lines(transfer, settings.world.seed + 1),
        *_validation_lines(validation),
        "## Before and after RL (test split, greedy decoding)",
        "",
        before_after_table(before, after),
        "`world-Nhop` rows split the questions by the number of hops they need. Turns and "
        "searches are means per question.",
        "",
        *_curve_lines(metrics, plots, rl),
        "## Example trajectories (test questions)",
        "",
        examples_section(before_records, after_records, count=3),
        "## How this run was made",
        "",
        *_provenance_lines(settings, policy, facts),
        "<details><summary>All settings</summary>",
        "",
        "```json",
        _json(asdict(settings)),
        "```",
        "",
        "</details>",
        "",
    ]
    atomic_write_text(paths.report, "\n".join(lines))
    return paths.report


def _final_policy_sentence(final_step: int | None, steps: int) -> str:
    """Which RL checkpoint the "after" columns are."""
    if final_step is None or final_step == steps:
        return "The final policy is the last step's."
    return (
        f"The final policy is step {final_step}'s, the checkpoint with the best greedy dev EM "
        "(the test split played no part in choosing it)."
    )


def _curve_lines(
    metrics: Sequence[Mapping[str, Any]], plots: Mapping[str, str], rl: RLStage
) -> list[str]:
    """The training-curves section: reward and EM, zero-signal groups, near misses."""
    window = slice(0, min(5, len(metrics)))
    tail = slice(max(0, len(metrics) - 5), len(metrics))
    return [
        "## Training curves",
        "",
        f"![reward and EM]({plots['reward']})",
        "",
        "Training reward is the EM of sampled trajectories (temperature "
        f"{rl.temperature}); the dashed markers are greedy test EM before and after.",
        "",
        f"![zero-signal groups]({plots['zero_signal']})",
        "",
        "A group of trajectories for one question carries no learning signal when all its "
        "advantages are zero. Under outcome-only GRPO that happens whenever every trajectory "
        f"gets the same EM; FOLR (`{rl.estimator}`) still separates trajectories that retrieved "
        "the answer from those that did not. Mean over the first 5 / last 5 steps: GRPO view "
        f"{_mean(metrics, 'zero_signal_groups_grpo', window):.2f} / "
        f"{_mean(metrics, 'zero_signal_groups_grpo', tail):.2f}, `{rl.estimator}` "
        f"{_mean(metrics, 'zero_signal_groups', window):.2f} / "
        f"{_mean(metrics, 'zero_signal_groups', tail):.2f}.",
        "",
        f"![near misses]({plots['near_miss']})",
        "",
        "Hit rate: the answer appeared in a retrieved document. Near miss: it appeared, yet the "
        "final answer was wrong (the process reward FOLR credits and the outcome reward ignores).",
        "",
    ]


def _provenance_lines(
    settings: QuickstartSettings, policy: Mapping[str, Any], facts: Mapping[str, Any]
) -> list[str]:
    """How the run was made: world, policy, RL, time and machine, files."""
    rl, seconds = settings.rl, facts["seconds"]
    return [
        f"- World: seed {settings.world.seed}, size `{settings.world.size}`; questions per "
        f"split {facts['world']}.",
        f"- Policy: Llama-shaped, {policy['parameters']:,} parameters, vocabulary "
        f"{policy['vocab_size']}; SFT on {policy['episodes']} noisy expert episodes (expert EM "
        f"{policy['expert_em']:.2f}: early answers {settings.policy.early_answer}, wrong queries "
        f"{settings.policy.wrong_query}), {policy['sft_steps']} steps, loss "
        f"{policy['sft_loss_first']:.2f} (first step) -> {policy['sft_loss_last']:.2f} "
        "(mean of the last 10 steps).",
        f"- RL: `{rl.estimator}`, {rl.steps} steps x {rl.prompts_per_step} questions x group "
        f"{rl.group_size}, lr {rl.lr}, KL {rl.kl_coef}, alpha {rl.alpha}, top-{rl.topk} BM25, "
        f"{rl.max_turns} turns.",
        "- Time (s): "
        + ", ".join(f"{name} {value:.0f}" for name, value in seconds.items())
        + f"; machine: {facts['machine'].get('cpu_count')} CPUs, torch threads "
        f"{facts['machine'].get('torch_threads')}; peak memory "
        f"{facts['memory'].get('peak_rss_mb', 0):.0f} MiB.",
        "- Files: `world/` (corpus + FlashRAG splits), `index/` (BM25), `sft/` (HF checkpoint), "
        "`rl/` (metrics.jsonl, samples.jsonl, checkpoints), `eval/{sft,final}/` "
        "(eval.json, trajectories.jsonl).",
        "",
    ]


def _transfer_lines(transfer: Mapping[str, Any] | None, seed: int) -> list[str]:
    if not transfer:
        return []
    before, after = transfer["sft"], transfer["final"]
    return [
        f"On another world (seed {seed}: other names, other facts, never trained on), test EM "
        f"is {before['em']:.3f} (SFT start) -> {after['em']:.3f} (after RL) on "
        f"{int(after['count'])} questions.",
        "",
    ]


def _validation_lines(validation: Sequence[Mapping[str, Any]]) -> list[str]:
    if not validation:
        return []
    curve = ", ".join(f"{int(v['step'])}: {v['em']:.3f}" for v in validation)
    return [
        f"Greedy dev EM during RL ({int(validation[0]['count'])} dev questions), by step: {curve}.",
        "",
    ]


def _json(value: Any) -> str:
    import json

    return json.dumps(value, indent=2, default=str)

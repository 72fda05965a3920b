"""Evaluate a search agent: greedy multi-turn rollouts, EM and F1 per data source and overall.

:func:`evaluate` works on a loaded model; :func:`run_eval` loads a model folder and QA files
(Search-R1 parquet or FlashRAG jsonl, e.g. the seven standard test sets as distributed), runs
:func:`evaluate` and writes ``eval.json``, ``eval.md`` (a Markdown table) and
``trajectories.jsonl`` to an output folder.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tspo.data.qa import QAExample
from tspo.retrieval.base import Retriever
from tspo.rollout.batch import Trajectory
from tspo.utils import atomic_write_text, progress_bar, write_json

OVERALL = "overall"


@dataclass
class EvalResult:
    """Scores per data source (``OVERALL`` for all questions) and every trajectory."""

    scores: dict[str, dict[str, float]]
    trajectories: list[Trajectory] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def overall(self) -> dict[str, float]:
        return self.scores[OVERALL]


def summarize(trajectories: Sequence[Trajectory]) -> dict[str, float]:
    """Count, EM, F1, mean turns and searches, answer rate, the share of invalid turns and the
    share of trajectories whose first turn is a well-formed search."""
    count = len(trajectories)
    if count == 0:
        return {
            "count": 0,
            "em": 0.0,
            "f1": 0.0,
            "turns": 0.0,
            "searches": 0.0,
            "answered": 0.0,
            "invalid_rate": 0.0,
            "first_search": 0.0,
        }
    turns = sum(t.num_turns for t in trajectories)
    return {
        "count": count,
        "em": sum(t.outcome for t in trajectories) / count,
        "f1": sum(t.f1 for t in trajectories) / count,
        "turns": sum(t.num_turns for t in trajectories) / count,
        "searches": sum(t.num_searches for t in trajectories) / count,
        "answered": sum(t.final_answer is not None for t in trajectories) / count,
        "invalid_rate": sum(t.num_invalid for t in trajectories) / max(turns, 1),
        "first_search": sum(first_turn_searches(t) for t in trajectories) / count,
    }


def first_turn_searches(trajectory: Trajectory) -> bool:
    """Whether the first turn is a well-formed search (a complete ``<search>`` block with a query,
    before any answer), which the environment ran."""
    return bool(trajectory.queries) and trajectory.queries[0] is not None


def scores_by_source(
    trajectories: Sequence[Trajectory], labels: Sequence[str] | None = None
) -> dict[str, dict[str, float]]:
    """:func:`summarize` per ``data_source`` (in order of first appearance) plus ``overall``;
    per ``labels`` instead when given (one per trajectory, e.g. ``file/data_source``)."""
    groups: dict[str, list[Trajectory]] = {}
    keys = labels if labels is not None else [t.data_source for t in trajectories]
    for key, trajectory in zip(keys, trajectories, strict=True):
        groups.setdefault(key, []).append(trajectory)
    scores = {source: summarize(group) for source, group in groups.items()}
    scores[OVERALL] = summarize(trajectories)
    return scores


def evaluate(
    model: Any,
    tokenizer: Any,
    retriever: Retriever,
    examples: Sequence[QAExample],
    *,
    rollout: Any = None,
    batch_size: int = 16,
    show_progress: bool = True,
    labels: Sequence[str] | None = None,
) -> EvalResult:
    """Greedy rollouts of ``examples`` in batches of ``batch_size``, scored by EM and F1.

    ``rollout`` is a ``tspo.rollout.RolloutConfig`` (turn limits, top-k, chat template); sampling
    settings in it are ignored because decoding is greedy. Scores are grouped by ``labels`` (one
    per example) when given, else by data source. The progress bar (with ETA) goes to stderr, as
    plain lines every 30 s when stderr is not a terminal.
    """
    import torch

    from tspo.rollout import RolloutConfig, RolloutEngine
    from tspo.train.sft import LogLines

    rollout = rollout or RolloutConfig()
    engine = RolloutEngine(model, tokenizer, retriever, rollout)
    trajectories: list[Trajectory] = []
    log_lines = LogLines("evaluating", enabled=show_progress)
    with progress_bar(disable=not show_progress, stderr=True) as progress:
        task = progress.add_task("evaluating", total=len(examples))
        for start in range(0, len(examples), batch_size):
            chunk = list(examples[start : start + batch_size])
            with torch.no_grad():
                batch = engine.generate(chunk, 1, greedy=True)
            trajectories.extend(batch.trajectories)
            progress.update(task, advance=len(chunk))
            log_lines.update(len(trajectories), len(examples))
    settings = {
        "max_turns": rollout.max_turns,
        "max_turn_tokens": rollout.max_turn_tokens,
        "max_obs_tokens": rollout.max_obs_tokens,
        "topk": rollout.topk,
        "use_chat_template": rollout.use_chat_template,
        "decoding": "greedy",
    }
    return EvalResult(scores_by_source(trajectories, labels), trajectories, settings)


def markdown_table(scores: dict[str, dict[str, float]]) -> str:
    """The scores as a Markdown table, one row per data source and ``overall`` last."""
    lines = [
        "| data source | questions | EM | F1 | turns | searches | answered |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for source, row in scores.items():
        name = f"**{source}**" if source == OVERALL else source
        lines.append(
            f"| {name} | {int(row['count'])} | {row['em']:.3f} | {row['f1']:.3f} | "
            f"{row['turns']:.2f} | {row['searches']:.2f} | {row['answered']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def trajectory_record(trajectory: Trajectory) -> dict[str, Any]:
    return {
        "id": trajectory.example_id,
        "data_source": trajectory.data_source,
        "question": trajectory.question,
        "golds": trajectory.golds,
        "response": trajectory.response_text,
        "queries": trajectory.queries,
        "final_answer": trajectory.final_answer,
        "em": trajectory.outcome,
        "f1": trajectory.f1,
        "first_hit_turn": trajectory.first_hit_turn,
        "turns": trajectory.num_turns,
        "searches": trajectory.num_searches,
    }


def write_report(result: EvalResult, out_dir: str | Path, *, meta: dict[str, Any]) -> Path:
    """Write ``eval.json``, ``eval.md`` and ``trajectories.jsonl`` into ``out_dir``."""
    import json

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(
        out_dir / "eval.json", {**meta, "settings": result.settings, "scores": result.scores}
    )
    title = f"# Evaluation of `{meta.get('model', 'model')}`\n\n"
    atomic_write_text(out_dir / "eval.md", title + markdown_table(result.scores))
    atomic_write_text(
        out_dir / "trajectories.jsonl",
        "".join(json.dumps(trajectory_record(t)) + "\n" for t in result.trajectories),
    )
    return out_dir


def load_eval_examples(paths: Sequence[str | Path], limit: int | None = None) -> list[QAExample]:
    """Questions from QA files (the first ``limit`` of each file when given)."""
    return [example for _, examples in load_eval_files(paths, limit) for example in examples]


def load_eval_files(
    paths: Sequence[str | Path], limit: int | None = None
) -> list[tuple[str, list[QAExample]]]:
    """(label, questions) per QA file, the first ``limit`` of each when given. The label is the
    file's stem, or the path as given when two files share a stem."""
    from tspo.data.qa import read_qa
    from tspo.errors import TSPOError

    stems = [Path(path).stem for path in paths]
    loaded = []
    for path, stem in zip(paths, stems, strict=True):
        if not Path(path).is_file():
            raise TSPOError(f"--data: no such file {path}")
        label = stem if stems.count(stem) == 1 else str(path)
        loaded.append((label, read_qa(path)[:limit]))
    if not any(examples for _, examples in loaded):
        raise TSPOError("--data: the files hold no questions")
    return loaded


def group_labels(files: Sequence[tuple[str, Sequence[QAExample]]]) -> list[str] | None:
    """Score groups for several files: by data source, unless two files share a data source;
    then ``file/data_source``, so every file is reported on its own. None: by data source."""
    owners: dict[str, set[str]] = {}
    for label, examples in files:
        for example in examples:
            owners.setdefault(example.data_source, set()).add(label)
    if all(len(labels) == 1 for labels in owners.values()):
        return None
    return [f"{label}/{example.data_source}" for label, examples in files for example in examples]


def checkpoint_chat_template(model_path: str | Path) -> bool | None:
    """Whether the model folder says it was trained with the chat template: a ``tspo train``
    checkpoint's ``config.yaml`` (``rollout.use_chat_template``) or ``tspo sft``'s
    ``tspo_sft.json``; None when it says nothing."""
    from tspo.errors import TSPOError
    from tspo.train.sft import sft_info

    folder = Path(model_path)
    if (folder / "config.yaml").is_file():
        from tspo.train.config import load_config

        try:
            return bool(load_config(folder / "config.yaml").rollout.use_chat_template)
        except TSPOError:
            pass  # a model's own config.yaml that is not a tspo config
    info = sft_info(folder)
    if info is not None and isinstance(info.get("use_chat_template"), bool):
        return info["use_chat_template"]
    return None


def resolve_chat_template(model_path: str | Path, tokenizer: Any, requested: bool | None) -> bool:
    """``requested`` when given, else what the checkpoint says, else whether the tokenizer has a
    chat template (instruct models do)."""
    from tspo.train.sft import wants_chat_template

    if requested is None:
        requested = checkpoint_chat_template(model_path)
    return wants_chat_template(tokenizer, requested)


def run_eval(
    model_path: str,
    data_files: Sequence[str | Path],
    *,
    retriever: Retriever,
    out_dir: str | Path | None = None,
    rollout: Any = None,
    dtype: str = "float32",
    device: str = "auto",
    batch_size: int = 16,
    limit: int | None = None,
    show_progress: bool = True,
    chat_template: bool | None = None,
    bf16: bool | str = "auto",
) -> EvalResult:
    """Load ``model_path`` and evaluate it on ``data_files``; with ``out_dir``, write the report.

    ``chat_template``: True/False forces it; None (default) uses what the checkpoint was trained
    with (``tspo train``'s config.yaml, ``tspo sft``'s tspo_sft.json), else the tokenizer's chat
    template when it has one. ``bf16``: bf16 autocast (``auto``: on CUDA and on CPUs with native
    bf16). Several files sharing a data source are reported per file.
    """
    from dataclasses import replace

    from tspo.models.loading import load_policy
    from tspo.rollout import RolloutConfig
    from tspo.train.forward import autocast_context

    model, tokenizer = load_policy(model_path, dtype, device)
    model_device = next(model.parameters()).device
    if model_device.type == "cpu":
        from tspo.utils import apply_thread_policy

        apply_thread_policy()
    files = load_eval_files(data_files, limit)
    examples = [example for _, group in files for example in group]
    rollout = rollout or RolloutConfig()
    rollout = replace(
        rollout,
        use_chat_template=resolve_chat_template(model_path, tokenizer, chat_template),
    )
    autocast = autocast_context(model_device, bf16)
    with autocast:
        result = evaluate(
            model,
            tokenizer,
            retriever,
            examples,
            rollout=rollout,
            batch_size=batch_size,
            show_progress=show_progress,
            labels=group_labels(files),
        )
    from contextlib import nullcontext

    result.settings["bf16"] = not isinstance(autocast, nullcontext)
    if out_dir is not None:
        meta = {"model": str(model_path), "data": [str(p) for p in data_files]}
        write_report(result, out_dir, meta=meta)
    return result

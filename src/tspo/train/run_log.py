"""What a run writes while it trains: ``metrics.jsonl``, ``samples.jsonl``, and optionally
TensorBoard scalars and a Weights & Biases run (``logging.wandb``; ``WANDB_MODE=offline`` keeps it
on disk under ``<output_dir>/wandb``; a resumed run continues the same W&B run).

One JSON object per line and per step, appended and flushed at once, so a crashed run keeps every
step it finished. On resume, lines of steps after the checkpoint are dropped first, so the files
never hold a step twice.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from tspo.errors import TSPOError
from tspo.rollout.batch import RolloutBatch

METRICS_FILE = "metrics.jsonl"
SAMPLES_FILE = "samples.jsonl"
VALIDATION_FILE = "validation.jsonl"
WANDB_ID_FILE = "wandb_run_id.txt"


def start_wandb(
    output_dir: Path, *, project: str, name: str | None, config: dict[str, Any], resume: bool
) -> Any:
    """A Weights & Biases run writing under ``output_dir/wandb``; resumed when the run resumes."""
    try:
        import wandb
    except ImportError:
        raise TSPOError(
            "config field 'logging.wandb': Weights & Biases is not installed; "
            "pip install 'tspo[wandb]'"
        ) from None
    id_file = output_dir / WANDB_ID_FILE
    run_id = id_file.read_text(encoding="utf-8").strip() if resume and id_file.is_file() else None
    try:
        run = wandb.init(
            project=project,
            name=name or output_dir.name,
            dir=str(output_dir),
            config=config,
            id=run_id,
            resume="allow" if run_id else None,
        )
    except Exception as err:  # noqa: BLE001 - wandb raises many types; the user needs one line
        raise TSPOError(
            f"Weights & Biases did not start: {' '.join(str(err).split())} "
            "(set WANDB_MODE=offline to log without a network)"
        ) from None
    id_file.write_text(run.id, encoding="utf-8")
    return run


def rollout_statistics(batch: RolloutBatch) -> dict[str, float]:
    """Per-trajectory means of the rollout: turns, searches, generated tokens, F1, answer rate."""
    trajectories = batch.trajectories
    count = max(len(trajectories), 1)
    generated = batch.loss_mask.bool().sum(dim=1).float()
    return {
        "turns_mean": sum(t.num_turns for t in trajectories) / count,
        "searches_mean": sum(t.num_searches for t in trajectories) / count,
        "response_tokens_mean": float(generated.mean()) if len(generated) else 0.0,
        "response_tokens_max": float(generated.max()) if len(generated) else 0.0,
        "f1_mean": sum(t.f1 for t in trajectories) / count,
        "answered_rate": sum(t.final_answer is not None for t in trajectories) / count,
        "invalid_rate": sum(t.num_invalid for t in trajectories)
        / max(sum(t.num_turns for t in trajectories), 1),
    }


def trajectory_samples(
    batch: RolloutBatch, advantages: torch.Tensor, step: int, limit: int
) -> list[dict[str, Any]]:
    """The first ``limit`` trajectories as JSON-ready records, with their mean token advantage."""
    records = []
    mask = batch.loss_mask.bool()
    for row, trajectory in enumerate(batch.trajectories[:limit]):
        tokens = mask[row]
        mean_advantage = float(advantages[row][tokens].mean()) if bool(tokens.any()) else 0.0
        records.append(
            {
                "step": step,
                "example_id": trajectory.example_id,
                "data_source": trajectory.data_source,
                "group_id": trajectory.group_id,
                "question": trajectory.question,
                "golds": trajectory.golds,
                "response": trajectory.response_text,
                "queries": trajectory.queries,
                "final_answer": trajectory.final_answer,
                "outcome": trajectory.outcome,
                "f1": trajectory.f1,
                "first_hit_turn": trajectory.first_hit_turn,
                "num_turns": trajectory.num_turns,
                "num_searches": trajectory.num_searches,
                "mean_advantage": mean_advantage,
            }
        )
    return records


def _json_safe(value: Any) -> Any:
    """NaN/inf become None (JSON has no NaN); dict keys become strings."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def truncate_after_step(path: Path, step: int) -> None:
    """Drop lines of ``path`` whose ``step`` is greater than ``step`` (resuming from it)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a crash
    path.write_text("".join(f"{line}\n" for line in kept), encoding="utf-8")


class RunLog:
    """Appends metrics and samples as JSONL under ``output_dir``; mirrors scalars to TensorBoard."""

    def __init__(
        self,
        output_dir: str | Path,
        *,
        tensorboard: bool = False,
        resume_step: int = 0,
        wandb: dict[str, Any] | None = None,
    ):
        """``wandb``: :func:`start_wandb`'s ``project``, ``name`` and ``config``, or None."""
        self.output_dir = Path(output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.output_dir / METRICS_FILE
        self.samples_path = self.output_dir / SAMPLES_FILE
        self.validation_path = self.output_dir / VALIDATION_FILE
        for path in (self.metrics_path, self.samples_path, self.validation_path):
            if resume_step:
                truncate_after_step(path, resume_step)
            else:
                path.unlink(missing_ok=True)
        self._writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(self.output_dir / "tensorboard"))
        self._wandb = None
        if wandb is not None:
            self._wandb = start_wandb(self.output_dir, resume=bool(resume_step), **wandb)

    @staticmethod
    def _append(path: Path, records: list[dict[str, Any]]) -> None:
        text = "".join(json.dumps(_json_safe(record)) + "\n" for record in records)
        try:
            with path.open("a", encoding="utf-8") as handle:
                handle.write(text)
                handle.flush()
        except OSError as err:
            raise TSPOError(f"cannot append to {path}: {err.strerror or err}") from None

    def log_step(self, metrics: dict[str, Any], samples: list[dict[str, Any]]) -> None:
        self._append(self.metrics_path, [metrics])
        if samples:
            self._append(self.samples_path, samples)
        if self._writer is not None:
            step = int(metrics["step"])
            for name, value in metrics.items():
                if isinstance(value, int | float) and name != "step" and math.isfinite(value):
                    self._writer.add_scalar(name, value, step)
            self._writer.flush()
        if self._wandb is not None:
            scalars = {
                name: value
                for name, value in metrics.items()
                if isinstance(value, int | float) and name != "step" and math.isfinite(value)
            }
            self._wandb.log(scalars, step=int(metrics["step"]))

    def log_validation(self, record: dict[str, Any]) -> None:
        """One validation result (``step`` plus greedy scores) to ``validation.jsonl``."""
        self._append(self.validation_path, [record])
        if self._writer is not None:
            for name in ("em", "f1", "answered", "invalid_rate"):
                self._writer.add_scalar(f"val_{name}", record[name], int(record["step"]))
            self._writer.flush()
        if self._wandb is not None:
            names = ("em", "f1", "answered", "invalid_rate")
            scalars = {f"val_{name}": record[name] for name in names if name in record}
            self._wandb.log(scalars, step=int(record["step"]))

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None

"""Guards that stop a run loudly instead of losing work, leaking a secret or training on NaN.

- :func:`refuse_existing_run`: a fresh run never writes into a folder that holds another run.
- :func:`config_yaml_for_disk`: the config as written to disk, without the retriever token.
- :func:`check_advantages`: a non-finite advantage stops the step before the update.
- :class:`SkippedSteps`: a step whose optimizer update was skipped (non-finite loss or gradient)
  is reported; ``train.max_skipped_steps`` of them in a row stop the run.

Each stop is a one-line :class:`TSPOError` (``error: …``, exit status 2 from the CLI).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tspo.errors import TSPOError
from tspo.train.checkpoint import _NAME, first_non_finite, warn
from tspo.train.run_log import METRICS_FILE, SAMPLES_FILE, VALIDATION_FILE

RUN_FILES = (METRICS_FILE, SAMPLES_FILE, VALIDATION_FILE)


def refuse_existing_run(output_dir: Path, checkpoint_root: Path, resume: str | None) -> None:
    """Raise unless ``output_dir`` holds no run (logs or checkpoints) or the run resumes."""
    if resume is not None:
        return
    held = [name for name in RUN_FILES if (output_dir / name).is_file()]
    if checkpoint_root.is_dir() and any(
        _NAME.match(entry.name) for entry in checkpoint_root.iterdir()
    ):
        held.append(f"{checkpoint_root.name}/")
    if held:
        raise TSPOError(
            f"{output_dir} already holds a run ({', '.join(held)}); pass --resume auto "
            "(train.resume=auto) to continue it, or choose a new train.output_dir"
        )


def config_yaml_for_disk(config: Any) -> str:
    """The run's config as YAML with ``retriever.token`` left out (null).

    A resumed run gets the token again from the command line or ``$TSPO_RETRIEVER_TOKEN``.
    """
    if config.retriever.token is None:
        return config.to_yaml()
    safe = config.model_copy(deep=True)
    safe.retriever.token = None
    return safe.to_yaml()


def check_advantages(advantages: torch.Tensor, step: int, estimator: str) -> None:
    """Raise when an advantage is NaN or infinite (the update would poison the weights)."""
    finite = torch.isfinite(advantages)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        raise TSPOError(
            f"step {step}: the '{estimator}' estimator gave {bad} non-finite advantage(s); "
            "stopping before the update"
        )


@dataclass
class SkippedSteps:
    """Counts steps in a row with a skipped optimizer update; stops the run at ``limit``."""

    limit: int
    in_a_row: int = 0

    def after_step(self, step: int, metrics: dict[str, Any], model: Any) -> None:
        skipped = int(metrics.get("skipped_optimizer_steps") or 0)
        if not skipped:
            self.in_a_row = 0
            return
        self.in_a_row += 1
        total = skipped + int(metrics.get("optimizer_steps") or 0)
        warn(
            f"step {step}: skipped {skipped} of {total} optimizer update(s): the gradient norm "
            f"is not finite ({self.in_a_row} step(s) in a row)"
        )
        if self.in_a_row >= self.limit:
            bad = first_non_finite(model)
            cause = f"{bad} holds NaN or inf" if bad else "non-finite loss or gradients"
            raise TSPOError(
                f"step {step}: {self.in_a_row} steps in a row skipped their optimizer update "
                f"({cause}; train.max_skipped_steps={self.limit}); stopping"
            )

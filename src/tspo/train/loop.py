"""The training loop: rollout groups, score, compute advantages, run PPO against a frozen reference.

Read :func:`train` top to bottom; each numbered step of :func:`run_step` is one stage of
docs/training.md, "One step, in order" (rollout -> rewards -> advantages -> loss -> optimizer
step -> diagnostics).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tspo.algo import compute_advantages, group_diagnostics
from tspo.rollout.batch import RolloutBatch
from tspo.train.checkpoint import (
    TrainerState,
    capture_rng_state,
    load_trainer_state,
    resolve_resume,
    restore_rng_state,
    save_checkpoint,
    warn,
)
from tspo.train.components import (
    Policy,
    build_policy,
    load_examples,
    retriever_from_config,
    rollout_config,
)
from tspo.train.config import TrainConfig
from tspo.train.forward import UpdateBatch, autocast_context, batch_logprobs
from tspo.train.guards import (
    SkippedSteps,
    check_advantages,
    config_yaml_for_disk,
    refuse_existing_run,
)
from tspo.train.optim import build_optimizer, build_scheduler
from tspo.train.run_log import RunLog, rollout_statistics, trajectory_samples
from tspo.train.sampler import PromptSampler
from tspo.train.update import UpdateSettings, old_from_update, ppo_update
from tspo.utils import (
    limit_heap_retention,
    peak_memory_mb,
    progress_bar,
    release_free_heap,
    set_seed,
)

CHECKPOINT_DIR = "checkpoints"


@dataclass
class TrainResult:
    """Where the run wrote its files, how far it got, and the metrics of the steps run now."""

    output_dir: Path
    final_step: int
    last_checkpoint: Path | None
    metrics: list[dict[str, Any]] = field(default_factory=list)


class TrainInterrupted(KeyboardInterrupt):
    """Ctrl-C during :func:`train`: how far the run got and where it can continue from."""

    def __init__(self, output_dir: Path, step: int, steps: int, last_checkpoint: Path | None):
        super().__init__(f"interrupted after step {step} of {steps}")
        self.output_dir = output_dir
        self.step = step
        self.steps = steps
        self.last_checkpoint = last_checkpoint

    def describe(self, command: str) -> str:
        """Three lines for the user: where the run stopped, what is saved, how to continue."""
        if self.last_checkpoint is None:
            saved = "no checkpoint yet: continuing starts over at step 1"
        else:
            saved = f"last checkpoint {self.last_checkpoint}"
            checkpoint_step = _step_of_checkpoint(self.last_checkpoint)
            if checkpoint_step is not None and checkpoint_step < self.step:
                saved += f" (steps {checkpoint_step + 1}-{self.step} will run again)"
        return (
            f"interrupted: last completed step {self.step} of {self.steps}; {saved}\n"
            f"continue with: {command}"
        )


def _step_of_checkpoint(folder: Path) -> int | None:
    name = Path(folder).name
    return int(name[5:]) if name.startswith("step-") and name[5:].isdigit() else None


HEADER_PREFIX = "tspo train: "


def say(message: str) -> None:
    """One line of the run header on stderr, marked with :data:`HEADER_PREFIX`."""
    print(f"{HEADER_PREFIX}{message}", file=sys.stderr, flush=True)


@dataclass
class NoSignalWatch:
    """Warns once when every group had zero learning signal for ``after`` steps in a row."""

    after: int
    in_a_row: int = 0

    def after_step(self, step: int, metrics: dict[str, Any]) -> None:
        silent = metrics.get("zero_signal_groups")
        if not self.after or silent is None or silent < 1.0:
            self.in_a_row = 0
            return
        self.in_a_row += 1
        if self.in_a_row != self.after:
            return
        reward = float(metrics.get("reward_mean") or 0.0)
        if reward <= 0.0:
            cause = (
                "no trajectory found and gave a right answer, so every group scored the same "
                "and the policy gets no gradient from the reward. It needs a warm start that "
                "already searches and answers sometimes (e.g. `tspo sft`, or an instruct model "
                "with rollout.use_chat_template=true) or an easier task"
            )
        else:
            cause = (
                "within each group every trajectory scored the same (all right or all wrong), "
                "so the reward gives no gradient. Try a harder task, a larger "
                "rollout.group_size or a higher rollout.temperature"
            )
        warn(
            f"steps {step - self.after + 1}-{step}: every group had zero learning signal "
            f"(mean reward {reward:.3f}): {cause}"
        )


def _describe_retriever(config: TrainConfig) -> str:
    source = config.retriever
    if source.index:
        return f"index {source.index}"
    if source.url:
        return f"server {source.url}"
    return f"BM25 over {source.corpus} (built in memory)"


def run_header(run: _Run, output_dir: Path, checkpoint_root: Path) -> None:
    """What the run is about to do: model, size, device, dtype, data, and where files go."""
    config = run.config
    model = run.policy.model
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    device = run.policy.device
    uses_bf16 = isinstance(autocast_context(device, config.train.bf16), torch.autocast)
    size = f"{total / 1e6:.1f}M parameters" + (
        f" ({trainable / 1e6:.2f}M trainable)" if trainable != total else ""
    )
    say(
        f"model {config.model.name}: {size} on {device}, {config.model.dtype} weights"
        + (", bf16 autocast" if uses_bf16 else "")
    )
    files = ", ".join(config.data.train_files)
    say(
        f"{len(run.sampler.items)} questions from {files}; retriever: {_describe_retriever(config)}"
    )
    say(
        f"writing to {output_dir} (metrics.jsonl, samples.jsonl); checkpoints: {checkpoint_root} "
        f"every {config.checkpoint.every} steps and at step {config.train.steps}, "
        f"keeping {config.checkpoint.keep_last}"
    )


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix.rstrip("."): tree}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        flat.update(_flatten(value, f"{prefix}{key}."))
    return flat


# Fields that may change on resume without a warning: how long to run, where the (moved) run
# folder is, what is logged, checkpointed and validated; none of them changes what is trained.
RESUME_FREE_FIELDS = ("train.steps", "train.resume", "train.output_dir", "retriever.token")
RESUME_FREE_SECTIONS = ("logging.", "checkpoint.", "eval.")


def config_changes(config: TrainConfig, checkpoint: Path) -> list[str]:
    """``field (saved -> now)`` for every field that differs from the checkpoint's config."""
    import yaml

    try:
        saved = yaml.safe_load((checkpoint / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return []
    if not isinstance(saved, dict):
        return []
    before = _flatten(saved)
    now = _flatten(config.model_dump(mode="json"))
    changes = []
    for name in sorted(set(before) | set(now)):
        if (
            name in RESUME_FREE_FIELDS
            or name.startswith(RESUME_FREE_SECTIONS)
            or before.get(name) == now.get(name)
        ):
            continue
        changes.append(f"{name} ({before.get(name)!r} -> {now.get(name)!r})")
    return changes


@dataclass
class _Run:
    """The live objects of a run (built once, mutated by every step)."""

    config: TrainConfig
    policy: Policy
    engine: Any
    sampler: PromptSampler
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    rollout_generator: torch.Generator
    shuffle_generator: torch.Generator

    def trainer_state(self, step: int) -> TrainerState:
        return TrainerState(
            step=step,
            optimizer=self.optimizer.state_dict(),
            scheduler=self.scheduler.state_dict(),
            sampler=self.sampler.state_dict(),
            generators={
                "rollout": self.rollout_generator.get_state(),
                "shuffle": self.shuffle_generator.get_state(),
            },
            rng=capture_rng_state(),
        )

    def restore(self, state: TrainerState) -> None:
        self.optimizer.load_state_dict(state.optimizer)
        self.scheduler.load_state_dict(state.scheduler)
        self.sampler.load_state_dict(state.sampler)
        self.rollout_generator.set_state(state.generators["rollout"])
        self.shuffle_generator.set_state(state.generators["shuffle"])
        restore_rng_state(state.rng)


def train(config: TrainConfig) -> TrainResult:
    """Train the policy for ``config.train.steps`` steps (continuing a checkpoint if asked to).

    Prints a short header to stderr (model, size, device, data, output). Ctrl-C raises
    :class:`TrainInterrupted` (a ``KeyboardInterrupt``) naming the last step and checkpoint.
    """
    from tspo import preflight
    from tspo.models.loading import resolve_device

    preflight.train_config(config)  # files, model name, device, output folder: before any load
    resolve_device(config.model.device)
    output_dir = Path(config.train.output_dir)
    checkpoint_root = output_dir / CHECKPOINT_DIR
    refuse_existing_run(output_dir, checkpoint_root, config.train.resume)
    resume_from = resolve_resume(config.train.resume, checkpoint_root)
    set_seed(config.train.seed)

    run, start_step = _build_run(config, resume_from)
    releases_memory = _releases_memory(config, run.policy.device)
    run_header(run, output_dir, checkpoint_root)
    if resume_from is not None:
        say(f"resuming from step {start_step} (checkpoint {resume_from})")
        changes = config_changes(config, resume_from)
        if changes:
            warn(f"the config differs from the checkpoint's: {'; '.join(changes)}")
    output_dir.mkdir(parents=True, exist_ok=True)
    config_yaml = config_yaml_for_disk(config)  # without the retriever token
    (output_dir / "config.yaml").write_text(config_yaml, encoding="utf-8")
    log = RunLog(
        output_dir,
        tensorboard=config.logging.tensorboard,
        resume_step=start_step,
        wandb=_wandb_settings(config),
    )
    result = TrainResult(output_dir, start_step, resume_from)
    validation = _validation_examples(config)
    skipped = SkippedSteps(config.train.max_skipped_steps)
    no_signal = NoSignalWatch(config.logging.warn_no_signal_steps)

    try:
        if validation and start_step == 0:
            log.log_validation(validate(run, validation, 0))
        with progress_bar(disable=not config.logging.progress) as progress:
            task = progress.add_task("training", total=config.train.steps, completed=start_step)
            for step in range(start_step + 1, config.train.steps + 1):
                metrics, samples = run_step(run, step)
                if releases_memory:
                    release_free_heap()  # what the step freed, before the next step's peak
                log.log_step(metrics, samples)
                skipped.after_step(step, metrics, run.policy.model)
                no_signal.after_step(step, metrics)
                if validation and (step % config.eval.every == 0 or step == config.train.steps):
                    log.log_validation(validate(run, validation, step))
                result.metrics.append(metrics)
                result.final_step = step
                if step % config.checkpoint.every == 0 or step == config.train.steps:
                    result.last_checkpoint = save_checkpoint(
                        checkpoint_root,
                        model=run.policy.model,
                        tokenizer=run.policy.tokenizer,
                        state=run.trainer_state(step),
                        config_yaml=config_yaml,
                        keep_last=config.checkpoint.keep_last,
                    )
                progress.update(
                    task,
                    advance=1,
                    description=f"training (reward {metrics['reward_mean']:.3f})",
                )
    except KeyboardInterrupt:
        raise TrainInterrupted(
            output_dir, result.final_step, config.train.steps, result.last_checkpoint
        ) from None
    finally:
        log.close()
        run.engine.retriever.close()
    return result


def _wandb_settings(config: TrainConfig) -> dict[str, Any] | None:
    if not config.logging.wandb:
        return None
    import yaml

    return {
        "project": config.logging.wandb_project,
        "name": config.logging.wandb_run_name,
        "config": yaml.safe_load(config_yaml_for_disk(config)),  # without the retriever token
    }


def _validation_examples(config: TrainConfig) -> list[Any]:
    """The fixed validation questions (empty when validation is off)."""
    if not config.eval.every:
        return []
    from tspo.data.qa import read_qa

    examples = [example for path in config.eval.files for example in read_qa(path)]
    return examples[: config.eval.max_examples] if config.eval.max_examples else examples


def validate(run: _Run, examples: list[Any], step: int) -> dict[str, Any]:
    """Greedy EM/F1 of the current policy on ``examples`` (Search-R1's validation, veRL's
    ``test_freq``); ``by_source`` splits the scores per data source."""
    from tspo.evaluation import OVERALL, evaluate

    config = run.config
    run.policy.model.eval()
    started = time.perf_counter()
    with torch.no_grad(), autocast_context(run.policy.device, config.train.bf16):
        result = evaluate(
            run.policy.model,
            run.policy.tokenizer,
            run.engine.retriever,
            examples,
            rollout=run.engine.config,
            batch_size=config.eval.batch_size,
            show_progress=False,
        )
    by_source = {k: v for k, v in result.scores.items() if k != OVERALL}
    return {
        "step": step,
        **result.overall,
        "seconds": time.perf_counter() - started,
        "by_source": by_source,
    }


def _releases_memory(config: TrainConfig, device: torch.device) -> bool:
    """``train.release_freed_memory`` applies to runs on the CPU (glibc's heap, oneDNN)."""
    return config.train.release_freed_memory and device.type == "cpu"


def _build_run(config: TrainConfig, resume_from: Path | None) -> tuple[_Run, int]:
    from tspo.rollout import RolloutEngine

    seed = config.train.seed
    retriever = retriever_from_config(config.retriever)  # first: a dead server fails in seconds
    policy = build_policy(
        config.model,
        kl_coef=config.algo.kl_coef,
        weights_from=resume_from,
        bf16=config.train.bf16,  # the reference's weights follow autocast (model.ref_dtype)
    )
    if _releases_memory(config, policy.device):
        limit_heap_retention()
    optimizer = build_optimizer(policy.model, config.optim)
    engine = RolloutEngine(
        policy.model,
        policy.tokenizer,
        retriever,
        rollout_config(
            config.rollout,
            detect_in=config.algo.detect_in,
            min_answer_chars=config.algo.min_answer_chars,
        ),
    )
    run = _Run(
        config=config,
        policy=policy,
        engine=engine,
        sampler=PromptSampler(
            load_examples(config.data),
            config.train.prompts_per_step,
            seed=seed,
            shuffle=config.data.shuffle,
        ),
        optimizer=optimizer,
        scheduler=build_scheduler(optimizer, config.optim, config.train.steps),
        rollout_generator=torch.Generator(device=policy.device).manual_seed(seed),
        shuffle_generator=torch.Generator().manual_seed(seed + 1),
    )
    if resume_from is None:
        return run, 0
    state = load_trainer_state(resume_from)
    run.restore(state)
    return run, state.step


def shaped_outcome(rollout: RolloutBatch, invalid_penalty: float) -> torch.Tensor:
    """(B,) the reward the advantages see: EM, minus ``invalid_penalty`` for every trajectory with
    at least one invalid turn (a turn holding neither a complete search nor a complete answer)."""
    if not invalid_penalty:
        return rollout.outcome
    invalid = torch.tensor(
        [trajectory.num_invalid > 0 for trajectory in rollout.trajectories],
        dtype=rollout.outcome.dtype,
        device=rollout.outcome.device,
    )
    return rollout.outcome - invalid_penalty * invalid


def run_step(run: _Run, step: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """One training step; returns its metrics and a few trajectories for inspection."""
    config, policy = run.config, run.policy
    autocast = autocast_context(policy.device, config.train.bf16)
    step_start = time.perf_counter()

    # 1. Rollout: a group of trajectories per question, sampled by the current policy. The engine
    #    scores them (EM outcome, F1, first-occurrence turn k*).
    questions = run.sampler.next_batch()
    policy.model.eval()
    with torch.no_grad(), autocast:
        rollout: RolloutBatch = run.engine.generate(
            questions, config.rollout.group_size, generator=run.rollout_generator
        )
    rollout = rollout.to(policy.device)
    rollout_seconds = time.perf_counter() - step_start

    # 2. Advantages from the configured estimator (token level, 0 off the loss mask), on the EM
    #    outcome minus the optional format penalty.
    advantages = compute_advantages(
        config.algo.estimator,
        outcome=shaped_outcome(rollout, config.algo.invalid_penalty),
        first_hit_turn=rollout.first_hit_turn,
        turn_ids=rollout.turn_ids,
        group_ids=rollout.group_ids,
        **config.algo.advantage_options(),
    )
    check_advantages(advantages, step, config.algo.estimator)
    batch = UpdateBatch.from_rollout(rollout, advantages.float())

    # 3. Log-probs of the sampling policy (recomputed in a plain forward pass so the first ratio
    #    is exactly 1; with one optimizer step per batch the update's own pass gives them) and of
    #    the frozen reference for the KL term.
    micro = config.train.micro_batch_size
    temperature = config.rollout.temperature
    mini_batch_size = config.train.mini_batch_size or len(batch)
    reuse_update_pass = old_from_update(
        recompute=config.train.recompute_old_logprobs,
        ppo_epochs=config.train.ppo_epochs,
        mini_batch_size=mini_batch_size,
        rows=len(batch),
    )
    if config.train.recompute_old_logprobs and not reuse_update_pass:
        batch.old_logprobs = batch_logprobs(
            policy.model, batch, micro_batch_size=micro, temperature=temperature, autocast=autocast
        )
    if config.algo.kl_coef > 0:
        with policy.reference_context():
            batch.ref_logprobs = batch_logprobs(
                policy.reference_model(),
                batch,
                micro_batch_size=micro,
                temperature=temperature,
                autocast=autocast,
            )

    # 4. PPO epochs over mini-batches, then one scheduler step per training step.
    update_start = time.perf_counter()
    lr = run.scheduler.get_last_lr()[0]
    loss_metrics = ppo_update(
        policy.model,
        run.optimizer,
        batch,
        UpdateSettings(
            ppo_epochs=config.train.ppo_epochs,
            mini_batch_size=mini_batch_size,
            micro_batch_size=micro,
            max_grad_norm=config.optim.max_grad_norm,
            temperature=temperature,
            algo=config.algo,
            old_from_update=reuse_update_pass,
        ),
        generator=run.shuffle_generator,
        autocast=autocast,
    )
    run.scheduler.step()
    now = time.perf_counter()
    update_seconds = now - update_start

    # 5. Diagnostics (docs/algorithm.md §6) and cost.
    generated_tokens = int(rollout.loss_mask.sum())
    metrics: dict[str, Any] = {
        "step": step,
        "epoch": run.sampler.epoch,
        "lr": lr,
        **group_diagnostics(
            rollout.outcome,
            rollout.first_hit_turn,
            rollout.group_ids,
            advantages,
            rollout.loss_mask,
        ),
        **rollout_statistics(rollout),
        **loss_metrics,
        "rollout_seconds": rollout_seconds,
        "update_seconds": update_seconds,
        "step_seconds": now - step_start,
        "generated_tokens": generated_tokens,
        "rollout_tokens_per_s": generated_tokens / max(rollout_seconds, 1e-9),
        "update_tokens_per_s": loss_metrics["update_tokens"] / max(update_seconds, 1e-9),
        **peak_memory_mb(),  # peak_cuda_mb is null when CUDA is not used
    }
    samples = trajectory_samples(rollout, advantages, step, config.logging.samples_per_step)
    return metrics, samples

"""`TrainConfig`: every knob of a training run, typed, with defaults, from YAML plus CLI overrides.

A config is a tree of sections (``model``, ``data``, ``retriever``, ``rollout``, ``algo``,
``optim``, ``train``, ``checkpoint``, ``logging``). Load one with :func:`load_config`::

    config = load_config("configs/smollm2-wiki.yaml", ["algo.estimator=grpo", "train.steps=2"])

An override is ``section.field=value``; the value is read as YAML, so ``2`` is an int, ``true`` a
bool and ``[a, b]`` a list. Every invalid value raises :class:`tspo.errors.TSPOError` naming the
field, e.g. ``config field 'algo.clip_low': Input should be greater than 0``; a mistyped field
name gets the closest valid one (``did you mean train.steps?``).

Relative paths in a config *file* (``data.train_files``, ``eval.files``, ``retriever.index``,
``retriever.corpus``, ``train.output_dir``, ``train.resume``, and ``model.name`` /
``model.tokenizer`` when they start with ``./`` or ``../`` or name an existing folder there)
resolve against the file's folder; paths given as overrides resolve against the working folder.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tspo.errors import TSPOError

if TYPE_CHECKING:
    from tspo.rollout.config import RolloutConfig

BUILTIN_ESTIMATORS = ("grpo", "folr_scalar", "tspo", "tspo_switch")


class _Section(BaseModel):
    """A config section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class LoraConfig(_Section):
    """Low-rank adapters (peft). With LoRA the KL reference is the base model, adapters disabled."""

    enabled: bool = Field(False, description="Train LoRA adapters instead of every weight.")
    r: int = Field(16, gt=0, description="Adapter rank.")
    alpha: float = Field(32.0, gt=0, description="LoRA scaling numerator (scale = alpha / r).")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapter input.")
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        description="Names of the linear layers that get adapters.",
    )


class ModelConfig(_Section):
    """The policy model."""

    name: str = Field(
        "smollm2-135m-instruct",
        description="Hugging Face folder or hub id (offline cache), or the alias "
        "'smollm2-135m-instruct' for the bundled SmolLM2 (converted once, then cached).",
    )
    tokenizer: str | None = Field(None, description="Tokenizer folder; defaults to the model's.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32",
        description="Weight dtype. Keep float32 for training; bf16 compute comes "
        "from autocast (train.bf16).",
    )
    device: str = Field(
        "auto", description="'auto' (CUDA when available), 'cpu', 'cuda' or 'cuda:N'."
    )
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in the backward pass to save memory."
    )
    ref_dtype: Literal["auto", "model", "bfloat16"] = Field(
        "auto",
        description="Weights of the frozen KL reference copy (full fine-tuning): bfloat16 "
        "stores its linear layers' weights in bf16, as bf16 autocast casts them anyway (needs "
        "autocast; same log-probs, less memory); model = model.dtype; auto = bfloat16 when "
        "train.bf16 autocast is on, else model.",
    )
    lora: LoraConfig = Field(default_factory=LoraConfig)

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        if value in ("auto", "cpu", "cuda") or (value.startswith("cuda:") and value[5:].isdigit()):
            return value
        raise ValueError("must be 'auto', 'cpu', 'cuda' or 'cuda:N'")


class DataConfig(_Section):
    """Training questions."""

    train_files: list[str] = Field(
        default_factory=list,
        description="QA files: Search-R1 parquet (.parquet) or FlashRAG jsonl (.jsonl).",
    )
    shuffle: bool = Field(True, description="Visit questions in a seeded random order each epoch.")
    max_examples: int | None = Field(None, gt=0, description="Use only the first N questions.")

    @field_validator("train_files", mode="before")
    @classmethod
    def _one_file_is_a_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value


class RetrieverConfig(_Section):
    """Where searches go: exactly one of ``index``, ``url`` or ``corpus``."""

    index: str | None = Field(
        None, description="Index folder from `tspo index build`, searched in-process."
    )
    url: str | None = Field(None, description="Retriever server URL (POST /retrieve).")
    corpus: str | None = Field(
        None, description="Corpus jsonl; a BM25 index is built in memory at start-up."
    )
    token: str | None = Field(None, description="Bearer token for the retriever server.")
    timeout: float = Field(30.0, gt=0, description="Seconds per HTTP request.")
    retries: int = Field(3, ge=0, description="HTTP retries on connection errors and 5xx.")

    @model_validator(mode="after")
    def _at_most_one_source(self) -> RetrieverConfig:
        given = [name for name in ("index", "url", "corpus") if getattr(self, name)]
        if len(given) > 1:
            raise ValueError(f"set only one of index, url, corpus (got {', '.join(given)})")
        return self


# What a greedy evaluation takes from a training run's rollout section: turn limits, top-k and the
# chat template, never the sampling settings (`tspo eval` of a checkpoint, the quickstart's evals).
EVAL_ROLLOUT_FIELDS = (
    "max_turns",
    "max_turn_tokens",
    "max_obs_tokens",
    "topk",
    "use_chat_template",
)


class RolloutSection(_Section):
    """Multi-turn sampling (the protocol: docs/algorithm.md §1)."""

    group_size: int = Field(5, ge=1, description="Trajectories per question (the GRPO group n).")
    max_turns: int = Field(4, ge=1, description="Search turns before the forced answer turn.")
    max_turn_tokens: int = Field(500, ge=1, description="Generated tokens per turn, at most.")
    max_obs_tokens: int = Field(500, ge=1, description="Tokens per <information> block, at most.")
    topk: int = Field(3, ge=1, description="Documents per search.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature in training.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass in training.")
    use_chat_template: bool = Field(
        False, description="Wrap the prompt in the tokenizer's chat template (instruct models)."
    )
    kv_cache: bool = Field(True, description="Reuse the KV cache across turns (else re-encode).")

    def to_rollout_config(
        self, fields: Iterable[str] | None = None, **extra: object
    ) -> RolloutConfig:
        """The rollout engine's ``RolloutConfig``: every field of it that this section has (all
        but ``group_size``; only ``fields`` when given, e.g. ``EVAL_ROLLOUT_FIELDS``), plus
        ``extra``, fields it lacks or overrides (FOLR's ``detect_in`` and ``min_answer_chars``,
        from the ``algo`` section); the rest keep their defaults."""
        from tspo.rollout.config import RolloutConfig

        names = {field.name for field in dataclasses.fields(RolloutConfig)}
        settings = self.model_dump(include=names if fields is None else names & set(fields))
        settings.update(extra)
        return RolloutConfig(**settings)


class AlgoConfig(_Section):
    """Rewards, advantages and the loss (docs/algorithm.md §2-§5)."""

    estimator: str = Field("tspo", description="Advantage estimator from tspo.algo.ESTIMATORS.")
    alpha: float = Field(0.5, ge=0, description="FOLR partial reward at the first-hit turn.")
    lam: float = Field(1.0, ge=0, description="Weight of the FOLR term on stage-1 tokens (tspo).")
    eps: float = Field(1e-6, gt=0, description="Added to the group std before dividing.")
    per_turn_norm: bool = Field(False, description="Normalise advantages per turn index.")
    detect_in: Literal["retrieved", "generated", "both"] = Field(
        "retrieved", description="Where FOLR looks for the first gold occurrence."
    )
    min_answer_chars: int = Field(2, ge=1, description="Ignore shorter gold aliases for FOLR.")
    clip_low: float = Field(0.2, gt=0, lt=1, description="PPO clip below: ratio >= 1 - clip_low.")
    clip_high: float = Field(0.2, gt=0, description="PPO clip above: ratio <= 1 + clip_high.")
    kl_coef: float = Field(
        0.001, ge=0, description="KL-to-reference coefficient (0 = no reference model)."
    )
    kl_type: Literal["low_var_kl", "kl", "abs", "mse"] = Field(
        "low_var_kl", description="KL estimator; low_var_kl is k3."
    )
    entropy_coef: float = Field(0.0, ge=0, description="Entropy bonus coefficient.")
    invalid_penalty: float = Field(
        0.0,
        ge=0,
        description="Subtracted from the outcome reward of a trajectory with an invalid turn "
        "(a format penalty; 0 = EM only, as in Search-R1).",
    )
    agg: Literal["token-mean", "seq-mean-token-mean"] = Field(
        "token-mean", description="How per-token losses become one number."
    )

    @field_validator("estimator")
    @classmethod
    def _registered(cls, value: str) -> str:
        return check_estimator(value)

    def advantage_options(self) -> dict[str, Any]:
        """Keyword options for ``tspo.algo.compute_advantages``."""
        return {
            "alpha": self.alpha,
            "lam": self.lam,
            "eps": self.eps,
            "per_turn_norm": self.per_turn_norm,
        }

    def loss_options(self) -> dict[str, Any]:
        """Keyword options for ``tspo.algo.policy_loss``."""
        return {
            "clip_low": self.clip_low,
            "clip_high": self.clip_high,
            "kl_coef": self.kl_coef,
            "kl_type": self.kl_type,
            "entropy_coef": self.entropy_coef,
            "agg": self.agg,
        }


class OptimConfig(_Section):
    """AdamW with warm-up and a schedule."""

    lr: float = Field(1e-6, gt=0, description="Peak learning rate.")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay.")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas.")
    adam_eps: float = Field(1e-8, gt=0, description="AdamW epsilon.")
    max_grad_norm: float = Field(1.0, gt=0, description="Clip the global gradient norm to this.")
    warmup_ratio: float = Field(0.0, ge=0, le=1, description="Warm-up length as a share of steps.")
    warmup_steps: int | None = Field(None, ge=0, description="Warm-up length; beats warmup_ratio.")
    schedule: Literal["constant", "linear", "cosine"] = Field(
        "constant", description="LR after warm-up: constant, linear decay or cosine decay."
    )
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="Decay floor as a share of lr.")


class TrainSection(_Section):
    """The outer loop."""

    steps: int = Field(100, ge=1, description="Training steps (one rollout batch each).")
    prompts_per_step: int = Field(8, ge=1, description="Questions per step.")
    mini_batch_size: int | None = Field(
        None, ge=1, description="Trajectories per optimizer update; None = the whole step's batch."
    )
    micro_batch_size: int = Field(4, ge=1, description="Trajectories per forward/backward pass.")
    ppo_epochs: int = Field(1, ge=1, description="Passes over the step's batch.")
    recompute_old_logprobs: bool = Field(
        True,
        description="Recompute old log-probs under the current weights instead of trusting the "
        "sampler's (exact ratios of 1 on the first update); with one optimizer step per batch "
        "they come from the update's own forward pass.",
    )
    bf16: bool | Literal["auto"] = Field(
        "auto",
        description="bf16 autocast, fp32 weights: auto = on CUDA and on CPUs with native bf16.",
    )
    release_freed_memory: bool = Field(
        False,
        description="On the CPU (glibc): allocations of 2 MiB and up get their own mappings, "
        "free heap pages go back to the OS after each step, oneDNN keeps 16 kernel shapes. Lower "
        "peak RSS over a run (SmolLM2 preset, 6 steps: 4.40 -> 3.56 GiB; 20 steps: 3.97), steps "
        "13% slower there; small models slow down more (the quickstart's: 57%).",
    )
    seed: int = Field(0, description="Seed for data order, sampling and initialisation.")
    output_dir: str = Field("runs/tspo", description="Metrics, samples and checkpoints go here.")
    resume: str | None = Field(
        None, description="'auto' (newest complete checkpoint in output_dir) or a checkpoint path."
    )
    max_skipped_steps: int = Field(
        3,
        ge=1,
        description="Stop the run after this many steps in a row whose optimizer update was "
        "skipped (non-finite loss or gradient norm).",
    )


class CheckpointConfig(_Section):
    """Checkpoints: HF model + tokenizer + optimizer, scheduler, RNG, data position, step."""

    every: int = Field(50, ge=1, description="Save every N steps (and at the last step).")
    keep_last: int = Field(3, ge=1, description="Keep only the newest N checkpoints.")


class LoggingConfig(_Section):
    """What the run writes besides checkpoints."""

    tensorboard: bool = Field(False, description="Also write TensorBoard scalars.")
    samples_per_step: int = Field(
        4, ge=0, description="Trajectories written to samples.jsonl each step."
    )
    progress: bool = Field(True, description="Show a progress bar with ETA.")
    warn_no_signal_steps: int = Field(
        5,
        ge=0,
        description="Warn when every group had zero learning signal for this many steps in a "
        "row (0 = never).",
    )
    wandb: bool = Field(
        False,
        description="Also log to Weights & Biases (pip install 'tspo[wandb]'); WANDB_MODE=offline "
        "writes the run under output_dir/wandb without a network.",
    )
    wandb_project: str = Field("tspo", description="Weights & Biases project name.")
    wandb_run_name: str | None = Field(
        None, description="Weights & Biases run name; defaults to the output folder's name."
    )


class EvalSection(_Section):
    """Validation during training: greedy EM/F1 on held-out questions every N steps."""

    files: list[str] = Field(
        default_factory=list, description="QA files (Search-R1 parquet or FlashRAG jsonl)."
    )
    every: int = Field(
        0, ge=0, description="Validate every N steps, at step 0 and at the end; 0 = off."
    )
    max_examples: int | None = Field(None, gt=0, description="Use only the first N questions.")
    batch_size: int = Field(32, ge=1, description="Questions per greedy rollout batch.")


class TrainConfig(_Section):
    """A whole training run."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    retriever: RetrieverConfig = Field(default_factory=RetrieverConfig)
    rollout: RolloutSection = Field(default_factory=RolloutSection)
    algo: AlgoConfig = Field(default_factory=AlgoConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainSection = Field(default_factory=TrainSection)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    eval: EvalSection = Field(default_factory=EvalSection)

    def to_yaml(self) -> str:
        """The config as YAML that :func:`load_config` reads back to an equal config."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    def check_runnable(self) -> None:
        """Raise TSPOError for what a training run needs beyond field validity."""
        if not self.data.train_files:
            raise TSPOError("config field 'data.train_files': give at least one QA file")
        if not (self.retriever.index or self.retriever.url or self.retriever.corpus):
            raise TSPOError("config field 'retriever': set one of index, url or corpus")
        if not self.train.recompute_old_logprobs and self.rollout.temperature != 1.0:
            raise TSPOError(
                "config field 'train.recompute_old_logprobs': must be true when "
                "rollout.temperature is not 1 (the sampler records temperature-1 log-probs)"
            )
        if self.eval.every and not self.eval.files:
            raise TSPOError("config field 'eval.files': give the QA files to validate on")
        # Whether the files exist is checked before a run starts (tspo.preflight), as for
        # data.train_files: a preset stays valid before its data has been written.
        batch = self.train.prompts_per_step * self.rollout.group_size
        mini = self.train.mini_batch_size or batch
        if batch % mini:
            raise TSPOError(
                f"config field 'train.mini_batch_size': {mini} does not divide the step's "
                f"{batch} trajectories (prompts_per_step x group_size)"
            )


def check_estimator(name: str) -> str:
    """``name`` when it is a registered advantage estimator, else ValueError with the closest one.

    User estimators register by importing ``tspo.algo`` (``register_estimator``); when nothing has
    imported it yet, only the built-in names can be valid, so a typo fails without loading torch.
    """
    if name in BUILTIN_ESTIMATORS:
        return name
    known = list(BUILTIN_ESTIMATORS)
    if "tspo.algo" in sys.modules:
        from tspo.algo import ESTIMATORS

        if name in ESTIMATORS:
            return name
        known = sorted(ESTIMATORS)
    raise ValueError(
        f"unknown estimator {name!r}; known: {', '.join(known)}{did_you_mean(name, known)}"
    )


def sections_of(settings: Mapping[str, object]) -> dict[str, dict[str, object]]:
    """Flat ``{field: value}`` -> ``{section: {field: value}}``, each field placed in the one
    section of ``TrainConfig`` that has a field of that name (``lr`` -> ``optim``).

    Raises ValueError for a name that no section, or more than one, has (``every``).
    """
    tree: dict[str, dict[str, object]] = {}
    for name, value in settings.items():
        owners = [
            section
            for section, field in TrainConfig.model_fields.items()
            if isinstance(field.annotation, type)
            and issubclass(field.annotation, BaseModel)
            and name in field.annotation.model_fields
        ]
        if len(owners) != 1:
            found = ", ".join(owners) or "none"
            raise ValueError(f"{name!r} must name a field of exactly one section (found: {found})")
        tree.setdefault(owners[0], {})[name] = value
    return tree


def did_you_mean(name: str, choices: list[str] | tuple[str, ...]) -> str:
    """``"; did you mean X?"`` for the closest of ``choices``, or ``""`` when none is close."""
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f"; did you mean {close[0]}?" if close else ""


def field_paths(model: type[BaseModel] | None = None, prefix: str = "") -> list[str]:
    """Every leaf field of the config as ``section.field`` (``model.lora.r`` for nested ones)."""
    paths: list[str] = []
    for name, field in (model or TrainConfig).model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            paths += field_paths(annotation, f"{prefix}{name}.")
        else:
            paths.append(f"{prefix}{name}")
    return paths


def suggest_field(name: str) -> str | None:
    """The valid config field closest to a mistyped ``name`` (dotted), or None."""
    paths = field_paths()
    sections = sorted({path.split(".")[0] for path in paths})
    leaf = name.rsplit(".", 1)[-1]
    same_leaf = [path for path in paths if path.rsplit(".", 1)[-1] == leaf]
    if len(same_leaf) == 1:  # the right field in the wrong (or no) section: steps -> train.steps
        return same_leaf[0]
    close = difflib.get_close_matches(name, paths + sections, n=1, cutoff=0.7)
    if close:
        return close[0]
    by_leaf: dict[str, list[str]] = {}
    for path in paths:
        by_leaf.setdefault(path.rsplit(".", 1)[-1], []).append(path)
    leaves = difflib.get_close_matches(leaf, list(by_leaf), n=1, cutoff=0.75)
    if leaves and len(by_leaf[leaves[0]]) == 1:
        return by_leaf[leaves[0]][0]
    return None


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``["a.b=1", "a.c=x"]`` -> ``{"a": {"b": 1, "c": "x"}}``; values are parsed as YAML."""
    tree: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise TSPOError(f"override {item!r}: expected section.field=value")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as err:
            raise TSPOError(f"override {item!r}: value is not valid YAML ({err})") from None
        *parents, leaf = key.split(".")
        node = tree
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise TSPOError(f"override {item!r}: {part!r} is already set to a value")
            node = child
        node[leaf] = value
    return tree


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def config_from_dict(raw: dict[str, Any], *, source: str = "config") -> TrainConfig:
    """Validate a plain dict; errors name the first bad field as ``section.field``."""
    try:
        return TrainConfig.model_validate(raw)
    except ValidationError as err:
        first = err.errors()[0]
        field = ".".join(str(part) for part in first["loc"]) or "<root>"
        message = first["msg"].removeprefix("Value error, ")
        if first["type"] == "extra_forbidden":
            guess = suggest_field(field)
            message = "unknown field" + (f"; did you mean {guess}?" if guess else "")
        extra = f" ({err.error_count() - 1} more)" if err.error_count() > 1 else ""
        raise TSPOError(f"{source} field '{field}': {message}{extra}") from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Read a YAML config (or start from the defaults) and apply dotted ``overrides``."""
    raw: dict[str, Any] = {}
    source = "config"
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise TSPOError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as err:
            raise TSPOError(f"config file {path} is not valid YAML: {err}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise TSPOError(f"config file {path}: the top level must be a mapping of sections")
        raw = resolve_relative_paths(loaded or {}, path.parent)
        source = f"config {path.name}"
    raw = _merge(raw, parse_overrides(overrides or []))
    return config_from_dict(raw, source=source)


# Fields holding paths; a config file's relative paths resolve against the file's folder.
_PATH_FIELDS = (
    ("data", "train_files"),
    ("eval", "files"),
    ("retriever", "index"),
    ("retriever", "corpus"),
    ("train", "output_dir"),
    ("train", "resume"),
)
# Fields that hold a path or a name (an alias, a hub id): resolved only when clearly a path.
_NAME_OR_PATH_FIELDS = (("model", "name"), ("model", "tokenizer"))


def _against(folder: Path, value: str) -> str:
    if os.path.isabs(value) or value.startswith("~"):
        return value
    return os.path.normpath(folder / value)


def resolve_relative_paths(raw: dict[str, Any], folder: Path) -> dict[str, Any]:
    """``raw`` (a config file's mapping) with relative paths joined to ``folder``.

    ``train.resume: auto`` stays ``auto``; ``model.name`` and ``model.tokenizer`` change only when
    they start with ``./`` or ``../`` or name something that exists under ``folder``, so aliases
    and hub ids (``Qwen/Qwen2.5-3B-Instruct``) stay as they are. Values of the wrong type are left
    for validation to report.
    """
    if folder == Path(".") or not isinstance(raw, dict):
        return raw
    resolved = {
        key: dict(value) if isinstance(value, dict) else value for key, value in raw.items()
    }
    for section, name in _PATH_FIELDS:
        node = resolved.get(section)
        if not isinstance(node, dict) or name not in node:
            continue
        value = node[name]
        if isinstance(value, str) and not (section == "train" and value == "auto"):
            node[name] = _against(folder, value)
        elif isinstance(value, list):
            node[name] = [_against(folder, v) if isinstance(v, str) else v for v in value]
    for section, name in _NAME_OR_PATH_FIELDS:
        node = resolved.get(section)
        value = node.get(name) if isinstance(node, dict) else None
        if isinstance(value, str) and (
            value.startswith(("./", "../")) or (folder / value).exists()
        ):
            node[name] = _against(folder, value)  # type: ignore[index]
    return resolved

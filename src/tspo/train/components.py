"""Build what a run needs from its config: questions, retriever, policy and reference model."""

from __future__ import annotations

import copy
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tspo.data.qa import QAExample
from tspo.errors import TSPOError
from tspo.retrieval.base import Retriever
from tspo.train.config import DataConfig, ModelConfig, RetrieverConfig, RolloutSection

if TYPE_CHECKING:
    from tspo.rollout.config import RolloutConfig


def load_examples(config: DataConfig) -> list[QAExample]:
    """Every question of ``config.train_files``, in file order, cut to ``max_examples``."""
    from tspo.data.qa import read_qa

    examples: list[QAExample] = []
    for path in config.train_files:
        if not Path(path).is_file():
            raise TSPOError(f"config field 'data.train_files': no such file {path}")
        examples.extend(read_qa(path))
    if config.max_examples is not None:
        examples = examples[: config.max_examples]
    if not examples:
        raise TSPOError("config field 'data.train_files': the files hold no questions")
    return examples


def retriever_from_config(config: RetrieverConfig) -> Retriever:
    from tspo.retrieval.index import open_retriever

    return open_retriever(
        index=config.index,
        url=config.url,
        corpus=config.corpus,
        token=config.token,
        timeout=config.timeout,
        retries=config.retries,
    )


def rollout_config(
    section: RolloutSection, *, detect_in: str, min_answer_chars: int
) -> RolloutConfig:
    """The rollout engine's ``RolloutConfig`` from the config's ``rollout`` and FOLR fields."""
    return section.to_rollout_config(detect_in=detect_in, min_answer_chars=min_answer_chars)


@dataclass
class Policy:
    """The trained model, its tokenizer, and the frozen reference used for the KL term.

    With LoRA the reference is the same module with its adapters switched off (no second copy);
    otherwise it is a frozen deep copy made before training. ``reference`` is None when the KL
    coefficient is 0.
    """

    model: Any
    tokenizer: Any
    reference: Any | None
    device: Any
    uses_lora: bool

    def reference_context(self) -> AbstractContextManager[Any]:
        """Within it, :meth:`reference_model` computes reference log-probs."""
        return self.model.disable_adapter() if self.uses_lora else nullcontext()

    def reference_model(self) -> Any:
        return self.model if self.uses_lora else self.reference


def build_policy(
    config: ModelConfig, *, kl_coef: float, weights_from: str | Path | None = None
) -> Policy:
    """Load the policy (from ``weights_from``, a checkpoint, when resuming) and its reference.

    The reference always comes from ``config.name``, the model training started from.
    """
    from tspo.models.loading import load_policy

    base_source = config.name
    if weights_from is not None and not config.lora.enabled:
        base_source = str(weights_from)
    model, tokenizer = load_policy(
        base_source, config.dtype, config.device, tokenizer=config.tokenizer
    )
    device = next(model.parameters()).device
    if device.type == "cpu":
        from tspo.utils import apply_thread_policy

        apply_thread_policy()

    reference = None
    if config.lora.enabled:
        model = _with_lora(model, config, weights_from)
    elif kl_coef > 0:
        reference = _frozen_reference(model if weights_from is None else None, config, device)

    if config.gradient_checkpointing:
        _enable_activation_checkpointing(model)
        if config.lora.enabled:
            model.enable_input_require_grads()
    return Policy(model, tokenizer, reference, device, config.lora.enabled)


def _enable_activation_checkpointing(model: Any) -> None:
    """Recompute activations in the backward pass (renamed in transformers 5.x; both spellings)."""
    options = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=options)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options)


def _frozen_reference(start_model: Any | None, config: ModelConfig, device: Any) -> Any:
    """A frozen copy of the starting weights (reloaded from ``config.name`` when resuming)."""
    if start_model is not None:
        reference = copy.deepcopy(start_model)
    else:
        from tspo.models.loading import load_policy

        reference, _ = load_policy(config.name, config.dtype, str(device))
    reference.eval()
    reference.requires_grad_(False)
    return reference


def _with_lora(model: Any, config: ModelConfig, weights_from: str | Path | None) -> Any:
    from peft import LoraConfig, PeftModel, get_peft_model

    if weights_from is not None:
        return PeftModel.from_pretrained(model, str(weights_from), is_trainable=True)
    lora = LoraConfig(
        r=config.lora.r,
        lora_alpha=config.lora.alpha,  # type: ignore[arg-type]  # peft says int; a float works
        lora_dropout=config.lora.dropout,
        target_modules=list(config.lora.target_modules),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora)

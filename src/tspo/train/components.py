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
    import torch

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
    config: ModelConfig,
    *,
    kl_coef: float,
    weights_from: str | Path | None = None,
    bf16: bool | str = False,
) -> Policy:
    """Load the policy (from ``weights_from``, a checkpoint, when resuming) and its reference.

    The reference always comes from ``config.name``, the model training started from. ``bf16``
    is ``train.bf16``: with autocast on, ``config.ref_dtype: auto`` stores the reference's linear
    weights in bf16 (see :func:`reference_dtype`).
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
        reference = _frozen_reference(
            model if weights_from is None else None,
            config,
            device,
            reference_dtype(config, device, bf16),
        )

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


def reference_dtype(config: ModelConfig, device: Any, bf16: bool | str) -> torch.dtype | None:
    """The dtype of the frozen reference's linear weights, or None to keep ``model.dtype``
    (``ref_dtype: model``).

    ``ref_dtype: auto`` is bf16 exactly when the run's forward passes use bf16 autocast
    (``train.bf16`` on this device): autocast casts every linear weight to bf16 before its matmul
    anyway, so a reference stored that way gives the same log-probs in half the memory.
    ``bfloat16`` without autocast is refused (fp32 activations cannot meet bf16 weights).
    """
    import torch

    from tspo.train.forward import autocast_context

    autocast = isinstance(autocast_context(torch.device(device), bf16), torch.autocast)
    if config.ref_dtype == "model":
        return None
    if config.ref_dtype == "bfloat16" and not autocast:
        raise TSPOError(
            "config field 'model.ref_dtype': bfloat16 needs bf16 autocast (train.bf16), "
            f"which is off on {device}; use auto or model"
        )
    return torch.bfloat16 if autocast else None


def autocast_weights(model: Any) -> list[Any]:
    """The weights bf16 autocast casts before use: those of ``torch.nn.Linear`` layers, except
    any shared with another kind of module (a tied input embedding looks its rows up uncast)."""
    import torch

    linear = {
        id(module.weight): module.weight
        for module in model.modules()
        if isinstance(module, torch.nn.Linear) and module.weight.is_floating_point()
    }
    shared = {
        id(param)
        for module in model.modules()
        if not isinstance(module, torch.nn.Linear)
        for param in module.parameters(recurse=False)
    }
    return [weight for key, weight in linear.items() if key not in shared]


def _frozen_reference(
    start_model: Any | None, config: ModelConfig, device: Any, dtype: torch.dtype | None
) -> Any:
    """A frozen copy of the starting weights (reloaded from ``config.name`` when resuming), its
    :func:`autocast_weights` stored in ``dtype`` (None: as loaded).

    The copy never holds a second full-precision version of the cast weights: the deep copy
    takes their cast versions directly.
    """
    import torch

    if start_model is not None:
        memo: dict[int, Any] = {}
        if dtype is not None:
            for weight in autocast_weights(start_model):
                cast = weight.detach().to(dtype)
                memo[id(weight)] = torch.nn.Parameter(cast, requires_grad=False)
        reference = copy.deepcopy(start_model, memo)
    else:
        from tspo.models.loading import load_policy

        reference, _ = load_policy(config.name, config.dtype, str(device))
        if dtype is not None:
            for weight in autocast_weights(reference):
                weight.data = weight.data.to(dtype)
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

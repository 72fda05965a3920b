"""The real-model path: SmolLM2-135M-Instruct converted from its GGUF, one training step, one eval.

Slow (the one-time conversion takes ~35 s) but part of CI. Set ``TSPO_CACHE`` to an existing cache
folder to reuse a conversion between runs; otherwise it goes to a temporary folder.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
from train_helpers import write_jsonl

from tspo.models.smollm2 import ALIAS, smollm2_path

pytestmark = pytest.mark.slow

QUESTIONS = [
    ("France", "Paris is the capital and largest city of France.", "capital of France?", "Paris"),
    ("Italy", "Rome is the capital city of Italy.", "What is the capital of Italy?", "Rome"),
]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    existing = os.environ.get("TSPO_CACHE")
    return Path(existing) if existing else tmp_path_factory.mktemp("tspo-cache")


@pytest.fixture(scope="module")
def model_dir(cache_dir: Path) -> Path:
    return smollm2_path(cache_dir)


def test_conversion_is_cached_and_loads_as_plain_hf(model_dir: Path, cache_dir: Path) -> None:
    from transformers import AutoConfig, AutoTokenizer

    assert model_dir == cache_dir / ALIAS
    assert (model_dir / "model.safetensors").is_file()
    stamp = (model_dir / "model.safetensors").stat().st_mtime_ns
    assert smollm2_path(cache_dir) == model_dir  # second call: no new conversion
    assert (model_dir / "model.safetensors").stat().st_mtime_ns == stamp
    config = AutoConfig.from_pretrained(model_dir)
    assert getattr(config, "quantization_config", None) is None
    assert (config.hidden_size, config.num_hidden_layers) == (576, 30)
    assert AutoTokenizer.from_pretrained(model_dir).chat_template


def test_one_training_step_and_eval(
    model_dir: Path, cache_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tspo.evaluation import run_eval
    from tspo.retrieval.index import open_retriever
    from tspo.rollout import RolloutConfig
    from tspo.train.config import load_config
    from tspo.train.loop import train

    monkeypatch.setenv("TSPO_CACHE", str(cache_dir))  # the alias resolves through the cache
    corpus = write_jsonl(
        tmp_path / "corpus.jsonl",
        [{"id": str(i), "contents": f"{t}\n{text}"} for i, (t, text, _, _) in enumerate(QUESTIONS)],
    )
    qa = write_jsonl(
        tmp_path / "qa.jsonl",
        [
            {"id": f"q{i}", "question": q, "golden_answers": [a]}
            for i, (_, _, q, a) in enumerate(QUESTIONS)
        ],
    )
    config = load_config(
        Path(__file__).resolve().parents[1] / "configs" / "smollm2-wiki.yaml",
        [
            f"model.name={ALIAS}",
            f"data.train_files=[{qa}]",
            f"retriever.corpus={corpus}",
            f"train.output_dir={tmp_path / 'run'}",
            "train.steps=1",
            "train.prompts_per_step=1",
            "rollout.group_size=2",
            "rollout.max_turns=1",
            "rollout.max_turn_tokens=8",
            "rollout.max_obs_tokens=16",
            "logging.progress=false",
            "eval.every=0",  # the preset validates on the recipe's data/wiki, not written here
            "eval.files=[]",
            # Adapters keep the step light (no 135M-parameter AdamW state, no 1.6 GB checkpoint);
            # full fine-tuning is the same code path, covered by the micro-model tests.
            "model.lora.enabled=true",
            "model.lora.r=4",
            # The sampler's own log-probs serve as old log-probs: one 135M forward pass fewer.
            "train.recompute_old_logprobs=false",
            # ...which equal the forward pass's only in fp32: under bf16 autocast (the default on
            # CPUs with native bf16) they differ by about 1e-2 (0.017 measured), which is why
            # recompute_old_logprobs defaults to true.
            "train.bf16=false",
        ],
    )
    result = train(config)
    (metrics,) = result.metrics
    assert math.isfinite(metrics["loss"]) and math.isfinite(metrics["kl_ref"])
    assert metrics["approx_kl"] == pytest.approx(0.0, abs=1e-3)  # sampler vs forward log-probs
    assert metrics["num_trajectories"] == 2 and metrics["generated_tokens"] > 0
    assert (result.last_checkpoint / "adapter_config.json").is_file()

    with open_retriever(corpus=str(corpus)) as retriever:
        evaluation = run_eval(
            str(result.last_checkpoint),
            [qa],
            retriever=retriever,
            out_dir=tmp_path / "eval",
            rollout=RolloutConfig(
                max_turns=1, max_turn_tokens=8, max_obs_tokens=16, use_chat_template=True
            ),
            device="cpu",
            show_progress=False,
        )
    assert evaluation.overall["count"] == 2
    report = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert report["scores"]["overall"]["count"] == 2

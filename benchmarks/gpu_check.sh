#!/usr/bin/env bash
# One-shot GPU check (needs one CUDA card, no internet): records the card and
#   1. the trainer on CUDA in bf16 autocast for a few steps, with a random-weight model of
#      Qwen2.5-0.5B's shape, on a small generated corpus + QA (BM25 in memory);
#   2. the rollout benchmark (KV-reuse vs re-encode vs single-turn generate) on CUDA in bf16;
#   3. the policy-update benchmark against TRL's GRPOTrainer, when trl is installed.
# Results go to $OUT (default docs/bench/gpu): nvidia-smi.txt, train.json, rollout.*, update.*.
#
#   bash benchmarks/gpu_check.sh                 # STEPS=3 PYTHON=.venv/bin/python OUT=...
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
[ -x "$PYTHON" ] || PYTHON=python
OUT=${OUT:-docs/bench/gpu}
STEPS=${STEPS:-3}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT"
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || echo "nvidia-smi not available" > "$OUT/nvidia-smi.txt"

echo "== 1/3 trainer: ${STEPS} steps, qwen2.5-0.5b-shape, bf16 autocast"
"$PYTHON" - "$OUT" "$STEPS" <<'PY'
import json
import sys
import tempfile
from pathlib import Path

import torch

from tspo.models.tiny import build_tiny_model, count_parameters, train_tokenizer
from tspo.protocol import PROMPT_TEMPLATE
from tspo.train.config import load_config
from tspo.train.loop import train
from tspo.utils import machine_info, write_json

out, steps = Path(sys.argv[1]), int(sys.argv[2])
assert torch.cuda.is_available(), "this check needs a CUDA device"
work = Path(tempfile.mkdtemp(prefix="tspo-gpu-check-"))
cities = ["Paris", "Rome", "Oslo", "Lima", "Cairo", "Quito", "Hanoi", "Dakar", "Riga", "Bern"]
countries = ["France", "Italy", "Norway", "Peru", "Egypt", "Ecuador", "Vietnam", "Senegal",
             "Latvia", "Switzerland"]
docs = [f"{city}\n{city} is the capital of {country}." for city, country in zip(cities, countries)]
questions = [f"What is the capital of {country}?" for country in countries]
(work / "corpus.jsonl").write_text(
    "".join(json.dumps({"id": str(i), "contents": d}) + "\n" for i, d in enumerate(docs)))
(work / "qa.jsonl").write_text("".join(
    json.dumps({"id": f"q{i}", "question": q, "golden_answers": [c]}) + "\n"
    for i, (q, c) in enumerate(zip(questions, cities))))
tokenizer = train_tokenizer([PROMPT_TEMPLATE.format(question=q) for q in questions] * 20 + docs,
                            vocab_size=2048, min_frequency=1)
model = build_tiny_model(tokenizer, "qwen2.5-0.5b-shape", seed=0)
model.save_pretrained(work / "model")
tokenizer.save_pretrained(work / "model")
parameters = count_parameters(model)
del model

config = load_config(None, [
    f"model.name={work / 'model'}", "model.device=cuda", "model.gradient_checkpointing=true",
    f"data.train_files=[{work / 'qa.jsonl'}]", f"retriever.corpus={work / 'corpus.jsonl'}",
    f"train.output_dir={work / 'run'}", f"train.steps={steps}", "train.prompts_per_step=8",
    "train.micro_batch_size=8", "train.bf16=true", "rollout.group_size=5", "rollout.max_turns=2",
    "rollout.max_turn_tokens=64", "rollout.max_obs_tokens=128", "optim.lr=1e-6",
    "checkpoint.every=1000", "logging.progress=false",
])
result = train(config)
keys = ("step", "step_seconds", "rollout_seconds", "update_seconds", "generated_tokens",
        "rollout_tokens_per_s", "update_tokens_per_s", "update_tokens", "loss", "kl_ref",
        "peak_cuda_mb", "peak_rss_mb")
report = {
    "benchmark": "trainer steps on CUDA, bf16 autocast, random-weight Qwen2.5-0.5B shape",
    "model_parameters": parameters,
    "settings": config.model_dump(mode="json"),
    "steps": [{k: m.get(k) for k in keys} for m in result.metrics],
    "machine": machine_info(),
}
write_json(out / "train.json", report)
for row in report["steps"]:
    print(json.dumps(row))
PY

echo "== 2/3 rollout benchmark on CUDA (bf16)"
"$PYTHON" benchmarks/rollout.py --device cuda --dtype bfloat16 --preset qwen2.5-0.5b-shape \
    --out "$OUT/rollout"

echo "== 3/3 policy-update benchmark against TRL on CUDA (bf16)"
if "$PYTHON" -c "import trl" 2>/dev/null; then
    "$PYTHON" benchmarks/update.py --device cuda --precisions bf16 --preset qwen2.5-0.5b-shape \
        --prompts 8 --group-size 5 --completion-tokens 256 --micro-batch 8 --out "$OUT/update.json"
else
    echo "trl is not installed: skipped (pip install 'trl==1.16.0')"
fi
echo "results in $OUT"

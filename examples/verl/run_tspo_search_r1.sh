#!/usr/bin/env bash
# A Search-R1-style TSPO run on veRL 0.9.1. Needs GPUs (8 by default) and an environment with
# veRL 0.9.1 + vLLM and tspo (pip install --no-deps -e .; see docs/scaling-with-verl.md). Not run
# by our CI: the docs say what is tested on CPU and what is not.
#
# Start the retriever first, from the tspo environment (any host the workers can reach):
#   tspo serve --index indexes/wiki-e5 --port 8000
# then:
#   TSPO_RETRIEVER_URL=http://127.0.0.1:8000 TRAIN_QA=nq_hotpotqa/train.parquet \
#   VAL_QA=nq_hotpotqa/test.parquet bash examples/verl/run_tspo_search_r1.sh [hydra overrides]
#
# Extra arguments are Hydra overrides, e.g. algorithm.adv_estimator=tspo_grpo for the baseline.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
: "${TSPO_RETRIEVER_URL:?set TSPO_RETRIEVER_URL to a running tspo serve, e.g. http://127.0.0.1:8000}"
: "${TRAIN_QA:?set TRAIN_QA to a Search-R1 parquet or FlashRAG jsonl file}"
: "${VAL_QA:?set VAL_QA to a Search-R1 parquet or FlashRAG jsonl file}"
data_dir="${DATA_DIR:-$repo_root/data/verl}"

python -c "import httpx, sys; httpx.get(sys.argv[1].rstrip('/') + '/health').raise_for_status()" \
    "$TSPO_RETRIEVER_URL" || { echo "no tspo serve at $TSPO_RETRIEVER_URL" >&2; exit 1; }

python "$repo_root/examples/verl/prepare_data.py" "$TRAIN_QA" "$data_dir/train.parquet" --split train
python "$repo_root/examples/verl/prepare_data.py" "$VAL_QA" "$data_dir/dev.parquet" --split test

# Ray workers started by this driver inherit the environment: the search tool reads these.
export TSPO_RETRIEVER_URL
export TSPO_RETRIEVER_TOPK="${TSPO_RETRIEVER_TOPK:-3}"

cd "$repo_root"
python -m verl.trainer.main_ppo \
    --config-path "$repo_root/examples/verl" --config-name tspo_search_r1 \
    data.train_files="$data_dir/train.parquet" data.val_files="$data_dir/dev.parquet" \
    "$@"

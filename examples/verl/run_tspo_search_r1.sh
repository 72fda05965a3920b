#!/usr/bin/env bash
# A Search-R1-style TSPO run on veRL 0.9.1 with our retriever server. Needs GPUs (8 by default),
# veRL 0.9.1 with vLLM, and tspo installed in the same environment. Not run by our CI: see
# docs/scaling-with-verl.md for what is tested on CPU and what is not.
#
#   INDEX_DIR=indexes/wiki-bm25 TRAIN_QA=data/nq_hotpotqa/train.parquet \
#   VAL_QA=data/nq_hotpotqa/test.parquet bash examples/verl/run_tspo_search_r1.sh [hydra overrides]
#
# Extra arguments are Hydra overrides, e.g. algorithm.adv_estimator=tspo_grpo for the baseline.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
: "${INDEX_DIR:?set INDEX_DIR to an index built by tspo index build}"
: "${TRAIN_QA:?set TRAIN_QA to a Search-R1 parquet or FlashRAG jsonl file}"
: "${VAL_QA:?set VAL_QA to a Search-R1 parquet or FlashRAG jsonl file}"
data_dir="${DATA_DIR:-$repo_root/data/verl}"
port="${RETRIEVER_PORT:-8000}"

python "$repo_root/examples/verl/prepare_data.py" "$TRAIN_QA" "$data_dir/train.parquet" --split train
python "$repo_root/examples/verl/prepare_data.py" "$VAL_QA" "$data_dir/dev.parquet" --split test

tspo serve --index "$INDEX_DIR" --port "$port" --topk 3 &
server_pid=$!
trap 'kill "$server_pid"' EXIT
for _ in $(seq 120); do
    curl -sf "http://127.0.0.1:$port/health" >/dev/null && break
    sleep 1
done
curl -sf "http://127.0.0.1:$port/health" >/dev/null || { echo "retriever did not start" >&2; exit 1; }

# Ray workers started by this driver inherit these.
export TSPO_RETRIEVER_URL="http://127.0.0.1:$port"
export TSPO_RETRIEVER_TOPK=3

cd "$repo_root"
python -m verl.trainer.main_ppo \
    --config-path "$repo_root/examples/verl" --config-name tspo_search_r1 \
    data.train_files="$data_dir/train.parquet" data.val_files="$data_dir/dev.parquet" \
    "$@"

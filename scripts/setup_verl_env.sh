#!/usr/bin/env bash
# Create a second virtual environment with veRL 0.9.1 for the veRL adapter tests.
#
# veRL 0.9.1 pins transformers<5.11, so it lives apart from the main environment. torch is
# installed first and exactly (2.13.0, a CPU build from local files); every later install resolves
# against it, so nothing can pull in another torch. veRL itself goes in with --no-deps: its full
# dependency list (vLLM, flash-attn, ...) needs GPUs; the packages below are what its
# `core_algos`, `reward_score` and `ray_trainer` (the trainer's advantage dispatch, exercised by
# tests/verl) import on a CPU.
#
# Usage: scripts/setup_verl_env.sh VENV_DIR
set -euo pipefail

if [[ $# -ne 1 ]]; then
    echo "usage: $0 VENV_DIR" >&2
    exit 2
fi
venv_dir="$1"
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-python3}"

test -x "$venv_dir/bin/python" || "$python" -m venv "$venv_dir"
pip=("$venv_dir/bin/python" -m pip install -q)

"${pip[@]}" --upgrade pip
"${pip[@]}" torch==2.13.0
"${pip[@]}" --no-deps verl==0.9.1
"${pip[@]}" torch==2.13.0 \
    ray "tensordict>=0.8,<=0.10.0,!=0.9.0" codetiming hydra-core pylatexenc torchdata cachetools \
    "transformers>=5,<5.11" datasets pillow peft uvicorn fastapi numpy pandas pyarrow \
    aiohttp pytest "hypothesis>=6.100" httpx "bm25s>=0.2.10" scipy
# tspo itself without its heavy extras (dense retrieval, training): the adapter needs tspo.algo,
# tspo.protocol and the retrieval client; its tests also serve a BM25 index over HTTP.
"${pip[@]}" --no-deps -e "$repo_root"

"$venv_dir/bin/python" - <<'PY'
import torch

assert torch.__version__.split("+")[0] == "2.13.0", f"unexpected torch {torch.__version__}"
import verl.trainer.ppo.ray_trainer  # noqa: F401  (fails loudly if a dependency is missing)
import tspo.integrations.verl  # noqa: F401
PY

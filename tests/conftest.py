"""Shared test set-up: seeded RNGs and the Triton interpreter on machines without a GPU."""

import os
import random

import numpy as np
import pytest
import torch

# Must be set before any @triton.jit function runs; harmless where Triton is never used.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed_rngs():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield

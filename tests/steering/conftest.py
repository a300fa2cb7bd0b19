"""Fixtures of the steering tests: the shared tiny models with a random bank each."""

import pytest
import torch
from helpers import random_bank
from steering_helpers import neutral_baseline


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def family(request):
    """``(model, tokenizer, bank)`` for the tiny Llama, then the tiny GPT-2."""
    model, tokenizer = request.getfixturevalue(f"tiny_{request.param}")
    return model, tokenizer, random_bank(model)


@pytest.fixture(scope="module")
def llama(tiny_llama):
    """``(model, tokenizer, bank)`` for the tiny Llama."""
    model, tokenizer = tiny_llama
    return model, tokenizer, random_bank(model)


@pytest.fixture(scope="module")
def calibrated(tiny_llama):
    """The tiny Llama with a bank whose neutral baseline differs per layer and emotion
    (:func:`neutral_baseline`), detection layers [3], recommended weights joy 1.5 (reading
    2.0), fear 0.5."""
    model, tokenizer = tiny_llama
    bank = random_bank(model, detection_layers=[3], recommended_weights={
        "joy": {"weight": 1.5, "reading": 2.0}, "fear": {"weight": 0.5}})
    mean, std = neutral_baseline(bank.n_layers, bank.n_emotions)
    bank = bank.replace(neutral_mean=torch.tensor(mean, dtype=torch.float32),
                        neutral_std=torch.tensor(std, dtype=torch.float32))
    return model, tokenizer, bank

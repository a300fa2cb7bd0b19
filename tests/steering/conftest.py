"""Fixtures of the steering tests: the shared tiny models with a random bank each."""

import pytest
from helpers import random_bank


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

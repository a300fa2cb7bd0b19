"""What the generate benchmark runs on: its prompts, its bank and the steered layers.

Tested in ``tests/benchmarks/test_generate.py`` (the workload's bank and layers).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from emokern.bank import EmotionBank
from emokern.emotions import BASIC_EMOTIONS
from emokern.models import decoder_layers, model_fingerprint
from emokern.tokens import encode_prompts, model_device

__all__ = ["PROMPTS", "benchmark_bank", "middle_layers"]

PROMPTS = (
    "Tell me about your weekend.",
    "Describe the house you grew up in.",
    "What happens when the power goes out at night?",
    "Write a short note to a colleague about the meeting tomorrow.",
    "How was the concert yesterday?",
    "Describe a walk through the old part of town.",
    "What did you find in the attic?",
    "Tell me about the letter that arrived this morning.",
)


def benchmark_bank(model: nn.Module, tokenizer, *, model_name: str = "default",
                   names: Sequence[str] = BASIC_EMOTIONS, seed: int = 0):
    """The bank to benchmark with: the shipped default bank for the default model when present
    (restricted to ``names``), else random vectors with realistic norms.

    Random vectors are unit directions scaled to a fifth of the mean hidden-state norm at each
    layer (measured on :data:`PROMPTS`), about the size of extracted emotion vectors; timing
    does not depend on their values.

    Returns
    -------
    (EmotionBank, str)
        The bank and a description of where it came from.
    """
    if model_name == "default":
        try:
            bank = EmotionBank.load_default("ev")
            bank.check_compatible(model)
            if all(name in bank for name in names):
                return bank.select(list(names)), "shipped default bank (ev)"
        except (FileNotFoundError, ValueError):
            pass
    n_layers = len(decoder_layers(model))
    encoded = encode_prompts(tokenizer, list(PROMPTS), device=model_device(model))
    with torch.inference_mode():
        hidden = model(**encoded, output_hidden_states=True).hidden_states
    real = encoded["attention_mask"].bool()
    norms = torch.stack([h[real].float().norm(dim=-1).mean() for h in hidden[1:n_layers + 1]])
    generator = torch.Generator().manual_seed(seed)
    dim = hidden[0].shape[-1]
    vectors = torch.randn(n_layers, len(names), dim, generator=generator)
    vectors = vectors / vectors.norm(dim=-1, keepdim=True) * (0.2 * norms.cpu())[:, None, None]
    bank = EmotionBank(vectors, list(names), list(range(n_layers)),
                       hidden_norm=norms.cpu().float(),
                       metadata={"fingerprint": model_fingerprint(model), "default_weight": 1.0,
                                 "random": True})
    return bank, "random vectors, norm 0.2 x mean hidden norm per layer (no shipped bank)"


def middle_layers(bank, count: int) -> list[int]:
    """``count`` consecutive bank layers around the middle of the bank (all when fewer)."""
    layers = sorted(bank.layers)
    if len(layers) <= count:
        return layers
    start = (len(layers) - count) // 2
    return layers[start:start + count]

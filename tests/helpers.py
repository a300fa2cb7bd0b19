"""Helpers shared by several test files (import as ``from helpers import ...``; pytest puts
``tests/`` on the path, see pyproject)."""

from __future__ import annotations

import torch

from emokern.bank import EmotionBank
from emokern.models import decoder_layers, model_fingerprint

NAMES = ["joy", "sadness", "fear"]


def random_bank(model, *, seed: int = 0, scale: float = 1.0, names=NAMES, fingerprint=True,
                **metadata) -> EmotionBank:
    """A bank of random vectors at every decoder layer of ``model`` (recommended layers 1, 2
    unless ``metadata`` says otherwise)."""
    n_layers = len(decoder_layers(model))
    dim = model.config.hidden_size
    generator = torch.Generator().manual_seed(seed)
    vectors = torch.randn(n_layers, len(names), dim, generator=generator) * scale
    meta = {"recommended_layers": [1, 2], **metadata}
    if fingerprint:
        meta["fingerprint"] = model_fingerprint(model)
    return EmotionBank(vectors, list(names), list(range(n_layers)), metadata=meta)

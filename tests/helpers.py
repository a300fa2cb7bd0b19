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


def standard_scores_by_hand(bank: EmotionBank, layers, mean) -> tuple[torch.Tensor, float]:
    r"""Readings in standard scores computed here, not by the code under test: the raw mean
    projections ``mean [L', K]`` (decoder ``layers``, in their order) less the bank's neutral
    mean of the same layer and emotion, over its spread, averaged over the layers, in float64:
    :math:`z_k = \frac{1}{L'} \sum_l (m_{l,k} - \mu_{l,k}) / \sigma_{l,k}`. Returns ``(z [K],
    min σ)``: a raw tolerance ``atol`` becomes ``atol / min σ`` in these units."""
    rows = [list(bank.layers).index(layer) for layer in layers]
    mu = bank.neutral_mean.double()[rows]
    sigma = bank.neutral_std.double()[rows]
    z = (torch.as_tensor(mean, dtype=torch.float64) - mu) / sigma
    return z.mean(dim=0), float(sigma.min())

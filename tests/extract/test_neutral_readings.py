"""The readings' neutral baseline and the detection layers, on tiny models: the statistics are
the ones the module defines, the vectors are never touched, Method EV stores its baseline."""

import pytest
import torch
from helpers import random_bank

from emokern.extract import (
    detection_accuracy,
    extract_ev,
    neutral_baseline,
    neutral_stats,
)
from emokern.extract.neutral_readings import neutral_prompts

pytestmark = pytest.mark.usefixtures("one_thread")

QUERIES = ["How was your weekend?", "Tell me about your morning commute.",
           "What do you think about rainy days?", "How do you feel about Mondays?"]


def test_neutral_stats_by_hand():
    g = torch.Generator().manual_seed(0)
    sums = torch.randn(5, 2, 8, generator=g)
    counts = torch.tensor([3, 1, 4, 0, 2])
    vectors = torch.randn(2, 3, 8, generator=g)
    mean, std = neutral_stats(sums, counts, vectors)
    assert mean.shape == std.shape == (2, 3)
    unit = vectors / vectors.norm(dim=-1, keepdim=True)
    keep = counts > 0  # the response without tokens is skipped
    proj = torch.einsum("nld,lkd->nlk", sums[keep].double(), unit.double())
    torch.testing.assert_close(mean.double(), proj.sum(0) / counts[keep].sum(), rtol=1e-6,
                               atol=1e-6)
    per = proj / counts[keep].double()[:, None, None]
    torch.testing.assert_close(std.double(), per.std(0), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="at least 2"):
        neutral_stats(sums[:1], counts[:1], vectors)


def test_detection_accuracy_reads_standard_scores(small_llama):
    model, _ = small_llama
    bank = random_bank(model)  # joy, sadness, fear
    mean = torch.zeros(bank.n_layers, 3)
    std = torch.ones(bank.n_layers, 3)
    bank = bank.replace(neutral_mean=mean, neutral_std=std)
    unit = bank.vectors / bank.vectors.norm(dim=-1, keepdim=True)
    # Each text lies along its emotion's direction at layer 0 and along the opposite at the
    # others: perfect detection at layer 0 only.
    labels = ["joy", "fear", "sadness", "anger"]  # anger is not in the bank: skipped
    states = torch.zeros(4, bank.n_layers, bank.dim)
    for i, y in enumerate(labels[:3]):
        k = bank.index(y)
        states[i, 0] = 10 * unit[0, k]
        states[i, 1:] = -10 * unit[1:, k]
    accuracy = detection_accuracy(states, labels, bank)
    assert float(accuracy[0]) == 1.0 and float(accuracy[1:].max()) < 1.0


def test_neutral_baseline_keeps_the_vectors(small_llama):
    model, tokenizer = small_llama
    bank = random_bank(model)
    calibrated = neutral_baseline(model, tokenizer, bank, queries=QUERIES, max_new_tokens=6,
                                  progress=False)
    assert torch.equal(calibrated.vectors, bank.vectors)
    assert calibrated.calibrated and calibrated.neutral_mean.shape == (bank.n_layers, 3)
    assert bool((calibrated.neutral_std > 0).all())
    meta = calibrated.metadata
    assert meta["neutral"]["responses"] >= 2 and meta["neutral"]["source"] == "custom"
    assert len(meta["detection_layers"]) == 3
    assert set(map(int, meta["detection_accuracy"])) == set(bank.layers)
    # Neutral text reads 0 on average, by construction.
    z = calibrated.standardize(calibrated.neutral_mean[None], calibrated.layers)
    torch.testing.assert_close(z, torch.zeros_like(z))
    assert len(neutral_prompts(tokenizer, QUERIES)) == 4


def test_ev_extraction_stores_its_neutral_baseline(small_llama):
    model, tokenizer = small_llama
    bank = extract_ev(model, tokenizer, emotions=["joy", "fear"], queries=QUERIES,
                      max_new_tokens=6, progress=False)
    assert bank.calibrated and bank.neutral_std.shape == (bank.n_layers, 2)
    assert bank.metadata["neutral"]["responses"] >= 2
    assert set(bank.detection_layers) <= set(bank.layers)

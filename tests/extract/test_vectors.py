"""From means to a bank: centring, pairwise cosines, the recommendation read from the
calibration record (calibrated on the same model, transferred to another, heuristic without)."""

import pytest
import torch

from emokern.extract import center_vectors, make_bank, pairwise_cosines, recommend
from emokern.extract import vectors as vectors_module
from emokern.models import model_fingerprint


def test_center_vectors_removes_the_shared_component():
    v = torch.randn(2, 3, 8)
    c = center_vectors(v)
    torch.testing.assert_close(c.sum(dim=1), torch.zeros(2, 8), atol=1e-6, rtol=0)
    torch.testing.assert_close(c[:, 0] - c[:, 1], v[:, 0] - v[:, 1])
    with pytest.raises(ValueError, match="K >= 2"):
        center_vectors(torch.randn(2, 1, 8))
    with pytest.raises(ValueError, match=r"\[L, K, D\]"):
        center_vectors(torch.randn(3, 8))


def test_pairwise_cosines():
    v = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [-3.0, 0.0]]])
    expected = torch.tensor([[[1.0, 0.0, -1.0], [0.0, 1.0, 0.0], [-1.0, 0.0, 1.0]]])
    torch.testing.assert_close(pairwise_cosines(v), expected)


def _record(fingerprint, **overrides):
    record = {"default_weight": 6.0, "recommended_layers": [1], "relative_depth": 0.5,
              "relative_strength": 0.25, "centered": True, "fingerprint": fingerprint}
    return record | overrides


def test_recommend_copies_transfers_or_guesses(small_llama, monkeypatch):
    model, _ = small_llama
    fingerprint = model_fingerprint(model)
    # |v| = 2 at every layer, |h| = 4: relative strength 0.5 per unit of weight.
    vectors = torch.zeros(3, 2, 4)
    vectors[..., 0] = 2.0
    hidden_norm = torch.full((3,), 4.0)
    layers = [0, 1, 2]

    def run(records, **kwargs):
        monkeypatch.setattr(vectors_module, "load_calibration", lambda: records)
        args = dict(method="ev", centered=True, fingerprint=fingerprint) | kwargs
        return recommend(vectors, layers, hidden_norm, 3, **args)

    same = run({"ev": _record(fingerprint)})
    assert same == {"default_weight": 6.0, "recommended_layers": [1],
                    "recommendation": "calibrated"}
    # Another model: same relative depth (0.5 of layers 0..2 -> 1), same relative strength.
    other = run({"ev": _record(dict(fingerprint, hidden_size=999))})
    assert other == {"default_weight": 0.5, "recommended_layers": [1],
                     "recommendation": "transferred"}
    # Calibrated without centring: transferred, not copied.
    assert run({"ev": _record(fingerprint)}, centered=False)["recommendation"] == "transferred"
    # The record of the other method does not apply.
    assert run({"concept": _record(fingerprint)})["recommendation"] == "heuristic"
    nothing = run({})
    # No record: relative depth 0.4 (layer 0.8 -> 1) and relative strength 0.5.
    assert nothing == {"default_weight": 1.0, "recommended_layers": [1],
                       "recommendation": "heuristic"}


def test_recommend_transfers_calibrated_layers_that_were_not_extracted(small_llama,
                                                                         monkeypatch):
    model, _ = small_llama
    fingerprint = model_fingerprint(model)
    monkeypatch.setattr(vectors_module, "load_calibration",
                        lambda: {"ev": _record(fingerprint, recommended_layers=[2])})
    out = recommend(torch.ones(2, 2, 4), [0, 1], torch.ones(2), 3, "ev", True, fingerprint)
    assert out["recommendation"] == "transferred" and out["recommended_layers"] == [1]


def test_make_bank_is_float32():
    bank = make_bank(torch.randn(2, 2, 4, dtype=torch.float64), ["joy", "fear"], [3, 5],
                     torch.ones(2, dtype=torch.float64), {"method": "ev"})
    assert bank.vectors.dtype == torch.float32 and bank.hidden_norm.dtype == torch.float32
    assert bank.layers == [3, 5] and bank.names == ["joy", "fear"]

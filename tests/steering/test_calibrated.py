"""Readings in calibrated units at chosen monitor layers and ``"rec"`` weights, on the tiny
models (the closed-loop ``target=`` controller: ``test_control.py``; the ``calibrated``
fixture: ``conftest.py``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import random_bank
from steering_helpers import encode, greedy, neutral_baseline

from emokern.steering import generate, mix_to_weights, parse_mix, steer

pytestmark = pytest.mark.usefixtures("one_thread")


def _unit(bank, layer):
    v = bank.layer_vectors(layer).float()
    return v / v.norm(dim=-1, keepdim=True)


# ------------------------------------------------------------------------------ "rec"


def test_rec_weights_resolve_per_emotion(calibrated):
    model, _, bank = calibrated
    assert parse_mix("joy=rec, fear=1") == {"joy": "rec", "fear": 1.0}
    s = steer(model, bank, [{"joy": "rec"}, {"fear": "rec", "sadness": "REC"}], layers=[1])
    expected = torch.tensor([[1.5, 0.0, 0.0], [0.0, bank.default_weight, 0.5]])
    assert torch.equal(s.weights, expected)
    s.set_mix([{"fear": "rec"}, {}])
    assert s.weights[0, 2] == 0.5
    with pytest.raises(ValueError, match="no bank gives recommended weights"):
        mix_to_weights([{"joy": "rec"}], ["joy"])
    with pytest.raises(TypeError, match="must be a number"):
        steer(model, bank, [{"joy": "lots"}])


# ------------------------------------------------------------------------- monitor layers


def test_monitor_layers_read_unsteered_layers_without_changing_the_output(calibrated):
    model, tokenizer, bank = calibrated
    encoded = encode(tokenizer)
    real = encoded["attention_mask"].bool()
    mixes = [{"joy": 1.0}, {"fear": -1.0}, {}]
    with steer(model, bank, mixes, layers=[1]) as plain:
        steered = greedy(model, tokenizer, encoded, new_tokens=3)
    with steer(model, bank, mixes, layers=[1], monitor_layers=[1, 3]) as s:
        assert torch.equal(greedy(model, tokenizer, encoded, new_tokens=3), steered)
    assert s.monitor.layers == (1, 3) and s.monitor.mean().shape == (3, 2, 3)
    torch.testing.assert_close(s.monitor.mean()[:, 0], plain.monitor.mean()[:, 0])
    # Layers 2 and 0 (in that order) are read by zero-weight calls: layer 2 after steering at
    # 1 has flowed through. Recompute both from the hidden states of the same steered forward
    # (not at the last layer, whose hidden_states entry is taken after the final norm).
    with steer(model, bank, mixes, layers=[1], monitor_layers=[2, 0]) as s, \
            torch.inference_mode():
        hidden = model(**encoded, output_hidden_states=True).hidden_states
    p = hidden[3].float() @ _unit(bank, 2).T
    expected = (p * real[..., None]).sum(1) / real.sum(1, keepdim=True)
    torch.testing.assert_close(s.monitor.mean()[:, 0], expected, rtol=1e-4, atol=1e-4)
    # Standard scores by hand, float64, against the baseline of each layer and emotion.
    mu, sigma = neutral_baseline(bank.n_layers, bank.n_emotions)
    mask = real[..., None].double().numpy()
    means = np.stack([((hidden[layer + 1].double() @ _unit(bank, layer).double().T).numpy()
                       * mask).sum(1) / mask.sum(1) for layer in (2, 0)], axis=1)  # [B, 2, K]
    z = (means - mu[[2, 0]][None]) / sigma[[2, 0]][None]
    np.testing.assert_allclose(s.monitor.standardized().numpy(), z, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(s.monitor.readings().numpy(), z.mean(axis=1), rtol=1e-4,
                               atol=1e-4)
    # The same with a subset of emotions in another order: columns follow the names.
    with steer(model, bank, mixes, layers=[1], monitor_layers=[2, 0],
               emotions=["fear", "joy"]) as sub, torch.inference_mode():
        model(**encoded)
    cols = [bank.index("fear"), bank.index("joy")]
    np.testing.assert_allclose(sub.monitor.mean().double().numpy(), means[:, :, cols],
                               rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(sub.monitor.standardized().numpy(), z[:, :, cols], rtol=1e-4,
                               atol=1e-4)
    np.testing.assert_allclose(sub.monitor.readings().numpy(), z[:, :, cols].mean(axis=1),
                               rtol=1e-4, atol=1e-4)
    auto = steer(model, bank, mixes, layers=[1], monitor_layers="auto")
    assert auto.monitor.layers == (3,)
    for bad in ("best", [9], [1, 1]):
        with pytest.raises(ValueError, match="monitor_layers|layer"):
            steer(model, bank, mixes, layers=[1], monitor_layers=bad)


def test_generate_reports_calibrated_readings(calibrated):
    model, tokenizer, bank = calibrated
    rows = generate(model, tokenizer, bank, ["Hello there", "Hi"], [{"joy": "rec"}, {}],
                    max_new_tokens=3, layers=[1])
    assert rows[0]["mix"] == {"joy": 1.5}
    mu, sigma = neutral_baseline(bank.n_layers, bank.n_emotions)
    for row in rows:
        raw, z = row["projections"], row["readings"]
        for name in raw:  # read at the detection layer (3): against layer 3's baseline
            k = bank.index(name)
            assert z[name] == pytest.approx((raw[name] - mu[3, k]) / sigma[3, k], abs=1e-5)
    uncalibrated = random_bank(model)
    rows = generate(model, tokenizer, uncalibrated, "Hi", [{}], max_new_tokens=2, layers=[1])
    assert rows[0]["readings"] is None and set(rows[0]["projections"]) == {"joy", "sadness",
                                                                            "fear"}


# ------------------------------------------------------------------------------ real model


@pytest.mark.slow
@pytest.mark.model
def test_default_model_calibrated_readings_rec_and_targets():
    """The shipped concept bank on the default model: unsteered rows read near the neutral
    baseline, the recommended sadness weight reads far above it, and a higher sadness target
    gets a higher mean weight and reading (one batch, 16 tokens)."""
    from emokern import EmotionBank, load_model

    model, tokenizer = load_model("default")
    bank = EmotionBank.load_default("concept")
    assert bank.calibrated and bank.recommended_weight("anger") > bank.recommended_weight("joy")
    prompts = ["Describe the street where you live.", "What are you going to cook tonight?"]
    rows = generate(model, tokenizer, bank, prompts * 2,
                    [{}, {}, {"sadness": "rec"}, {"sadness": "rec"}], max_new_tokens=16)
    plain = [r["readings"]["sadness"] for r in rows[:2]]
    steered = [r["readings"]["sadness"] for r in rows[2:]]
    assert all(abs(z) < 4 for z in plain), plain
    assert min(steered) > max(plain) + 3, (plain, steered)
    low = bank.recommended_weights["sadness"]["reading"] * 0.5
    rows = generate(model, tokenizer, bank, prompts * 2,
                    target=[{"sadness": low}] * 2 + [{"sadness": 3 * low}] * 2,
                    max_new_tokens=16)
    weights = [r["weights"]["sadness"] for r in rows]
    readings = [r["readings"]["sadness"] for r in rows]
    assert min(weights[2:]) > max(weights[:2]) and min(readings[2:]) > max(readings[:2])

"""Calibrated units on the tiny models: readings at chosen monitor layers, ``"rec"`` weights,
and levels, caps and floors in standard scores (the closed-loop ``target=`` controller:
``test_control.py``; the ``calibrated`` fixture: ``conftest.py``)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import random_bank
from steering_helpers import Capture, encode, greedy, logits, neutral_baseline

from emokern.models import decoder_layers
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
    low = 0.5 * sum(steered) / len(steered)  # half the reading the recipe reached
    rows = generate(model, tokenizer, bank, prompts * 2,
                    target=[{"sadness": low}] * 2 + [{"sadness": 3 * low}] * 2,
                    max_new_tokens=16)
    weights = [r["weights"]["sadness"] for r in rows]
    readings = [r["readings"]["sadness"] for r in rows]
    assert min(weights[2:]) > max(weights[:2]) and min(readings[2:]) > max(readings[:2])


# ------------------------------------------------------------------- levels and bounds
# The CPU/Triton/CUDA kernels take bounds later; the reference backend has them now.


def _projections(hidden, bank, layer):
    return hidden.float() @ _unit(bank, layer).T  # [B, T, K]


def test_levels_caps_and_floors_land_on_calibrated_targets_at_every_steered_layer(calibrated):
    model, tokenizer, bank = calibrated
    encoded = encode(tokenizer)
    real = encoded["attention_mask"].bool()
    mu, sigma = neutral_baseline(bank.n_layers, bank.n_emotions)
    joy, sad, fear = (bank.index(n) for n in ("joy", "sadness", "fear"))
    mixes = ["sadness@1.5", {}, {"fear": {"max": -1.0}, "joy": {"weight": 1.0, "min": 0.5}}]
    captures = [Capture(decoder_layers(model)[layer]) for layer in (1, 2)]
    s = steer(model, bank, mixes, layers=[1, 2], backend="reference")
    assert torch.equal(s.weights, torch.tensor([[0.0] * 3, [0.0] * 3, [1.0, 0.0, 0.0]]))
    assert s.z_bounds[0, :, sad].tolist() == [1.5, 1.5]
    assert s.z_bounds[2, :, fear].tolist() == [-math.inf, -1.0]
    assert s.z_bounds[1].isinf().all()
    assert set(s.bounds) == {1, 2}
    for layer, raw in s.bounds.items():  # mu + z sigma of each layer: not the same
        assert raw[0, 0, sad].item() == pytest.approx(mu[layer, sad] + 1.5 * sigma[layer, sad])
        assert raw[2, 0, joy].item() == pytest.approx(mu[layer, joy] + 0.5 * sigma[layer, joy])
    with s, torch.inference_mode():
        for capture in captures:
            capture.attach_after()
        model(**encoded)
    for capture in captures:
        capture.remove()
    for layer, capture in zip((1, 2), captures, strict=True):
        before, after = capture.before[0], capture.after[0]
        p = _projections(after, bank, layer)
        target = mu[layer, sad] + 1.5 * sigma[layer, sad]
        torch.testing.assert_close(p[0][real[0]][:, sad], torch.full_like(p[0][real[0]][:, sad],
                                   target), atol=1e-4, rtol=1e-5)
        assert torch.equal(after[1], before[1])  # {}: untouched
        rows, cap = p[2][real[2]], mu[layer, fear] - sigma[layer, fear]
        assert (_projections(before, bank, layer)[2][real[2]][:, fear] > cap).any()  # it bites
        assert (rows[:, fear] <= cap + 1e-4).all()
        assert (rows[:, joy] >= mu[layer, joy] + 0.5 * sigma[layer, joy] - 1e-4).all()


def test_levels_hold_on_generated_tokens_and_set_mix_adds_and_drops_them(calibrated):
    model, tokenizer, bank = calibrated
    encoded = encode(tokenizer)
    mu, sigma = neutral_baseline(bank.n_layers, bank.n_emotions)
    fear = bank.index("fear")
    s = steer(model, bank, [{"joy": 1.0}, {}, {}], layers=[1], positions="generated",
              backend="reference")
    assert s.bounds is None and s.z_bounds is None
    s.set_mix([{"joy": 1.0}, "fear=erase", {}])  # the first bounds: the decode calls change
    capture = Capture(decoder_layers(model)[1])
    with s:
        capture.attach_after()
        greedy(model, tokenizer, encoded, new_tokens=3)
    capture.remove()
    decode = [(b, a) for b, a in zip(capture.before, capture.after, strict=True)
              if a.shape[1] == 1]
    assert len(decode) == 2 and torch.equal(capture.before[0], capture.after[0])  # prompt
    for before, after in decode:
        p = _projections(after, bank, 1)
        assert p[1, 0, fear].item() == pytest.approx(mu[1, fear], abs=1e-4)  # erased
        assert torch.equal(before[2], after[2])
    s.set_mix([{"joy": 2.0}, {}, {}])  # the last bounds dropped
    assert s.bounds is None and s.weights[0, 0] == 2.0
    with s:
        greedy(model, tokenizer, encoded, new_tokens=2)


def test_a_level_recipe_is_what_rec_means_and_bad_mixes_change_nothing(calibrated):
    model, _, bank = calibrated
    leveled = bank.replace(metadata={"recommended_weights": {
        "joy": {"mode": "level", "level": 2.0}, "fear": {"weight": 0.5}}})
    s = steer(model, leveled, [{"joy": "rec", "fear": "rec"}, "joy=rec,fear<=1"],
              layers=[1], backend="reference")
    assert s.weights.tolist() == [[0.0, 0.0, 0.5], [0.0, 0.0, 0.0]]
    assert s.z_bounds[0, :, 0].tolist() == [2.0, 2.0]
    assert s.z_bounds[1, :, 0].tolist() == [2.0, 2.0] and s.z_bounds[1, 1, 2] == 1.0
    with pytest.raises(ValueError, match=r"mix\[0\]\['joy'\] is 'rec', and the recipe of 'joy' "
                                         r"is a level \(z = 2\), which cannot go with a cap"):
        steer(model, leveled, [{"joy": {"weight": "rec", "max": 3}}], layers=[1])
    weights, bounds = s.weights, s.bounds
    for bad, exc, message in (
            ([{"joy": 1.0}, {"fear": {"min": 2, "max": 1}}], ValueError,
             r"mix\[1\]\['fear'\] has a floor above its cap"),
            ([{"joy": 1.0}, "sadness@1,sadness=2"], ValueError,
             r"mix\[1\]: 'sadness' .* has a level and a push"),
            ([{"joy": 1.0}, {"fear": {"level": 3e38}}], ValueError,
             r"mix\[1\]\['fear'\]: z = 3e\+38 is .* at layer 1, outside float32"),
            ([{"joy": 1.0}, {"fear": {"lvl": 1}}], ValueError, r"unknown field\(s\) \['lvl'\]"),
            ([{"joy": 1.0}, {"fear": {"level": "high"}}], TypeError,
             r"mix\[1\]\['fear'\]\['level'\] must be a number")):
        with pytest.raises(exc, match=message):
            s.set_mix(bad)
        assert torch.equal(s.weights, weights)  # nothing half-applied
        assert all(torch.equal(bounds[k], s.bounds[k]) for k in bounds)
    uncalibrated = random_bank(model)
    with pytest.raises(ValueError, match=r"mix\[1\]\['sadness'\] asks for a level or bound.*"
                                         r"this bank has none"):
        steer(model, uncalibrated, [{"joy": 1}, {"sadness": "erase"}], layers=[1])


def test_generate_with_levels(calibrated, monkeypatch):
    model, tokenizer, bank = calibrated
    monkeypatch.setenv("EMOKERN_BACKEND", "reference")
    rows = generate(model, tokenizer, bank, "Hi", ["sadness@8", {}, "joy=1,joy<=0"],
                    max_new_tokens=3, layers=[1])
    assert [r["mix"] for r in rows] == [{"sadness": {"level": 8.0}}, {},
                                        {"joy": {"weight": 1.0, "max": 0.0}}]
    assert rows[0]["readings"]["sadness"] != rows[1]["readings"]["sadness"]


# ------------------------------------------------------------------------------ scope


def test_a_scoped_term_steers_its_layers_and_positions_only(calibrated):
    """``joy[3]=1.5`` under layers [1, 3] adds the whole 1.5 × v at layer 3 and nothing at 1
    (what a steerer of layer 3 alone does); ``[generated]`` leaves the prompt's rows as the
    model wrote them and steers every generated token; a scoped level holds where it is
    scoped and nowhere else; set_mix moves between scoped and plain mixes like a fresh
    steerer."""
    model, tokenizer, bank = calibrated
    encoded = encode(tokenizer)
    real = encoded["attention_mask"].bool()
    mu, sigma = neutral_baseline(bank.n_layers, bank.n_emotions)
    sad = bank.index("sadness")
    with steer(model, bank, [{"joy": {"weight": 1.5, "layers": [3]}}] * 3, layers=[1, 3]):
        scoped = logits(model, encoded)
    with steer(model, bank, [{"joy": 1.5}] * 3, layers=[3]):
        alone = logits(model, encoded)
    assert torch.equal(scoped, alone)
    assert not torch.equal(scoped, logits(model, encoded))

    mixes = ["joy[generated]=2", "sadness[3;generated]@1.5", {"fear": -1.0}]
    captures = [Capture(decoder_layers(model)[layer]) for layer in (1, 3)]
    s = steer(model, bank, mixes, layers=[1, 3], backend="reference").install()
    for capture in captures:
        capture.attach_after()
    greedy(model, tokenizer, encoded, new_tokens=3)
    s.remove()
    for capture in captures:
        capture.remove()
    for layer, capture in zip((1, 3), captures, strict=True):
        changed = capture.changed()
        assert not changed[0][:2].any()  # rows 0 and 1: generated tokens only
        assert torch.equal(changed[0][2], real[2])  # row 2 unscoped: its prompt too
        for step, (before, after) in enumerate(zip(capture.before[1:], capture.after[1:],
                                                   strict=True)):
            assert bool(changed[step + 1][0].all())  # row 0: every layer, generated tokens
            sadness = _projections(after, bank, layer)[1, 0, sad].item()
            if layer == 3:  # row 1's level: layer 3, generated tokens
                assert sadness == pytest.approx(mu[3, sad] + 1.5 * sigma[3, sad], abs=1e-4)
            else:
                assert torch.equal(before[1], after[1])

    fresh = steer(model, bank, [{"joy": 1.0}] * 3, layers=[1, 3])
    with fresh:
        expected = greedy(model, tokenizer, encoded, new_tokens=3)
    s.set_mix([{"joy": 1.0}] * 3)  # from scoped back to plain
    with s:
        assert torch.equal(greedy(model, tokenizer, encoded, new_tokens=3), expected)


def test_auto_layers_steer_the_recipes_bands(calibrated):
    """A recipe on another band than the recommended layers: ``layers="auto"`` steers that
    band too, ``rec`` applies there with its full weight, a plain push stays on the
    recommended layers, and a steerer whose layers lack the band refuses ``rec``."""
    model, tokenizer, bank = calibrated
    recommended = bank.recommended_layers
    banded = bank.replace(metadata={"recommended_layers": recommended, "recommended_weights": {
        "joy": {"weight": 1.5, "layers": [3], "positions": "generated"}}})
    s = steer(model, banded, ["joy=rec,fear=1"])
    assert s.layers == (*recommended, 3) and s.config.band == tuple(recommended)
    encoded = encode(tokenizer, ["a plain prompt without padding"])
    with s:
        out = greedy(model, tokenizer, encoded, new_tokens=4)
    by_hand = steer(model, banded, [{"joy": {"weight": 1.5, "layers": [3],
                                             "positions": "generated"}, "fear": 1.0}],
                    layers=[*recommended, 3], band=recommended)
    with by_hand:
        assert torch.equal(greedy(model, tokenizer, encoded, new_tokens=4), out)
    with pytest.raises(ValueError, match=r"mix\[0\]\['joy'\] steers layers \[3\], which this "
                                         r"steerer does not steer"):
        steer(model, banded, ["joy=rec"], layers=recommended)

"""Readings in calibrated units at chosen monitor layers, ``"rec"`` weights, and the
closed-loop ``target=`` controller, on the tiny models."""

from __future__ import annotations

import pytest
import torch
from helpers import random_bank
from steering_helpers import encode, greedy
from torch.profiler import ProfilerActivity, profile

from emokern.steering import generate, mix_to_weights, parse_mix, steer
from emokern.steering.control import DEFAULT_CONTROL

pytestmark = pytest.mark.usefixtures("one_thread")


def _unit(bank, layer):
    v = bank.layer_vectors(layer).float()
    return v / v.norm(dim=-1, keepdim=True)


@pytest.fixture(scope="module")
def calibrated(tiny_llama):
    """The tiny Llama with a bank whose neutral baseline is mean 0.5, spread 2 everywhere,
    detection layers [3], recommended weights joy 1.5 (reading 2.0), fear 0.5."""
    model, tokenizer = tiny_llama
    bank = random_bank(model, detection_layers=[3], recommended_weights={
        "joy": {"weight": 1.5, "reading": 2.0}, "fear": {"weight": 0.5}})
    shape = (bank.n_layers, bank.n_emotions)
    bank = bank.replace(neutral_mean=torch.full(shape, 0.5), neutral_std=torch.full(shape, 2.0))
    return model, tokenizer, bank


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
    # Layer 2 is read (after steering at 1 has flowed through) by a zero-weight call:
    # recompute it from the hidden states of the same steered forward (not at the last layer,
    # whose hidden_states entry is taken after the final norm).
    with steer(model, bank, mixes, layers=[1], monitor_layers=[2]) as s, \
            torch.inference_mode():
        hidden = model(**encoded, output_hidden_states=True).hidden_states
    p = hidden[3].float() @ _unit(bank, 2).T
    expected = (p * real[..., None]).sum(1) / real.sum(1, keepdim=True)
    torch.testing.assert_close(s.monitor.mean()[:, 0], expected, rtol=1e-4, atol=1e-4)
    # Standard scores against the baseline (mean 0.5, spread 2).
    torch.testing.assert_close(s.monitor.standardized()[:, 0], (expected - 0.5) / 2.0,
                               rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(s.monitor.readings(), (expected - 0.5) / 2.0, rtol=1e-4,
                               atol=1e-4)
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
    for row in rows:
        raw, z = row["projections"], row["readings"]
        for name in raw:  # one baseline everywhere: z is an affine map of the raw reading
            assert z[name] == pytest.approx((raw[name] - 0.5) / 2.0, abs=1e-5)
    uncalibrated = random_bank(model)
    rows = generate(model, tokenizer, uncalibrated, "Hi", [{}], max_new_tokens=2, layers=[1])
    assert rows[0]["readings"] is None and set(rows[0]["projections"]) == {"joy", "sadness",
                                                                            "fear"}


# ------------------------------------------------------------------------------ controller


def test_target_is_validated_before_anything_is_installed(calibrated, tiny_llama):
    model, _, bank = calibrated
    hooks = [len(m._forward_hooks) for m in model.modules()]
    cases = [({"target": [{"anger": 1.0}]}, ValueError, "unknown emotion 'anger'"),
             ({"target": [{"joy": float("nan")}]}, ValueError, "finite"),
             ({"target": [{"joy": 1.0}], "mix": [{}]}, ValueError, "not both"),
             ({"target": [{"joy": 1.0}], "control": {"gain": -1}}, ValueError, "positive"),
             ({"target": [{"joy": 1.0}], "control": {"speed": 1}}, ValueError, "unknown"),
             ({}, TypeError, "needs mix")]
    for kwargs, exc, match in cases:
        with pytest.raises(exc, match=match):
            steer(model, bank, layers=[1], **kwargs)
    with pytest.raises(ValueError, match="no neutral baseline|has none"):
        steer(model, random_bank(model), target=[{"joy": 1.0}], layers=[1])
    assert [len(m._forward_hooks) for m in model.modules()] == hooks


def test_controller_is_bounded_and_monotone_in_the_target(calibrated):
    model, tokenizer, bank = calibrated
    levels = [-1.0, 0.0, 1.0, 3.0, 50.0]
    encoded = encode(tokenizer, ["the cat sat on the mat"] * len(levels))
    s = steer(model, bank, target=[{"joy": t} for t in levels], layers=[1],
              monitor_layers=[1, 3])
    with s:
        greedy(model, tokenizer, encoded, new_tokens=8)
    w = s.controller.weights()
    bound = DEFAULT_CONTROL["max_scale"] * 1.5
    assert bool((w.abs() <= bound + 1e-6).all())
    assert torch.equal(w[:, 1:], torch.zeros(len(levels), 2))  # untargeted emotions stay 0
    joy = w[:, 0].tolist()
    # Same prompt, same readings until the weights differ: a higher target never gets less.
    assert joy == sorted(joy) and joy[-1] == pytest.approx(bound)
    assert s.controller.steps == 7
    mean = s.controller.mean_weights()[:, 0]
    assert mean.tolist() == sorted(mean.tolist())
    # The applied weights the op reads are the controller's, spread over the steered layers.
    torch.testing.assert_close(s._applied[torch.device("cpu")], w)
    with pytest.raises(ValueError, match="set_target"):
        s.set_mix([{}] * len(levels))
    s.set_target([{"joy": 0.0}] * len(levels))


def test_controller_feeds_forward_from_the_recorded_reading(calibrated):
    model, tokenizer, bank = calibrated
    encoded = encode(tokenizer, ["hello"])
    s = steer(model, bank, target=[{"joy": 1.0, "fear": 0.4}], layers=[1],
              control={"gain": 1e-9})  # (almost) no feedback: the start value stays
    with s:
        greedy(model, tokenizer, encoded, new_tokens=2)
    w = s.controller.weights()[0]
    # joy: 1.5 x 1.0 / 2.0 (its recorded reading); fear: 0.5 x 0.4 / 1.0 (none recorded).
    assert float(w[0]) == pytest.approx(0.75, abs=1e-5)
    assert float(w[2]) == pytest.approx(0.2, abs=1e-5)


def _allocated_bytes(fn) -> int:
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return sum(e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0)


def test_controller_decode_step_allocates_nothing(calibrated):
    """The decode step of a closed-loop steerer (pre-hook, layer hooks, the controller's update
    in the post-hook) allocates nothing and never syncs: all in-place on preallocated
    tensors."""
    model, _, bank = calibrated
    s = steer(model, bank, target=[{"joy": 1.0}, {"fear": 2.0}], layers=[1, 2],
              monitor_layers=[2, 3], monitor=False).install()
    try:
        hooks = [s._layer_hook(slot) for slot in range(len(s._slot_layers))]
        hidden = torch.randn(2, 1, model.config.hidden_size)
        mask = torch.ones(2, 12, dtype=torch.long)
        decode = {"input_ids": torch.zeros(2, 1, dtype=torch.long), "attention_mask": mask}
        prompt = {"input_ids": torch.zeros(2, 12, dtype=torch.long), "attention_mask": mask}

        def step(kwargs, h):
            s._before_forward(None, (), kwargs)
            for hook in hooks:
                hook(None, (), h)
            s._after_forward(None, (), None)

        with torch.inference_mode():
            step(prompt, torch.randn(2, 12, model.config.hidden_size))
            before = s.controller.weights()
            step(decode, hidden)  # warm-up
            assert _allocated_bytes(lambda: step(decode, hidden)) == 0
            assert not torch.equal(s.controller.weights(), before)  # it did update
    finally:
        s.remove()


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

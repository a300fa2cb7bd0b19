"""The closed-loop controller (emokern.steering.control): its law checked by hand through the
steerer's public interface only, and, through ``steer(target=...)`` on the tiny Llama, its
validation, bounds, monotonicity, feed-forward start and allocation-free decode step."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers import random_bank
from steering_helpers import encode, greedy
from torch.profiler import ProfilerActivity, profile

from emokern.bank import EmotionBank
from emokern.steering import steer
from emokern.steering.control import DEFAULT_CONTROL, Controller

pytestmark = pytest.mark.usefixtures("one_thread")

CPU = torch.device("cpu")


def _controller_bank():
    """Two layers, three emotions; a neutral baseline that differs per layer and emotion; joy
    recommended at 1.5 with reading 2.0, fear unrecorded (the default weight 0.8)."""
    g = torch.Generator().manual_seed(3)
    mean = torch.tensor([[0.1, -0.4, 0.7], [1.2, 0.3, -0.9]])
    std = torch.tensor([[0.5, 1.0, 2.0], [4.0, 0.25, 1.5]])
    return EmotionBank(torch.randn(2, 3, 8, generator=g), ["joy", "sadness", "fear"], [4, 6],
                       metadata={"default_weight": 0.8, "recommended_weights": {
                           "joy": {"weight": 1.5, "reading": 2.0}}},
                       neutral_mean=mean, neutral_std=std)


def _fake_steerer(bank, names, monitor_layers, batch, scale):
    """Only what the Steerer documents as public: the controller needs nothing else."""
    k = len(names)
    return SimpleNamespace(
        bank=bank, names=tuple(names), monitor_layers=tuple(monitor_layers), devices=(CPU,),
        applied={CPU: torch.full((batch, k), 7.0)}, scale=scale,
        step_projections=tuple(torch.zeros(batch, 1, k) for _ in monitor_layers))


def test_controller_law_by_hand_through_the_public_interface():
    bank = _controller_bank()
    names, layers = ("fear", "joy"), (6, 4)  # columns and layers out of the bank's order
    mu = np.array([[-0.9, 1.2], [0.7, 0.1]])  # [layer 6, layer 4] x [fear, joy]
    sigma = np.array([[1.5, 4.0], [2.0, 0.5]])
    rec, zref = np.array([0.8, 1.5]), np.array([1.0, 2.0])
    gain, smoothing, cap, scale = 0.5, 0.25, 2.0, 0.5
    target = [{"joy": 3.0}, {"fear": -0.5, "joy": 0.2}]
    targets = torch.tensor([[0.0, 3.0], [-0.5, 0.2]])
    mask = np.array([[0.0, 1.0], [1.0, 1.0]])
    t = targets.double().numpy()
    steerer = _fake_steerer(bank, names, layers, 2, scale)
    ctl = Controller(steerer, target, targets, {"gain": gain, "smoothing": smoothing,
                                                "max_scale": cap})
    ctl.allocate(2)

    def reading(projections):
        return np.mean([(p - mu[i]) / sigma[i] for i, p in enumerate(projections)], axis=0)

    g = np.random.default_rng(0)
    prompt = [g.normal(size=(2, 2)) * 3 for _ in layers]
    ctl.start([torch.tensor(p, dtype=torch.float32) for p in prompt])
    ema = reading(prompt)
    w = np.clip(rec * t / zref, -cap * rec, cap * rec) * mask
    np.testing.assert_allclose(ctl.weights().numpy(), w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ctl.reading().numpy(), ema, rtol=1e-5, atol=1e-6)
    # The controller writes the steerer's applied buffer in place: weights x scale.
    np.testing.assert_allclose(steerer.applied[CPU].numpy(), w * scale, rtol=1e-5, atol=1e-6)
    total = w.copy()
    for _ in range(4):
        step_p = [g.normal(size=(2, 2)) * 3 for _ in layers]
        for buffer, p in zip(steerer.step_projections, step_p, strict=True):
            buffer[:, 0] = torch.tensor(p, dtype=torch.float32)
        ctl.update()
        ema = ema + smoothing * (reading(step_p) - ema)
        w = np.clip(w + gain * rec * mask * (t - ema), -cap * rec, cap * rec) * mask
        total += w
        np.testing.assert_allclose(ctl.reading().numpy(), ema, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(ctl.weights().numpy(), w, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(steerer.applied[CPU].numpy(), w * scale, rtol=1e-5,
                                   atol=1e-5)
    assert ctl.steps == 4
    np.testing.assert_allclose(ctl.mean_weights().numpy(), total / 5, rtol=1e-5, atol=1e-5)


def test_controller_checks_its_settings_and_the_steerer():
    bank = _controller_bank()
    targets = torch.tensor([[1.0]])
    steerer = _fake_steerer(bank, ("joy",), (4,), 1, 1.0)
    for control, exc, match in [({"gain": 0}, ValueError, r"control\['gain'\] must be a positive"),
                                ({"smoothing": 1.5}, ValueError, r"in \(0, 1\]"),
                                ({"max_scale": True}, ValueError, "positive number"),
                                ({"speed": 1}, ValueError, "unknown settings"),
                                ([("gain", 1)], TypeError, "control must be a dict")]:
        with pytest.raises(exc, match=match):
            Controller(steerer, [{"joy": 1.0}], targets, control)
    steerer.devices = (CPU, torch.device("meta"))
    with pytest.raises(ValueError, match="on one device"):
        Controller(steerer, [{"joy": 1.0}], targets)
    ctl = Controller(_fake_steerer(bank, ("joy",), (4,), 1, 1.0), [{"joy": 1.0}], targets)
    with pytest.raises(ValueError, match="target has 1 rows but the steerer 2"):
        ctl.allocate(2)
    uncalibrated = bank.select()
    uncalibrated = EmotionBank(uncalibrated.vectors, uncalibrated.names, uncalibrated.layers)
    with pytest.raises(ValueError, match="has none"):
        Controller(_fake_steerer(uncalibrated, ("joy",), (4,), 1, 1.0), [{"joy": 1.0}],
                   targets)


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
    torch.testing.assert_close(s.applied[torch.device("cpu")], w)
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

"""The monitor's readings (:class:`emokern.steering.Monitor`): which tokens it counts, the
running projections against a recomputation from hidden states, the trajectory, summary and
reset."""

from __future__ import annotations

import pytest
import torch
from helpers import NAMES
from steering_helpers import encode, greedy

from emokern.steering import Monitor, steer

pytestmark = pytest.mark.usefixtures("one_thread")


def test_monitor_positions_can_differ_from_steered_positions(llama):
    model, tokenizer, bank = llama
    encoded = encode(tokenizer)
    real = encoded["attention_mask"].bool()
    plain_tokens = greedy(model, tokenizer, encoded, new_tokens=4)
    # Monitor the generated tokens while steering nothing but the prompt...
    with steer(model, bank, [{"joy": 2.0}] * 3, layers=[1], positions="prompt",
               monitor="generated") as s:
        greedy(model, tokenizer, encoded, new_tokens=4)
    assert torch.equal(s.monitor.count(), torch.full((3,), 3))
    # ...and count every real token while steering none: the output stays bit-identical.
    with steer(model, bank, [{}] * 3, layers=[1], positions="generated", monitor="all") as s:
        assert torch.equal(greedy(model, tokenizer, encoded, new_tokens=4), plain_tokens)
    assert torch.equal(s.monitor.count(), real.sum(dim=1) + 3)


def _unit(bank, layer):
    v = bank.layer_vectors(layer).float()
    return v / v.norm(dim=-1, keepdim=True)


def test_running_projections_equal_recomputation_from_hidden_states(family):
    """The op reads the output of decoder layer l *before* steering it. With
    output_hidden_states, hidden_states[l + 1] is that same tensor *after* the in-place steer
    (transformers records the layer's output object), so the op's input is
    hidden_states[l + 1] - delta on the steered rows. (The last layer's entry is replaced by
    the final norm's output, so it cannot be recomputed this way; the test steers inner
    layers.)"""
    model, tokenizer, bank = family
    encoded = encode(tokenizer)
    real = encoded["attention_mask"].bool()
    mixes = [{"joy": 1.0}, {"sadness": 0.5, "fear": -1.0}, {}]
    layers = [1, 2]
    with steer(model, bank, mixes, layers=layers, trajectory=True) as s, torch.inference_mode():
        hidden = model(**encoded, output_hidden_states=True).hidden_states
    weights = s.weights / len(layers)  # spread="divide"
    for slot, layer in enumerate(layers):
        delta = weights @ bank.layer_vectors(layer).float()  # [B, D]
        before = hidden[layer + 1].float() - real[..., None] * delta[:, None, :]
        p = before @ _unit(bank, layer).T  # [B, T, K]
        expected = (p * real[..., None]).sum(dim=1) / real.sum(dim=1, keepdim=True)
        torch.testing.assert_close(s.monitor.mean()[:, slot], expected, rtol=1e-4, atol=1e-4)
        # The newest token's projections: the last column (left padding).
        torch.testing.assert_close(s.monitor.last()[:, slot], p[:, -1], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(s.monitor.trajectory()[0, :, slot], p[:, -1],
                                   rtol=1e-4, atol=1e-4)


def test_trajectory_has_one_step_per_generated_token(llama):
    model, tokenizer, bank = llama
    encoded = encode(tokenizer)
    with steer(model, bank, [{"joy": 1.0}, {}, {"fear": 2.0}], layers=[1, 3],
               trajectory=True) as s:
        greedy(model, tokenizer, encoded, new_tokens=5)
        trajectory = s.monitor.trajectory()
        assert trajectory.shape == (5, 3, 2, 3)
        assert torch.isfinite(trajectory).all()
        # The last step is the newest token the monitor counted.
        torch.testing.assert_close(trajectory[-1], s.monitor.last())
        assert s.monitor.mean().shape == (3, 2, 3)
        # A new prompt forward restarts the statistics.
        greedy(model, tokenizer, encoded, new_tokens=2)
        assert s.monitor.trajectory().shape[0] == 2
    with steer(model, bank, [{}] * 3, layers=[1]) as s:
        with pytest.raises(ValueError, match="trajectory=True"):
            s.monitor.trajectory()


def test_monitor_summary_and_reset(llama):
    model, tokenizer, bank = llama
    encoded = encode(tokenizer)
    with steer(model, bank, [{"joy": 1.0}, {}, {}], layers=[1, 2]) as s:
        greedy(model, tokenizer, encoded, new_tokens=3)
    summary = s.monitor.summary()
    assert len(summary) == 3 and set(summary[0]) == set(NAMES)
    mean = s.monitor.mean().mean(dim=1)
    assert summary[1]["fear"] == pytest.approx(float(mean[1, 2]))
    s.monitor.reset([0])
    assert s.monitor.count()[0] == 0 and s.monitor.count()[1] > 0
    assert torch.isnan(s.monitor.mean()[0]).all()


def test_monitor_reads_the_steerer_through_public_attributes(llama):
    model, tokenizer, bank = llama
    encoded = encode(tokenizer)
    with steer(model, bank, [{"joy": 1.0}, {}, {}], layers=[1, 2], trajectory=True) as s:
        greedy(model, tokenizer, encoded, new_tokens=3)
    assert isinstance(s.monitor, Monitor)
    assert s.monitor.running == s.running and len(s.running) == 2
    assert s.records_trajectory and len(s.trajectory_steps) == 3
    assert torch.equal(s.monitor.trajectory(), torch.stack(s.trajectory_steps))
    s.clear_trajectory()
    assert s.monitor.trajectory().shape == (0, 3, 2, 3)
    assert "Monitor(batch=3" in repr(s.monitor)
    assert steer(model, bank, [{}], layers=[1], monitor=False).monitor is None

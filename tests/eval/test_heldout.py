"""Held-out classification: projection argmax, nearest class mean, the states and the report
on a tiny model."""

import pytest
import torch
from helpers import random_bank

from emokern.eval.heldout import (
    heldout_report,
    heldout_states,
    nearest_mean_accuracy,
    projection_accuracy,
)

SENTENCES = [("joy", "What a lovely sunny day, I could sing!"),
             ("joy", "We won the match and everyone cheered."),
             ("sadness", "I miss her every single morning."),
             ("sadness", "The house feels empty since they left."),
             ("fear", "Something is moving in the dark hallway."),
             ("fear", "My hands shook as the plane dropped."),
             ("anger", "He lied to me again and I am furious.")]


def test_projection_accuracy_on_separable_states():
    gen = torch.Generator().manual_seed(0)
    names = ["joy", "fear", "anger"]
    directions = torch.randn(2, 3, 16, generator=gen)
    labels = [names[i % 3] for i in range(30)]
    y = torch.tensor([i % 3 for i in range(30)])
    # Each state is its class direction (at both layers) plus a little noise and an offset
    # shared by all states, which centring removes.
    states = directions.permute(1, 0, 2)[y] * 3 + 0.1 * torch.randn(30, 2, 16, generator=gen)
    states = states + 50 * torch.randn(1, 2, 16, generator=gen)
    acc = projection_accuracy(states, labels, directions, names)
    assert acc.shape == (2,) and bool((acc == 1).all())
    # Directions orthogonal to the classes classify at about chance, never perfectly.
    shuffled = directions[:, [1, 2, 0]]
    assert float(projection_accuracy(states, labels, shuffled, names).max()) == 0.0
    with pytest.raises(ValueError, match="share no emotion"):
        projection_accuracy(states, ["x"] * 30, directions, names)


def test_nearest_mean_is_leave_one_out():
    # Two points per class, far apart classes: LOO still classifies right.
    states = torch.tensor([[[0.0, 0.0]], [[0.1, 0.0]], [[10.0, 0.0]], [[10.1, 0.0]]])
    assert float(nearest_mean_accuracy(states, ["a", "a", "b", "b"])[0]) == 1.0
    # With one point per class, leaving it out empties its class: it cannot be right.
    states = torch.tensor([[[0.0, 0.0]], [[10.0, 0.0]], [[10.1, 0.0]]])
    acc = float(nearest_mean_accuracy(states, ["a", "b", "b"])[0])
    assert acc == pytest.approx(2 / 3)


def test_heldout_states_skip_the_first_token(small_llama):
    model, tokenizer = small_llama
    states, labels = heldout_states(model, tokenizer, [0, 1], SENTENCES[:3], batch_size=2)
    assert states.shape == (3, 2, 32) and labels == ["joy", "joy", "sadness"]
    for i, (_, text) in enumerate(SENTENCES[:3]):
        ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            out = model(input_ids=ids, output_hidden_states=True)
        expected = torch.stack([out.hidden_states[layer + 1][0, 1:].mean(dim=0)
                                for layer in (0, 1)])
        torch.testing.assert_close(states[i], expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="fewer than 2 tokens"):
        heldout_states(model, tokenizer, [0], [("joy", "Hi")])


def test_heldout_report_on_a_tiny_model(small_llama):
    model, tokenizer = small_llama
    bank = random_bank(model, names=["joy", "sadness", "fear"])
    report = heldout_report(model, tokenizer, bank, sentences=SENTENCES, n_random=3)
    assert report["layers"] == [0, 1, 2] and report["n"] == 6  # anger is not in the bank
    assert report["chance"] == pytest.approx(1 / 3)
    for key in ("bank", "random", "nearest_mean"):
        assert len(report[key]) == 3 and all(0 <= x <= 1 for x in report[key])
    assert report["best_layer"] in bank.layers
    assert report["best_bank"] == max(report["bank"])
    assert report["best_random_any_draw"] >= report["best_random"]
    # The project's held-out set by default: 22 sentences for each of the bank's 3 emotions.
    assert heldout_report(model, tokenizer, bank, n_random=1)["n"] == 66
    with pytest.raises(ValueError, match="at least two of"):
        heldout_report(model, tokenizer, random_bank(model, names=["joy", "trust"]))

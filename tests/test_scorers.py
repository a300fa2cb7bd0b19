"""Scorers (nade classifier, repetition, perplexity) and the calibration helpers."""

import math

import numpy as np
import pytest
import torch

from emokern.eval.calibrate import (
    RowSteering,
    calibrate,
    choose_recommendation,
    format_sweep,
    nearest_mean_accuracy,
    projection_accuracy,
)
from emokern.eval.scorers import BASIC_EMOTIONS, EmotionScorer, distinct_n, perplexity, repetition


@pytest.fixture(scope="module")
def scorer():
    return EmotionScorer()


@pytest.fixture(scope="module")
def tiny():
    from emokern.models import tiny_model

    return tiny_model("llama", num_layers=3, hidden_size=32)


# ---------------------------------------------------------------------------- repetition


def test_repetition_of_fluent_and_looping_text():
    fluent = "I walked to the market this morning and bought fresh bread for breakfast."
    loop = "happy happy happy happy happy happy happy happy happy happy"
    assert repetition(fluent) == 0.0
    assert repetition(loop) > 0.8
    # A sentence repeated twice repeats about half of its 3-grams.
    twice = fluent + " " + fluent
    assert 0.4 < repetition(twice) < 0.6


def test_distinct_n_edge_cases():
    assert distinct_n("", 2) == 1.0
    assert distinct_n("one", 2) == 1.0
    assert distinct_n("a b a b", 2) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="n must be"):
        distinct_n("text", 0)


# ---------------------------------------------------------------------------- emotion scorer


def test_emotion_scorer_shape_range_and_sense(scorer):
    texts = [
        "What a wonderful day, I am so happy and full of joy!",
        "I am terrified, something is lurking in the dark and I am scared.",
        "My dog died and I cried all night, I miss him so much.",
    ]
    s = scorer.score(texts)
    assert s.shape == (3, 6) and s.dtype == np.float32
    assert ((s >= 0) & (s <= 1)).all()
    col = {e: scorer.column(e) for e in BASIC_EMOTIONS}
    assert s[0].argmax() == col["joy"]
    assert s[1, col["fear"]] > s[0, col["fear"]]
    assert s[2, col["sadness"]] > s[0, col["sadness"]]
    p = scorer.probabilities(texts)
    np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-5)
    assert scorer.score([]).shape == (0, 6)


def test_emotion_scorer_bad_input(scorer):
    with pytest.raises(TypeError, match="not a single str"):
        scorer.score("one text")
    with pytest.raises(TypeError, match=r"texts\[1\]"):
        scorer.score(["ok", 3])
    with pytest.raises(ValueError, match="nade's labels"):
        EmotionScorer(emotions=("joy", "boredom"))
    with pytest.raises(ValueError, match="emotion must be one of"):
        scorer.column("trust")


def test_newlines_do_not_split_a_text(scorer):
    a = scorer.score(["I am happy.\nSo happy today."])
    b = scorer.score(["I am happy. So happy today."])
    np.testing.assert_allclose(a, b)


# ---------------------------------------------------------------------------- perplexity


def test_perplexity_matches_a_manual_computation(tiny):
    model, tokenizer = tiny
    texts = ["The cat sat on the mat.", "Hello", "A much longer sentence about the weather."]
    got = perplexity(model, tokenizer, texts, batch_size=2)
    for text, value in zip(texts, got, strict=True):
        ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
        if ids.shape[1] < 2:
            assert math.isnan(value)
            continue
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, :-1]
        nll = torch.nn.functional.cross_entropy(logits, ids[0, 1:])
        assert value == pytest.approx(math.exp(float(nll)), rel=1e-4)


# ---------------------------------------------------------------------------- classification


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


# ---------------------------------------------------------------------------- steering sweep


def _tiny_bank(model, names=("joy", "fear", "sadness"), scale=1.0):
    from emokern.bank import EmotionBank
    from emokern.models import model_fingerprint

    d = model.config.hidden_size
    n = model.config.num_hidden_layers
    gen = torch.Generator().manual_seed(1)
    return EmotionBank(scale * torch.randn(n, len(names), d, generator=gen), list(names),
                       list(range(n)), hidden_norm=torch.ones(n),
                       metadata={"method": "ev", "fingerprint": model_fingerprint(model)})


def test_row_steering_adds_each_rows_mix(tiny):
    model, tokenizer = tiny
    from emokern.models import decoder_layers

    bank = _tiny_bank(model)
    ids = torch.tensor([tokenizer("Hello there friend")["input_ids"]] * 2)
    seen = {}
    hook = decoder_layers(model)[2].register_forward_pre_hook(
        lambda mod, args: seen.__setitem__("x", args[0].clone()))
    try:
        with torch.no_grad():
            model(input_ids=ids)
            plain = seen["x"].clone()
            with RowSteering(model, bank, [1]) as steering:
                steering.set_rows([{1: {"joy": 2.0}}, {}])
                model(input_ids=ids)
    finally:
        hook.remove()
    steered = seen["x"]
    expected = plain[0] + 2.0 * bank.vector("joy", 1)
    torch.testing.assert_close(steered[0], expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(steered[1], plain[1])


def test_calibrate_rows_and_recommendation(tiny, scorer):
    model, tokenizer = tiny
    bank = _tiny_bank(model)
    rows = calibrate(model, tokenizer, bank, layers=[1, (0, 1)], alphas=[0.5, 2.0],
                     prompts=["Tell me about your day.", "How are you?"],
                     emotions=["joy", "fear"], max_new_tokens=6, scorer=scorer,
                     progress=False)
    assert len(rows) == 1 + 2 * 2 * 2
    base = rows[0]
    assert base["emotion"] == "none" and set(base["scores"]) == {"joy", "fear"}
    for r in rows[1:]:
        assert 0 <= r["score"] <= 1 and 0 <= r["hit_rate"] <= 1 and 0 <= r["repetition"] <= 1
        assert r["layer"] in ("1", "0-1")
        assert math.isfinite(r["perplexity"]) or math.isnan(r["perplexity"])
    table = format_sweep(rows)
    assert table.count("\n") == 1 + 1 + 4
    with pytest.raises(ValueError, match="not in the bank"):
        calibrate(model, tokenizer, bank, layers=[7], alphas=[1.0], scorer=scorer)
    with pytest.raises(ValueError, match="alphas must be positive"):
        calibrate(model, tokenizer, bank, layers=[1], alphas=[0.0], scorer=scorer)
    with pytest.raises(ValueError, match="not in the bank"):
        calibrate(model, tokenizer, bank, layers=[1], alphas=[1.0], emotions=["anger"],
                  scorer=scorer)


def test_choose_recommendation_prefers_fluent_gain():
    def row(layer, alpha, emotion, gain, rep, ppl=10.0):
        return {"layer": str(layer), "layers": [layer], "alpha": alpha, "emotion": emotion,
                "score": 0.2 + gain, "gain": gain, "hit_rate": gain, "repetition": rep,
                "perplexity": ppl}

    base = {"layer": "-", "layers": [], "alpha": 0.0, "emotion": "none", "scores": {},
            "repetition": 0.0, "perplexity": 10.0}
    rows = [base,
            row(5, 2.0, "joy", 0.10, 0.05), row(5, 2.0, "fear", 0.10, 0.05),
            row(5, 8.0, "joy", 0.50, 0.60), row(5, 8.0, "fear", 0.50, 0.60),  # loops
            row(9, 4.0, "joy", 0.30, 0.10), row(9, 4.0, "fear", 0.20, 0.10),
            row(9, 6.0, "joy", 0.40, 0.10, ppl=80.0), row(9, 6.0, "fear", 0.40, 0.1)]
    best = choose_recommendation(rows)
    assert best["layers"] == [9] and best["alpha"] == 4.0
    assert best["gain"] == pytest.approx(0.25)
    assert choose_recommendation(rows, max_repetition=0.01) == {}

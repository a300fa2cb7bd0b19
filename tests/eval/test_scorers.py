"""Scorers: the nade classifier, repetition, distinct n-grams, perplexity."""

import math

import numpy as np
import pytest
import torch

from emokern.eval.scorers import BASIC_EMOTIONS, EmotionScorer, distinct_n, perplexity, repetition

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


def test_perplexity_matches_a_manual_computation(small_llama):
    model, tokenizer = small_llama
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


def test_perplexity_does_not_depend_on_the_batch(small_gpt2):
    model, tokenizer = small_gpt2
    texts = ["A short one.", "", "A somewhat longer text about rivers, hills and the sea.", "x"]
    together = perplexity(model, tokenizer, texts, batch_size=4)
    alone = [perplexity(model, tokenizer, [t])[0] for t in texts]
    np.testing.assert_allclose(together, alone, rtol=1e-4)
    assert math.isnan(together[1]) and math.isnan(together[3])  # fewer than two tokens
    assert all(v >= 1.0 for v in (together[0], together[2]))  # p <= 1: ppl >= 1
    assert all(math.isnan(v) for v in perplexity(model, tokenizer, ["", ""]))
    assert perplexity(model, tokenizer, []) == []


def test_judge_is_score_and_probabilities_in_one_pass(scorer):
    texts = ["I am so happy today!", "This is awful and I am furious."]
    s, p = scorer.judge(texts)
    np.testing.assert_array_equal(s, scorer.score(texts))
    np.testing.assert_allclose(p, scorer.probabilities(texts))
    np.testing.assert_allclose(p, s / s.sum(axis=1, keepdims=True), rtol=1e-5)


def test_degeneration():
    from emokern.eval.scorers import degeneration

    d2, rep3 = degeneration(["a fresh new sentence here", "go go go go go go"])
    assert d2[0] == 1.0 and rep3[0] == 0.0
    assert d2[1] < 0.3 and rep3[1] > 0.7

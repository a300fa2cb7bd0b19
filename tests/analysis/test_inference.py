"""The vignette task: the data, option tokens, calibration, evaluation with and without an
ablation, random layer-matched sets, the ablation study's bookkeeping."""

from __future__ import annotations

import re

import numpy as np
import pytest

import emokern
from emokern.analysis.inference import (
    ablation_study,
    calibrated,
    evaluate,
    load_vignettes,
    option_scores,
    option_token_ids,
    random_matched_set,
)
from emokern.emotions import BASIC_EMOTIONS

pytestmark = pytest.mark.usefixtures("one_thread")


def test_vignettes_cover_every_basic_emotion_without_naming_it():
    options, items = load_vignettes()
    assert sorted(options) == sorted(BASIC_EMOTIONS)
    for emotion in options:
        texts = [t for t, e in items if e == emotion]
        assert len(texts) >= 30 and len(set(texts)) == len(texts)
    named = re.compile(r"\b(joy|sad|sadness|anger|angry|fear|afraid|scared|disgust\w*|"
                       r"surpris\w*|happy|happiness)\b", re.I)
    assert [t for t, _ in items if named.search(t)] == []


def test_option_tokens_are_distinct(small_llama):
    _, tokenizer = small_llama
    options, _ = load_vignettes()
    assert len(set(option_token_ids(tokenizer, options))) == 6
    with pytest.raises(ValueError, match="distinct tokens"):
        option_token_ids(tokenizer, ["joy", "joy"])


def test_calibration_removes_each_options_mean():
    scores = np.array([[0.0, -5.0], [-1.0, -5.5], [-3.0, -5.2]])
    c = calibrated(scores)
    assert np.allclose(c.mean(axis=0), 0)
    assert scores.argmax(1).tolist() == [0, 0, 0] and c.argmax(1).tolist() == [0, 0, 1]


def test_evaluate_and_ablation_change_scores_consistently(small_llama):
    model, tokenizer = small_llama
    options, items = load_vignettes()
    base = evaluate(model, tokenizer)
    assert base["n_items"] == len(items) >= 180
    assert sum(base["raw"]["predicted_counts"]) == len(items)
    texts = [t for t, _ in items[:4]]
    before = option_scores(model, tokenizer, texts, options)
    with emokern.ablate(model, neurons={0: list(range(64))}):
        ablated = option_scores(model, tokenizer, texts, options)
    assert not np.allclose(before, ablated)
    with emokern.ablate(model, neurons={0: []}):
        assert np.array_equal(option_scores(model, tokenizer, texts, options), before)


def test_random_matched_sets_keep_the_layer_counts_and_avoid_the_set():
    rng = np.random.default_rng(0)
    top = {0: [1, 2, 3], 4: [10]}
    for _ in range(20):
        r = random_matched_set(top, [8, 8, 8, 8, 16], rng)
        assert {k: len(v) for k, v in r.items()} == {0: 3, 4: 1}
        assert not set(r[0]) & {1, 2, 3} and r[4] != [10]


def test_ablation_study_bookkeeping(small_llama):
    model, tokenizer = small_llama
    neurons = {"per_attribute": {
        "valence": {"top": [[0, 1, 0.5, 0.01, 0.02], [2, 5, 0.4, 0.01, 0.02]]},
        "arousal": {"top": [[1, 3, 0.5, 0.01, 0.02], [1, 4, 0.4, 0.01, 0.02]]}}}
    partial = []
    res = ablation_study(model, tokenizer, neurons, ks=[2, 1], draws=2, progress=False,
                         on_condition=partial.append)
    assert res["complete"] and [c["attribute"] for c in res["conditions"]] == \
        ["valence", "arousal", "valence", "arousal"]
    assert res["conditions"][0]["per_layer"] == {"0": 1, "2": 1}
    assert all(len(c["random"]) == 2 for c in res["conditions"])
    assert len(partial) == 3 and not partial[0]["complete"]
    with pytest.raises(ValueError, match="ks must be between 1 and"):
        ablation_study(model, tokenizer, neurons, ks=[3], progress=False)
    with pytest.raises(ValueError, match="lacks"):
        ablation_study(model, tokenizer, neurons, attributes=["dominance"], progress=False)
    with pytest.raises(ValueError, match="draws must be a positive int"):
        ablation_study(model, tokenizer, neurons, ks=[1], draws=0, progress=False)

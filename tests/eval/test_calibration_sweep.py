"""The steering sweep on a tiny model: per-row steering, the rows and table, the choice of a
recommendation and how it is stored."""

import json
import math

import pytest
import torch
from helpers import random_bank

from emokern.bank import EmotionBank
from emokern.data import load_calibration
from emokern.eval.calibration_sweep import (
    RowSteering,
    calibrate,
    calibration_record,
    choose_recommendation,
    format_sweep,
    generate_steered,
    parse_layers,
    store_recommendation,
)
from emokern.models import decoder_layers

NAMES = ["joy", "fear", "sadness"]


def _bank(model, **metadata):
    bank = random_bank(model, seed=1, names=NAMES, method="ev", **metadata)
    return EmotionBank(bank.vectors, bank.names, bank.layers,
                       hidden_norm=torch.ones(len(bank.layers)), metadata=bank.metadata)


def test_row_steering_adds_each_rows_mix(small_llama):
    model, tokenizer = small_llama
    bank = _bank(model)
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


def test_calibrate_rows_and_recommendation(small_llama, scorer):
    model, tokenizer = small_llama
    bank = _bank(model)
    rows = calibrate(model, tokenizer, bank, layers=[1, (0, 1)], weights=[0.5, 2.0],
                     prompts=["Tell me about your day.", "How are you?"],
                     emotions=["joy", "fear"], max_new_tokens=6, scorer=scorer,
                     progress=False)
    assert len(rows) == 1 + 2 * 2 * 2
    base = rows[0]
    assert base["emotion"] == "none" and set(base["scores"]) == {"joy", "fear"}
    # Every answer has 6 tokens to score: a perplexity is a finite number >= 1 (p <= 1).
    assert math.isfinite(base["perplexity"]) and base["perplexity"] >= 1.0
    for r in rows[1:]:
        assert 0 <= r["score"] <= 1 and 0 <= r["hit_rate"] <= 1 and 0 <= r["repetition"] <= 1
        assert r["layer"] in ("1", "0-1")
        assert math.isfinite(r["perplexity"]) and r["perplexity"] >= 1.0
    table = format_sweep(rows)
    assert table.count("\n") == 1 + 1 + 4
    with pytest.raises(ValueError, match="not in the bank"):
        calibrate(model, tokenizer, bank, layers=[7], weights=[1.0], scorer=scorer)
    with pytest.raises(ValueError, match="weights must be positive"):
        calibrate(model, tokenizer, bank, layers=[1], weights=[0.0], scorer=scorer)
    with pytest.raises(ValueError, match="not in the bank"):
        calibrate(model, tokenizer, bank, layers=[1], weights=[1.0], emotions=["anger"],
                  scorer=scorer)


def test_calibrate_bad_layers_and_prompts(small_llama, scorer):
    model, tokenizer = small_llama
    bank = _bank(model)
    with pytest.raises(TypeError, match="ints or tuples of ints"):
        calibrate(model, tokenizer, bank, layers=[(1, "2")], weights=[1.0], scorer=scorer)
    with pytest.raises(ValueError, match="layers must not be empty"):
        calibrate(model, tokenizer, bank, layers=[], weights=[1.0], scorer=scorer)
    with pytest.raises(ValueError, match="prompts must be a non-empty list"):
        calibrate(model, tokenizer, bank, layers=[1], weights=[1.0], prompts=[" "],
                  scorer=scorer)
    with pytest.raises(ValueError, match="one entry per prompt"):
        generate_steered(model, tokenizer, bank, ["Hi"], [{}, {}])


def test_generate_steered_unsteered_rows_are_plain_generation(small_llama):
    model, tokenizer = small_llama
    bank = _bank(model, scale=50.0)
    texts = generate_steered(model, tokenizer, bank, ["Hi there", "Hi there"],
                             [{}, {1: {"joy": 50.0}}], max_new_tokens=5, progress=False)
    plain = generate_steered(model, tokenizer, bank, ["Hi there"], [{}], max_new_tokens=5,
                             progress=False)
    assert texts[0] == plain[0] and texts[1] != plain[0]


def _row(layer, weight, emotion, gain, rep, ppl=10.0):
    return {"layer": str(layer), "layers": [layer], "weight": weight, "emotion": emotion,
            "score": 0.2 + gain, "gain": gain, "hit_rate": gain, "repetition": rep,
            "perplexity": ppl}


def test_choose_recommendation_prefers_fluent_gain():
    base = {"layer": "-", "layers": [], "weight": 0.0, "emotion": "none", "scores": {},
            "repetition": 0.0, "perplexity": 10.0}
    rows = [base,
            _row(5, 2.0, "joy", 0.10, 0.05), _row(5, 2.0, "fear", 0.10, 0.05),
            _row(5, 8.0, "joy", 0.50, 0.60), _row(5, 8.0, "fear", 0.50, 0.60),  # loops
            _row(9, 4.0, "joy", 0.30, 0.10), _row(9, 4.0, "fear", 0.20, 0.10),
            _row(9, 6.0, "joy", 0.40, 0.10, ppl=80.0), _row(9, 6.0, "fear", 0.40, 0.1)]
    best = choose_recommendation(rows)
    assert best["layers"] == [9] and best["weight"] == 4.0
    assert best["gain"] == pytest.approx(0.25)
    assert choose_recommendation(rows, max_repetition=0.01) == {}


def test_choose_recommendation_breaks_ties_towards_the_smaller_weight():
    rows = [_row(5, 4.0, "joy", 0.305, 0.0), _row(5, 2.0, "joy", 0.30, 0.0)]
    assert choose_recommendation(rows)["weight"] == 2.0


def test_parse_layers():
    assert parse_layers("6,9,12") == [6, 9, 12]
    assert parse_layers("6,8-10") == [6, (8, 9, 10)]


def test_recommendation_is_stored_in_the_record_and_the_bank(small_llama, tmp_path):
    model, _ = small_llama
    bank = _bank(model, centered=True)
    best = {"layers": [1], "weight": 4.0, "gain": 0.21234, "hit_rate": 0.5, "repetition": 0.01,
            "perplexity": 12.0}
    rows = [{"emotion": "none"}] * 5
    record = calibration_record(bank, best, rows)
    ratio = float(bank.vectors[1].norm(dim=-1).mean())  # hidden norm 1
    assert record["default_weight"] == 4.0 and record["recommended_layers"] == [1]
    assert record["relative_depth"] == 0.5  # layer 1 of 0..2
    assert record["relative_strength"] == pytest.approx(round(4.0 * ratio, 4))
    assert record["centered"] is True and record["fingerprint"] == bank.fingerprint
    assert record["gain"] == 0.2123 and record["n_rows"] == 5
    json.dumps(record, allow_nan=False)

    calibration = tmp_path / "calibration.json"
    calibration.write_text(json.dumps({"concept": {"recommended_alpha": 1.5}}))
    path = tmp_path / "bank.safetensors"
    store_recommendation("ev", path, bank, best, rows, calibration_path=calibration)
    # The other method's record keeps its old key in the file and reads as default_weight.
    assert load_calibration(calibration) == {"concept": {"default_weight": 1.5},
                                             "ev": record}
    saved = EmotionBank.load(path)
    assert saved.default_weight == 4.0 and saved.recommended_layers == [1]
    assert saved.metadata["recommendation"] == "calibrated"
    torch.testing.assert_close(saved.vectors, bank.vectors.half().float())

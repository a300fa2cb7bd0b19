"""Per-emotion recommended weights: the choice rule, storing it in a bank, the sweep on a tiny
model."""

import re

import pytest
import torch
from helpers import random_bank

from emokern.eval.evaluation import load_prompts
from emokern.eval.recommend import SWEEP_PROMPTS, choose, store, sweep


def _agg(emotion, label, weight, gain, distinct2=0.9, perplexity=10.0, adherence=0.6):
    return {"emotion": emotion, "label": label, "weight": weight, "gain": gain, "eps": gain,
            "distinct2": distinct2, "perplexity": perplexity, "adherence": adherence}


def test_choose_takes_the_largest_fluent_gain_per_emotion():
    aggregates = [
        _agg("anger", "0", 0.0, 0.0, perplexity=6.0),
        _agg("anger", "2", 2.0, 0.05), _agg("anger", "4", 4.0, 0.23),
        _agg("anger", "6", 6.0, 0.40, distinct2=0.5),           # loops: not fluent
        _agg("anger", "8", 8.0, 0.45, perplexity=30.0),         # > 3x unsteered perplexity
        _agg("joy", "0", 0.0, 0.0, perplexity=6.0),
        _agg("joy", "1", 1.0, 0.10), _agg("joy", "2", 2.0, 0.105),  # tie: the smaller weight
        _agg("fear", "0", 0.0, 0.0, perplexity=6.0),
        _agg("fear", "1", 1.0, 0.10, distinct2=0.2), _agg("fear", "-1", -1.0, 0.0),
    ]
    choice = choose(aggregates)
    assert choice["anger"]["weight"] == 4.0 and choice["anger"]["fluent"]
    assert choice["anger"]["mode"] == "push"
    assert choice["joy"]["weight"] == 1.0
    assert choice["fear"] == {"mode": "push", "weight": 1.0, "gain": 0.1, "eps": 0.1,
                              "distinct2": 0.2, "perplexity": 10.0, "adherence_ratio": 1.0,
                              "fluent": False}


def test_choose_keeps_the_answer_on_topic_and_weighs_levels_against_pushes():
    aggregates = [
        _agg("anger", "0", 0.0, 0.0, adherence=0.6),
        _agg("anger", "4", 4.0, 0.20, adherence=0.06),          # moves by leaving the question
        _agg("anger", "2", 2.0, 0.03, adherence=0.58),
        _agg("anger", "@8", float("nan"), 0.12, adherence=0.55),
        _agg("anger", "@16", float("nan"), 0.30, adherence=0.40),  # below 0.8 x 0.6
        _agg("sadness", "0", 0.0, 0.0, adherence=0.6),
        _agg("sadness", "1", 1.0, 0.15, adherence=0.59),
        _agg("sadness", "@8", float("nan"), 0.155, adherence=0.59),  # tie: the push stays
    ]
    choice = choose(aggregates)
    assert choice["anger"]["mode"] == "level" and choice["anger"]["level"] == 8.0
    assert choice["anger"]["adherence_ratio"] == pytest.approx(0.55 / 0.6, abs=1e-4)
    assert choice["sadness"]["mode"] == "push" and choice["sadness"]["weight"] == 1.0


def test_a_scoped_edit_can_be_the_recipe_and_brings_its_scope(tiny_llama):
    """The sweep's scoped terms (``[generated]=2``: the push on generated tokens only) compete
    with the plain ones; the chosen scope goes into the recipe, the bank and ``rec``."""
    aggregates = [
        _agg("joy", "0", 0.0, 0.0, adherence=0.6),
        _agg("joy", "4", 4.0, 0.20, adherence=0.10),                 # leaves the question
        _agg("joy", "[generated]=4", 4.0, 0.15, adherence=0.55),     # keeps it
        _agg("joy", "[generated]@8", float("nan"), 0.10, adherence=0.58),
        _agg("fear", "0", 0.0, 0.0, adherence=0.6),
        _agg("fear", "[1-2;generated]@8", float("nan"), 0.2, adherence=0.6),
    ]
    choice = choose(aggregates)
    assert choice["joy"]["mode"] == "push" and choice["joy"]["weight"] == 4.0
    assert choice["joy"]["positions"] == "generated" and "layers" not in choice["joy"]
    assert choice["fear"]["level"] == 8.0 and choice["fear"]["layers"] == [1, 2]
    model, _ = tiny_llama
    bank = store(random_bank(model, recommended_layers=[1]), choice)
    assert bank.recommended("joy").layers == (1,)
    assert bank.recommended("joy").mix_term() == {"weight": 4.0, "positions": "generated"}
    assert bank.recommended("fear").mix_term() == {"level": 8.0, "layers": [1, 2],
                                                   "positions": "generated"}
    assert bank.recipe_layers() == [2]


def test_a_stored_level_recipe_is_what_bank_recommended_returns(tiny_llama):
    model, _ = tiny_llama
    bank = random_bank(model)
    stored = store(bank, {"fear": {"mode": "level", "level": 8.0, "gain": 0.1}})
    recipe = stored.recommended("fear")
    assert (recipe.mode, recipe.strength, recipe.layers) == ("level", 8.0, (1, 2))
    assert recipe.mix_term() == {"level": 8.0} and recipe.measured == {"gain": 0.1}
    assert stored.recommended_weight("fear") == bank.default_weight
    assert stored.recommended("joy").mode == "push"


def test_store_keeps_the_vectors_and_records_the_band(tiny_llama, tmp_path):
    model, _ = tiny_llama
    bank = random_bank(model)
    stored = store(bank, {"joy": {"weight": 3.0, "gain": 0.2, "perplexity": float("nan")}},
                   prompts=24, reading={"joy": 1.234567})
    assert torch.equal(stored.vectors, bank.vectors)
    assert stored.recommended_weight("joy") == 3.0
    assert stored.recommended_weight("fear") == bank.default_weight
    record = stored.recommended_weights["joy"]
    assert record == {"weight": 3.0, "gain": 0.2, "layers": [1, 2], "prompts": 24,
                      "reading": 1.235}
    path = stored.save(tmp_path / "b.safetensors", dtype=torch.float16)
    assert type(stored).load(path).recommended_weights == stored.recommended_weights


def test_sweep_prompts_are_not_evaluation_prompts():
    assert len(SWEEP_PROMPTS) == 24
    assert not set(SWEEP_PROMPTS) & set(load_prompts())


def test_sweep_scopes_every_push_and_level(monkeypatch, tiny_llama):
    """``scopes`` adds each push weight and level again under each scope, as grid labels."""
    import emokern.eval.recommend as recommend
    asked = {}
    monkeypatch.setattr(recommend, "evaluate",
                        lambda *args, weights, **options: asked.setdefault("w", weights))
    model, _ = tiny_llama
    bank = random_bank(model)
    recommend.sweep(model, None, bank, weights=[1, 2], levels=[8], scopes=["generated", "[2]"])
    assert asked["w"] == [0.0, 1.0, 2.0, "@8", "[generated]=1", "[generated]=2",
                          "[generated]@8", "[2]=1", "[2]=2", "[2]@8"]


def test_sweep_runs_the_grid(tiny_llama, scorer, one_thread):
    model, tokenizer = tiny_llama
    bank = random_bank(model, scale=0.5)
    result = sweep(model, tokenizer, bank, emotions=["joy"], weights=[1.0, 2.0],
                   prompts=SWEEP_PROMPTS[:2], max_new_tokens=3, progress=False, scorer=scorer)
    labels = sorted(a["label"] for a in result["aggregates"])
    assert labels == ["0", "1", "2"]
    assert set(choose(result["aggregates"])) == {"joy"}
    with pytest.raises(ValueError, match="unknown emotion"):
        sweep(model, tokenizer, bank, emotions=["anger"], progress=False)


def test_recipe_study_chooses_on_some_prompts_and_judges_on_others(tiny_llama, scorer,
                                                                   one_thread):
    """On a calibrated bank the sweep weighs levels against pushes; the held-out grid runs the
    chosen recipe (``rec``) beside the bank's old recipe, scope and all, on other prompts."""
    from emokern.eval.recommend import format_study, recipe_study

    model, tokenizer = tiny_llama
    bank = random_bank(model, scale=0.5)
    n_layers, k = bank.n_layers, bank.n_emotions
    bank = bank.replace(neutral_mean=torch.zeros(n_layers, k), neutral_std=torch.ones(n_layers, k),
                        metadata={"recommended_weights": {"joy": {
                            "mode": "level", "level": 3.0, "positions": "generated"}}})
    study = recipe_study(model, tokenizer, bank, sweep_prompts=SWEEP_PROMPTS[:2],
                         eval_prompts=load_prompts()[:2], emotions=["joy"], weights=[1.0],
                         levels=[2.0], max_new_tokens=3, progress=False, scorer=scorer)
    labels = sorted(a["label"] for a in study["sweep"]["aggregates"])
    assert labels == ["0", "1", "@2"]
    (row,) = study["rows"]
    assert row["recipe"]["mode"] in ("push", "level") and row["recipe_heldout"] is not None
    assert study["bank"].recommended("joy").mode == row["recipe"]["mode"]
    held = {r["prompt"] for r in study["heldout"]["rows"]}
    assert held == set(load_prompts()[:2]) and not held & set(SWEEP_PROMPTS[:2])
    assert row["old"]["term"] == "[generated]@3" and row["old_heldout"] is not None
    assert {a["label"] for a in study["heldout"]["aggregates"]} == {"0", "rec", "[generated]@3"}
    assert "| joy |" in format_study(study) and "| [generated]@3 |" in format_study(study)
    assert len(row["recipe_heldout"]["gain_ci"]) == 2
    assert re.search(r"\| [+-]\d\.\d\d \([+-]\d\.\d\d…[+-]\d\.\d\d\) \|", format_study(study))


def test_a_model_that_repeats_itself_is_held_to_its_own_distinct2():
    """A base model decoding greedily repeats itself (unsteered distinct-2 0.5): an edit is
    fluent at 0.9 of that, not at the 0.7 no answer of that model reaches."""
    aggregates = [_agg("joy", "0", 0.0, 0.0, distinct2=0.5),
                  _agg("joy", "9", 9.0, 0.10, distinct2=0.48),
                  _agg("joy", "18", 18.0, 0.30, distinct2=0.30)]
    choice = choose(aggregates)
    assert choice["joy"]["weight"] == 9.0 and choice["joy"]["fluent"]
    assert not choose([dict(a, distinct2=0.6) if a["label"] == "9" else dict(a, distinct2=0.95)
                       for a in aggregates[:2]])["joy"]["fluent"]   # 0.6 < 0.7 ≤ 0.9 × 0.95


def test_a_recipe_keeps_the_reading_measured_at_it_where_there_is_one(tiny_llama):
    """The chosen edit's mean calibrated reading goes with its recipe (into the bank, where the
    server's default level limit reads it); an engine that reads none (vLLM) leaves it out."""
    aggregates = [_agg("joy", "0", 0.0, 0.0), dict(_agg("joy", "1", 1.0, 0.2), reading=4.38612),
                  _agg("fear", "0", 0.0, 0.0), dict(_agg("fear", "2", 2.0, 0.1), reading=None),
                  _agg("anger", "0", 0.0, 0.0),
                  dict(_agg("anger", "2", 2.0, 0.1), reading=float("nan"))]
    choice = choose(aggregates)
    assert choice["joy"]["reading"] == 4.386
    assert "reading" not in choice["fear"] and "reading" not in choice["anger"]
    bank = random_bank(tiny_llama[0], names=["joy", "fear", "anger"])
    assert store(bank, choice).recommended("joy").measured["reading"] == 4.386


def test_held_out_intervals_resample_prompts_with_their_unsteered_answer():
    """The gain's interval pairs each edited answer with the same prompt's unsteered one: a
    gain of exactly 0.1 on every prompt has the interval [0.1, 0.1] however much the prompts
    differ; an uneven gain gets an interval around its mean; too few prompts, none."""
    from emokern.eval.recommend import paired_intervals

    def row(prompt, emotion, label, p, adherence):
        return {"prompt": prompt, "emotion": emotion, "label": label,
                "judge_p": {"joy": p}, "adherence": adherence}

    base = [row(f"q{i}", None, "0", 0.1 * i, 0.5 + 0.05 * i) for i in range(8)]
    even = [row(f"q{i}", "joy", "2", 0.1 * i + 0.1, 0.5 * (0.5 + 0.05 * i)) for i in range(8)]
    got = paired_intervals(base + even, "joy", "2")
    assert got["gain_ci"] == pytest.approx([0.1, 0.1]) and \
        got["adherence_ratio_ci"] == pytest.approx([0.5, 0.5])
    uneven = [row(f"q{i}", "joy", "2", 0.1 * i + (0.3 if i % 2 else -0.1), 0.6)
              for i in range(8)]
    low, high = paired_intervals(base + uneven, "joy", "2")["gain_ci"]
    assert low < 0.1 < high and low >= -0.1 and high <= 0.3
    assert paired_intervals(base + uneven[:1], "joy", "2") == {}
    assert paired_intervals(base + even, "joy", "rec") == {}

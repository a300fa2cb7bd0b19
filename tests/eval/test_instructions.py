"""Method EV's measures on a tiny model: the instruction sweep and the extraction report."""

import pytest

from emokern.eval.instructions import ev_report, format_ev_report, instruction_sweep

QUERIES = ["How was your weekend?", "What do you think about rainy days?"]


def test_instruction_sweep_rows(small_llama, scorer):
    model, tokenizer = small_llama
    rows = instruction_sweep(model, tokenizer, phrasings=["user_prefix", "system_feeling"],
                             queries=QUERIES, emotions=("joy", "fear"), max_new_tokens=4,
                             scorer=scorer, progress=False)
    assert [r["phrasing"] for r in rows] == ["user_prefix", "system_feeling"]
    for r in rows:
        assert set(r["per_emotion"]) == {"joy", "fear"}
        for e in r["per_emotion"].values():
            assert 0 <= e["score"] <= 1 and -1 <= e["gain"] <= 1 and 0 <= e["hit_rate"] <= 1
        assert r["gain"] == pytest.approx(sum(e["gain"] for e in r["per_emotion"].values()) / 2)
        assert 0 <= r["repetition"] <= 1
        assert set(r["example"]) == {"neutral", "joy", "fear"}
    with pytest.raises(ValueError, match="emotion must be one of"):
        instruction_sweep(model, tokenizer, queries=QUERIES, emotions=("trust",), scorer=scorer)


def test_ev_report_and_its_markdown(small_llama):
    model, tokenizer = small_llama
    report, raw, centred = ev_report(model, tokenizer, queries=QUERIES, emotions=("joy", "fear"),
                                     progress=False, max_new_tokens=3)
    assert raw.metadata["centered"] is False and centred.metadata["centered"] is True
    assert report["layers"] == [0, 1, 2] and len(report["norm_ratio_raw"]) == 3
    assert report["task"] == "Method EV, 2 emotions x 2 queries, 3 layers"
    assert report["settings"]["num_queries"] == 2
    assert report["cosines_raw"]["max"] <= 1.0
    assert len(report["cosines_centred"]["middle_layer_matrix"]) == 2
    for kind in ("raw", "centred"):
        assert report["heldout"][kind]["n"] == 44 and report["heldout"][kind]["chance"] == 0.5
    text = format_ev_report(report)
    assert text.startswith("# Method EV extraction on the default model\n")
    assert text.count("\n| 1 | ") == 1 and text.endswith(".\n")

"""emokern.eval.studies: the dial and erase measures on rows whose answer is known, and the
three studies end to end on a tiny model (the real judge, three tokens)."""

import json

import pytest
import torch
from helpers import random_bank

from emokern.eval.evaluation import load_prompts
from emokern.eval.studies import (
    EVOKING_PROMPTS,
    dial_of_rows,
    erase_of_rows,
    format_studies,
    run_studies,
)


def _row(prompt, emotion, label, p, adherence=0.6, distinct2=0.9):
    return {"prompt": prompt, "emotion": emotion, "label": label, "adherence": adherence,
            "distinct2": distinct2, "judge_p": {"sadness": p, "joy": 1.0 - p}}


def test_the_dial_is_the_mean_per_prompt_spearman_of_level_and_judge():
    rows = [_row(q, None, "0", 0.1) for q in "abc"]
    # prompt a rises with the level (ρ = 1), b too, c falls (ρ = -1): ρ̄ = 1/3
    for q, ps in {"a": (0.2, 0.3, 0.4), "b": (0.2, 0.5, 0.9), "c": (0.6, 0.4, 0.2)}.items():
        rows += [_row(q, "sadness", f"@{z:g}", p, adherence=0.5)
                 for z, p in zip((4, 8, 16), ps, strict=True)]
    dial = dial_of_rows(rows, ["sadness"], [4.0, 8.0, 16.0])["sadness"]
    assert dial["rho_mean"] == pytest.approx(1 / 3)
    assert dial["rho_rows"] == 3 and dial["share_increasing"] == pytest.approx(2 / 3)
    assert not dial["met"]
    # a prompt whose score does not move with the level is a dial that does not turn: ρ = 0
    flat = [r for r in rows if r["prompt"] != "c"] + [_row("c", None, "0", 0.1)] + [
        _row("c", "sadness", f"@{z}", 0.3) for z in (4, 8, 16)]
    assert dial_of_rows(flat, ["sadness"], [4, 8, 16])["sadness"]["rho_mean"] \
        == pytest.approx(2 / 3)
    assert [x["label"] for x in dial["per_level"]] == ["0", "@4", "@8", "@16"]
    assert dial["per_level"][3]["p"] == pytest.approx((0.4 + 0.9 + 0.2) / 3)
    assert dial["per_level"][0]["adherence"] == pytest.approx(0.6)
    # the other emotion's probabilities fall where sadness rises: a dial that goes backwards
    assert dial_of_rows([{**r, "emotion": None if r["emotion"] is None else "joy"}
                         for r in rows], ["joy"], [4, 8, 16])["joy"]["rho_mean"] \
        == pytest.approx(-1 / 3)


def test_erase_is_judged_per_emotion_on_its_own_prompts_only():
    prompts = {"sadness": ["s1", "s2"], "joy": ["j1"]}
    rows = [_row(q, None, "0", 0.5) for q in ("s1", "s2", "j1")]
    rows += [_row("s1", "sadness", "erase", 0.2, adherence=0.57),
             _row("s2", "sadness", "erase", 0.4, adherence=0.57),
             _row("j1", "sadness", "erase", 0.9, adherence=0.1),   # not a sadness prompt
             _row("s1", "sadness", "<=0", 0.6), _row("s2", "sadness", "<=0", 0.45),
             _row("j1", "joy", "erase", 0.5, adherence=0.3),        # joy p = 0.5: lowered
             _row("j1", "joy", "<=0", 0.5)]
    got = erase_of_rows(rows, prompts, ["erase", "<=0"])
    sad = got["sadness"]
    assert sad["0"]["p"] == pytest.approx(0.5)
    assert sad["erase"]["p"] == pytest.approx(0.3) and sad["erase"]["met"]
    assert sad["erase"]["adherence_ratio"] == pytest.approx(0.95)
    assert sad["<=0"]["p"] == pytest.approx(0.525) and not sad["<=0"]["lowered"]
    joy = got["joy"]  # joy p = 1 - 0.5: unchanged by erase, and off topic
    assert not joy["erase"]["lowered"] and joy["erase"]["adherence_ratio"] == pytest.approx(0.5)


def test_run_studies_writes_all_three_on_a_tiny_model(tiny_llama, scorer, one_thread, tmp_path):
    model, tokenizer = tiny_llama
    bank = random_bank(model, scale=0.5)
    n_layers, k = bank.n_layers, bank.n_emotions
    bank = bank.replace(neutral_mean=torch.zeros(n_layers, k), neutral_std=torch.ones(n_layers, k))
    result = run_studies(model, tokenizer, bank, out=tmp_path, heldout_prompts=2,
                         max_new_tokens=3, progress=False, scorer=scorer,
                         emotions=["joy"], weights=[1.0], levels=[2.0],
                         sweep_prompts=load_prompts()[-2:],
                         dial={"emotions": ["sadness"], "levels": [1.0, 2.0, 4.0]},
                         erase={"prompts": {"sadness": EVOKING_PROMPTS["sadness"][:2]}})
    assert result["recipes"]["rows"][0]["emotion"] == "joy"
    assert result["dial"]["emotions"]["sadness"]["rho_rows"] == 2
    assert set(result["erase"]["emotions"]) == {"sadness"}
    written = json.loads((tmp_path / "studies.json").read_text())
    assert set(written) >= {"recipes", "dial", "erase", "config", "machine"}
    md = (tmp_path / "studies.md").read_text()
    assert md == format_studies(result) and "Levels as a dial" in md
    assert (tmp_path / "bank-with-recipes.safetensors").is_file()


def test_erase_runs_each_emotion_on_its_own_prompts(tiny_llama, scorer, one_thread,
                                                    monkeypatch):
    """The erase grid answers every prompt unsteered and each emotion's edits only on the
    prompts that evoke it (not every prompt × emotion, two thirds of which were thrown away)."""
    from emokern.eval import studies

    model, tokenizer = tiny_llama
    bank = random_bank(model, scale=0.5)
    n_layers, k = bank.n_layers, bank.n_emotions
    bank = bank.replace(neutral_mean=torch.zeros(n_layers, k), neutral_std=torch.ones(n_layers, k))
    seen, evaluate = {}, studies.evaluate

    def recording(*args, **kwargs):
        seen["result"] = evaluate(*args, **kwargs)
        return seen["result"]

    monkeypatch.setattr(studies, "evaluate", recording)
    prompts = {"sadness": EVOKING_PROMPTS["sadness"][:2], "fear": EVOKING_PROMPTS["fear"][:1]}
    out = studies.erase_study(model, tokenizer, bank, prompts=prompts, max_new_tokens=2,
                              progress=False, scorer=scorer)
    rows = seen["result"]["rows"]
    assert len(rows) == 3 + 2 * 2 + 2 * 1
    assert {(r["prompt"], r["emotion"]) for r in rows if r["emotion"]} == {
        (p, e) for e, ps in prompts.items() for p in ps}
    assert set(out["emotions"]) == {"sadness", "fear"}
    assert out["emotions"]["fear"]["erase"]["adherence_ratio"] > 0

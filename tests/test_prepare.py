"""emokern prepare on a tiny model: both stages write a bank ``emokern.steer`` takes, a rerun
redoes nothing, an interrupted run resumes at the stage it was in, other options are refused."""

from __future__ import annotations

import json

import pytest
import torch

import emokern
from emokern import prepare as prepare_module
from emokern.eval import EmotionScorer
from emokern.eval.similarity import SentenceEmbedder
from emokern.prepare import MANIFEST, prepare

QUERIES = ["How was your weekend?", "Tell me about your morning commute."]
PROMPTS = ["Tell me about your day.", "Describe the street where you live."]


@pytest.fixture(scope="module")
def judges():
    return {"scorer": EmotionScorer(), "embedder": SentenceEmbedder()}


def _run(model, tokenizer, out, judges, **kw):
    return prepare(model, tokenizer, out, model_name="tiny", methods=("ev",),
                   emotions=["joy", "fear"], sweep_prompts=PROMPTS, max_new_tokens=3,
                   extract_options={"ev": {"queries": QUERIES, "max_new_tokens": 4}},
                   progress=False, **judges, **kw)


def test_prepare_writes_a_steerable_bank_and_resumes(small_llama, judges, tmp_path,
                                                     monkeypatch, one_thread):
    model, tokenizer = small_llama
    out = tmp_path / "banks"

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    # Interrupted in the recipe stage: the extraction is kept, no served bank yet.
    monkeypatch.setattr("emokern.eval.recommend.sweep", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _run(model, tokenizer, out, judges)
    assert (out / "ev-extracted.safetensors").exists() and not (out / "ev.safetensors").exists()
    assert list(json.loads((out / MANIFEST).read_text())["stages"]) == ["ev/extract"]
    monkeypatch.undo()

    # Resumed: the extraction is not redone.
    monkeypatch.setattr("emokern.extract.extract_ev", interrupted)
    manifest = _run(model, tokenizer, out, judges)
    assert list(manifest["stages"]) == ["ev/extract", "ev/recipes"]
    bank = emokern.EmotionBank.load(manifest["banks"]["ev"])
    assert bank.calibrated and set(bank.recommended_weights) == {"joy", "fear"}
    for name in ("joy", "fear"):
        assert bank.recommended(name).mode in ("push", "level")
    assert manifest["stages"]["ev/recipes"]["engine"] == "hf"
    swept = json.loads((out / "ev-sweep.json").read_text())
    assert {a["emotion"] for a in swept["aggregates"]} == {"joy", "fear"}
    assert {n: bank.recommended(n).strength for n in ("joy", "fear")} == {
        n: r.get("weight", r.get("level")) for n, r in swept["choice"].items()}
    # A finished prepare redoes nothing (the sweep would raise).
    monkeypatch.setattr("emokern.eval.recommend.sweep", interrupted)
    assert list(_run(model, tokenizer, out, judges)["stages"]) == ["ev/extract", "ev/recipes"]
    monkeypatch.undo()

    # The served bank steers as it is, its recipes included.
    with emokern.steer(model, bank, mix=[{"joy": "rec"}, {"fear": "rec"}]), \
            torch.inference_mode():
        model(**tokenizer(["Hi", "Hi"], return_tensors="pt", padding=True))

    with pytest.raises(ValueError, match="other options"):
        prepare(model, tokenizer, out, model_name="tiny", methods=("ev",), progress=False)


def test_prepare_checks_its_arguments(small_llama, tmp_path):
    model, tokenizer = small_llama
    with pytest.raises(ValueError, match="methods"):
        prepare(model, tokenizer, tmp_path, methods=("nope",), progress=False)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        prepare(model, tokenizer, tmp_path / "file", progress=False)
    assert prepare_module.STAGES == ("extract", "recipes")


def test_prepare_command_refuses_unknown_methods_before_loading(tmp_path):
    """``emokern prepare --methods`` is checked before the model loads; nothing is written."""
    from emokern.cli import main

    with pytest.raises(SystemExit, match="--methods takes names from"):
        main(["prepare", "--model", str(tmp_path / "no-such-model"), "--out",
              str(tmp_path / "out"), "--methods", "ev,nope"])
    assert not (tmp_path / "out").exists()

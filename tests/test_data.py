"""The project's data files (emokern.data): the sets are complete, the loaders reject bad files
with messages that name the argument, the calibration record round-trips; the shipped banks
belong to the default model and are reproduced by re-extraction (slow).
"""

import json

import pytest
import torch
from safetensors import safe_open

from emokern import data
from emokern.bank import EmotionBank
from emokern.data import (
    load_calibration,
    load_concepts,
    load_heldout,
    load_instructions,
    load_queries,
    store_calibration,
    text_hash,
)
from emokern.emotions import BASIC_EMOTIONS
from emokern.eval import calibrate, heldout_report
from emokern.extract import extract_concept, extract_ev
from emokern.machine import auto_threads
from emokern.models import load_model

# ---------------------------------------------------------------------------- the shipped sets


def test_project_data_sets_are_complete():
    queries = load_queries()
    assert len(queries) >= 100 and len(set(queries)) == len(queries)
    instructions = load_instructions()
    assert len(instructions["phrasings"]) >= 4
    assert instructions["default"] in instructions["phrasings"]
    for phrasing in instructions["phrasings"].values():
        assert "{query}" in phrasing["user"] and "{query}" in phrasing["neutral_user"]
    concepts = load_concepts()
    cats = concepts["categories"]
    assert len(cats) >= 24 and set(BASIC_EMOTIONS) <= set(cats)
    assert all(len(words) >= 10 for words in cats.values())
    assert set(cats) <= set(instructions["emotions"])
    assert all(c.count("{concept}") == 1 for c in concepts["carriers"])
    heldout = load_heldout()
    for e in BASIC_EMOTIONS:
        assert sum(1 for label, _ in heldout if label == e) >= 20
    # Held-out sentences are not extraction data.
    assert not {t for _, t in heldout} & set(queries)


def test_paths_point_into_the_package():
    for path in (data.QUERIES_FILE, data.INSTRUCTIONS_FILE, data.CONCEPTS_FILE,
                 data.HELDOUT_FILE, data.CALIBRATION_FILE):
        assert path.is_file() and path.parent == data.DATA_DIR
    assert data.BANKS_DIR.is_dir() and data.BANKS_DIR.parent == data.DATA_DIR
    assert set(load_calibration()) == {"ev", "concept"}


def test_text_hash_names_a_set():
    assert text_hash(["a", "b"]) == text_hash("a\nb")
    assert text_hash(["a", "b"]) != text_hash(["b", "a"])
    assert len(text_hash("x")) == 16


# ---------------------------------------------------------------------------- bad files


def test_query_files(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n# only a comment\n")
    with pytest.raises(ValueError, match="holds no query"):
        load_queries(empty)
    with pytest.raises(ValueError, match="does not exist"):
        load_queries(tmp_path / "missing.txt")
    good = tmp_path / "q.txt"
    good.write_text("First query?\n\n# comment\n  Second query?  \n")
    assert load_queries(good) == ["First query?", "Second query?"]


def test_loaders_name_the_argument_and_the_problem(tmp_path):
    with pytest.raises(TypeError, match="queries_path must be a path, got int"):
        load_queries(3)
    with pytest.raises(ValueError, match="queries_path .* does not exist or is not a file"):
        load_queries(tmp_path)  # a directory
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\xe9?\n".encode("latin-1"))
    with pytest.raises(ValueError, match="queries_path .* is not UTF-8 text"):
        load_queries(latin1)

    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ValueError, match="instructions_path .* is not valid JSON"):
        load_instructions(broken)
    with pytest.raises(ValueError, match="concepts_path .* is not valid JSON"):
        load_concepts(broken)
    array = tmp_path / "array.json"
    array.write_text("[1, 2]")
    with pytest.raises(ValueError, match="must hold a JSON object"):
        load_instructions(array)
    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps({"default": "x", "phrasings": {}}))
    with pytest.raises(ValueError, match="instructions file lacks the key 'emotions'"):
        load_instructions(partial)
    partial.write_text(json.dumps({"categories": {}}))
    with pytest.raises(ValueError, match="concepts file lacks the key 'carriers'"):
        load_concepts(partial)


def test_heldout_files(tmp_path):
    good = tmp_path / "h.jsonl"
    good.write_text('{"emotion": "joy", "text": "Yay."}\n\n{"emotion": "fear", "text": "Eek."}\n')
    assert load_heldout(good) == [("joy", "Yay."), ("fear", "Eek.")]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"emotion": "joy", "text": "Yay."}\n{"emotion": "joy"}\n')
    with pytest.raises(ValueError, match="heldout_path line 2 is not a JSON object"):
        load_heldout(bad)
    bad.write_text('{"emotion": "joy", "text": "Yay."}\n[1]\n')
    with pytest.raises(ValueError, match="heldout_path line 2"):
        load_heldout(bad)
    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n\n")
    with pytest.raises(ValueError, match="holds no sentence"):
        load_heldout(blank)


def test_calibration_record_round_trip(tmp_path):
    path = tmp_path / "calibration.json"
    assert load_calibration(path) == {}  # absent: nothing calibrated
    store_calibration("ev", {"default_weight": 6.0, "recommended_layers": [12]}, path)
    store_calibration("concept", {"default_weight": 1.5, "recommended_layers": [18]}, path)
    store_calibration("ev", {"default_weight": 4.0, "recommended_layers": [9]}, path)
    assert load_calibration(path) == {
        "ev": {"default_weight": 4.0, "recommended_layers": [9]},
        "concept": {"default_weight": 1.5, "recommended_layers": [18]}}
    assert path.read_text().endswith("}\n")
    # An unreadable record starts afresh rather than failing after a long sweep.
    path.write_text("{truncated")
    store_calibration("ev", {"default_weight": 2.0}, path)
    assert load_calibration(path) == {"ev": {"default_weight": 2.0}}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calibration.json"]
    # A record that still names the weight recommended_alpha reads it as default_weight.
    path.write_text('{"ev": {"recommended_alpha": 6.0, "recommended_layers": [12]}}')
    assert load_calibration(path) == {"ev": {"default_weight": 6.0, "recommended_layers": [12]}}


# ---------------------------------------------------------------------------- shipped banks


@pytest.fixture(scope="module")
def default_model():
    # CI machines are shared: one thread is several times faster when the CPUs are busy.
    threads = torch.get_num_threads()
    auto_threads()
    yield load_model("default")
    torch.set_num_threads(threads)


@pytest.mark.slow
@pytest.mark.model
def test_shipped_banks_are_small_float16_and_belong_to_the_default_model(default_model):
    model, _ = default_model
    total = 0
    for method in ("ev", "concept"):
        path = EmotionBank.default_path(method)
        assert path.parent == data.BANKS_DIR
        total += path.stat().st_size
        bank = EmotionBank.load_default(method)
        bank.check_compatible(model)
        assert bank.metadata["method"] == method
        assert bank.metadata.get("recommendation") == "calibrated"
        assert bank.default_weight > 0 and bank.recommended_layers
        with safe_open(str(path), framework="pt") as fh:
            assert fh.get_tensor("vectors").dtype == torch.float16
    assert total < 5 * 2**20
    ev = EmotionBank.load_default("ev")
    assert ev.names == list(BASIC_EMOTIONS) and ev.layers == list(range(30))
    concept = EmotionBank.load_default("concept")
    assert len(concept.names) >= 24 and set(BASIC_EMOTIONS) <= set(concept.names)


def _middle_cosines(a, b, layers):
    out = []
    for layer in layers:
        x, y = a.layer_vectors(layer), b.layer_vectors(layer)
        out.append(torch.nn.functional.cosine_similarity(x, y, dim=-1))
    return torch.stack(out)  # [layers, K]


@pytest.mark.slow
@pytest.mark.model
def test_reextracting_ev_on_a_subset_reproduces_the_shipped_vectors(default_model):
    model, tokenizer = default_model
    shipped = EmotionBank.load_default("ev")
    layers = [10, 14, 18]
    # Measured on the default model (docs/emotions.md): the centred vectors of a subset of n
    # of the 118 queries reach cosine >= 0.9 with the full set's from n ~ 50 (20 queries give
    # ~0.7), so the test uses the first 60.
    queries = load_queries()[:60]
    bank = extract_ev(model, tokenizer, queries=queries, layers=layers, progress=False)
    cos = _middle_cosines(bank, shipped, layers)
    assert float(cos.min()) >= 0.9, cos


@pytest.mark.slow
@pytest.mark.model
def test_reextracting_concepts_reproduces_the_shipped_vectors(default_model):
    model, tokenizer = default_model
    shipped = EmotionBank.load_default("concept")
    layers = [10, 14]
    bank = extract_concept(model, tokenizer, layers=layers, progress=False, baseline=False)
    cos = _middle_cosines(bank, shipped, layers)
    assert float(cos.min()) >= 0.99, cos


@pytest.mark.slow
@pytest.mark.model
def test_heldout_sentences_are_classified_by_the_ev_directions(default_model):
    model, tokenizer = default_model
    bank = EmotionBank.load_default("ev")
    layers = list(range(4, 28, 2))  # a dozen layers keeps it quick
    report = heldout_report(model, tokenizer, bank.select(layers=layers))
    assert report["best_bank"] >= 0.5, report
    assert report["best_random"] < report["best_bank"]
    assert report["best_nearest_mean"] >= report["best_bank"] - 0.05
    print(json.dumps({k: report[k] for k in ("best_layer", "best_bank", "best_random",
                                             "best_nearest_mean")}))


@pytest.mark.slow
@pytest.mark.model
@pytest.mark.parametrize("method", ["ev", "concept"])
def test_recommended_setting_steers_sadness_fluently(default_model, method):
    """At the shipped recommendation the classifier sees sadness and the text does not loop
    (docs/emotions.md: sadness gain +0.30 / +0.33, hit rate 0.88 with both banks)."""
    model, tokenizer = default_model
    bank = EmotionBank.load_default(method)
    rows = calibrate(model, tokenizer, bank, layers=bank.recommended_layers,
                     weights=[bank.default_weight], emotions=["sadness"], fluency=False,
                     progress=False)
    steered = rows[1]
    assert steered["gain"] >= 0.15 and steered["hit_rate"] >= 0.5, steered
    assert steered["repetition"] <= 0.2, steered

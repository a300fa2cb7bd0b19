"""``emokern eval``: the grid, its scores and files on a tiny model, and every bad input
refused before anything is generated."""

from __future__ import annotations

import json

import pytest
from helpers import random_bank

from emokern.cli import main
from emokern.eval import engines, evaluation
from emokern.eval.evaluation import (
    EVAL_PROMPTS_FILE,
    evaluate,
    grid_rows,
    load_prompts,
    parse_weights,
)

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["Tell me about your cat.", "What is for dinner?"]


@pytest.fixture(scope="module")
def tiny(tiny_llama):
    model, tokenizer = tiny_llama
    return model, tokenizer, random_bank(model, scale=0.5)


@pytest.fixture(scope="module")
def embedder():
    from emokern.eval.similarity import SentenceEmbedder

    return SentenceEmbedder()


@pytest.fixture
def no_generation(monkeypatch):
    """Fails the test if the evaluation reaches generation."""
    def refuse(*args, **kwargs):
        raise AssertionError("generation ran despite bad input")

    monkeypatch.setattr(engines, "generate", refuse)
    monkeypatch.setattr(engines, "generate_vllm", refuse)
    monkeypatch.setattr(evaluation, "generate_vllm", refuse)


def test_builtin_prompts_are_new_to_the_project():
    from emokern.data import load_queries
    from emokern.eval.calibration_sweep import CALIBRATION_PROMPTS

    prompts = load_prompts()
    assert len(prompts) >= 50 and len(set(prompts)) == len(prompts)
    known = {q.lower() for q in load_queries()} | {p.lower() for p in CALIBRATION_PROMPTS}
    assert not [p for p in prompts if p.lower() in known]
    assert load_prompts(EVAL_PROMPTS_FILE) == prompts


def test_prompt_files_json_and_lines(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps(["one?", " two "]))
    (tmp_path / "b.txt").write_text("# comment\none?\n\ntwo\n")
    assert load_prompts(tmp_path / "a.json") == ["one?", "two"]
    assert load_prompts(tmp_path / "b.txt") == ["one?", "two"]


def test_parse_weights():
    assert parse_weights("-1,0,1,2,4") == [-1.0, 0.0, 1.0, 2.0, 4.0]
    assert parse_weights(["[generated]=2", "[10-12;generated]@8", "2"]) == [
        "[generated]=2", "[10-12;generated]@8", 2.0]
    assert parse_weights("rec") == ["rec"]
    assert parse_weights("0, REC ,1.5") == [0.0, "rec", 1.5]
    assert parse_weights("2, @8, <=0, >=-1.5, ERASE") == [2.0, "@8", "<=0", ">=-1.5", "erase"]
    for bad, match in (("1,lots", "none of a number"), ("1,1", "twice"), ("", "none of"),
                       ("nan", "must be finite"), ("@x", "none of"), ("@inf", "must be finite"),
                       ("@8,@8.0", "twice"), ("<=", "none of")):
        with pytest.raises(ValueError, match=match):
            parse_weights(bad)


def test_grid_shares_one_unsteered_row_per_prompt(tiny):
    _, _, bank = tiny
    bank = bank.replace(metadata={"recommended_weights": {"fear": {"weight": 3.0}}})
    rows = grid_rows(PROMPTS, ["joy", "fear"], [0.0, 2.0, "rec"], bank)
    assert len(rows) == 2 + 2 * 2 * 2
    assert [r["mix"] for r in rows[:2]] == [{}, {}]
    rec = {r["emotion"]: r["weight"] for r in rows if r["label"] == "rec"}
    assert rec == {"joy": bank.default_weight, "fear": 3.0}
    rows = grid_rows(PROMPTS[:1], ["fear"], ["@4", "<=0", ">=1", "erase"], bank)
    assert [r["mix"] for r in rows[1:]] == [{"fear": {"level": 4.0}}, {"fear": {"max": 0.0}},
                                            {"fear": {"min": 1.0}}, {"fear": {"level": 0.0}}]
    assert [r["label"] for r in rows[1:]] == ["@4", "<=0", ">=1", "erase"]
    # an emotion's edits on its own prompts only; every prompt has its unsteered row
    rows = grid_rows(PROMPTS, ["joy", "fear"], [0.0, 2.0, "erase"], bank,
                     prompts_of={"fear": PROMPTS[1:]})
    assert [(r["prompt"], r["emotion"]) for r in rows if r["label"] == "erase"] == [
        (PROMPTS[0], "joy"), (PROMPTS[1], "joy"), (PROMPTS[1], "fear")]
    assert [r["prompt"] for r in rows if r["emotion"] is None] == PROMPTS


def test_evaluate_writes_results_report_and_plots(tiny, embedder, scorer, tmp_path):
    model, tokenizer, bank = tiny
    out = tmp_path / "run"
    result = evaluate(model, tokenizer, bank, emotions="joy,fear", weights="0,1,rec",
                      prompts=PROMPTS, max_new_tokens=4, batch_size=4, out=out,
                      progress=False, scorer=scorer, embedder=embedder)
    assert len(result["rows"]) == 2 + 2 * 2 * 2
    saved = json.loads((out / "results.json").read_text())
    assert saved["config"]["emotions"] == ["joy", "fear"] and len(saved["rows"]) == 10
    for row in saved["rows"]:
        assert set(row["judge"]) == set(row["judge_p"]) == set(row["lexicon"])
        assert 0.0 <= row["distinct2"] <= 1.0 and -1.0 <= row["fidelity"] <= 1.0001
        assert set(row["projections"]) == {"joy", "sadness", "fear"}
    base = [r for r in saved["rows"] if r["emotion"] is None]
    assert all(r["fidelity"] == pytest.approx(1.0, abs=1e-4) for r in base)
    keys = {(a["emotion"], a["label"]) for a in saved["aggregates"]}
    assert keys == {(e, w) for e in ("joy", "fear") for w in ("0", "1", "rec")}
    for a in saved["aggregates"]:
        assert 0.0 <= a["eps"] <= 1.0 and a["n"] == 2
    report = (out / "report.md").read_text()
    assert "| fear | rec |" in report and "EPS" in report
    for png in ("eps.png", "perplexity.png", "tradeoff.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_interrupted_run_leaves_no_results(tiny, embedder, scorer, tmp_path, monkeypatch):
    model, tokenizer, bank = tiny

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(evaluation, "perplexity", interrupted)
    with pytest.raises(KeyboardInterrupt):
        evaluate(model, tokenizer, bank, emotions="joy", weights="0,1", prompts=PROMPTS,
                 max_new_tokens=2, out=tmp_path, progress=False, scorer=scorer,
                 embedder=embedder)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("options, match", [
    ({"emotions": "joy,boredom"}, "unknown emotion 'boredom'"),
    ({"weights": "1,two"}, "none of a number"),
    ({"prompts": []}, "non-empty list"),
    ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"prompts_of": {"fear": PROMPTS}}, "prompts_of names 'fear', which is not evaluated"),
    ({"prompts_of": {"joy": ["Another prompt?"]}}, r"prompts_of\['joy'\] must be"),
    ({"prompts_of": {"joy": []}}, r"prompts_of\['joy'\] must be"),
])
def test_bad_input_before_generation(tiny, no_generation, options, match):
    model, tokenizer, bank = tiny
    kwargs = {"emotions": "joy", "weights": "0,1", "prompts": PROMPTS, **options}
    with pytest.raises(ValueError, match=match):
        evaluate(model, tokenizer, bank, progress=False, **kwargs)


def test_bad_files_before_generation(tiny, no_generation, tmp_path):
    model, tokenizer, bank = tiny
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n\n")
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe\x00bad")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    cases = [({"prompts": str(empty)}, "holds no prompt"),
             ({"prompts": str(binary)}, "cannot be read as UTF-8"),
             ({"prompts": str(tmp_path / "missing.txt")}, "does not exist"),
             ({"out": blocker / "sub"}, "not a writable directory"),
             ({"out": blocker}, "is not a directory")]
    for options, match in cases:
        kwargs = {"emotions": "joy", "weights": "0,1", "prompts": PROMPTS, **options}
        with pytest.raises(ValueError, match=match):
            evaluate(model, tokenizer, bank, progress=False, **kwargs)


def test_cli_errors_before_loading_the_model(capsys, tmp_path, monkeypatch):
    from emokern import models

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded despite bad input")

    monkeypatch.setattr(models, "load_model", refuse)
    for argv, match in ((["--weights", "1,x"], "none of a number"),
                        (["--emotions", "joy,boredom"], "unknown emotion"),
                        (["--prompts", str(tmp_path / "none.txt")], "does not exist")):
        code = main(["eval", "--out", str(tmp_path / "o"), *argv])
        assert code == 2
        err = capsys.readouterr().err
        assert err.startswith("emokern eval: error:") and match in err
    # The option's former spelling still works, with a note.
    assert main(["eval", "--out", str(tmp_path / "o"), "--alphas", "1,x"]) == 2
    err = capsys.readouterr().err
    assert "--alphas is deprecated, use --weights" in err and "none of a number" in err


def test_cli_vllm_engine_errors_before_loading_anything(capsys, tmp_path, monkeypatch):
    """``--engine vllm`` where vLLM cannot be imported, or with a model vLLM cannot load: one
    error, before the bank, the prompts or the model load."""
    from emokern import models

    def refuse(*args, **kwargs):
        raise AssertionError("loaded despite an engine that cannot run")

    monkeypatch.setattr(models, "load_model", refuse)
    monkeypatch.setattr(evaluation, "load_prompts", refuse)
    monkeypatch.setattr(engines, "_vllm_importable", lambda: False)
    assert main(["eval", "--engine", "vllm", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("emokern eval: error: engine 'vllm' needs vLLM")
    assert "make setup-vllm" in err and ".venv-vllm" in err
    monkeypatch.setattr(engines, "_vllm_importable", lambda: True)
    assert main(["eval", "--engine", "vllm", "--model", str(tmp_path / "m.gguf"),
                 "--out", str(tmp_path / "o")]) == 2
    assert "Hugging Face checkpoint directory" in capsys.readouterr().err
    assert main(["eval", "--vllm-compile", "--out", str(tmp_path / "o")]) == 2
    assert "--vllm-compile is a setting of --engine vllm" in capsys.readouterr().err
    with pytest.raises(ValueError, match="engine must be one of"):
        engines.check_engine("llamacpp")


def test_report_names_the_engine(tiny, embedder, scorer, tmp_path):
    model, tokenizer, bank = tiny
    result = evaluate(model, tokenizer, bank, emotions="joy", weights="0,1", prompts=PROMPTS,
                      max_new_tokens=2, batch_size=3, out=tmp_path, progress=False,
                      scorer=scorer, embedder=embedder)
    assert result["config"]["engine"] == "hf"
    assert set(result["seconds"]) == {"generate", "score"}
    assert "Engine hf: transformers generate, batches of 3 rows" in \
        (tmp_path / "report.md").read_text()
    assert json.loads((tmp_path / "results.json").read_text())["config"]["engine"] == "hf"


def test_vllm_engine_settings_are_stable_across_runs(tiny, tmp_path, monkeypatch):
    """vLLM keys its compiled-graph cache on the engine's settings: the bank's file is named by
    its content (the same bank twice: one path; another bank: another), the context length is
    rounded up to a power of two, and the settings follow the grid (levels only with edits)."""
    model, _, bank = tiny
    monkeypatch.setenv("EMOKERN_CACHE", str(tmp_path))
    first, again = engines._bank_file(bank), engines._bank_file(bank)
    assert first == again and first.parent == tmp_path / "eval-banks"
    assert type(bank).load(first).names == bank.names
    other = engines._bank_file(bank.select(bank.names[:2]))
    assert other != first and len(list(first.parent.iterdir())) == 2
    assert [engines._max_model_len(n) for n in (40, 256, 257, 700)] == [256, 256, 512, 1024]
    pushes = grid_rows(PROMPTS, ["joy"], [0.0, 2.0], bank)
    settings = engines.vllm_settings(model, first, pushes, [1], max_model_len=256, seed=0)
    assert settings["dtype"] == "float32" and not settings["enable_prefix_caching"]
    assert settings["enforce_eager"]
    assert settings["additional_config"]["emokern"] == {
        "bank": str(first), "layers": [1], "spread": "divide", "levels": False,
        "monitor": False, "max_weight": 2.0}
    # the engine's limits admit the whole grid, however far past the bank's recipes it goes
    far = grid_rows(PROMPTS, ["joy", "fear"], [-90.0, 3.0, "@32", "<=-40", "erase"], bank)
    limits = engines.vllm_settings(model, first, far, [1], max_model_len=256, seed=0)
    assert {k: limits["additional_config"]["emokern"][k] for k in ("max_weight", "max_level")} \
        == {"max_weight": 90.0, "max_level": 40.0}
    edits = grid_rows(PROMPTS, ["joy"], ["<=0"], bank)
    assert not engines.vllm_settings(model, first, edits, [1], max_model_len=256, seed=0,
                                     options={"enforce_eager": False})["enforce_eager"]
    assert engines._has_edits(edits) and not engines._has_edits(pushes)
    sampled = engines.vllm_settings(model, first, pushes, [1], max_model_len=256, seed=0,
                                    band=[1], sampled=True)
    assert sampled["enable_chunked_prefill"] is False  # a CPU generator cannot be rewound
    assert sampled["additional_config"]["emokern"]["band"] == [1]


def test_scoped_terms_steer_their_own_layers(tiny, embedder, scorer, tmp_path):
    """A grid term scoped to a layer off the band (``[l;generated]=1``) is steered there, as
    steering that layer alone on generated tokens would, while unscoped terms keep the band;
    a recipe with a scope is written in the mix grammar in the report."""
    from emokern.steering import generate

    model, tokenizer, bank = tiny
    band = list(bank.recommended_layers)
    other = next(layer for layer in bank.layers if layer not in band)
    bank = bank.replace(metadata={"recommended_weights": {
        "joy": {"weight": 2.0, "positions": "generated"}}})
    term = f"[{other};generated]=1"
    result = evaluate(model, tokenizer, bank, emotions="joy", weights=f"0,1,{term},rec",
                      prompts=PROMPTS, max_new_tokens=4, batch_size=8, out=tmp_path,
                      progress=False, scorer=scorer, embedder=embedder, fluency=False)
    assert result["config"]["layers"] == [*band, other] and result["config"]["band"] == band
    scoped = [r for r in result["rows"] if r["label"] == term]
    alone = generate(model, tokenizer, bank, PROMPTS, {"joy": 1.0}, layers=[other],
                     positions="generated", max_new_tokens=4)
    for row, expected in zip(scoped, alone, strict=True):
        assert row["text"] == expected["text"]
        assert row["projections"] == pytest.approx(expected["projections"], rel=1e-5, abs=1e-6)
    plain = [r for r in result["rows"] if r["label"] == "1"]
    on_band = generate(model, tokenizer, bank, PROMPTS, {"joy": 1.0}, max_new_tokens=4)
    for row, expected in zip(plain, on_band, strict=True):  # other batches: rounding only
        assert row["projections"] == pytest.approx(expected["projections"], rel=1e-5, abs=1e-6)
    assert "recipes (rec): joy[generated]=2" in (tmp_path / "report.md").read_text()
    steered, kept = evaluation.grid_layers(bank, ["[1-2]=1"], layers=band)
    assert kept == band and set(steered) == set(band) | {1, 2}

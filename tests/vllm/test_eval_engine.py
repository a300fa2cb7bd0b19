"""``emokern eval --engine vllm`` against the Hugging Face engine: a tiny grid (2 emotions x 2
edits, a push weight and a level, x 3 prompts, 12 greedy tokens, the default model in float32)
through both, compared row by row, and the report files of the vLLM run. Run by
``make test-vllm`` in ``.venv-vllm`` (which has the evaluation's scorers); skipped where vLLM is
not installed (``make test``).

One vLLM engine is loaded (eager, as ``emokern eval --engine vllm`` runs it by default; with
levels on, since the grid has one).
"""

import json
import os

import pytest

# A submodule: this tests/vllm directory would pass for the package ``vllm``.
pytest.importorskip("vllm.sampling_params")

import emokern  # noqa: E402
from emokern.cli import main  # noqa: E402
from emokern.eval import EmotionScorer, LexiconScorer, SentenceEmbedder  # noqa: E402
from emokern.eval.evaluation import evaluate, load_prompts  # noqa: E402
from emokern.machine import auto_threads  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.model]

GRID = {"emotions": "joy,sadness", "weights": "0,4,@3", "max_new_tokens": 12}


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    """The grid evaluated by each engine (one vLLM engine load), with shared scorers."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    auto_threads()  # as emokern eval does: on a busy machine a second torch thread costs 10x
    model, tokenizer = emokern.load_model("default")
    bank = emokern.EmotionBank.load_default()
    shared = {"scorer": EmotionScorer(), "lexicon": LexiconScorer(),
              "embedder": SentenceEmbedder(), "prompts": load_prompts()[:3],
              "progress": False, "model_name": "default", "bank_name": "default", **GRID}
    out = {name: tmp_path_factory.mktemp(name) for name in ("hf", "vllm")}
    results = {name: evaluate(model, tokenizer, bank, engine=name, out=out[name], **shared)
               for name in ("hf", "vllm")}
    return results, out


def test_greedy_rows_are_the_hugging_face_rows(both):
    results, _ = both
    hf, vl = results["hf"]["rows"], results["vllm"]["rows"]
    assert len(hf) == len(vl) == 3 + 2 * 2 * 3
    for a, b in zip(hf, vl, strict=True):
        assert (a["prompt"], a["emotion"], a["label"], a["mix"]) == \
            (b["prompt"], b["emotion"], b["label"], b["mix"])
        assert (b["text"], b["n_tokens"]) == (a["text"], a["n_tokens"]), a["mix"]
        assert b["judge"] == a["judge"] and b["fidelity"] == a["fidelity"]
    # The engine steered: the weight-4 and level answers are not the unsteered ones.
    base = {r["prompt"]: r["text"] for r in vl if r["emotion"] is None}
    for label in ("4", "@3"):
        assert sum(r["text"] != base[r["prompt"]] for r in vl if r["label"] == label) >= 4


def test_vllm_run_writes_the_same_report(both):
    results, out = both
    saved = json.loads((out["vllm"] / "results.json").read_text())
    config = saved["config"]
    assert config["engine"] == "vllm" and config["n_rows"] == 15
    emokern_settings = config["vllm"]["settings"]["additional_config"]["emokern"]
    assert emokern_settings["layers"] == results["hf"]["config"]["layers"]
    assert emokern_settings["levels"] is True
    assert config["vllm"]["settings"]["dtype"] == "float32"
    assert config["vllm"]["settings"]["enforce_eager"] is True
    assert saved["seconds"]["engine_load"] > 0 and saved["seconds"]["generate"] > 0
    assert all(r["projections"] is None for r in saved["rows"])
    hf_keys = [(a["emotion"], a["label"]) for a in results["hf"]["aggregates"]]
    assert [(a["emotion"], a["label"]) for a in saved["aggregates"]] == hf_keys
    for a, b in zip(results["hf"]["aggregates"], saved["aggregates"], strict=True):
        assert a["eps"] == pytest.approx(b["eps"]) and b.get("reading") is None
    report = (out["vllm"] / "report.md").read_text()
    assert "Engine vllm: vLLM" in report and "(eager, float32)" in report
    assert "| sadness | @3 |" in report
    assert "engine load" in report
    for png in ("eps.png", "perplexity.png", "tradeoff.png"):
        assert (out["vllm"] / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_refuses_a_model_vllm_cannot_load(tmp_path, capsys):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    assert main(["eval", "--engine", "vllm", "--model", str(gguf),
                 "--out", str(tmp_path / "o")]) == 2
    assert "Hugging Face checkpoint directory" in capsys.readouterr().err


def test_seeded_sampling_runs_more_prompt_tokens_than_one_step_holds():
    """Sampled rows are seeded per request; more prompt tokens than one engine step schedules
    (4,096) would split a prompt, and vLLM then rewinds that request's generator, which a CPU
    generator cannot do: the evaluation's engine runs without chunked prefill there."""
    from emokern.eval.engines import generate_vllm
    from emokern.eval.evaluation import grid_rows
    from emokern.models import model_dir

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    model, tokenizer = emokern.load_model("default")
    bank = emokern.EmotionBank.load_default()
    rows = grid_rows(load_prompts()[:40], ["joy", "fear"], [0.0, 2.0], bank)  # 120 rows
    timing = generate_vllm(model, tokenizer, bank, rows, model_dir=str(model_dir("default")),
                           max_new_tokens=4, layers=bank.recommended_layers, seed=0,
                           do_sample=True, progress=False)
    assert timing["settings"]["enable_chunked_prefill"] is False
    assert sum(r["n_tokens"] for r in rows) > 0 and all(r["text"] is not None for r in rows)

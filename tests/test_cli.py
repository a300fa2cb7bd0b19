"""Smoke tests of the ``emokern`` command line on a tiny saved model (seconds each): every
subcommand parses, runs the library and prints what it promises; bad input exits with one
clear message."""

from __future__ import annotations

import json

import pytest
from helpers import random_bank

from emokern.benchmarks import ops as ops_bench
from emokern.cli import build_parser, main

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tiny_llama):
    """A tiny Llama saved as a checkpoint directory, and a bank made for it."""
    model, tokenizer = tiny_llama
    root = tmp_path_factory.mktemp("cli")
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    bank = random_bank(model, scale=0.5)
    bank.save(root / "bank.safetensors")
    return root / "model", root / "bank.safetensors"


def test_help_lists_every_subcommand(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for command in ("demo", "info", "extract", "calibrate", "generate", "bench"):
        assert command in out


def test_info_reports_backends_without_compiling(capsys, saved, monkeypatch):
    from emokern.ops import build

    def no_compile():
        raise AssertionError("emokern info compiled a kernel")

    monkeypatch.setattr(build, "load_cpu", no_compile)
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "backends:" in out and "reference yes" in out
    assert main(["info", str(saved[1])]) == 0
    assert "joy" in capsys.readouterr().out


def test_generate_prints_rows_and_readings(capsys, saved):
    model, bank = saved
    argv = ["generate", "--model", str(model), "--bank", str(bank), "--prompt", "Hello",
            "--mix", "joy=1", "--mix", "", "--max-new-tokens", "3", "--layers", "1"]
    assert main([*argv, "--monitor"]) == 0
    out = capsys.readouterr().out
    assert "--- joy=1" in out and "--- (unsteered)" in out and "sadness" in out
    assert main([*argv, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["mix"] for r in rows] == [{"joy": 1.0}, {}]
    assert all(1 <= r["n_tokens"] <= 3 for r in rows)


def test_generate_bad_mix_is_one_clear_error(capsys, saved):
    model, bank = saved
    code = main(["generate", "--model", str(model), "--bank", str(bank), "--prompt", "Hi",
                 "--mix", "joy=lots"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("emokern generate: error:") and "joy=lots" in err


def test_demo_runs_on_any_model_and_bank(capsys, saved):
    model, bank = saved
    assert main(["demo", "--model", str(model), "--bank", str(bank),
                 "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert "[unsteered]" in out and "[joy=+1]" in out and "emotion readings" in out


def test_extract_writes_a_bank(capsys, saved, tmp_path):
    model, _ = saved
    out = tmp_path / "concept.safetensors"
    assert main(["extract", "--model", str(model), "--method", "concept",
                 "--emotions", "joy,sadness", "--layers", "1,2", "--threads", "1",
                 "--out", str(out)]) == 0
    assert out.is_file() and f"saved {out}" in capsys.readouterr().out
    assert main(["info", str(out)]) == 0
    assert "sadness" in capsys.readouterr().out


def test_bench_ops_on_one_small_shape(capsys, tmp_path):
    from emokern.ops import build

    if not build.load_cpu():
        pytest.skip("the CPU kernel did not build")
    assert main(["bench", "ops", "--shape", "2x1x64x3", "--dtypes", "fp32", "--rounds", "3",
                 "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "ops.json").read_text())
    assert len(rows) == 1 and rows[0]["dtype"] == "fp32"
    assert "decode" in capsys.readouterr().out


def test_bench_generate_without_sweep(capsys, saved):
    model, _ = saved
    assert main(["bench", "generate", "--model", str(model), "--batch-sizes", "1",
                 "--rounds", "2", "--no-sweep"]) == 0
    assert "decode" in capsys.readouterr().out.lower()


@pytest.mark.parametrize("argv", [["bench", "ops", "--shape", "1x1x576"],
                                  ["bench", "ops", "--batch-sizes", "0"]])
def test_bench_bad_arguments_exit_with_a_message(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert "emokern:" in str(exit_.value)


def test_parser_has_one_extract_command_with_every_option():
    text = build_parser().format_help()
    assert "extract" in text
    extract = build_parser()._subparsers._group_actions[0].choices["extract"].format_help()
    for option in ("--model", "--method", "--emotions", "--queries", "--layers", "--out",
                   "--threads"):
        assert option in extract
    assert ops_bench.OpShape("decode", 1, 1, 8, 2).rows == 1


def test_export_writes_a_control_vector_of_a_shipped_bank(tmp_path, capsys):
    """`emokern export` with the shipped bank: the file reads back as the folded mix."""
    from emokern import EmotionBank
    from emokern.interop.llamacpp import mix_directions, read_control_vector

    out = tmp_path / "joy.gguf"
    assert main(["export", "--bank", "concept", "--mix", "joy=2,fear=0.5", "--out", str(out),
                 "--layers", "10,12"]) == 0
    assert "--control-vector" in capsys.readouterr().out
    bank = EmotionBank.load_default("concept")
    expected = mix_directions(bank, {"joy": 2.0, "fear": 0.5}, layers=[10, 12])
    read = read_control_vector(out)
    assert sorted(read) == [10, 12]
    for layer, vector in expected.items():
        assert (read[layer] == vector).all()


def test_export_refuses_a_bad_mix_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "x.gguf"
    assert main(["export", "--mix", "awe=1", "--out", str(out)]) == 2
    assert "unknown emotion 'awe'" in capsys.readouterr().err and not out.exists()


def test_generate_takes_the_mix_grammar(capsys, saved, tmp_path, monkeypatch):
    """Levels, caps, erase and rec on the command line (a calibrated bank; the reference
    backend until the kernels take bounds); bad terms and uncalibrated levels fail before the
    model loads, naming the row and emotion."""
    import torch

    from emokern import EmotionBank

    model, bank_path = saved
    bank = EmotionBank.load(bank_path)
    calibrated = bank.replace(
        neutral_mean=torch.zeros(bank.n_layers, bank.n_emotions),
        neutral_std=torch.ones(bank.n_layers, bank.n_emotions),
        metadata={"recommended_weights": {"fear": {"mode": "level", "level": 2.0}}})
    calibrated.save(tmp_path / "calibrated.safetensors")
    monkeypatch.setenv("EMOKERN_BACKEND", "reference")
    argv = ["generate", "--model", str(model), "--bank", str(tmp_path / "calibrated.safetensors"),
            "--prompt", "Hello", "--max-new-tokens", "2", "--layers", "1"]
    assert main([*argv, "--mix", "sadness@1.5", "--mix", "joy=1,joy<=0.5,fear=erase",
                 "--mix", "fear=rec", "--mix", '{"joy": {"min": -1}}']) == 0
    out = capsys.readouterr().out
    for line in ("--- sadness@1.5", "--- joy=1,joy<=0.5,fear=erase", "--- fear@2",
                 "--- joy>=-1"):
        assert line in out
    assert main([*argv, "--json", "--mix", "sadness@1.5"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["mix"] == {"sadness": {"level": 1.5}}

    def no_model(*args, **kwargs):
        raise AssertionError("the model loaded before the mix was checked")

    monkeypatch.setattr("emokern.models.load_model", no_model)
    for mix, bank_arg, message in (
            ("joy@1,joy=2", tmp_path / "calibrated.safetensors", "has a level and a push"),
            ("rage=1", tmp_path / "calibrated.safetensors", "--mix[0] names unknown emotion"),
            ("joy>=2,joy<=1", tmp_path / "calibrated.safetensors", "floor above its cap"),
            ("fear=rec,fear<=1", tmp_path / "calibrated.safetensors",
             "the recipe of 'fear' is a level"),
            ("sadness@1", bank_path, r"--mix[0]['sadness'] asks for a level or bound")):
        assert main([*argv[:3], "--bank", str(bank_arg), *argv[5:], "--mix", mix]) == 2
        err = capsys.readouterr().err
        assert err.startswith("emokern generate: error:") and message in err, err


def test_export_refuses_levels_with_the_push_weight_to_use(tmp_path, capsys, saved):
    import torch

    from emokern import EmotionBank

    _, bank_path = saved
    bank = EmotionBank.load(bank_path)
    leveled = bank.replace(
        neutral_mean=torch.zeros(bank.n_layers, bank.n_emotions),
        neutral_std=torch.ones(bank.n_layers, bank.n_emotions),
        metadata={"default_weight": 3.0,
                  "recommended_weights": {"fear": {"mode": "level", "level": 2.0},
                                          "joy": {"weight": 1.5}}})
    leveled.save(tmp_path / "leveled.safetensors")
    out = tmp_path / "x.gguf"
    argv = ["export", "--bank", str(tmp_path / "leveled.safetensors"), "--out", str(out),
            "--layers", "1"]
    assert main([*argv, "--mix", "fear=rec"]) == 2
    err = capsys.readouterr().err
    assert "mix['fear'] is 'fear@2' (its recipe), a level or bound" in err
    assert "fear=3" in err and not out.exists()
    assert main([*argv, "--mix", "joy=1,sadness<=0"]) == 2
    assert "mix['sadness'] is 'sadness<=0'" in capsys.readouterr().err and not out.exists()
    assert main([*argv, "--mix", "joy=rec,sadness=1"]) == 0
    assert "(mix joy=1.5,sadness=1," in capsys.readouterr().out and out.exists()


def test_mix_help_shows_every_term():
    generate = build_parser()._subparsers._group_actions[0].choices["generate"].format_help()
    text = " ".join(generate.split())
    for term in ("joy=2", "anger=rec", "sadness@1.5", "fear=erase", "anger<=0.5", "joy>=1"):
        assert term in text


def test_study_refuses_bad_input_before_loading_anything(capsys, saved, tmp_path, monkeypatch):
    """``emokern study``: an unknown study, and the dial/erase studies on a bank without a
    neutral baseline (levels are standard scores), are one error each before the model loads."""
    import emokern.models

    def no_load(*args, **kwargs):
        raise AssertionError("emokern study loaded the model before checking its input")

    monkeypatch.setattr(emokern.models, "load_model", no_load)
    model, bank = saved   # a random bank: no neutral baseline
    base = ["study", "--model", str(model), "--bank", str(bank), "--out", str(tmp_path / "s")]
    assert main([*base, "--studies", "recipes,mood"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("emokern study: error:") and "recipes, dial, erase" in err
    assert main([*base, "--studies", "dial"]) == 2
    assert "no neutral baseline" in capsys.readouterr().err
    assert main([*base, "--bank", "no-such-bank"]) == 2
    assert "'no-such-bank' is none of these" in capsys.readouterr().err

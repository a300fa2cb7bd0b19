"""Smoke test of the generate-benchmark harness on the tiny Llama, in seconds: the decode A/B,
a two-condition sweep, the markdown table and the saved json/md/png. Correctness of the
harness (shapes, keys, parity of the arms), not speed."""

from __future__ import annotations

import json
import os

import pytest
import torch

from emokern.benchmarks import mix_sweep as sweep_module
from emokern.benchmarks.decode import DecodeState, decode_overhead, distinct_mixes, quantiles
from emokern.benchmarks.generate import (
    TARGETS,
    format_table,
    run_generate_benchmark,
    save_results,
)
from emokern.benchmarks.hook_baselines import NaiveSteering, PerRowSteering, mix_rows, shared_deltas
from emokern.benchmarks.mix_sweep import sweep, sweep_conditions
from emokern.benchmarks.workload import PROMPTS, benchmark_bank, middle_layers
from emokern.emotions import BASIC_EMOTIONS
from emokern.steering import steer
from emokern.tokens import encode_prompts

pytestmark = pytest.mark.usefixtures("one_thread")


def quiet(*args, **kwargs):
    pass


@pytest.fixture(scope="module")
def setup(tiny_llama):
    model, tokenizer = tiny_llama
    bank, source = benchmark_bank(model, tokenizer, model_name="tiny")
    return model, tokenizer, bank, source


def test_workload_bank_and_layers(setup):
    model, _, bank, source = setup
    assert source.startswith("random vectors") and bank.metadata["random"]
    assert tuple(bank.names) == BASIC_EMOTIONS
    bank.check_compatible(model)
    assert middle_layers(bank, 2) == [1, 2]
    assert middle_layers(bank, 10) == [0, 1, 2, 3]
    assert quantiles([3.0]) == {"median": 3.0, "q25": 3.0, "q75": 3.0, "n": 1}
    mixes = distinct_mixes(bank.names, 4, 1.0, seed=0)
    assert len(mixes) == 4 and all(len(m) == 2 for m in mixes)
    assert mixes == distinct_mixes(bank.names, 4, 1.0, seed=0)


def test_decode_state_arms_agree(setup):
    """emokern and the naive hooks give the same logits for one shared mix on the decode
    state (what bench/bench_generate.py checks on the default model), and the state's cache is
    cropped back after each step."""
    model, tokenizer, bank, _ = setup
    state = DecodeState(model, tokenizer, batch=2)
    length = state.cache.get_seq_length()
    assert state.context == length and state.attention_mask.shape == (2, length + 1)
    layers = middle_layers(bank, 2)
    mix = {bank.names[0]: 2.0}

    def forward():
        with torch.inference_mode():
            out = model(input_ids=state.next_tokens, attention_mask=state.attention_mask,
                        past_key_values=state.cache, use_cache=True).logits
        state.cache.crop(-1)
        return out

    with steer(model, bank, [mix] * 2, layers=layers, monitor=True):
        fused = forward()
    with NaiveSteering(model, shared_deltas(bank, mix, layers)):
        naive = forward()
    torch.testing.assert_close(fused, naive, rtol=1e-4, atol=1e-4)
    assert state.timed_step() > 0 and state.cache.get_seq_length() == length


def test_decode_overhead(setup):
    model, tokenizer, bank, _ = setup
    rows, mixes = decode_overhead(model, tokenizer, bank, batch_sizes=[1, 2], layers=[1, 2],
                                  rounds=2, include_steering_vectors=False, log=quiet)
    assert [row["batch"] for row in rows] == [1, 2]
    for row in rows:
        assert row["rounds"] == 2 and row["context"] > 0
        assert set(row["ratio"]) >= {"emokern", "naive"}
        assert all(len(times) == 2 and min(times) > 0 for times in row["times_ms"].values())
        assert row["ratio"]["emokern"]["n"] == 2
    assert "emokern_shared" in rows[1]["ratio"] and "emokern_shared" not in rows[0]["ratio"]
    assert mixes["batch"] == 2 and "per_row" in rows[1]["ratio"] and "per_row" not in rows[0]
    assert mixes["hook_distinct_ms"] == rows[1]["time_ms"]["per_row"]["median"]
    assert mixes["hook_shared_ms"] == rows[1]["time_ms"]["naive"]["median"]
    paired = [a / b for a, b in zip(rows[1]["times_ms"]["naive"], rows[1]["times_ms"]["per_row"],
                                    strict=True)]
    assert mixes["hook_ratio_distinct_vs_shared"] == pytest.approx(sum(paired) / 2)
    assert mixes["hook_distinct_vs_unsteered"] == rows[1]["ratio"]["per_row"]


def test_mix_rows():
    weights = mix_rows(["joy", "fear"], [{"fear": 2.0}, {}, {"joy": -1.0, "fear": 0.5}])
    assert weights.dtype == torch.float32
    assert weights.tolist() == [[0.0, 2.0], [0.0, 0.0], [-1.0, 0.5]]
    assert mix_rows(["joy"], []).shape == (0, 1)
    with pytest.raises(ValueError, match=r"mixes\[1\] names \['rage'\]"):
        mix_rows(["joy"], [{"joy": 1.0}, {"rage": 1.0}])


def test_per_row_hook_matches_emokern_and_naive(setup):
    """The per-row hook steers each row by its own mix: on a left-padded prefill, the same
    logits at real tokens as emokern with those mixes (emokern leaves padding alone, the hooks
    do not), and with one mix in every row the same logits and readings as the naive hook."""
    model, tokenizer, bank, _ = setup
    layers = middle_layers(bank, 2)
    vectors = {layer: bank.layer_vectors(layer) for layer in layers}
    mixes = [{bank.names[0]: 2.0}, {bank.names[1]: -1.0, bank.names[2]: 3.0}]
    encoded = encode_prompts(tokenizer, list(PROMPTS[:2]))
    real = encoded["attention_mask"].bool()
    assert not real.all()  # the prompts differ in length: padding is present

    def logits():
        with torch.inference_mode():
            return model(**encoded).logits

    plain = logits()
    with steer(model, bank, mixes, layers=layers):
        fused = logits()
    with PerRowSteering(model, mix_rows(bank.names, mixes), vectors, read=False) as hook:
        hooked = logits()
    assert hook.readings == {layer: [] for layer in layers}
    torch.testing.assert_close(hooked[real], fused[real], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(hooked[real], plain[real], atol=1e-2)
    shared = [mixes[1]] * 2
    with PerRowSteering(model, mix_rows(bank.names, shared), vectors) as per_row:
        per_row_logits = logits()
    with NaiveSteering(model, shared_deltas(bank, mixes[1], layers), vectors) as naive:
        naive_logits = logits()
    torch.testing.assert_close(per_row_logits, naive_logits, rtol=1e-5, atol=1e-5)
    for layer in layers:
        torch.testing.assert_close(per_row.readings[layer][0], naive.readings[layer][0])
    with PerRowSteering(model, mix_rows(bank.names, mixes[:1]), vectors):
        with pytest.raises(ValueError, match="a batch of 2 rows, but weights for 1"):
            logits()
    with pytest.raises(ValueError, match="spread must be"):
        PerRowSteering(model, mix_rows(bank.names, mixes), vectors, spread="sum")
    with pytest.raises(ValueError, match=r"weights must be \[B, K\]"):
        PerRowSteering(model, torch.zeros(2, 3), vectors)


def test_sweep_on_two_conditions(setup, monkeypatch):
    model, tokenizer, bank, _ = setup
    monkeypatch.setattr(sweep_module, "SWEEP_WEIGHTS", (0.0, 1.0))
    joy = bank.select(["joy"])
    assert sweep_conditions(joy) == [{"joy": 0.0}, {"joy": 1.0}]
    result = sweep(model, tokenizer, joy, [1, 2], new_tokens=3, max_batch=len(PROMPTS),
                   include_steering_vectors=False, log=quiet)
    assert result["conditions"] == 2 and result["sequences"] == 2 * len(PROMPTS)
    assert result["emokern_generate_calls"] == 2 and result["naive_generate_calls"] == 2
    assert result["weights_x_alpha"] == [0.0, 1.0]
    for key in ("emokern_s", "emokern_prefill_s", "emokern_decode_s", "naive_s",
                "speedup_vs_naive", "decode_speedup_vs_naive", "per_row_s",
                "speedup_vs_per_row", "decode_speedup_vs_per_row"):
        assert result[key] > 0, key
    # The per-row hook runs in emokern's batches: the same number of generate calls.
    assert result["per_row_generate_calls"] == result["emokern_generate_calls"]
    assert len(PROMPTS) <= result["identical_rows_vs_per_row"] <= result["sequences"]
    # The weight-0 condition is the unsteered model on both sides: token-identical rows.
    assert len(PROMPTS) <= result["identical_rows_vs_naive"] <= result["sequences"]


def test_run_format_and_save(setup, tmp_path, monkeypatch):
    model, tokenizer, bank, _ = setup
    threads = torch.get_num_threads()
    result = run_generate_benchmark(model, tokenizer=tokenizer, batch_sizes=[1, 2], n_layers=2,
                                    rounds=2, run_sweep=False, include_steering_vectors=False,
                                    threads=1, log=quiet)
    assert torch.get_num_threads() == threads
    assert result["benchmark"] == "generate" and result["model"] == "LlamaForCausalLM"
    assert result["layers"] == [1, 2] and result["emotions"] == list(BASIC_EMOTIONS)
    assert result["targets"] == TARGETS and result["sweep"] is None
    machine = result["machine"]
    assert machine["torch_threads"] == 1 and machine["backends"]["reference"] is True
    # Add a two-condition sweep so the report covers (a), (b) and (c).
    monkeypatch.setattr(sweep_module, "SWEEP_WEIGHTS", (0.0, 1.0))
    result["sweep"] = sweep(model, tokenizer, bank.select(["joy"]), [1, 2], new_tokens=2,
                            max_batch=16, include_steering_vectors=False, log=quiet)
    table = format_table(result)
    assert "(a) decode tokens/s" in table and "(b) batch 2" in table
    assert "(c) sweep: 2 conditions x 8 prompts = 16 sequences" in table
    assert table.count("\n| 1 |") == 1 and "| naive hooks loop | 2 |" in table
    written = save_results(json.loads(json.dumps(result)), tmp_path / "out", stem="smoke")
    assert [p.name for p in written] == ["smoke.json", "smoke.md", "smoke.png"]
    assert json.loads(written[0].read_text()) == json.loads(json.dumps(result))
    assert written[1].read_text() == table
    assert written[2].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    umask = os.umask(0)
    os.umask(umask)
    assert all(p.stat().st_mode & 0o777 == 0o666 & ~umask for p in written)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [p.name for p in written]

"""The vLLM benchmark's pieces that run without vLLM: the sweep as requests (the same prompt ids
and mixes, row for row, as the Hugging Face sweep), token comparison, and the capture of lines
that child processes write."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from emokern.benchmarks import mix_sweep as sweep_module
from emokern.benchmarks.mix_sweep import generate_options, sweep, sweep_conditions
from emokern.benchmarks.serving import (
    CapturedLines,
    first_differences,
    identical_rows,
    sweep_requests,
)
from emokern.benchmarks.workload import PROMPTS, benchmark_bank
from emokern.tokens import encode_prompts

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(tiny_llama):
    model, tokenizer = tiny_llama
    bank, _ = benchmark_bank(model, tokenizer, model_name="tiny")
    return model, tokenizer, bank


def test_sweep_requests_are_the_hf_rows(setup):
    """Row ``i`` is condition ``i // 8`` on prompt ``i % 8``, its ids exactly the unpadded ids
    the Hugging Face sweep feeds: greedy generation from them alone gives the tokens that row
    gets in the padded batch."""
    model, tokenizer, bank = setup
    prompts, mixes = sweep_requests(tokenizer, bank)
    conditions = sweep_conditions(bank)
    assert len(prompts) == len(mixes) == len(conditions) * len(PROMPTS) == 336
    assert mixes[0] == conditions[0] and mixes[8] == conditions[1]
    assert mixes[-1] == conditions[-1] and mixes[7] == conditions[0]
    encoded = encode_prompts(tokenizer, list(PROMPTS))
    lengths = encoded["attention_mask"].sum(1).tolist()
    assert len(set(lengths)) > 1  # the batch is padded, the requests are not
    for i in (0, 5, 8 + 5, 335):
        ids = prompts[i]["prompt_token_ids"]
        row = encoded["input_ids"][i % 8]
        assert ids == row[-lengths[i % 8]:].tolist()
        assert tokenizer.pad_token_id not in ids[:1]
    options = generate_options(tokenizer, 3)
    with torch.inference_mode():
        batched = model.generate(**encoded, **options)[:, encoded["input_ids"].shape[1]:]
        alone = model.generate(input_ids=torch.tensor([prompts[5]["prompt_token_ids"]]),
                               attention_mask=torch.ones(1, lengths[5], dtype=torch.long),
                               **options)[0, lengths[5]:]
    assert identical_rows([alone], [batched[5]]) == 1


def test_identical_rows():
    assert identical_rows([[1, 2], [3, 4]], [torch.tensor([1, 2]), torch.tensor([3, 5])]) == 1
    assert identical_rows([], []) == 0
    assert identical_rows([[1, 2]], [[1, 2, 3]]) == 0
    with pytest.raises(ValueError, match="2 rows against 1"):
        identical_rows([[1], [2]], [[1]])


def test_first_differences():
    a = [[1, 2, 3], [1, 2, 3], [4, 5, 6], [7, 8, 9]]
    b = [torch.tensor([1, 2, 3]), [1, 0, 3], [0, 5, 6], [7, 8, 0]]
    assert first_differences(a, b) == {"0": 1, "1": 1, "2": 1}
    assert list(first_differences([[0, 1]] * 3 + [[1, 1]], [[0, 2]] * 3 + [[0, 1]])) == ["0", "1"]
    with pytest.raises(ValueError, match="first_differences: 1 rows against 2"):
        first_differences([[1]], [[1], [2]])


def test_sweep_hands_out_its_tokens(setup, monkeypatch):
    """``sweep(tokens=...)`` receives each system's rows (emokern, the per-condition loop and the
    per-row hook), the ones it counted identical."""
    model, tokenizer, bank = setup
    monkeypatch.setattr(sweep_module, "SWEEP_WEIGHTS", (0.0, 1.0))
    tokens: dict = {}
    result = sweep(model, tokenizer, bank.select(["joy"]), [1, 2], new_tokens=2,
                   max_batch=16, include_steering_vectors=False, log=lambda *a: None,
                   tokens=tokens)
    assert set(tokens) == {"emokern", "naive", "per_row"}
    assert all(len(rows) == 16 and all(r.shape == (2,) for r in rows)
               for rows in tokens.values())
    for other in ("naive", "per_row"):
        assert (identical_rows(tokens["emokern"], tokens[other])
                == result[f"identical_rows_vs_{other}"])


def test_captured_lines_from_children(capfd):
    """Lines a child process writes to either stream are kept when they match and passed on
    unchanged either way; the descriptors are restored afterwards."""
    script = ("import sys; print('INFO emokern.vllm: op backend on cpu: cpu'); "
              "print('other line'); sys.stderr.write('ERR emokern.vllm: on stderr\\n'); "
              "sys.stdout.write('no newline emokern.vllm: at the end')")
    before = os.fstat(1).st_ino, os.fstat(2).st_ino
    with CapturedLines(r"emokern\.vllm:") as captured:
        subprocess.run([sys.executable, "-c", script], check=True)
        os.write(2, b"parent emokern.vllm: too\n")  # at the descriptor: pytest swaps sys.stderr
    assert (os.fstat(1).st_ino, os.fstat(2).st_ino) == before
    assert sorted(captured.lines) == sorted([
        "INFO emokern.vllm: op backend on cpu: cpu", "ERR emokern.vllm: on stderr",
        "no newline emokern.vllm: at the end", "parent emokern.vllm: too"])
    out, err = capfd.readouterr()
    assert "other line\n" in out and "INFO emokern.vllm: op backend on cpu: cpu\n" in out
    assert out.endswith("no newline emokern.vllm: at the end")
    assert "ERR emokern.vllm: on stderr\n" in err and "parent emokern.vllm: too\n" in err
    with CapturedLines("x") as again, pytest.raises(RuntimeError, match="already capturing"):
        again.__enter__()

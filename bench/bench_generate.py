"""End-to-end steering benchmark on the default model.

Full run, writing ``bench/results/generate.{json,md,png}``::

    python bench/bench_generate.py [--batch-sizes 1,8,32,64] [--rounds 40] [--threads N]
                                   [--sweep-new-tokens 32] [--no-sweep] [--out bench/results]

It measures, as ratios within one run (see :mod:`emokern.benchmarks.generate`): (a) decode
tokens/s steered (10 layers, K = 6, a distinct mix per row, monitor on) over unsteered, paired
per step, at batch 1, 8, 32, 64, with the naive hook baseline and the ``steering-vectors``
library alongside; (b) 64 distinct mixes vs one shared mix at batch 64, for emokern and for
plain hooks (the naive shared-vector hook vs a per-row hook ``h.add_((W @ V)[:, None])``, the
plain PyTorch for distinct mixes in one batch); (c) a 336-sequence
sweep, emokern batched vs the baseline's per-condition loop. ``emokern bench generate`` runs the
same harness on any model.

Under pytest (``make bench``) the decode step of each arm is timed with pytest-benchmark at
batch 8 on the default model, after checking that emokern and the naive hooks agree.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch

from emokern.benchmarks.decode import DecodeState
from emokern.benchmarks.generate import format_table, run_generate_benchmark, save_results
from emokern.benchmarks.hook_baselines import NaiveSteering, shared_deltas
from emokern.benchmarks.workload import benchmark_bank, middle_layers
from emokern.models import load_model
from emokern.steering import steer

RESULTS = Path(__file__).resolve().parent / "results"


# ------------------------------------------------------------------------ pytest-benchmark


@pytest.fixture(scope="module")
def setup():
    model, tokenizer = load_model("default")
    bank, _ = benchmark_bank(model, tokenizer)
    layers = middle_layers(bank, 10)
    mix = {bank.names[0]: 2.0 * bank.default_weight}
    state = DecodeState(model, tokenizer, batch=8)
    steerer = steer(model, bank, [mix] * 8, layers=layers, monitor=True)
    naive = NaiveSteering(model, shared_deltas(bank, mix, layers),
                          {layer: bank.layer_vectors(layer) for layer in layers})
    # Check, then time (also under --benchmark-only, which skips plain tests).
    with steerer:
        fused = _forward(state)
    with naive:
        hooked = _forward(state)
    torch.testing.assert_close(fused, hooked, rtol=1e-4, atol=1e-3)
    for readings in naive.readings.values():
        readings.clear()
    return model, state, steerer, naive


def _forward(state):
    with torch.inference_mode():
        out = state.model(input_ids=state.next_tokens, attention_mask=state.attention_mask,
                          past_key_values=state.cache, use_cache=True).logits
    state.cache.crop(-1)
    return out


def test_check_emokern_matches_naive(setup):
    """The fixture asserts that emokern and the naive hooks give the same logits."""
    assert setup[2].layers == tuple(setup[3].deltas)


def test_decode_unsteered(benchmark, setup):
    benchmark(_forward, setup[1])


def test_decode_emokern(benchmark, setup):
    _, state, steerer, _ = setup
    with steerer:
        benchmark(_forward, state)


def test_decode_naive(benchmark, setup):
    _, state, _, naive = setup
    with naive:
        benchmark(_forward, state)
    for readings in naive.readings.values():
        readings.clear()


# ------------------------------------------------------------------------ full run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--batch-sizes", default="1,8,32,64")
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--sweep-new-tokens", type=int, default=32)
    parser.add_argument("--sweep-max-batch", type=int, default=168)
    parser.add_argument("--no-sweep", action="store_true")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    result = run_generate_benchmark(
        args.model, batch_sizes=[int(b) for b in args.batch_sizes.split(",")],
        rounds=args.rounds, threads=args.threads, run_sweep=not args.no_sweep,
        sweep_new_tokens=args.sweep_new_tokens, sweep_max_batch=args.sweep_max_batch)
    print()
    print(format_table(result))
    for path in save_results(result, args.out):
        print(f"saved {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

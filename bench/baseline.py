"""The naive steering baselines emokern is measured against.

1. :class:`NaiveSteering` — the common forward-hook approach of existing steering libraries:
   one hook per steered decoder layer returns ``output + delta`` (one shared vector for the
   whole batch, every position), projections come from a separate matmul appended to Python
   lists, and different mixes run by looping over conditions, one batch each
   (:func:`sweep_loop`).
2. The published ``steering-vectors`` library (``pip install --no-deps steering-vectors``; it
   pins transformers<5 but works with 5.x, and imports scikit-learn), through
   ``SteeringVector(...).apply(model)`` (:func:`steering_vectors_patch`).

The implementation lives in :mod:`emokern.benchmarks.baseline` (the loop over conditions in
:mod:`emokern.benchmarks.sweep`) so that ``emokern bench generate`` can run it from an
installed package; this module is the benchmark suite's entry point to it. Run it to check, on
the default model, that the naive hooks and emokern give the same logits for one shared mix::

    python bench/baseline.py
"""

from __future__ import annotations

import torch

from emokern.benchmarks.baseline import (
    NaiveSteering,
    shared_deltas,
    steering_vectors_available,
    steering_vectors_patch,
)
from emokern.benchmarks.sweep import sweep_conditions, sweep_loop
from emokern.benchmarks.workload import PROMPTS, benchmark_bank, middle_layers
from emokern.models import load_model
from emokern.steering import steer
from emokern.tokens import encode_prompts

__all__ = ["NaiveSteering", "shared_deltas", "steering_vectors_available",
           "steering_vectors_patch", "sweep_conditions", "sweep_loop"]


def _parity_on_default_model() -> None:
    model, tokenizer = load_model("default")
    bank, source = benchmark_bank(model, tokenizer)
    layers = middle_layers(bank, 10)
    mix = {bank.names[0]: 2.0 * bank.recommended_alpha}
    encoded = encode_prompts(tokenizer, list(PROMPTS[:4]))
    with torch.inference_mode():
        with steer(model, bank, [mix] * 4, layers=layers, positions="all"):
            fused = model(**encoded).logits
        with NaiveSteering(model, shared_deltas(bank, mix, layers)):
            naive = model(**encoded).logits
        plain = model(**encoded).logits
    real = encoded["attention_mask"].bool()
    print(f"bank: {source}; layers {layers}; mix {mix}")
    print(f"max |fused - naive| over real tokens: {(fused - naive)[real].abs().max():.2e} "
          f"(steering moved the logits by up to {(fused - plain)[real].abs().max():.2f})")
    if steering_vectors_available():
        deltas = shared_deltas(bank, mix, layers)
        with torch.inference_mode(), steering_vectors_patch(model, deltas):
            library = model(**encoded).logits
        print(f"max |fused - steering-vectors|: {(fused - library)[real].abs().max():.2e}")


if __name__ == "__main__":
    _parity_on_default_model()

"""Check, on the default model, that the naive hook baselines (and ``steering-vectors`` when
installed) give emokern's logits for one shared mix::

    python bench/hook_parity.py

The baselines and the check live in :mod:`emokern.benchmarks.hook_baselines` (reusable by
``emokern bench``); this file only runs it.
"""

from emokern.benchmarks.hook_baselines import parity_on_default_model

if __name__ == "__main__":
    parity_on_default_model()

"""Evaluation: independent scorers for generated text and the calibration sweeps.

* :mod:`emokern.eval.scorers` — :class:`EmotionScorer` (the independent ``nade`` classifier),
  :func:`repetition`, :func:`distinct_n`, :func:`perplexity`;
* :mod:`emokern.eval.calibrate` — steering sweeps (:func:`calibrate`), the choice of the
  recommended weight and layers, held-out classification accuracy of a bank, and the choice of
  Method EV's instruction phrasing.
"""

from emokern.eval.scorers import (
    BASIC_EMOTIONS,
    EmotionScorer,
    distinct_n,
    perplexity,
    repetition,
)

__all__ = ["BASIC_EMOTIONS", "EmotionScorer", "distinct_n", "perplexity", "repetition"]

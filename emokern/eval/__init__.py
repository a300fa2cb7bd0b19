"""Evaluation: independent scorers for generated text, the calibration sweep, held-out
classification and the measures of Method EV.

* :mod:`emokern.eval.scorers` — :class:`EmotionScorer` (the independent ``nade`` classifier),
  :func:`repetition`, :func:`distinct_n`, :func:`degeneration`, :func:`perplexity`;
* :mod:`emokern.eval.lexicon` — :class:`LexiconScorer` (NRC EmoLex word densities);
* :mod:`emokern.eval.similarity` — :class:`SentenceEmbedder` (all-MiniLM-L6-v2): semantic
  fidelity and topic adherence;
* :mod:`emokern.eval.metrics` — the papers' EPS and EAS per emotion and weight
  (:func:`aggregate`); correlations (:func:`pearson`, :func:`spearman`) are
  :mod:`emokern.stats`'s, re-exported here;
* :mod:`emokern.eval.calibration_sweep` — steering sweeps (:func:`calibrate`), the choice of the
  recommended weight and layers (:func:`choose_recommendation`) and storing it
  (:func:`store_recommendation`);
* :mod:`emokern.eval.heldout` — held-out classification accuracy of a bank
  (:func:`heldout_report`);
* :mod:`emokern.eval.instructions` — the choice of Method EV's instruction phrasing
  (:func:`instruction_sweep`) and the report of a full extraction (:func:`ev_report`).

``emokern calibrate {sweep,report,instructions}`` runs them on the default model.
"""

from emokern.emotions import BASIC_EMOTIONS
from emokern.eval.calibration_sweep import (
    RowSteering,
    calibrate,
    calibration_record,
    choose_recommendation,
    format_sweep,
    store_recommendation,
)
from emokern.eval.heldout import (
    heldout_report,
    heldout_states,
    nearest_mean_accuracy,
    projection_accuracy,
)
from emokern.eval.instructions import ev_report, format_ev_report, instruction_sweep
from emokern.eval.lexicon import LexiconScorer
from emokern.eval.metrics import aggregate, eas, eps
from emokern.eval.scorers import EmotionScorer, degeneration, distinct_n, perplexity, repetition
from emokern.eval.similarity import SentenceEmbedder
from emokern.stats import pearson, spearman

__all__ = [
    "BASIC_EMOTIONS",
    "EmotionScorer",
    "LexiconScorer",
    "SentenceEmbedder",
    "RowSteering",
    "aggregate",
    "calibrate",
    "calibration_record",
    "choose_recommendation",
    "degeneration",
    "distinct_n",
    "eas",
    "eps",
    "ev_report",
    "format_ev_report",
    "format_sweep",
    "heldout_report",
    "heldout_states",
    "instruction_sweep",
    "nearest_mean_accuracy",
    "pearson",
    "perplexity",
    "projection_accuracy",
    "repetition",
    "spearman",
    "store_recommendation",
]

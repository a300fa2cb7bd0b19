"""Evaluation: independent scorers for generated text, the calibration sweep, held-out
classification and the measures of Method EV.

* :mod:`emokern.eval.scorers` — :class:`EmotionScorer` (the independent ``nade`` classifier),
  :func:`repetition`, :func:`distinct_n`, :func:`perplexity`;
* :mod:`emokern.eval.sweep` — steering sweeps (:func:`calibrate`), the choice of the
  recommended weight and layers (:func:`choose_recommendation`) and storing it
  (:func:`store_recommendation`);
* :mod:`emokern.eval.heldout` — held-out classification accuracy of a bank
  (:func:`heldout_report`);
* :mod:`emokern.eval.instructions` — the choice of Method EV's instruction phrasing
  (:func:`instruction_sweep`) and the report of a full extraction (:func:`ev_report`).

``emokern calibrate {sweep,report,instructions}`` runs them on the default model.
"""

from emokern.emotions import BASIC_EMOTIONS
from emokern.eval.heldout import (
    heldout_report,
    heldout_states,
    nearest_mean_accuracy,
    projection_accuracy,
)
from emokern.eval.instructions import ev_report, format_ev_report, instruction_sweep
from emokern.eval.scorers import EmotionScorer, distinct_n, perplexity, repetition
from emokern.eval.sweep import (
    RowSteering,
    calibrate,
    calibration_record,
    choose_recommendation,
    format_sweep,
    store_recommendation,
)

__all__ = [
    "BASIC_EMOTIONS",
    "EmotionScorer",
    "RowSteering",
    "calibrate",
    "calibration_record",
    "choose_recommendation",
    "distinct_n",
    "ev_report",
    "format_ev_report",
    "format_sweep",
    "heldout_report",
    "heldout_states",
    "instruction_sweep",
    "nearest_mean_accuracy",
    "perplexity",
    "projection_accuracy",
    "repetition",
    "store_recommendation",
]

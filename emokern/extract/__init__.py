"""Emotion-vector extraction by the two published methods.

* :mod:`emokern.extract.ev` — **Method EV**: the model answers everyday queries neutrally and
  under an instruction to answer with an emotion; the vector is the difference of the mean
  hidden states over the response tokens (:func:`extract_ev`).
* :mod:`emokern.extract.concept` — **Method concept**: emotion-concept words in neutral carrier
  sentences; the vector is the category's mean hidden state at the word minus the mean over
  categories (:func:`extract_concept`).
* :mod:`emokern.extract.hidden` — the model reads both use: batched generation
  (:func:`generate_responses`) and hidden states summed over token spans
  (:func:`span_hidden_states`).
* :mod:`emokern.extract.vectors` — centring, pairwise cosines, the recommended weight and
  layers (from the calibration record, :func:`emokern.data.load_calibration`), the bank.
* :mod:`emokern.extract.neutral_readings` — the readings' neutral baseline
  (:func:`neutral_stats`, :func:`neutral_baseline`) and the layers that detect emotions best
  (:func:`detection_layers`).
* :mod:`emokern.extract.extract_command` — :func:`extract_main`: check, load the model,
  extract, save.

Both return an :class:`emokern.bank.EmotionBank` with per-layer mean hidden-state norms and
metadata (method, source-set hash, model fingerprint, emokern version, recommended weight and
layers). The data sets are read through :mod:`emokern.data`. The shipped banks are regenerated
with::

    emokern extract --method ev --out emokern/data/banks/default-ev.safetensors
    emokern extract --method concept --out emokern/data/banks/default-concept.safetensors
"""

from emokern.extract.concept import (
    CONCEPT_SLOT,
    DEFAULT_CONCEPT_POOLING,
    concept_token_span,
    extract_concept,
)
from emokern.extract.ev import DEFAULT_CENTER, ev_messages, extract_ev
from emokern.extract.extract_command import METHODS, extract_main
from emokern.extract.hidden import DEFAULT_MAX_NEW_TOKENS, generate_responses, span_hidden_states
from emokern.extract.neutral_readings import (
    detection_accuracy,
    detection_layers,
    neutral_baseline,
    neutral_stats,
)
from emokern.extract.vectors import center_vectors, make_bank, pairwise_cosines, recommend

__all__ = [
    "CONCEPT_SLOT",
    "DEFAULT_CENTER",
    "DEFAULT_CONCEPT_POOLING",
    "DEFAULT_MAX_NEW_TOKENS",
    "METHODS",
    "center_vectors",
    "concept_token_span",
    "detection_accuracy",
    "detection_layers",
    "ev_messages",
    "extract_concept",
    "extract_ev",
    "extract_main",
    "generate_responses",
    "make_bank",
    "neutral_baseline",
    "neutral_stats",
    "pairwise_cosines",
    "recommend",
    "span_hidden_states",
]

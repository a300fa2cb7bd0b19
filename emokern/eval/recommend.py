r"""Per-emotion recommended weights: one weight does not fit every emotion.

On the default model the concept bank moves sadness and disgust fluently at weight 2 but anger
only at 4; a single bank-wide weight either leaves anger unsteered or wrecks the others. The
sweep here runs the evaluation grid (:func:`emokern.eval.evaluation.evaluate`) over weights on
the project's own prompts (:data:`SWEEP_PROMPTS`: the calibration prompts and the first
extraction queries, never the evaluation prompts) and, per emotion, chooses (:func:`choose`)

.. math::
    w^*_e = \arg\max_{w \in W_e} \big(\mathrm{EPS}(e, w) - \mathrm{EPS}(e, 0)\big),\quad
    W_e = \{w : \overline{\mathrm{distinct}_2} \ge 0.7,\
           \mathrm{median\ ppl}(e, w) \le 3\,\mathrm{median\ ppl}(0)\}

(ties within 0.01 go to the smaller weight). The choice is stored in the bank's metadata
(``recommended_weights``), read by :meth:`emokern.EmotionBank.recommended_weight` and by
``mix=[{"anger": "rec"}]``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from emokern.data import load_queries
from emokern.eval.calibration_sweep import CALIBRATION_PROMPTS
from emokern.eval.evaluation import evaluate

__all__ = ["DEFAULT_SWEEP_WEIGHTS", "SWEEP_PROMPTS", "choose", "store", "sweep"]

#: The project's prompts for the sweep: the 8 calibration prompts and the first 16 extraction
#: queries (none is an evaluation prompt).
SWEEP_PROMPTS = (*CALIBRATION_PROMPTS, *load_queries()[:16])

#: Weights swept per extraction method (the concept vectors are ~5x longer than EV's).
DEFAULT_SWEEP_WEIGHTS = {"ev": (2.0, 4.0, 6.0, 8.0, 10.0, 12.0),
                         "concept": (0.5, 1.0, 1.5, 2.0, 3.0, 4.0)}


def sweep(model, tokenizer, bank, *, emotions=None, weights: Sequence[float] | None = None,
          prompts: Sequence[str] = SWEEP_PROMPTS, max_new_tokens: int = 40,
          batch_size: int = 64, progress: bool = True, **options) -> dict:
    """Run the evaluation grid over ``weights`` on ``prompts`` (default the project's sweep
    prompts and the method's :data:`DEFAULT_SWEEP_WEIGHTS`); returns ``evaluate``'s result."""
    if weights is None:
        weights = DEFAULT_SWEEP_WEIGHTS.get(bank.method or "", DEFAULT_SWEEP_WEIGHTS["ev"])
    weights = [0.0, *[float(w) for w in weights if float(w) != 0.0]]
    return evaluate(model, tokenizer, bank, emotions=emotions, weights=weights,
                    prompts=list(prompts), max_new_tokens=max_new_tokens,
                    batch_size=batch_size, progress=progress, **options)


def choose(aggregates: Sequence[dict], *, min_distinct2: float = 0.7,
           max_perplexity_ratio: float = 3.0) -> dict[str, dict]:
    """Per emotion, the fluent weight with the largest judge gain (see the module docstring).

    Parameters
    ----------
    aggregates : sequence of dict
        :func:`emokern.eval.metrics.aggregate` records (``emotion``, ``label``, ``weight``,
        ``gain``, ``distinct2``, ``perplexity``).

    Returns
    -------
    dict
        emotion -> ``{"weight", "gain", "eps", "distinct2", "perplexity", "fluent"}``;
        ``fluent`` is False when no swept weight passed, and the smallest swept weight is
        recorded.
    """
    out: dict[str, dict] = {}
    emotions = list(dict.fromkeys(a["emotion"] for a in aggregates))
    for emotion in emotions:
        records = [a for a in aggregates if a["emotion"] == emotion]
        base = [a for a in records if a["label"] == "0"]
        base_ppl = base[0]["perplexity"] if base else float("nan")
        swept = sorted((a for a in records if a["label"] != "0" and a["weight"] > 0),
                       key=lambda a: a["weight"])
        if not swept:
            continue
        best = None
        for a in swept:
            fluent = a.get("distinct2", 1.0) >= min_distinct2
            ppl = a.get("perplexity", float("nan"))
            if base_ppl == base_ppl and ppl == ppl and ppl > max_perplexity_ratio * base_ppl:
                fluent = False
            if fluent and (best is None or a["gain"] > best["gain"] + 0.01):
                best = a
        chosen = best if best is not None else swept[0]
        out[emotion] = {"weight": float(chosen["weight"]), "gain": round(chosen["gain"], 4),
                        "eps": round(chosen["eps"], 4),
                        "distinct2": round(chosen.get("distinct2", float("nan")), 4),
                        "perplexity": round(chosen.get("perplexity", float("nan")), 2),
                        "fluent": best is not None}
    return out


def store(bank, choice: dict[str, dict], *, layers: Sequence[int] | None = None,
          prompts: int | None = None, reading: dict[str, float] | None = None):
    """A copy of ``bank`` whose metadata records ``choice`` as ``recommended_weights`` (each
    with its layer band, default the bank's recommended layers, the number of sweep prompts
    and, when given, the mean calibrated reading at that weight); vectors unchanged."""
    band = list(bank.recommended_layers if layers is None else layers)
    records = bank.recommended_weights
    for emotion, record in choice.items():
        entry = {k: v for k, v in record.items() if v == v}  # drop NaN: not JSON
        entry["layers"] = band
        if prompts is not None:
            entry["prompts"] = int(prompts)
        if reading and reading.get(emotion) is not None:
            entry["reading"] = round(float(reading[emotion]), 3)
        records[emotion] = entry
    return bank.replace(metadata={"recommended_weights": records})


def save_shipped(bank, path) -> None:
    """Save a shipped bank in float16 as before (its vectors are float16 values already, so the
    round trip is bit-identical)."""
    bank.save(path, dtype=torch.float16)

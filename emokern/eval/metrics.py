r"""The emotion-vector papers' metrics, per emotion and weight, from judged answers.

Following Dong et al., *Controllable Emotion Generation with Emotion Vectors* (arXiv
2502.04075), for a target emotion :math:`e` steered at weight :math:`w` over prompts
:math:`i = 1..N`, with a judge (here the ``nade`` classifier, :class:`~emokern.eval.scorers.
EmotionScorer`) giving each answer intensities :math:`s_{i,k}\in[0,1]` over the six basic
emotions and probabilities :math:`p_{i,k} = s_{i,k}/\sum_j s_{i,j}`:

.. math::
    \mathrm{EPS}(e, w) = \frac1N\sum_i p_{i,e}, \qquad
    \mathrm{top}(e, w) = \frac1N\sum_i [\arg\max_k p_{i,k} = e]

(Emotion Probability Score, and the share of answers whose top emotion is the target), and

.. math::
    \mathrm{EAS}(e, w) = \frac1N\sum_i s_{i,e}, \qquad
    \Delta\mathrm{EAS}(e, w) = \frac{\mathrm{EAS}(e,w) - \mathrm{EAS}(e,0)}
                                     {\mathrm{EAS}(e,0)}

(Emotion Absolute Score: the target's mean intensity, and its relative change against the
unsteered answers to the same prompts, :math:`w = 0`). The paper judges with a large
model; the judge here is a small, independent classifier, so absolute levels differ, trends
compare.

:func:`aggregate` turns evaluated rows (one per answer) into one record per (emotion, weight)
with these and the fluency, fidelity and degeneration means.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = ["AGGREGATE_FIELDS", "PER_EMOTION_FIELDS", "aggregate", "eas", "eps", "finite"]

#: Per-row numeric fields averaged by :func:`aggregate` (when present in the rows).
AGGREGATE_FIELDS = ("fidelity", "adherence", "distinct2", "rep3", "n_tokens")
#: Per-row fields that hold one value per emotion (row key -> aggregate key): the target
#: emotion's value is averaged.
PER_EMOTION_FIELDS = {"readings": "reading", "projections": "raw_reading",
                      "lexicon": "lexicon"}


def eps(probabilities: np.ndarray, column: int) -> tuple[float, float]:
    """``(EPS, top share)`` of one emotion from judge probabilities ``[N, E]``."""
    p = np.asarray(probabilities, dtype=np.float64)
    if p.ndim != 2 or p.shape[0] == 0:
        raise ValueError(f"probabilities must be a non-empty [N, E] array, got {p.shape}")
    return float(p[:, column].mean()), float((p.argmax(axis=1) == column).mean())


def eas(intensities: np.ndarray, column: int, baseline: float | None = None
        ) -> tuple[float, float]:
    """``(EAS, relative change vs baseline)`` of one emotion from judge intensities
    ``[N, E]``; the change is NaN without a positive baseline."""
    s = np.asarray(intensities, dtype=np.float64)
    if s.ndim != 2 or s.shape[0] == 0:
        raise ValueError(f"intensities must be a non-empty [N, E] array, got {s.shape}")
    value = float(s[:, column].mean())
    change = (value - baseline) / baseline if baseline and baseline > 0 else float("nan")
    return value, change


def _nanmean(values) -> float:
    arr = np.asarray([v for v in values if v is not None], dtype=np.float64)
    arr = arr[np.isfinite(arr)]
    return float(arr.mean()) if arr.size else float("nan")


def _nanmedian(values) -> float:
    arr = np.asarray([v for v in values if v is not None], dtype=np.float64)
    arr = arr[np.isfinite(arr)]
    return float(np.median(arr)) if arr.size else float("nan")


def aggregate(rows: Sequence[dict], emotions: Sequence[str]) -> list[dict]:
    r"""One record per (emotion, weight label) from evaluated rows.

    Parameters
    ----------
    rows : sequence of dict
        Each with ``emotion`` (the target, or None for an unsteered row), ``label`` (the
        weight as asked: ``"0"``, ``"2"``, ``"rec"``...), ``weight`` (the weight applied),
        ``judge`` (emotion -> nade intensity), ``judge_p`` (emotion -> probability),
        ``perplexity`` and the :data:`AGGREGATE_FIELDS` that were measured; of the
        :data:`PER_EMOTION_FIELDS` (``readings``: emotion -> calibrated reading,
        ``projections``: raw, ``lexicon``: EmoLex density) the target's value is read.
    emotions : sequence of str
        The judged emotions, in the order of the probability columns.

    Returns
    -------
    list of dict
        Per (emotion, label): ``emotion``, ``label``, ``weight`` (mean applied), ``n``,
        ``eps``, ``top``, ``eas``, ``eas_change`` (vs the unsteered rows of the same prompts),
        ``gain`` (EPS minus the unsteered EPS), ``perplexity`` (median) and the means of
        :data:`AGGREGATE_FIELDS` and :data:`PER_EMOTION_FIELDS`. The unsteered rows count
        as weight ``"0"`` of every emotion.
    """
    emotions = list(emotions)
    base = [r for r in rows if r.get("emotion") is None]
    steered = [r for r in rows if r.get("emotion") is not None]
    out = []
    for emotion in emotions:
        k = emotions.index(emotion)
        groups: dict[str, list[dict]] = {}
        if base:
            groups["0"] = base
        for r in steered:
            if r["emotion"] == emotion:
                groups.setdefault(r["label"], []).append(r)
        base_prompts = {r["prompt"] for r in base}
        for label, group in groups.items():
            probs = np.array([[r["judge_p"][e] for e in emotions] for r in group])
            ints = np.array([[r["judge"][e] for e in emotions] for r in group])
            prompts = {r["prompt"] for r in group}
            same = [r for r in base if r["prompt"] in prompts] if prompts <= base_prompts \
                else base
            base_eas = float(np.mean([r["judge"][emotion] for r in same])) if same else None
            base_eps = float(np.mean([r["judge_p"][emotion] for r in same])) if same \
                else float("nan")
            e_ps, top = eps(probs, k)
            e_as, change = eas(ints, k, base_eas)
            record = {"emotion": emotion, "label": label,
                      "weight": _nanmean(r.get("weight", 0.0) for r in group), "n": len(group),
                      "eps": e_ps, "top": top, "eas": e_as, "eas_change": change,
                      "gain": e_ps - base_eps,
                      "perplexity": _nanmedian(r.get("perplexity") for r in group)}
            for field in AGGREGATE_FIELDS:
                values = [r.get(field) for r in group]
                if any(v is not None for v in values):
                    record[field] = _nanmean(values)
            for key, field in PER_EMOTION_FIELDS.items():
                values = [(r.get(key) or {}).get(emotion) for r in group]
                if any(v is not None for v in values):
                    record[field] = _nanmean(values)
            out.append(record)
    return out


def finite(value: float) -> float | None:
    """``value`` for JSON (None when NaN or infinite)."""
    return value if isinstance(value, (int, float)) and math.isfinite(value) else None

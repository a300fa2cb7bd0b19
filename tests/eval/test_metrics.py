"""The papers' metrics (EPS, EAS), aggregation per emotion and weight."""

import math

import numpy as np
import pytest

from emokern.eval.metrics import aggregate, eas, eps

EMOTIONS = ["joy", "sadness"]


def _row(prompt, emotion, label, weight, joy, sad, **extra):
    total = joy + sad
    return {"prompt": prompt, "emotion": emotion, "label": label, "weight": weight,
            "judge": {"joy": joy, "sadness": sad},
            "judge_p": {"joy": joy / total, "sadness": sad / total}, **extra}


def test_eps_and_eas():
    p = np.array([[0.8, 0.2], [0.4, 0.6], [0.1, 0.9]])
    value, top = eps(p, 1)
    assert value == pytest.approx(0.5667, abs=1e-4) and top == pytest.approx(2 / 3)
    s = np.array([[0.2, 0.1], [0.4, 0.3]])
    value, change = eas(s, 1, baseline=0.1)
    assert value == pytest.approx(0.2) and change == pytest.approx(1.0)
    assert math.isnan(eas(s, 1)[1]) and math.isnan(eas(s, 1, baseline=0.0)[1])
    with pytest.raises(ValueError, match="non-empty"):
        eps(np.zeros((0, 2)), 0)


def test_aggregate_per_emotion_and_weight():
    rows = [_row("a", None, "0", 0.0, 0.6, 0.2, distinct2=1.0, perplexity=5.0),
            _row("b", None, "0", 0.0, 0.6, 0.2, distinct2=0.8, perplexity=7.0),
            _row("a", "sadness", "2", 2.0, 0.2, 0.6, distinct2=0.9, perplexity=9.0,
                 readings={"sadness": 2.0, "joy": -1.0}),
            _row("b", "sadness", "2", 2.0, 0.4, 0.4, distinct2=0.7, perplexity=11.0,
                 readings={"sadness": 1.0, "joy": 0.0}),
            _row("a", "joy", "rec", 3.0, 0.9, 0.1), _row("b", "joy", "rec", 3.0, 0.9, 0.1)]
    out = {(r["emotion"], r["label"]): r for r in aggregate(rows, EMOTIONS)}
    assert set(out) == {("joy", "0"), ("joy", "rec"), ("sadness", "0"), ("sadness", "2")}
    sad = out[("sadness", "2")]
    assert sad["n"] == 2 and sad["weight"] == 2.0
    assert sad["eps"] == pytest.approx((0.75 + 0.5) / 2)
    assert sad["top"] == pytest.approx(0.5)  # the tie row's argmax is joy (first column)
    assert sad["eas"] == pytest.approx(0.5)
    assert sad["eas_change"] == pytest.approx((0.5 - 0.2) / 0.2)
    assert sad["gain"] == pytest.approx(sad["eps"] - 0.25)
    assert sad["perplexity"] == pytest.approx(10.0) and sad["distinct2"] == pytest.approx(0.8)
    assert sad["reading"] == pytest.approx(1.5)
    base = out[("sadness", "0")]
    assert base["eas_change"] == pytest.approx(0.0) and base["gain"] == pytest.approx(0.0)
    assert "reading" not in base
    assert out[("joy", "rec")]["top"] == 1.0

"""Fixtures of the evaluation tests: one nade classifier per session (loading it unpacks its
regressors, a few seconds)."""

import pytest

from emokern.eval import EmotionScorer


@pytest.fixture(scope="session")
def scorer():
    return EmotionScorer()

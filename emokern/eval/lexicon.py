r"""A second, transparent judge: the NRC Emotion Lexicon (EmoLex) word list.

EmoLex (Mohammad & Turney, *Crowdsourcing a word-emotion association lexicon*, 2013) tags
about 6,500 English words with Plutchik's emotions. Its licence does not allow copying it into
this repository, so the word list is read at run time from the ``nrclex`` package's data file
(``nrclex/data/nrc_en.json``); the ``nrclex`` code itself (and its TextBlob/NLTK tokeniser,
which wants corpus downloads) is not used: texts are split by the tokenizer-free
:func:`emokern.eval.scorers.words`.

For a text of :math:`N` word tokens, of which :math:`n_k` carry emotion :math:`k`,

.. math::
    \mathrm{density}_k = n_k / N, \qquad
    \mathrm{share}_k = n_k / \textstyle\sum_j n_j\ \ (\text{uniform when no word is tagged}).

A word matches as written, else after stripping one common inflection (``-s``, ``-es``,
``-ed``, ``-ing``, ``-ly``, ``-ies`` → ``-y``), so "mourned" reads as "mourn" and "cries"
as "cry".
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from importlib import resources

import numpy as np

from emokern.emotions import BASIC_EMOTIONS
from emokern.eval.scorers import check_texts, words

__all__ = ["LexiconScorer", "load_emolex"]

_SUFFIXES = ("ing", "es", "ed", "ly", "s")


def load_emolex() -> dict[str, frozenset[str]]:
    """The EmoLex word list from the ``nrclex`` package: word -> set of affect labels (the
    eight Plutchik emotions plus ``positive``/``negative``)."""
    try:
        source = resources.files("nrclex.data").joinpath("nrc_en.json")
        with source.open("r", encoding="utf-8") as fh:
            raw = json.load(fh)
    except ModuleNotFoundError as exc:  # pragma: no cover - depends on the install
        raise ImportError("LexiconScorer needs the `nrclex` package (its EmoLex word list): "
                          "pip install 'emokern[eval]'") from exc
    return {str(w).lower(): frozenset(tags) for w, tags in raw.items()}


class LexiconScorer:
    """Emotion-word densities of texts from NRC EmoLex (see the module docstring).

    Parameters
    ----------
    emotions : sequence of str
        Columns, among EmoLex's labels; default the six basic emotions.
    """

    def __init__(self, emotions: Sequence[str] = BASIC_EMOTIONS):
        self._lexicon = load_emolex()
        labels = sorted(set().union(*self._lexicon.values()))
        if isinstance(emotions, str) or not emotions:
            raise ValueError(f"emotions must be a non-empty list of labels among {labels}")
        unknown = [e for e in emotions if e not in labels]
        if unknown:
            raise ValueError(f"emotions must be among EmoLex's labels {labels}, got unknown "
                             f"{unknown}")
        self.emotions = tuple(emotions)

    def tags(self, word: str) -> frozenset[str]:
        """The affect labels of one lower-case word (empty when untagged)."""
        found = self._lexicon.get(word)
        if found is not None:
            return found
        if word.endswith("ies") and len(word) > 4:
            found = self._lexicon.get(word[:-3] + "y")
            if found is not None:
                return found
        for suffix in _SUFFIXES:
            if word.endswith(suffix) and len(word) > len(suffix) + 2:
                stem = word[:-len(suffix)]
                found = self._lexicon.get(stem) or self._lexicon.get(stem + "e")
                if found is not None:
                    return found
        return frozenset()

    def counts(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """``(n [N, E], total [N])``: tagged-word counts per emotion and word counts."""
        texts = check_texts(texts)
        n = np.zeros((len(texts), len(self.emotions)), dtype=np.float64)
        total = np.zeros(len(texts), dtype=np.float64)
        for i, text in enumerate(texts):
            tokens = [w for w in words(text) if w[0].isalnum()]
            total[i] = len(tokens)
            for token in tokens:
                tags = self.tags(token)
                for k, emotion in enumerate(self.emotions):
                    if emotion in tags:
                        n[i, k] += 1
        return n, total

    def score(self, texts: Sequence[str]) -> np.ndarray:
        """Densities ``[N, E]`` float32 in [0, 1] (0 for a text without words)."""
        n, total = self.counts(texts)
        return (n / np.maximum(total, 1.0)[:, None]).astype(np.float32)

    def probabilities(self, texts: Sequence[str]) -> np.ndarray:
        """Shares ``[N, E]`` float32 summing to one per text (uniform when no word is
        tagged)."""
        n, _ = self.counts(texts)
        total = n.sum(axis=1, keepdims=True)
        uniform = np.full_like(n, 1.0 / max(n.shape[1], 1))
        return np.where(total > 0, n / np.where(total > 0, total, 1.0), uniform).astype(
            np.float32)

    def column(self, emotion: str) -> int:
        """Column index of ``emotion``."""
        if emotion not in self.emotions:
            raise ValueError(f"emotion must be one of {self.emotions}, got {emotion!r}")
        return self.emotions.index(emotion)

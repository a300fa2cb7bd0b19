"""Independent scorers for generated text: emotion (nade), repetition, fluency.

These judge steered text without looking at the steering itself, so they can be used to choose
instruction phrasings, steering weights and layers without circularity:

* :class:`EmotionScorer` wraps the ``nade`` package (Hotz-Behofsits et al., *Natural affect
  detection*): a fastText emoji predictor followed by one LightGBM regressor per Plutchik
  emotion, trained on social-media text. It knows nothing of emokern's vectors or models.
* :func:`repetition` and :func:`distinct_n` measure degenerate, looping text, the first
  symptom of over-steering.
* :func:`perplexity` scores text under an (unsteered) language model: steered text that the
  plain model finds very unlikely has stopped being fluent English.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Sequence

import numpy as np
import torch

# The six basic emotions are the default columns of :meth:`EmotionScorer.score`, in this order.
from emokern.emotions import BASIC_EMOTIONS
from emokern.tokens import model_device, pad_batch, pad_id

_WORD = re.compile(r"[A-Za-z0-9']+|[^\sA-Za-z0-9']")


def check_texts(texts, name: str = "texts") -> list[str]:
    if isinstance(texts, str):
        raise TypeError(f"{name} must be a sequence of strings, not a single str; wrap it in a "
                        f"list")
    texts = list(texts)
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"{name}[{i}] must be a str, got {type(t).__name__}")
    return texts


def words(text: str) -> list[str]:
    """Lower-cased word and punctuation tokens of ``text`` (a tokenizer-free split, so the
    measures below do not depend on the model's vocabulary)."""
    return _WORD.findall(text.lower())


def distinct_n(text: str, n: int = 2) -> float:
    r"""Fraction of distinct n-grams among all word n-grams of ``text``.

    .. math:: \mathrm{distinct}_n = |\{\text{n-grams}\}| / \#\text{n-grams}

    1.0 for text that never repeats an n-gram; near 0 for a loop. Texts with fewer than ``n``
    words count as 1.0 (nothing repeated).
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    toks = words(text)
    grams = [tuple(toks[i:i + n]) for i in range(len(toks) - n + 1)]
    if not grams:
        return 1.0
    return len(set(grams)) / len(grams)


def repetition(text: str, n: int = 3) -> float:
    r"""Fraction of word n-grams of ``text`` that repeat an earlier n-gram (default n = 3).

    .. math:: \mathrm{rep}_n = 1 - \mathrm{distinct}_n

    0.0 for fluent text (ordinary prose rarely repeats a 3-gram within a few sentences); the
    degenerate loops of an over-steered model ("happy happy happy ...") score near 1.
    """
    return 1.0 - distinct_n(text, n)


def degeneration(texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """``(distinct-2 [N], repeated-3-gram rate [N])`` of each text (see :func:`distinct_n`,
    :func:`repetition`)."""
    texts = check_texts(texts)
    return (np.array([distinct_n(t, 2) for t in texts], dtype=np.float64),
            np.array([repetition(t, 3) for t in texts], dtype=np.float64))


def perplexity(model, tokenizer, texts: Sequence[str], *, batch_size: int = 16) -> list[float]:
    r"""Per-text perplexity under ``model`` (without chat template or steering).

    .. math:: \mathrm{ppl}(x) = \exp\Big(-\tfrac{1}{T-1}\sum_{t=2}^{T} \log p(x_t \mid x_{<t})\Big)

    Texts of fewer than two tokens get ``nan``.

    Parameters
    ----------
    model, tokenizer
        A transformers causal LM and its tokenizer (left or right padding).
    texts : sequence of str
    batch_size : int

    Returns
    -------
    list of float, one per text.
    """
    texts = check_texts(texts)
    out: list[float] = []
    device = model_device(model)
    for start in range(0, len(texts), batch_size):
        chunk = texts[start:start + batch_size]
        ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in chunk]
        if not any(ids):  # nothing to score (and a forward needs at least one position)
            out.extend(float("nan") for _ in ids)
            continue
        # Right padding: positions start at 0 for every text, as without padding.
        input_ids, mask, _ = pad_batch(ids, pad_id(tokenizer), side="right")
        with torch.no_grad():
            logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits
        logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        target = input_ids[:, 1:].to(device)
        nll = -logp.gather(-1, target[..., None])[..., 0]  # [B, T-1]
        valid = mask[:, 1:].to(device).bool()
        for i in range(len(ids)):
            n = int(valid[i].sum())
            out.append(math.exp(float(nll[i][valid[i]].mean())) if n else float("nan"))
    return out


class EmotionScorer:
    """Emotion intensities of texts from the independent ``nade`` classifier.

    nade predicts, for each of Plutchik's eight emotions, an intensity in [0, 1] with its own
    regressor (they are not a distribution: a text can score high on several). :meth:`score`
    returns the six basic ones; :meth:`probabilities` normalises them to sum to one per text.

    Parameters
    ----------
    emotions : sequence of str
        Columns to return, a subset of nade's labels (anger, anticipation, disgust, fear, joy,
        sadness, surprise, trust); default the six basic emotions.

    Examples
    --------
    >>> scorer = EmotionScorer()
    >>> scorer.score(["What a wonderful, happy day!"]).shape
    (1, 6)
    """

    def __init__(self, emotions: Sequence[str] = BASIC_EMOTIONS):
        try:
            from nade import Nade
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise ImportError("EmotionScorer needs the `nade` package: pip install "
                              "'emokern[eval]'") from exc
        with warnings.catch_warnings():
            # nade unpacks its regressors on first use and warns about each one.
            warnings.simplefilter("ignore", UserWarning)
            self._nade = Nade()
        unknown = [e for e in emotions if e not in self._nade.labels]
        if unknown:
            raise ValueError(f"emotions must be among nade's labels {self._nade.labels}, got "
                             f"unknown {unknown}")
        if not emotions:
            raise ValueError("emotions must not be empty")
        self.emotions = tuple(emotions)

    def score(self, texts: Sequence[str]) -> np.ndarray:
        """Intensities ``[N, E]`` (float32, each in [0, 1]) of the texts for ``self.emotions``."""
        texts = check_texts(texts)
        if not texts:
            return np.zeros((0, len(self.emotions)), dtype=np.float32)
        # fastText reads one line per text: newlines would split a text in two.
        clean = [" ".join(t.split()) for t in texts]
        raw = self._nade.predict(clean, dimensions=list(self.emotions))
        return np.stack([np.asarray(raw[e].to_pylist(), dtype=np.float32)
                         for e in self.emotions], axis=1)

    def probabilities(self, texts: Sequence[str]) -> np.ndarray:
        """:meth:`score` normalised per text to sum to one (uniform when all are zero)."""
        return self.judge(texts)[1]

    def judge(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        r"""Intensities and probabilities ``([N, E], [N, E])`` from one classifier pass.

        nade's eight Plutchik regressors map onto the six basic emotions by name (anger,
        disgust, fear, joy, sadness, surprise; anticipation and trust are dropped); the
        probabilities renormalise the kept intensities, :math:`p_k = s_k / \sum_j s_j`.
        """
        s = self.score(texts)
        d = s.astype(np.float64)
        total = d.sum(axis=1, keepdims=True)
        uniform = np.full_like(d, 1.0 / max(d.shape[1], 1))
        p = np.where(total > 0, d / np.where(total > 0, total, 1.0), uniform).astype(np.float32)
        return s, p

    def column(self, emotion: str) -> int:
        """Column index of ``emotion`` in :meth:`score`'s output."""
        if emotion not in self.emotions:
            raise ValueError(f"emotion must be one of {self.emotions}, got {emotion!r}")
        return self.emotions.index(emotion)

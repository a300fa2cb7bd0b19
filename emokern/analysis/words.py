r"""Word-rating prediction: do projections on a bank's emotion directions predict human word
ratings? (after arXiv 2506.13978).

For each rated word :math:`w` (a seeded subset of the norms, or all of them), the hidden state
:math:`h_l(w)` at the word's last token in a neutral carrier sentence is read at every bank
layer :math:`l`; its features are the projections on the bank's :math:`K` unit directions,
:math:`x_{l,k}(w) = \langle h_l(w), v_{l,k}\rangle / \lVert v_{l,k}\rVert`. A ridge regression
with 10-fold cross-validation (:func:`emokern.stats.ridge_cv_predict`) predicts each
rating dimension from :math:`x_l`; the score is Pearson :math:`r` between the held-out
predictions and the ratings, with a bootstrap 95% CI over words. The baseline is the same
pipeline on :math:`K` random Gaussian directions (``n_random`` draws per layer): what any
:math:`K` directions of the state carry about the ratings.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from emokern.analysis.norms import Norms
from emokern.data import load_concepts
from emokern.extract.concept import concept_token_span
from emokern.extract.hidden import span_hidden_states
from emokern.stats import bootstrap_ci, pearson, ridge_cv_predict
from emokern.tokens import pad_id

__all__ = ["CARRIERS", "analyze_words", "word_states"]

#: Neutral carrier sentences by norms: English takes the first concept carrier.
CARRIERS = {"cvaw": "卡片上写着的词是{concept}。"}


def word_states(model, tokenizer, words, layers, *, carrier: str, batch_size: int = 64,
                progress: bool = True) -> torch.Tensor:
    """Hidden states ``[N, L, D]`` (float32) at each word's last token in ``carrier``."""
    sequences, spans = [], []
    for word in words:
        ids, _, stop = concept_token_span(tokenizer, carrier, word)
        sequences.append(ids)
        spans.append((stop - 1, stop))
    sums, _, _ = span_hidden_states(model, sequences, spans, layers=list(layers),
                                    pad_token_id=pad_id(tokenizer), batch_size=batch_size,
                                    progress=progress, desc="words: read states")
    return sums


def analyze_words(model, tokenizer, bank, norms: Norms, *, size: int | None = 2000,
                  seed: int = 0, carrier: str | None = None, folds: int = 10,
                  n_boot: int = 1000, n_random: int = 3, layers=None, batch_size: int = 64,
                  progress: bool = True) -> dict:
    """Cross-validated prediction of every rating dimension of ``norms`` per bank layer.

    Parameters
    ----------
    bank : EmotionBank
        Compatible with ``model``; its directions are the features.
    norms : Norms
    size : int or None
        Words in the seeded subset (None: all).
    carrier : str, optional
        Sentence with one ``{concept}`` slot; default the first concept carrier (English) or
        :data:`CARRIERS` for the norms.
    n_random : int
        Random-direction draws per layer.

    Returns
    -------
    dict
        ``n_words``, ``words_total``, ``dimensions``, ``carrier`` and ``layers``: per layer and
        dimension ``r``, ``ci`` (bootstrap 95%), ``random_r`` (one per draw), ``random_ci``
        (of the first draw); ``best`` per dimension.
    """
    if isinstance(n_random, bool) or not isinstance(n_random, int) or n_random < 1:
        raise ValueError(f"n_random must be a positive int, got {n_random!r}")
    bank.check_compatible(model)
    started = time.perf_counter()
    sub = norms.subset(size, seed)
    carrier = carrier or CARRIERS.get(norms.name) or load_concepts()["carriers"][0]
    bank_layers = list(bank.layers)
    chosen = bank_layers if layers is None else list(layers)
    for layer in chosen:
        if layer not in bank_layers:
            raise ValueError(f"layers names {layer}, which the bank lacks ({bank_layers})")
    states = word_states(model, tokenizer, sub.words, chosen, carrier=carrier,
                         batch_size=batch_size, progress=progress).double()  # [N, L, D]
    dim = states.shape[-1]
    rng = np.random.default_rng(seed)
    rows = []
    for li, layer in enumerate(chosen):
        v = torch.as_tensor(bank.vectors[bank_layers.index(layer)]).double()
        feats = (states[:, li] @ torch.nn.functional.normalize(v, dim=1).T).numpy()
        randoms = []
        for _ in range(n_random):
            r = torch.from_numpy(rng.standard_normal((v.shape[0], dim)))
            randoms.append((states[:, li] @ torch.nn.functional.normalize(r, dim=1).T).numpy())
        row = {"layer": int(layer)}
        for d, name in enumerate(sub.dimensions):
            y = sub.ratings[:, d]
            pred, alphas = ridge_cv_predict(feats, y, folds=folds, seed=seed)
            rand_preds = [ridge_cv_predict(x, y, folds=folds, seed=seed)[0] for x in randoms]
            row[name] = {"r": pearson(pred, y), "ci": bootstrap_ci(pred, y, n_boot=n_boot,
                                                                  seed=seed),
                         "random_r": [pearson(p, y) for p in rand_preds],
                         "random_ci": bootstrap_ci(rand_preds[0], y, n_boot=n_boot, seed=seed),
                         "median_alpha": float(np.median(alphas))}
        rows.append(row)
    best = {name: max(rows, key=lambda r, n=name: r[n]["r"])["layer"]
            for name in sub.dimensions}
    return {"norms": sub.source, "norms_name": sub.name, "n_words": len(sub),
            "words_total": len(norms), "seed": seed, "dimensions": list(sub.dimensions),
            "carrier": carrier, "folds": folds, "n_boot": n_boot, "n_random": n_random,
            "n_directions": int(bank.vectors.shape[1]), "layers": rows, "best": best,
            "seconds": round(time.perf_counter() - started, 1)}

r"""Emotion geometry: does a model's space of emotion-category vectors line up with human
valence and arousal? (after arXiv 2506.13978).

Per layer :math:`l` of a bank with :math:`C` categories (vectors :math:`V_l \in R^{C\times D}`):

* **PCA** of the category vectors (centred over categories): the scores of each category on
  PC1 and PC2 and the variance each explains;
* **axes vs human ratings**: Pearson :math:`r` of the PC1/PC2 scores with the Warriner valence
  and arousal of the category words (a PC's sign is arbitrary, so :math:`|r|` is what counts);
* **RSA**: Spearman :math:`\rho` between the model's category distance matrix
  (:math:`1 - \cos` of the centred vectors) and the human distance matrix (Euclidean distance
  in the plane of z-scored valence and arousal), with a Mantel permutation p-value.

Needs no forward pass: the bank holds the category vectors.
"""

from __future__ import annotations

import numpy as np
import torch

from emokern.analysis.neurons import MIN_CATEGORIES
from emokern.analysis.norms import Norms
from emokern.stats import pearson, rsa_permutation

__all__ = ["analyze_space", "category_distances", "pca_scores"]


def pca_scores(vectors: np.ndarray, n_components: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """``(scores [C, n], explained variance ratio [n])`` of ``vectors [C, D]`` centred."""
    x = vectors - vectors.mean(axis=0, keepdims=True)
    u, s, _ = np.linalg.svd(x, full_matrices=False)
    var = s * s
    return u[:, :n_components] * s[:n_components], var[:n_components] / var.sum()


def category_distances(vectors: np.ndarray) -> np.ndarray:
    """Cosine distance ``1 - cos`` between the centred category vectors, ``[C, C]``."""
    x = vectors - vectors.mean(axis=0, keepdims=True)
    x = x / np.linalg.norm(x, axis=1, keepdims=True).clip(min=1e-12)
    return 1.0 - x @ x.T


def analyze_space(bank, norms: Norms, *, layers=None, n_perm: int = 10000, seed: int = 0
                  ) -> dict:
    """The geometry analysis of ``bank`` against the valence/arousal ``norms``.

    Parameters
    ----------
    bank : EmotionBank
        At least :data:`~emokern.analysis.neurons.MIN_CATEGORIES` categories rated in the norms.
    norms : Norms
        With ``valence`` and ``arousal`` dimensions.
    layers : sequence of int, optional
        Bank layers to analyse; default all.

    Returns
    -------
    dict
        ``categories``, ``valence``/``arousal`` (human ratings), ``unrated`` (dropped
        categories) and ``layers``: per layer ``layer``, ``explained [2]``, ``pc1``/``pc2``
        (scores), ``r_pc1_valence``, ``r_pc1_arousal``, ``r_pc2_valence``, ``r_pc2_arousal``,
        ``rsa_rho``, ``rsa_p``; ``best``: the layers with the highest ``|r|`` and ``rho``.
    """
    names = list(bank.names)
    rated, ratings = norms.lookup(names)
    if len(rated) < MIN_CATEGORIES:
        raise ValueError(f"the bank has {len(rated)} categories rated in the {norms.name} norms "
                         f"({rated}); the space analysis needs at least {MIN_CATEGORIES} "
                         f"(use the concept bank, 24 categories)")
    valence, arousal = norms.column("valence"), norms.column("arousal")
    index = {w: i for i, w in enumerate(norms.words)}
    v = np.array([valence[index[w]] for w in rated])
    a = np.array([arousal[index[w]] for w in rated])
    z = np.stack([(v - v.mean()) / v.std(), (a - a.mean()) / a.std()], axis=1)
    human = np.linalg.norm(z[:, None] - z[None], axis=-1)
    cols = [names.index(w) for w in rated]
    bank_layers = list(bank.layers)
    chosen = bank_layers if layers is None else list(layers)
    for layer in chosen:
        if layer not in bank_layers:
            raise ValueError(f"layers names {layer}, which the bank lacks ({bank_layers})")
    rows = []
    for layer in chosen:
        vec = torch.as_tensor(bank.vectors[bank_layers.index(layer)]).double().numpy()[cols]
        scores, explained = pca_scores(vec)
        rho, p = rsa_permutation(category_distances(vec), human, n_perm=n_perm, seed=seed)
        rows.append({"layer": int(layer), "explained": explained.round(4).tolist(),
                     "pc1": scores[:, 0].round(5).tolist(), "pc2": scores[:, 1].round(5).tolist(),
                     "r_pc1_valence": pearson(scores[:, 0], v),
                     "r_pc1_arousal": pearson(scores[:, 0], a),
                     "r_pc2_valence": pearson(scores[:, 1], v),
                     "r_pc2_arousal": pearson(scores[:, 1], a),
                     "rsa_rho": rho, "rsa_p": p})
    best = {key: max(rows, key=lambda r, k=key: abs(r[k]))["layer"]
            for key in ("r_pc1_valence", "r_pc2_arousal", "rsa_rho")}
    return {"categories": rated, "unrated": [n for n in names if n not in rated],
            "valence": v.tolist(), "arousal": a.tolist(), "n_perm": n_perm,
            "norms": norms.source, "layers": rows, "best": best}

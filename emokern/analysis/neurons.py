r"""Emotion-attribute neurons: which MLP intermediate neurons represent an attribute of the
emotion categories (after Li, Su et al. 2024, "Human-like emotion concepts in LLMs").

1. **Activations.** Every concept word of each category (``emokern/data/concepts.json``, the
   concept bank's categories) is read in neutral carrier sentences; the activation of every
   MLP intermediate neuron (the input of the down projection, see
   :mod:`emokern.steering.ablate`) at the concept's last token is averaged per category:
   :math:`a_n(c)`, ``[C, L, F]``.
2. **RSA per neuron.** A neuron's category distance matrix is
   :math:`D^n_{cc'} = |a_n(c) - a_n(c')|`; an attribute's is :math:`D^x_{cc'} = |x(c) - x(c')|`.
   The neuron's score is Kendall's :math:`\tau_b` between the two upper triangles
   (:math:`C(C-1)/2` pairs), with SciPy's asymptotic one-sided p-value (:math:`\tau > 0`:
   the neuron separates categories as the attribute does). The pairs of a distance matrix are
   not independent, so these p-values are approximate (anti-conservative); they rank neurons
   and are corrected for the number of neurons by Benjamini-Hochberg per attribute.
3. **Attributes.** Human ratings of the category words (valence, arousal, dominance from the
   Warriner norms) and, with an EV bank, each category's similarity to each basic emotion:
   :math:`x_e(c) = \operatorname{mean}_l \cos(v^{\mathrm{concept}}_{c,l}, v^{\mathrm{EV}}_{e,l})`
   over the layers both banks share.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from emokern.analysis.norms import Norms
from emokern.data import load_concepts
from emokern.extract.concept import concept_token_span
from emokern.stats import fdr_bh, kendall_tau_b_many
from emokern.steering.ablate import mlp_down_projections
from emokern.tokens import model_device, pad_batch, pad_id

__all__ = ["MIN_CATEGORIES", "attribute_neurons", "category_activations",
           "category_attributes", "pair_distances"]

#: Fewest categories an analysis accepts (RSA over fewer pairs is meaningless).
MIN_CATEGORIES = 6


def category_activations(model, tokenizer, categories: Mapping[str, Sequence[str]], *,
                         carriers: Sequence[str] | None = None, batch_size: int = 32,
                         progress: bool = True) -> np.ndarray:
    """Mean MLP intermediate activation per category at the concept's last token.

    Parameters
    ----------
    categories : mapping name -> concept words
    carriers : sequence of str, optional
        Neutral sentences with one ``{concept}`` slot; default the project's six.

    Returns
    -------
    ndarray [C, L, F] float64
        Every decoder layer's ``F`` intermediate neurons (``F`` the largest when layers
        differ; missing entries are 0).
    """
    if len(categories) < MIN_CATEGORIES:
        raise ValueError(f"categories must have at least {MIN_CATEGORIES} categories, got "
                         f"{len(categories)}")
    projections = mlp_down_projections(model)
    carriers = list(load_concepts()["carriers"] if carriers is None else carriers)
    sequences, positions, groups = [], [], []
    for g, words in enumerate(categories.values()):
        for word in words:
            for carrier in carriers:
                ids, _, stop = concept_token_span(tokenizer, carrier, word)
                sequences.append(ids)
                positions.append(stop - 1)
                groups.append(g)
    n_layers = len(projections)
    width = max(f for _, f in projections)
    sums = torch.zeros(len(categories), n_layers, width, dtype=torch.float64)
    counts = torch.zeros(len(categories), dtype=torch.float64)
    captured: dict[int, torch.Tensor] = {}
    rows: list[torch.Tensor] = []  # [index into the padded batch] for the current batch

    def capture(layer):
        def hook(module, args):
            act = args[0]
            captured[layer] = act.reshape(-1, act.shape[-1])[rows[0]].float().cpu()
        return hook

    handles = [module.register_forward_pre_hook(capture(i))
               for i, (module, _) in enumerate(projections)]
    device = model_device(model)
    pad = pad_id(tokenizer)
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
    try:
        with torch.inference_mode():
            for start in tqdm(range(0, len(order), batch_size), desc="neurons: activations",
                              disable=not progress, unit="batch"):
                chunk = order[start:start + batch_size]
                input_ids, mask, pos_ids = pad_batch([sequences[i] for i in chunk], pad)
                w = input_ids.shape[1]
                flat = [b * w + (w - len(sequences[i])) + positions[i]
                        for b, i in enumerate(chunk)]
                rows[:] = [torch.tensor(flat)]
                model(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                      position_ids=pos_ids.to(device), logits_to_keep=1)
                group = torch.tensor([groups[i] for i in chunk])
                for layer, act in captured.items():
                    sums[:, layer, :act.shape[1]].index_add_(0, group, act.double())
                counts.index_add_(0, group, torch.ones(len(chunk), dtype=torch.float64))
    finally:
        for handle in handles:
            handle.remove()
    return (sums / counts[:, None, None]).numpy()


def category_attributes(names: Sequence[str], norms: Norms, *, concept_bank=None,
                        ev_bank=None) -> dict[str, dict]:
    """The attributes of the categories: ``{name: {"values": [C], "source": str}}``.

    Human: every rating dimension of ``norms`` for the category words (all categories must be
    rated). Model: with both banks, each category's mean cosine similarity to each EV emotion
    (``sim_<emotion>``) over their shared layers.
    """
    found, ratings = norms.lookup(names)
    missing = [n for n in names if n not in found]
    if missing:
        raise ValueError(f"the {norms.name} norms rate no category word {missing}; every "
                         f"category needs human ratings")
    out = {dim: {"values": ratings[:, d].tolist(), "source": norms.source}
           for d, dim in enumerate(norms.dimensions)}
    if concept_bank is not None and ev_bank is not None:
        shared = [layer for layer in concept_bank.layers if layer in list(ev_bank.layers)]
        if not shared:
            raise ValueError("the concept and EV banks share no layer")
        c_layers, e_layers = list(concept_bank.layers), list(ev_bank.layers)
        cols = [concept_bank.index(n) for n in names]
        sims = []
        for layer in shared:
            c = torch.as_tensor(concept_bank.vectors[c_layers.index(layer)])[cols].double()
            e = torch.as_tensor(ev_bank.vectors[e_layers.index(layer)]).double()
            sims.append(torch.nn.functional.normalize(c, dim=1)
                        @ torch.nn.functional.normalize(e, dim=1).T)
        sim = torch.stack(sims).mean(0).numpy()  # [C, E]
        for k, emotion in enumerate(ev_bank.names):
            out[f"sim_{emotion}"] = {"values": sim[:, k].tolist(),
                                     "source": f"cosine to the EV bank's {emotion!r} vector, "
                                               f"mean over {len(shared)} layers"}
    return out


def pair_distances(values: np.ndarray) -> np.ndarray:
    """``|v(c) - v(c')|`` over the pairs ``c < c'``: ``[..., C]`` -> ``[..., C(C-1)/2]``."""
    values = np.asarray(values, dtype=np.float64)
    i, j = np.triu_indices(values.shape[-1], k=1)
    return np.abs(values[..., i] - values[..., j])


def attribute_neurons(activations: np.ndarray, attributes: Mapping[str, Mapping], *,
                      top_k: int = 1024, alpha: float = 0.05, n_perm: int = 20, seed: int = 0,
                      progress: bool = True) -> dict:
    r"""RSA of every neuron with every attribute; the top-k neurons per attribute.

    Parameters
    ----------
    activations : ndarray [C, L, F]
        From :func:`category_activations`.
    attributes : mapping name -> {"values": [C], ...}
        From :func:`category_attributes`.
    top_k : int
        Neurons kept per attribute (highest :math:`\tau` first).
    alpha : float
        FDR level for the significance counts.
    n_perm : int
        Label permutations of each attribute (the categories' values shuffled): the same
        pipeline on them gives the null distribution of the number of "significant" neurons
        and of the top-k mean tau, which the asymptotic p-values cannot (they treat the
        distance pairs as independent and are anti-conservative: a random-weight model gets
        many FDR-"significant" neurons).

    Returns
    -------
    dict
        ``per_attribute[name]``: ``top`` rows ``[layer, neuron, tau, p, q]``,
        ``n_significant`` (q < alpha), ``per_layer_significant [L]``, ``mean_tau``,
        ``top_layers`` (histogram of the layers of the top-k), ``top_mean_tau``, and the
        permutation null: ``null_n_significant`` (one count per permutation),
        ``null_top_mean_tau``; and ``n_neurons``, ``shape``.
    """
    n_cat, n_layers, width = activations.shape
    if n_cat < MIN_CATEGORIES:
        raise ValueError(f"activations must cover at least {MIN_CATEGORIES} categories, got "
                         f"{n_cat}")
    names = list(attributes)
    values = np.array([attributes[n]["values"] for n in names], dtype=np.float64)
    if values.shape[1] != n_cat:
        raise ValueError(f"attributes must have one value per category ({n_cat})")
    started = time.perf_counter()
    flat = activations.reshape(n_cat, -1).T  # [N, C]
    dx = pair_distances(flat)  # [N, P]
    rng = np.random.default_rng(seed)
    perms = [rng.permutation(n_cat) for _ in range(n_perm)]
    # Columns: the attributes, then each attribute under each permutation of the categories.
    columns = np.concatenate([values] + [values[:, perm] for perm in perms])
    dy = pair_distances(columns)  # [A (1 + n_perm), P]
    n_attr = len(names)
    tau, pval = np.empty((flat.shape[0], len(columns))), np.empty((flat.shape[0], len(columns)))
    step = 4096
    for start in tqdm(range(0, flat.shape[0], step), desc="neurons: RSA",
                      disable=not progress, unit="block"):
        tau[start:start + step], pval[start:start + step] = kendall_tau_b_many(
            dx[start:start + step], dy)
    def summary(col):
        q = fdr_bh(pval[:, col])
        t = np.nan_to_num(tau[:, col], nan=-np.inf)
        best = np.lexsort((pval[:, col], -t))[:top_k]
        return q, t, best, (q < alpha) & (t > 0)

    per_attribute = {}
    for a, name in enumerate(names):
        q, t, best, significant = summary(a)
        null = [summary(n_attr * (1 + r) + a) for r in range(n_perm)]
        per_attribute[name] = {
            "source": attributes[name].get("source", ""),
            "values": list(attributes[name]["values"]),
            "n_significant": int(significant.sum()),
            "per_layer_significant": significant.reshape(n_layers, width).sum(1).tolist(),
            "mean_tau": float(np.nanmean(tau[:, a])),
            "top_layers": np.bincount(best // width, minlength=n_layers).tolist(),
            "top_mean_tau": float(t[best].mean()),
            "null_n_significant": [int(sig.sum()) for *_, sig in null],
            "null_top_mean_tau": [float(nt[nb].mean()) for _, nt, nb, _ in null],
            "top": [[int(i // width), int(i % width), round(float(tau[i, a]), 5),
                     float(f"{pval[i, a]:.4g}"), float(f"{q[i]:.4g}")] for i in best],
        }
    return {"n_neurons": int(flat.shape[0]), "shape": [n_cat, n_layers, width],
            "alpha": alpha, "top_k": top_k, "n_perm": n_perm, "seed": seed,
            "per_attribute": per_attribute,
            "seconds_rsa": round(time.perf_counter() - started, 1)}

r"""Readings in units people understand: the neutral baseline, and the layers that detect
emotions best.

A raw reading is a projection :math:`p = \langle h, v\rangle/\lVert v\rVert` in hidden-state
units: its zero and scale differ per layer and emotion and mean nothing to a reader. The bank
therefore stores, per layer :math:`l` and emotion :math:`k`, how *neutral* text reads:

.. math::
    \mu_{l,k} = \frac{\sum_i S_{i,l}\cdot u_{l,k}}{\sum_i n_i}, \qquad
    \sigma_{l,k} = \operatorname{std}_i\Big(\frac{S_{i,l}\cdot u_{l,k}}{n_i}\Big)

over neutral responses :math:`i` (the model's answers to everyday queries under Method EV's
neutral instruction) with :math:`n_i` tokens and hidden-state sums :math:`S_{i,l}` at the output
of decoder layer :math:`l`; :math:`u_{l,k}` is the unit direction of the bank's vector. A
reading :math:`r` (a mean over a response's tokens) becomes the standard score
:math:`z = (r - \mu)/\sigma`: 0 reads as neutral text, +2 two neutral spreads above
(:meth:`emokern.EmotionBank.standardize`). :math:`\sigma` is the spread of *per-response*
means, the scale on which a row's reading varies.

Which layers to read is a separate question from which to steer: :func:`detection_layers`
classifies held-out emotional sentences (``emokern/data/heldout.jsonl``) by the argmax of their
standard scores at each layer and keeps the best layers.

Method EV computes the baseline from its own neutral answers at no extra cost
(:func:`neutral_stats`); :func:`neutral_baseline` generates neutral answers for any bank (the
concept method, or a bank shipped before baselines existed) without touching its vectors.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from emokern.data import load_heldout, load_instructions, load_queries
from emokern.extract.hidden import DEFAULT_MAX_NEW_TOKENS, generate_responses, span_hidden_states
from emokern.tokens import chat_prompt_ids, pad_id

__all__ = ["DETECTION_TOP", "detection_accuracy", "detection_layers", "neutral_baseline",
           "neutral_prompts", "neutral_stats"]

#: How many of the best-detecting layers the monitor reads by default.
DETECTION_TOP = 3


def neutral_stats(sums: torch.Tensor, counts: torch.Tensor, vectors: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    r"""The neutral baseline ``(mean [L, K], std [L, K])`` from span sums.

    Parameters
    ----------
    sums : Tensor [N, L, D]
        Hidden-state sums of N neutral responses at L layers.
    counts : Tensor [N]
        Tokens per response; responses without tokens are skipped.
    vectors : Tensor [L, K, D]
        The bank's vectors (their unit directions are read).

    Returns
    -------
    mean, std : Tensor [L, K] float32
        Token-weighted mean projection, and the standard deviation over responses of the
        per-response mean projection (floored at 1e-6 of the mean's scale so that it is > 0).
    """
    keep = counts > 0
    if int(keep.sum()) < 2:
        raise ValueError("neutral_stats needs at least 2 responses with tokens")
    sums, counts = sums[keep].double(), counts[keep].double()
    unit = vectors.double() / vectors.double().norm(dim=-1, keepdim=True)
    proj_sums = torch.einsum("nld,lkd->nlk", sums, unit)  # [N, L, K]
    mean = proj_sums.sum(dim=0) / counts.sum()
    per_response = proj_sums / counts[:, None, None]
    std = per_response.std(dim=0)
    floor = 1e-6 * (mean.abs() + 1.0)
    return mean.float(), torch.maximum(std, floor).float()


def neutral_prompts(tokenizer, queries: Sequence[str] | None = None) -> list[list[int]]:
    """Chat prompts of Method EV's neutral instruction (the default phrasing) for ``queries``
    (default the project's 118 queries)."""
    instructions = load_instructions()
    phrasing = instructions["phrasings"][instructions["default"]]
    queries = load_queries() if queries is None else list(queries)
    prompts = []
    for query in queries:
        messages = []
        if phrasing.get("neutral_system"):
            messages.append({"role": "system", "content": phrasing["neutral_system"]})
        messages.append({"role": "user",
                         "content": phrasing["neutral_user"].format(query=query)})
        prompts.append(chat_prompt_ids(tokenizer, messages))
    return prompts


def detection_accuracy(states: torch.Tensor, labels: Sequence[str], bank) -> torch.Tensor:
    r"""Per bank layer, the accuracy of :math:`\arg\max_k z_{l,k}` on labelled states.

    Parameters
    ----------
    states : Tensor [N, L, D]
        Mean hidden states of labelled texts at every bank layer.
    labels : N str
        Texts whose label the bank lacks are skipped.
    bank : calibrated EmotionBank

    Returns
    -------
    Tensor [L]
    """
    names = bank.names
    keep = [i for i, y in enumerate(labels) if y in names]
    if not keep:
        raise ValueError(f"labels share no emotion with the bank's {names}")
    vectors = bank.vectors.float()
    unit = vectors / vectors.norm(dim=-1, keepdim=True)
    proj = torch.einsum("nld,lkd->nlk", states[keep].float(), unit)
    z = bank.standardize(proj, bank.layers)
    # Only the emotions that occur among the labels compete (a 24-category bank would
    # otherwise lose to categories the held-out set never uses).
    present = sorted({labels[i] for i in keep}, key=names.index)
    cols = torch.tensor([names.index(e) for e in present])
    y = torch.tensor([present.index(labels[i]) for i in keep])
    return (z[..., cols].argmax(dim=-1) == y[:, None]).float().mean(dim=0)


def detection_layers(model, tokenizer, bank, *, top: int = DETECTION_TOP,
                     batch_size: int = 32) -> tuple[list[int], dict[int, float]]:
    """The ``top`` bank layers whose standard scores classify the held-out sentences best
    (ties go to the deeper layer), in layer order, and every layer's accuracy."""
    sentences = load_heldout()
    ids = [list(tokenizer(t, add_special_tokens=False)["input_ids"]) for _, t in sentences]
    labels = [e for e, _ in sentences]
    # Skip each text's first token: the attention sink reads the same in every text.
    sums, counts, _ = span_hidden_states(model, ids, [(1, len(x)) for x in ids],
                                         layers=bank.layers, pad_token_id=pad_id(tokenizer),
                                         batch_size=batch_size)
    states = sums / counts[:, None, None].clamp_min(1)
    accuracy = detection_accuracy(states, labels, bank)
    ranked = sorted(range(len(bank.layers)), key=lambda i: (-float(accuracy[i]), -i))
    chosen = sorted(bank.layers[i] for i in ranked[:top])
    return chosen, {layer: round(float(accuracy[i]), 4) for i, layer in enumerate(bank.layers)}


def neutral_baseline(model, tokenizer, bank, *, queries: Sequence[str] | None = None,
                     max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, batch_size: int = 32,
                     detect: bool = True, progress: bool = True):
    """A copy of ``bank`` with a neutral baseline (and detection layers), vectors unchanged.

    Generates the model's neutral answers to ``queries`` (greedy, Method EV's neutral
    instruction), reads their hidden states at every bank layer and stores
    :func:`neutral_stats`; with ``detect`` also :func:`detection_layers`.
    """
    bank.check_compatible(model)
    prompts = neutral_prompts(tokenizer, queries)
    responses = generate_responses(model, tokenizer, prompts, max_new_tokens=max_new_tokens,
                                   batch_size=batch_size, progress=progress,
                                   desc="neutral: generate")
    sequences = [p + r for p, r in zip(prompts, responses, strict=True)]
    spans = [(len(p), len(p) + len(r)) for p, r in zip(prompts, responses, strict=True)]
    sums, counts, _ = span_hidden_states(model, sequences, spans, layers=bank.layers,
                                         pad_token_id=pad_id(tokenizer),
                                         batch_size=max(1, batch_size // 2), progress=progress,
                                         desc="neutral: read states")
    mean, std = neutral_stats(sums, counts, bank.vectors)
    calibrated = bank.replace(neutral_mean=mean, neutral_std=std, metadata={"neutral": {
        "source": "queries.txt" if queries is None else "custom",
        "responses": int((counts > 0).sum()), "tokens": int(counts.sum()),
        "max_new_tokens": max_new_tokens}})
    if not detect or not set(calibrated.names) & {e for e, _ in load_heldout()}:
        return calibrated  # nothing the held-out sentences could tell about these names
    layers, accuracy = detection_layers(model, tokenizer, calibrated)
    return calibrated.replace(metadata={"detection_layers": layers,
                                        "detection_accuracy": {str(k): v for k, v in
                                                               accuracy.items()}})

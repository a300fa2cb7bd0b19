r"""Method concept (emotion-concept sets): concept words in neutral carrier sentences.

Each category :math:`c` has concept words :math:`w` placed in neutral carrier sentences
:math:`s`; the category's vector is the mean hidden state at the word's tokens minus the mean
over all categories:

.. math::
    u_{c,l} = \operatorname{mean}_{w\in c,\ s} h_l(s[w])\ , \qquad
    v_{c,l} = u_{c,l} - \frac1C\sum_{c'} u_{c',l}

with :math:`h_l` the output of decoder layer :math:`l` (see ``docs/design.md``). The word sets
and carriers are ``emokern/data/concepts.json`` (:func:`emokern.data.load_concepts`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence

import torch

from emokern.data import load_concepts, text_hash
from emokern.extract.checks import (
    check_layers,
    check_names,
    check_positive_int,
    num_decoder_layers,
)
from emokern.extract.hidden import span_hidden_states
from emokern.extract.neutral_readings import neutral_baseline
from emokern.extract.vectors import center_vectors, emokern_version, make_bank, recommend
from emokern.models import model_fingerprint
from emokern.tokens import pad_id

__all__ = ["CONCEPT_SLOT", "DEFAULT_CONCEPT_POOLING", "concept_token_span", "extract_concept"]

#: Method concept: read the hidden state at the concept's last token ("last") or average its
#: tokens ("mean"); chosen by measurement (docs/emotions.md).
DEFAULT_CONCEPT_POOLING = "last"
CONCEPT_SLOT = "{concept}"


def concept_token_span(tokenizer, carrier: str, concept: str) -> tuple[list[int], int, int]:
    """Tokenize ``carrier`` with ``concept`` in its slot; return (ids, start, stop) of the
    tokens that cover the concept's characters.

    Uses the fast tokenizer's character offsets; without them, the tokens past the prefix.
    """
    if carrier.count(CONCEPT_SLOT) != 1:
        raise ValueError(f"carrier {carrier!r} must contain exactly one {CONCEPT_SLOT} slot")
    char_start = carrier.index(CONCEPT_SLOT)
    sentence = carrier.replace(CONCEPT_SLOT, concept)
    char_stop = char_start + len(concept)
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(sentence, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        inside = [i for i, (a, b) in enumerate(enc["offset_mapping"])
                  if b > a and a < char_stop and b > char_start]
        if inside:
            return ids, inside[0], inside[-1] + 1
    ids = list(tokenizer(sentence, add_special_tokens=False)["input_ids"])
    prefix = sentence[:char_start].rstrip(" ")
    start = len(tokenizer(prefix, add_special_tokens=False)["input_ids"]) if prefix else 0
    suffix = sentence[char_stop:]
    tail = len(tokenizer(suffix, add_special_tokens=False)["input_ids"]) if suffix else 0
    return ids, start, max(start + 1, len(ids) - tail)


def _check_categories(categories, concepts: dict) -> dict[str, list[str]]:
    known = concepts["categories"]
    if categories is None:
        chosen = dict(known)
    elif isinstance(categories, Mapping):
        chosen = {}
        for name, words in categories.items():
            if not isinstance(name, str):
                raise TypeError(f"categories keys must be str, got {name!r}")
            if isinstance(words, str) or not words:
                raise ValueError(f"categories[{name!r}] must be a non-empty list of concept "
                                 f"words")
            if not all(isinstance(w, str) and w.strip() for w in words):
                raise ValueError(f"categories[{name!r}] must hold non-empty strings")
            chosen[name] = [w.strip() for w in words]
    else:
        names = check_names(categories, list(known), "categories", "category")
        chosen = {name: known[name] for name in names}
    if len(chosen) < 2:
        raise ValueError(f"categories must name at least 2 categories (a vector is a category's "
                         f"mean minus the mean over categories), got {list(chosen)}")
    return chosen


def extract_concept(
    model,
    tokenizer,
    *,
    categories: Sequence[str] | Mapping[str, Sequence[str]] | None = None,
    carriers: Sequence[str] | None = None,
    layers: Sequence[int] | None = None,
    pooling: str = DEFAULT_CONCEPT_POOLING,
    batch_size: int = 32,
    progress: bool = True,
    baseline: bool = True,
    neutral_queries: Sequence[str] | None = None,
):
    r"""Extract emotion vectors by Method concept (see the module docstring for the math).

    Parameters
    ----------
    model, tokenizer
        A transformers causal LM and its tokenizer.
    categories : sequence of names or mapping name -> words, optional
        Default all 24 categories of ``emokern/data/concepts.json``; a mapping supplies custom
        concept words. At least 2 categories.
    carriers : sequence of str, optional
        Neutral sentences with one ``{concept}`` slot; default the project's six.
    layers : sequence of int, optional
        Decoder layers; default all.
    pooling : {"last", "mean"}
        Hidden state at the concept's last token, or the mean over its tokens.
    batch_size : int
    progress : bool
    baseline : bool
        Also generate neutral answers to ``neutral_queries`` (default the project's queries)
        for the readings' neutral baseline and choose the detection layers
        (:func:`emokern.extract.neutral_readings.neutral_baseline`).

    Returns
    -------
    EmotionBank
        Vectors ``[L, C, D]`` (summing to zero over C), ``hidden_norm [L]`` (mean norm of the
        pooled concept states), the neutral baseline (with ``baseline``), metadata.
    """
    concepts = load_concepts()
    chosen = _check_categories(categories, concepts)
    carriers = list(concepts["carriers"] if carriers is None else carriers)
    if not carriers or isinstance(carriers, str):
        raise ValueError("carriers must be a non-empty list of sentences")
    for c in carriers:
        if not isinstance(c, str) or c.count(CONCEPT_SLOT) != 1:
            raise ValueError(f"carriers must be strings with exactly one {CONCEPT_SLOT} slot, "
                             f"got {c!r}")
    if pooling not in ("last", "mean"):
        raise ValueError(f"pooling must be 'last' or 'mean', got {pooling!r}")
    num_layers = num_decoder_layers(model)
    layers = check_layers(layers, num_layers)
    check_positive_int(batch_size, "batch_size")

    started = time.perf_counter()
    sequences, spans, groups = [], [], []
    for g, words in enumerate(chosen.values()):
        for word in words:
            for carrier in carriers:
                ids, a, b = concept_token_span(tokenizer, carrier, word)
                sequences.append(ids)
                spans.append((b - 1, b) if pooling == "last" else (a, b))
                groups.append(g)
    sums, counts, norm_sums = span_hidden_states(
        model, sequences, spans, layers=layers, pad_token_id=pad_id(tokenizer),
        batch_size=batch_size, progress=progress, desc="concept: read states")
    pooled = sums / counts[:, None, None].clamp_min(1)  # [N, L, D], one state per occurrence
    group = torch.tensor(groups)
    means = torch.stack([pooled[group == g].double().mean(dim=0)
                         for g in range(len(chosen))], dim=1)  # [L, C, D]
    vectors = center_vectors(means).float()
    hidden_norm = (norm_sums / counts[:, None].clamp_min(1)).double().mean(dim=0).float()
    fingerprint = model_fingerprint(model)
    source = json.dumps({"categories": chosen, "carriers": carriers}, sort_keys=True)
    metadata = {
        "method": "concept",
        "source_hash": text_hash(source),
        "source": "concepts.json" if categories is None and carriers == concepts["carriers"]
        else "custom",
        "pooling": pooling,
        "centered": True,
        "num_carriers": len(carriers),
        "words_per_category": {k: len(v) for k, v in chosen.items()},
        "emokern_version": emokern_version(),
        "fingerprint": fingerprint,
        "seconds_total": round(time.perf_counter() - started, 1),
    }
    metadata.update(recommend(vectors, layers, hidden_norm, num_layers, "concept", True,
                              fingerprint))
    bank = make_bank(vectors, list(chosen), layers, hidden_norm, metadata)
    if baseline:
        bank = neutral_baseline(model, tokenizer, bank, queries=neutral_queries,
                                batch_size=batch_size, progress=progress)
    return bank

r"""Method EV (emotion vectors): conditioned minus neutral answers, averaged over response tokens.

For each everyday query :math:`q` the model answers once neutrally and once under an
instruction to answer with emotion :math:`e`. One forward pass over prompt + answer reads the
residual stream; the vector of emotion :math:`e` at decoder layer :math:`l` is the difference
of the mean hidden states over all *response* tokens:

.. math::
    v_{e,l} = \frac{1}{|R_e|}\sum_{(q,t)\in R_e} h_l(q,t)
            - \frac{1}{|R_0|}\sum_{(q,t)\in R_0} h_l(q,t)

where :math:`R_e` is the set of (query, response-token) pairs of the answers under :math:`e`
(:math:`R_0`: neutral answers; prompt and padding tokens excluded) and :math:`h_l` is the output
of decoder layer ``l`` (``hidden_states[l + 1]`` of a transformers forward with
``output_hidden_states=True``, see ``docs/design.md``). With ``center=True`` the component
shared by all emotions is removed, :math:`v_{e,l} \leftarrow v_{e,l} - \frac1K\sum_{e'}
v_{e',l}`. The method follows the emotion-vector papers (e.g. *Controllable Emotion Generation
with Emotion Vectors*, and the EmotionQuery set it introduced); queries and instructions here
are written by this project (:mod:`emokern.data`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence

import torch

from emokern.data import load_heldout, load_instructions, load_queries, text_hash
from emokern.emotions import BASIC_EMOTIONS
from emokern.extract.checks import (
    check_layers,
    check_names,
    check_positive_int,
    num_decoder_layers,
)
from emokern.extract.hidden import DEFAULT_MAX_NEW_TOKENS, generate_responses, span_hidden_states
from emokern.extract.neutral_readings import detection_layers, neutral_stats
from emokern.extract.vectors import center_vectors, emokern_version, make_bank, recommend
from emokern.models import model_fingerprint
from emokern.tokens import chat_prompt_ids, pad_id

__all__ = ["DEFAULT_CENTER", "ev_messages", "extract_ev"]

#: Method EV removes the component shared by all emotions by default, chosen by measurement on
#: the default model (docs/emotions.md).
DEFAULT_CENTER = True


def _check_queries(queries) -> list[str]:
    if queries is None:
        return load_queries()
    if isinstance(queries, (str, os.PathLike)):
        raise TypeError("queries must be a sequence of query strings; to read a file use "
                        "load_queries(path)")
    queries = list(queries)
    if not queries:
        raise ValueError("queries must not be empty")
    for i, q in enumerate(queries):
        if not isinstance(q, str) or not q.strip():
            raise ValueError(f"queries[{i}] must be a non-empty str, got {q!r}")
    return [q.strip() for q in queries]


def _check_phrasing(instruction, instructions: dict) -> tuple[str, dict]:
    if isinstance(instruction, Mapping):
        phrasing = dict(instruction)
        name = str(phrasing.pop("id", "custom"))
    elif isinstance(instruction, str):
        if instruction not in instructions["phrasings"]:
            raise ValueError(f"instruction must be one of {sorted(instructions['phrasings'])} or "
                             f"a dict phrasing, got {instruction!r}")
        name, phrasing = instruction, instructions["phrasings"][instruction]
    else:
        raise TypeError(f"instruction must be a phrasing id or a dict, got "
                        f"{type(instruction).__name__}")
    for key in ("user", "neutral_user"):
        if not isinstance(phrasing.get(key), str) or "{query}" not in phrasing[key]:
            raise ValueError(f"instruction {name!r}: {key!r} must be a str containing "
                             f"'{{query}}'")
    return name, phrasing


def ev_messages(query: str, phrasing: Mapping, forms: Mapping[str, str] | None = None
                ) -> list[dict]:
    """Chat messages for one Method-EV prompt.

    Parameters
    ----------
    query : str
    phrasing : mapping
        One entry of ``load_instructions()["phrasings"]``.
    forms : mapping, optional
        ``{"noun": ..., "adjective": ...}`` of the emotion; None builds the neutral prompt.
    """
    prefix = "" if forms is not None else "neutral_"
    fill = dict(forms or {}, query=query)
    messages = []
    system = phrasing.get(prefix + "system")
    if system:
        messages.append({"role": "system", "content": system.format(**fill)})
    messages.append({"role": "user", "content": phrasing[prefix + "user"].format(**fill)})
    return messages


def extract_ev(
    model,
    tokenizer,
    *,
    emotions: Sequence[str] = BASIC_EMOTIONS,
    queries: Sequence[str] | None = None,
    instruction: str | Mapping | None = None,
    center: bool = DEFAULT_CENTER,
    layers: Sequence[int] | None = None,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    batch_size: int = 32,
    do_sample: bool = False,
    seed: int = 0,
    progress: bool = True,
    return_responses: bool = False,
    detect: bool = True,
):
    r"""Extract emotion vectors by Method EV (see the module docstring for the math).

    For every query: one neutral answer and one answer per emotion under ``instruction``
    (chat template, batched generation with left padding); then one forward pass over prompt +
    answer; response tokens only (prompt, end-of-sequence and padding excluded) are averaged.

    Parameters
    ----------
    model, tokenizer
        A transformers causal LM (eval mode) and its tokenizer.
    emotions : sequence of str
        Names known to ``instructions.json`` (24 are; default the six basic emotions).
    queries : sequence of str, optional
        Default: the project's 118 everyday queries (``emokern/data/queries.txt``).
    instruction : str or dict, optional
        A phrasing id from ``instructions.json`` (default: its measured ``default``) or a dict
        ``{system, user, neutral_system, neutral_user}``.
    center : bool
        Subtract the mean over emotions at each layer (needs >= 2 emotions).
    layers : sequence of int, optional
        Decoder layers to keep; default all.
    max_new_tokens, batch_size : int
    do_sample : bool
        Greedy (default) or seeded nucleus sampling.
    seed : int
    progress : bool
        tqdm progress bars.
    return_responses : bool
        Also return the generated texts ``{"neutral": [...], emotion: [...]}``.
    detect : bool
        Also choose the detection layers on the held-out sentences
        (:func:`emokern.extract.neutral_readings.detection_layers`).

    Returns
    -------
    EmotionBank
        Vectors ``[L, K, D]``, ``hidden_norm [L]`` (mean norm of response-token hidden states,
        all conditions), the neutral baseline of the readings (from the neutral answers,
        :func:`emokern.extract.neutral_readings.neutral_stats`), metadata (method, queries hash,
        instruction id, centered, model fingerprint, emokern version, default_weight,
        recommended_layers, detection layers, counts, time).
        With ``return_responses``: ``(bank, responses)``.

    Raises
    ------
    ValueError, TypeError
        Unknown emotion, empty queries, bad layers, ... before any generation.
    """
    instructions = load_instructions()
    emotions = check_names(emotions, list(instructions["emotions"]), "emotions", "emotion")
    queries = _check_queries(queries)
    name, phrasing = _check_phrasing(
        instructions["default"] if instruction is None else instruction, instructions)
    if not isinstance(center, bool):
        raise TypeError(f"center must be a bool, got {type(center).__name__}")
    if center and len(emotions) < 2:
        raise ValueError("center=True needs at least 2 emotions (centring one emotion leaves "
                         "a zero vector)")
    num_layers = num_decoder_layers(model)
    layers = check_layers(layers, num_layers)
    check_positive_int(max_new_tokens, "max_new_tokens")
    check_positive_int(batch_size, "batch_size")

    started = time.perf_counter()
    conditions = ["neutral", *emotions]
    prompts, groups = [], []
    for g, condition in enumerate(conditions):
        forms = None if condition == "neutral" else instructions["emotions"][condition]
        for query in queries:
            prompts.append(chat_prompt_ids(tokenizer, ev_messages(query, phrasing, forms)))
            groups.append(g)
    responses = generate_responses(model, tokenizer, prompts, max_new_tokens=max_new_tokens,
                                   batch_size=batch_size, do_sample=do_sample, seed=seed,
                                   progress=progress, desc="EV: generate")
    generated = time.perf_counter()
    sequences = [p + r for p, r in zip(prompts, responses, strict=True)]
    spans = [(len(p), len(p) + len(r)) for p, r in zip(prompts, responses, strict=True)]
    sums, counts, norm_sums = span_hidden_states(
        model, sequences, spans, layers=layers, pad_token_id=pad_id(tokenizer),
        batch_size=max(1, batch_size // 2), progress=progress, desc="EV: read states")

    group = torch.tensor(groups)
    means = []
    token_counts = {}
    for g, condition in enumerate(conditions):
        rows = group == g
        total = int(counts[rows].sum())
        if total == 0:
            raise ValueError(f"the model produced no response token under {condition!r} for "
                             f"any query (every answer ended at once); try more queries or "
                             f"another instruction")
        token_counts[condition] = total
        means.append(sums[rows].double().sum(dim=0) / total)  # [L, D]
    neutral = means[0]
    raw = torch.stack([m - neutral for m in means[1:]], dim=1).float()  # [L, K, D]
    vectors = center_vectors(raw) if center else raw
    hidden_norm = (norm_sums.double().sum(dim=0) / counts.sum()).float()  # [L]
    fingerprint = model_fingerprint(model)
    metadata = {
        "method": "ev",
        "source_hash": text_hash(queries),
        "source": "queries.txt" if queries == load_queries() else "custom",
        "num_queries": len(queries),
        "instruction": name,
        "instruction_phrasing": phrasing,
        "centered": center,
        "max_new_tokens": max_new_tokens,
        "do_sample": do_sample,
        "seed": seed,
        "response_tokens": token_counts,
        "emokern_version": emokern_version(),
        "fingerprint": fingerprint,
        "seconds_generate": round(generated - started, 1),
        "seconds_total": round(time.perf_counter() - started, 1),
    }
    metadata.update(recommend(vectors, layers, hidden_norm, num_layers, "ev", center,
                              fingerprint))
    # The neutral answers give the readings' baseline at no extra cost.
    neutral_rows = group == 0
    mean, std = neutral_stats(sums[neutral_rows], counts[neutral_rows], vectors)
    metadata["neutral"] = {"source": metadata["source"],
                           "responses": int((counts[neutral_rows] > 0).sum()),
                           "tokens": token_counts["neutral"], "max_new_tokens": max_new_tokens}
    bank = make_bank(vectors, emotions, layers, hidden_norm, metadata, neutral_mean=mean,
                     neutral_std=std)
    if detect and set(emotions) & {e for e, _ in load_heldout()}:
        chosen, accuracy = detection_layers(model, tokenizer, bank)
        bank = bank.replace(metadata={"detection_layers": chosen, "detection_accuracy": {
            str(k): v for k, v in accuracy.items()}})
    if not return_responses:
        return bank
    texts = tokenizer.batch_decode(responses, skip_special_tokens=True)
    by_condition = {c: [t for t, g in zip(texts, groups, strict=True) if g == i]
                    for i, c in enumerate(conditions)}
    return bank, by_condition

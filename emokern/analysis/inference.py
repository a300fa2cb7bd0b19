r"""Emotion inference from situation vignettes, scored from next-token logits, intact or with
neurons ablated.

The task: ``emokern/data/vignettes.json`` holds 30 original situation vignettes per basic
emotion (joy, sadness, anger, fear, disgust, surprise), none naming the emotion. Each item is
the cloze prompt :data:`PROMPT` (the vignette, then "The emotion this person feels is"); the model's
score of option :math:`o` on item :math:`i` is the log-probability of the option's first token
(with a leading space) as the next token:

.. math::
    s_{i,o} = \log p(o \mid \mathrm{prompt}_i).

**Calibration.** A small model prefers some answers whatever the item (on the default model
the raw argmax is nearly always the same option: chance accuracy). Content-free calibration
(Zhao et al. 2021, "Calibrate before use") removes that bias; here each option's bias is
estimated by its mean score over the item set, so the calibrated score is

.. math::
    c_{i,o} = s_{i,o} - \frac1N \sum_{i'} s_{i',o}, \qquad \hat y_i = \arg\max_o c_{i,o}.

It uses no labels (only the scores, over a balanced item set), and it is recomputed under
every ablation, so an ablation is judged by what it does to the model's discrimination between
items, not by a shift of its preferred answer. Raw accuracy is reported beside it.

**Ablation study** (Li, Su et al. 2024 design): accuracy intact; after ablating (scale 0) the
top-:math:`k` attribute neurons of each attribute (from :mod:`emokern.analysis.neurons`); and
after ablating ``draws`` random neuron sets with the same number of neurons in each layer (drawn
outside the attribute's set), per :math:`k`. Per-emotion accuracies give each attribute's
per-emotion drop beyond random.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from emokern.data import DATA_DIR
from emokern.steering.ablate import ablate, mlp_down_projections
from emokern.tokens import model_device, pad_batch, pad_id

__all__ = ["PROMPT", "VIGNETTES_FILE", "ablation_study", "calibrated", "evaluate",
           "load_vignettes", "option_scores", "option_token_ids", "random_matched_set"]

VIGNETTES_FILE = DATA_DIR / "vignettes.json"
#: The item prompt (a cloze: the options are scored as its next token). Measured on the
#: default model against a prompt that lists the options ("Question: Which emotion does the
#: person most likely feel: joy, ... or surprise?\nSituation: ...\nAnswer:"): calibrated
#: accuracy 0.59 vs 0.46, with half the tokens (24 vs 49 per item).
PROMPT = "{vignette} The emotion this person feels is"


def load_vignettes(path=None) -> tuple[list[str], list[tuple[str, str]]]:
    """``(options, items)``: the option names and ``(vignette, emotion)`` pairs."""
    path = VIGNETTES_FILE if path is None else path
    with open(path, encoding="utf-8") as fh:
        data = json.load(fh)
    options = list(data["options"])
    items = [(text, emotion) for emotion in options for text in data["vignettes"][emotion]]
    return options, items


def option_token_ids(tokenizer, options: Sequence[str]) -> list[int]:
    """The first token of ``" " + option`` for each option; distinct, else a ValueError."""
    ids = [tokenizer(" " + o, add_special_tokens=False)["input_ids"][0] for o in options]
    if len(set(ids)) != len(ids):
        raise ValueError(f"options {list(options)} do not start with distinct tokens")
    return ids


def _prompt_ids(tokenizer, options, texts) -> list[list[int]]:
    return [tokenizer(PROMPT.format(vignette=t), add_special_tokens=False)["input_ids"]
            for t in texts]


def option_scores(model, tokenizer, texts: Sequence[str], options: Sequence[str], *,
                  batch_size: int = 30, prompts=None) -> np.ndarray:
    """Next-token log-probabilities of each option's first token, ``[N, O]`` (float64)."""
    ids = option_token_ids(tokenizer, options)
    prompts = _prompt_ids(tokenizer, options, texts) if prompts is None else prompts
    pad = pad_id(tokenizer)
    device = model_device(model)
    out = np.empty((len(prompts), len(ids)))
    with torch.inference_mode():
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start:start + batch_size]
            input_ids, mask, positions = pad_batch(chunk, pad)
            logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                           position_ids=positions.to(device), logits_to_keep=1).logits[:, -1]
            logp = torch.log_softmax(logits.float(), dim=-1)[:, ids]
            out[start:start + len(chunk)] = logp.double().cpu().numpy()
    return out


def calibrated(scores: np.ndarray) -> np.ndarray:
    """Content-free calibration: each option's mean score over the items subtracted."""
    return scores - scores.mean(axis=0, keepdims=True)


def _accuracy(scores: np.ndarray, labels: np.ndarray, n_options: int) -> dict:
    pred = scores.argmax(axis=1)
    per = [float((pred[labels == o] == o).mean()) for o in range(n_options)]
    return {"accuracy": float((pred == labels).mean()), "per_emotion": per,
            "predicted_counts": np.bincount(pred, minlength=n_options).tolist()}


def evaluate(model, tokenizer, *, neurons: Mapping[int, Sequence[int]] | None = None,
             vignettes_path=None, batch_size: int = 30, _cache=None) -> dict:
    """Accuracy of the vignette task, raw and calibrated, optionally with ``neurons`` ablated.

    Returns
    -------
    dict
        ``raw`` and ``calibrated``: ``accuracy``, ``per_emotion`` (in the options' order),
        ``predicted_counts``; ``options``; ``n_items``.
    """
    options, items = load_vignettes(vignettes_path)
    texts = [t for t, _ in items]
    labels = np.array([options.index(e) for _, e in items])
    prompts = _cache if _cache is not None else _prompt_ids(tokenizer, options, texts)
    if neurons:
        with ablate(model, neurons):
            scores = option_scores(model, tokenizer, texts, options, batch_size=batch_size,
                                   prompts=prompts)
    else:
        scores = option_scores(model, tokenizer, texts, options, batch_size=batch_size,
                               prompts=prompts)
    return {"options": options, "n_items": len(items),
            "raw": _accuracy(scores, labels, len(options)),
            "calibrated": _accuracy(calibrated(scores), labels, len(options))}


def random_matched_set(neurons: Mapping[int, Sequence[int]], features: Sequence[int],
                       rng: np.random.Generator) -> dict[int, list[int]]:
    """A random set with as many neurons in each layer as ``neurons``, none of them in it."""
    out = {}
    for layer, ids in neurons.items():
        pool = np.setdiff1d(np.arange(features[layer]), np.asarray(ids, dtype=np.int64))
        out[int(layer)] = sorted(rng.choice(pool, len(ids), replace=False).tolist())
    return out


def _top_set(top: Sequence[Sequence], k: int) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for layer, neuron, *_ in top[:k]:
        out.setdefault(int(layer), []).append(int(neuron))
    return out


def ablation_study(model, tokenizer, neurons_result: dict, *, ks: Sequence[int] = (100, 400),
                   attributes: Sequence[str] | None = None, draws: int = 5, seed: int = 0,
                   vignettes_path=None, batch_size: int = 30, progress: bool = True,
                   on_condition=None) -> dict:
    """Accuracy intact, with each attribute's top-k neurons ablated, and with random
    layer-matched sets ablated (``draws`` per attribute and k).

    Parameters
    ----------
    neurons_result : dict
        The output of :func:`emokern.analysis.neurons.attribute_neurons` (``neurons.json``):
        ``per_attribute[name]["top"]`` rows ``[layer, neuron, tau, p, q]``.
    ks : sequence of int
        Numbers of top neurons to ablate (each at most the stored top list's length).
    attributes : sequence of str, optional
        Default every attribute of ``neurons_result``.
    draws : int
        Random sets per (attribute, k); at least 1.
    on_condition : callable, optional
        Called with the partial result (``complete`` False) after each (attribute, k), so a
        long run can be written as it goes.

    Returns
    -------
    dict
        ``intact``; ``conditions``: one row per (attribute, k) with ``top`` (the evaluation of
        the top set) and ``random`` (a list of ``draws`` evaluations), and the per-layer
        counts; ``seconds``.
    """
    per_attribute = neurons_result["per_attribute"]
    names = list(per_attribute) if attributes is None else list(attributes)
    for name in names:
        if name not in per_attribute:
            raise ValueError(f"attributes names {name!r}, which the neurons result lacks; it "
                             f"has {list(per_attribute)}")
    ks = [int(k) for k in ks]
    for k in ks:
        if k < 1 or any(k > len(per_attribute[n]["top"]) for n in names):
            raise ValueError(f"ks must be between 1 and the stored top-list length "
                             f"({min(len(per_attribute[n]['top']) for n in names)}), got {k}")
    if isinstance(draws, bool) or not isinstance(draws, int) or draws < 1:
        raise ValueError(f"draws must be a positive int, got {draws!r}")
    features = [f for _, f in mlp_down_projections(model)]
    started = time.perf_counter()
    options, items = load_vignettes(vignettes_path)
    prompts = _prompt_ids(tokenizer, options, [t for t, _ in items])
    rng = np.random.default_rng(seed)
    jobs = [(name, k) for k in ks for name in names]
    rows: list[dict] = []

    def result(complete: bool) -> dict:
        return {"options": options, "n_items": len(items), "ks": ks, "attributes": names,
                "draws": draws, "seed": seed, "prompt": PROMPT, "intact": intact,
                "conditions": list(rows), "complete": complete,
                "seconds": round(time.perf_counter() - started, 1)}

    bar = tqdm(total=1 + len(jobs) * (1 + draws), desc="inference: conditions",
               disable=not progress)
    intact = evaluate(model, tokenizer, vignettes_path=vignettes_path, batch_size=batch_size,
                      _cache=prompts)
    bar.update()
    rows = []
    for name, k in jobs:
        top = _top_set(per_attribute[name]["top"], k)
        row = {"attribute": name, "k": k,
               "per_layer": {str(layer): len(ids) for layer, ids in sorted(top.items())},
               "top": evaluate(model, tokenizer, neurons=top, vignettes_path=vignettes_path,
                               batch_size=batch_size, _cache=prompts)}
        bar.update()
        row["random"] = []
        for _ in range(draws):
            row["random"].append(evaluate(model, tokenizer,
                                          neurons=random_matched_set(top, features, rng),
                                          vignettes_path=vignettes_path,
                                          batch_size=batch_size, _cache=prompts))
            bar.update()
        rows.append(row)
        if on_condition is not None and len(rows) < len(jobs):
            on_condition(result(False))
    bar.close()
    return result(True)

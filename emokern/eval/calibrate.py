r"""Calibration and quality checks of emotion banks, measured with independent scorers.

* :func:`calibrate` — the steering sweep: layers x weights x emotions x prompts, batched (each
  row of a batch carries its own layer, weight and emotion), scored by the ``nade`` classifier,
  a repetition measure and the unsteered model's perplexity;
  :func:`choose_recommendation` turns its rows into ``recommended_alpha`` /
  ``recommended_layers``.
* :func:`heldout_report` — classify held-out emotional sentences by the argmax of their
  projections on a bank's directions, beside random directions (chance level) and a
  nearest-class-mean classifier (the upper bound on the same hidden states).
* :func:`instruction_sweep` — which Method-EV instruction phrasing makes the model's answers
  most emotional by the classifier.

Steering here uses :func:`emokern.steer` (the fused op at the output of a decoder layer, one
mix per sequence, ``positions="all"``: prompt and generated tokens) with one single-layer
steerer per swept layer, so every row of a batch can have its own layer, weight and emotion.

``python -m emokern.eval.calibrate --method ev --write`` reruns the sweep for a shipped bank,
stores the chosen values in ``emokern/data/calibration.json`` and in the bank's metadata, and
prints the table for docs/emotions.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from emokern.eval.scorers import BASIC_EMOTIONS, EmotionScorer, perplexity, repetition
from emokern.extract import (
    CALIBRATION_FILE,
    chat_prompt_ids,
    ev_messages,
    generate_responses,
    load_heldout,
    load_instructions,
    load_queries,
    span_hidden_states,
)

#: Everyday prompts for steering sweeps, not in the extraction queries.
CALIBRATION_PROMPTS = (
    "Tell me about your day.",
    "What did you do this morning?",
    "Describe the street where you live.",
    "How do you feel about the weekend?",
    "What are you going to cook tonight?",
    "Tell me about your favourite season.",
    "What happened at school today?",
    "Describe your last walk in the park.",
)


#: Weights swept by ``python -m emokern.eval.calibrate sweep`` per method.
DEFAULT_ALPHAS = {"ev": "2,4,6,8", "concept": "0.5,1,1.5,2"}


# --------------------------------------------------------------------------------------------
# Per-row steering with a forward hook
# --------------------------------------------------------------------------------------------

class RowSteering:
    """Each batch row steered at its own layers with its own mix, through :func:`emokern.steer`.

    One single-layer :class:`emokern.Steerer` per hooked layer (``positions="all"``: prompt
    and generated tokens, padding excluded; no monitor). :meth:`set_rows` gives every row of
    the next batch its mix per layer, ``rows[b] = {layer: {emotion: weight}}``; a row absent
    from a layer's dict is not steered there. A row steered at several layers gets the full
    weight at each of them (``spread="each"``), so a band of ``L`` layers pushes about ``L``
    times as hard as one layer.

    Parameters
    ----------
    model
        A transformers causal LM.
    bank : EmotionBank
        Checked against ``model`` with ``bank.check_compatible``.
    layers : sequence of int
        Bank layers to hook.
    """

    def __init__(self, model, bank, layers: Sequence[int]):
        from emokern.steer import Steerer

        self.layers = list(layers)
        self.steerers = {layer: Steerer(model, bank, [{}], layers=[layer], positions="all",
                                        monitor=False, spread="each")
                         for layer in self.layers}

    def set_rows(self, rows: Sequence[dict[int, dict[str, float]]]) -> None:
        """Set the mix of each row of the next batch: ``rows[b] = {layer: {emotion: weight}}``.
        """
        for layer, steerer in self.steerers.items():
            steerer.set_mix([row.get(layer, {}) for row in rows])

    def __enter__(self):
        for steerer in self.steerers.values():
            steerer.install()
        return self

    def __exit__(self, *exc):
        for steerer in self.steerers.values():
            steerer.remove()
        return False


# --------------------------------------------------------------------------------------------
# Steering sweep
# --------------------------------------------------------------------------------------------

def _layer_sets(layers) -> list[tuple[int, ...]]:
    out = []
    for item in layers:
        if isinstance(item, int) and not isinstance(item, bool):
            out.append((item,))
        else:
            items = tuple(item)
            if not items or not all(isinstance(x, int) and not isinstance(x, bool)
                                    for x in items):
                raise TypeError(f"layers must hold ints or tuples of ints, got {item!r}")
            out.append(items)
    if not out:
        raise ValueError("layers must not be empty")
    return out


def _label(layer_set: tuple[int, ...]) -> str:
    if len(layer_set) == 1:
        return str(layer_set[0])
    if list(layer_set) == list(range(layer_set[0], layer_set[-1] + 1)):
        return f"{layer_set[0]}-{layer_set[-1]}"
    return ",".join(map(str, layer_set))


def generate_steered(model, tokenizer, bank, prompts: Sequence[str],
                     mixes: Sequence[dict[int, dict[str, float]]], *,
                     max_new_tokens: int = 48, batch_size: int = 32, seed: int = 0,
                     progress: bool = True) -> list[str]:
    """Generate one answer per (prompt, mix) row with greedy decoding.

    ``mixes[i] = {layer: {emotion: weight}}`` steers row ``i`` at those layers (``{}``:
    unsteered). Returns the decoded answers.
    """
    if len(prompts) != len(mixes):
        raise ValueError(f"mixes must have one entry per prompt ({len(mixes)} vs "
                         f"{len(prompts)})")
    hooked = sorted({layer for mix in mixes for layer in mix})
    ids = [chat_prompt_ids(tokenizer, [{"role": "user", "content": p}]) for p in prompts]
    steering = RowSteering(model, bank, hooked)
    with steering:
        responses = generate_responses(
            model, tokenizer, ids, max_new_tokens=max_new_tokens, batch_size=batch_size,
            seed=seed, progress=progress, desc="steered generate",
            steer_weights=lambda a, b: steering.set_rows(mixes[a:b]))
    return tokenizer.batch_decode(responses, skip_special_tokens=True)


def calibrate(
    model,
    tokenizer,
    bank,
    *,
    layers: Sequence[int | Sequence[int]],
    alphas: Sequence[float],
    prompts: Sequence[str] = CALIBRATION_PROMPTS,
    emotions: Sequence[str] = ("joy", "fear", "sadness"),
    max_new_tokens: int = 40,
    batch_size: int = 32,
    scorer: EmotionScorer | None = None,
    fluency: bool = True,
    progress: bool = True,
) -> list[dict]:
    r"""Steering sweep: how emotional and how fluent is the steered text?

    Every combination (layer set, weight :math:`\alpha`, emotion :math:`e`, prompt) is one row
    of a batched greedy generation; row :math:`b` adds :math:`\alpha\,v_{e,l}` to the output
    of each decoder layer :math:`l` of its layer set at every position. Unsteered answers to the
    same prompts are the baseline.

    Parameters
    ----------
    model, tokenizer, bank
        The model the bank was extracted from (checked with ``bank.check_compatible``).
    layers : sequence of int or tuple of int
        Layer sets to try: an int steers one layer, a tuple steers all its layers at once.
    alphas : sequence of float
        Weights (> 0).
    prompts : sequence of str
        User messages (chat template applied).
    emotions : sequence of str
        Bank emotions to steer; the classifier must know them (the six basic ones).
    scorer : EmotionScorer, optional
    fluency : bool
        Also score the perplexity of each answer under the unsteered model.

    Returns
    -------
    list of dict
        One row per (layer set, alpha, emotion), plus baseline rows (``alpha == 0``,
        ``emotion == "none"``, with ``scores`` and ``top_rates`` per emotion), each with
        ``layer`` (label, e.g. "12" or "8-20"), ``alpha``,
        ``emotion``, ``score`` (mean classifier intensity of the target emotion, in [0, 1]),
        ``gain`` (score minus the unsteered score on the same prompts), ``hit_rate`` (fraction
        of answers whose top basic emotion is the target), ``repetition`` (mean repeated
        3-gram fraction), ``perplexity`` (median, if ``fluency``), ``words`` (mean length)
        and ``example`` (the first prompt's answer).
    """
    bank.check_compatible(model)
    layer_sets = _layer_sets(layers)
    for layer_set in layer_sets:
        missing = [layer for layer in layer_set if layer not in bank.layers]
        if missing:
            raise ValueError(f"layers {missing} are not in the bank (it has {bank.layers})")
    alphas = [float(a) for a in alphas]
    if not alphas or not all(math.isfinite(a) and a > 0 for a in alphas):
        raise ValueError(f"alphas must be positive finite numbers, got {alphas}")
    prompts = list(prompts)
    if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise ValueError("prompts must be a non-empty list of non-empty strings")
    scorer = scorer or EmotionScorer()
    emotions = list(emotions)
    for e in emotions:
        if e not in bank.names:
            raise ValueError(f"emotions: {e!r} is not in the bank ({bank.names})")
        scorer.column(e)

    configs = [((), 0.0, "none")] + [(ls, a, e) for ls in layer_sets for a in alphas
                                     for e in emotions]
    rows_prompts, rows_mix, rows_config = [], [], []
    for c, (layer_set, alpha, emotion) in enumerate(configs):
        for prompt in prompts:
            rows_prompts.append(prompt)
            rows_mix.append({layer: {emotion: alpha} for layer in layer_set})
            rows_config.append(c)
    texts = generate_steered(model, tokenizer, bank, rows_prompts, rows_mix,
                             max_new_tokens=max_new_tokens, batch_size=batch_size,
                             progress=progress)
    scores = scorer.score(texts)  # [N, E]
    reps = np.array([repetition(t) for t in texts])
    lengths = np.array([len(t.split()) for t in texts])
    ppl = np.array(perplexity(model, tokenizer, texts)) if fluency else None
    config_of = np.array(rows_config)
    base = config_of == 0
    base_scores = scores[base]  # [P, E]
    out = []
    for c, (layer_set, alpha, emotion) in enumerate(configs):
        sel = config_of == c
        s = scores[sel]
        row = {"layer": _label(layer_set) if layer_set else "-", "layers": list(layer_set),
               "alpha": alpha, "emotion": emotion}
        if emotion != "none":
            k = scorer.column(emotion)
            row["score"] = float(s[:, k].mean())
            row["gain"] = float((s[:, k] - base_scores[:, k]).mean())
            row["hit_rate"] = float((s.argmax(axis=1) == k).mean())
        else:
            row["scores"] = {e: float(s[:, scorer.column(e)].mean()) for e in emotions}
            # How often each swept emotion is already the top one without steering: the
            # level a steered hit rate has to beat.
            row["top_rates"] = {e: float((s.argmax(axis=1) == scorer.column(e)).mean())
                                for e in emotions}
        row["repetition"] = float(reps[sel].mean())
        if ppl is not None:
            row["perplexity"] = float(np.nanmedian(ppl[sel])) if np.isfinite(ppl[sel]).any() \
                else float("nan")
        row["words"] = float(lengths[sel].mean())
        row["example"] = texts[int(np.flatnonzero(sel)[0])]
        out.append(row)
    return out


def choose_recommendation(rows: Sequence[dict], *, max_repetition: float = 0.2,
                          max_perplexity_ratio: float = 3.0) -> dict:
    r"""Pick the (layer set, alpha) with the largest mean classifier gain over the swept
    emotions among those whose text stays fluent.

    Fluent means: mean repeated-3-gram fraction :math:`\le` ``max_repetition`` for every
    emotion, and median perplexity :math:`\le` ``max_perplexity_ratio`` x the unsteered
    median. Ties (gains within 0.01) go to the smaller alpha.

    Returns
    -------
    dict
        ``layers`` (list of int), ``alpha``, ``gain``, ``hit_rate``, ``repetition``,
        ``perplexity``; ``{}`` when no configuration is fluent.
    """
    base = [r for r in rows if r["emotion"] == "none"]
    base_ppl = base[0].get("perplexity", float("nan")) if base else float("nan")
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["emotion"] != "none":
            groups.setdefault((tuple(r["layers"]), r["alpha"]), []).append(r)
    best = {}
    for (layers, alpha), group in groups.items():
        rep = max(r["repetition"] for r in group)
        ppl = max(r.get("perplexity", float("nan")) for r in group)
        if rep > max_repetition:
            continue
        if math.isfinite(base_ppl) and math.isfinite(ppl) and ppl > max_perplexity_ratio * \
                base_ppl:
            continue
        gain = float(np.mean([r["gain"] for r in group]))
        better = not best or gain > best["gain"] + 0.01 or (
            abs(gain - best["gain"]) <= 0.01 and alpha < best["alpha"])
        if better:
            best = {"layers": list(layers), "alpha": alpha, "gain": gain,
                    "hit_rate": float(np.mean([r["hit_rate"] for r in group])),
                    "repetition": rep, "perplexity": ppl}
    return best


def format_sweep(rows: Sequence[dict]) -> str:
    """A Markdown table of :func:`calibrate` rows (one line per layer set x alpha, one column
    group per emotion: classifier score / gain / hit rate / repetition)."""
    base = [r for r in rows if r["emotion"] == "none"]
    emotions = sorted({r["emotion"] for r in rows if r["emotion"] != "none"},
                      key=lambda e: BASIC_EMOTIONS.index(e) if e in BASIC_EMOTIONS else 99)
    head = "| layer | alpha | " + " | ".join(f"{e} score (gain) / hit / rep" for e in emotions)
    head += " | ppl (max) |"
    lines = [head, "|" + "---|" * (3 + len(emotions))]
    if base:
        b = base[0]
        cells = [f"{b['scores'].get(e, float('nan')):.2f} / – / {b['repetition']:.2f}"
                 for e in emotions]
        lines.append("| none | 0 | " + " | ".join(cells) +
                     f" | {b.get('perplexity', float('nan')):.1f} |")
    groups: dict[tuple, dict] = {}
    for r in rows:
        if r["emotion"] != "none":
            groups.setdefault((r["layer"], r["alpha"]), {})[r["emotion"]] = r
    for (layer, alpha), by_e in groups.items():
        cells = []
        for e in emotions:
            r = by_e.get(e)
            cells.append("–" if r is None else f"{r['score']:.2f} ({r['gain']:+.2f}) / "
                         f"{r['hit_rate']:.2f} / {r['repetition']:.2f}")
        ppl = max(r.get("perplexity", float("nan")) for r in by_e.values())
        lines.append(f"| {layer} | {alpha:g} | " + " | ".join(cells) + f" | {ppl:.1f} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Held-out classification
# --------------------------------------------------------------------------------------------

def heldout_states(model, tokenizer, layers: Sequence[int],
                   sentences: Sequence[tuple[str, str]] | None = None, *,
                   batch_size: int = 32) -> tuple[torch.Tensor, list[str]]:
    """Mean hidden state over the tokens of each held-out sentence (plain text, no chat
    template), skipping its first token: ``states [N, L, D]`` float32 and the emotion labels.

    The first token of a text is the model's attention sink: from the middle layers on its
    state has a norm tens of times larger than the other tokens' and nearly the same direction
    in every text, so it would dominate a plain mean (measured on the default model: the
    nearest-class-mean accuracy at layers 12-20 drops from ~0.75 to ~0.2 when it is kept).
    """
    from emokern.extract import _pad_id

    sentences = load_heldout() if sentences is None else list(sentences)
    labels = [e for e, _ in sentences]
    ids = [list(tokenizer(t, add_special_tokens=False)["input_ids"]) for _, t in sentences]
    short = [i for i, x in enumerate(ids) if len(x) < 2]
    if short:
        raise ValueError(f"held-out sentence {short[0]} has fewer than 2 tokens")
    sums, counts, _ = span_hidden_states(model, ids, [(1, len(x)) for x in ids],
                                         layers=list(layers), pad_token_id=_pad_id(tokenizer),
                                         batch_size=batch_size)
    return sums / counts[:, None, None].clamp_min(1), labels


def projection_accuracy(states: torch.Tensor, labels: Sequence[str], directions: torch.Tensor,
                        names: Sequence[str], *, center_states: bool = True) -> torch.Tensor:
    r"""Per-layer accuracy of classifying by the argmax of projections on unit directions.

    .. math:: \hat y_i = \arg\max_k \langle x_{i,l} - \bar x_l,\ v_{k,l}\rangle /
              \lVert v_{k,l}\rVert

    where :math:`\bar x_l` is the mean over the evaluated sentences (label-free; omitted when
    ``center_states`` is False). Sentences whose label is not in ``names`` are skipped.

    Parameters
    ----------
    states : Tensor [N, L, D]
    labels : N str
    directions : Tensor [L, K, D]
    names : K str

    Returns
    -------
    Tensor [L] of accuracies.
    """
    keep = [i for i, y in enumerate(labels) if y in names]
    if not keep:
        raise ValueError(f"labels share no emotion with names {list(names)}")
    x = states[keep].float()
    if center_states:
        x = x - x.mean(dim=0, keepdim=True)
    y = torch.tensor([list(names).index(labels[i]) for i in keep])
    unit = directions.float() / directions.float().norm(dim=-1, keepdim=True).clamp_min(1e-12)
    proj = torch.einsum("nld,lkd->nlk", x, unit)
    return (proj.argmax(dim=-1) == y[:, None]).float().mean(dim=0)


def nearest_mean_accuracy(states: torch.Tensor, labels: Sequence[str]) -> torch.Tensor:
    """Per-layer leave-one-out accuracy of the nearest-class-mean classifier (Euclidean) on the
    same states: the upper bound a linear read-out of class means reaches. ``[N, L, D] -> [L]``.
    """
    classes = sorted(set(labels))
    y = torch.tensor([classes.index(label) for label in labels])
    x = states.float()
    n_layers = x.shape[1]
    sums = torch.stack([x[y == c].sum(dim=0) for c in range(len(classes))], dim=1)  # [L, C, D]
    counts = torch.tensor([(y == c).sum() for c in range(len(classes))]).float()
    correct = torch.zeros(n_layers)
    for i in range(x.shape[0]):
        means = sums.clone()
        n = counts.clone()
        means[:, y[i]] -= x[i]
        n[y[i]] -= 1
        means = means / n.clamp_min(1)[None, :, None]
        dist = (x[i][:, None, :] - means).norm(dim=-1)  # [L, C]
        dist[:, n == 0] = float("inf")  # a class emptied by leaving i out has no mean
        correct += (dist.argmin(dim=-1) == y[i]).float()
    return correct / x.shape[0]


def heldout_report(model, tokenizer, bank, *, names: Sequence[str] = BASIC_EMOTIONS,
                   n_random: int = 10, seed: int = 0, center_states: bool = True,
                   sentences=None) -> dict:
    """Classify the held-out sentences with ``bank`` at each of its layers.

    Returns
    -------
    dict
        ``layers``; per-layer ``bank`` accuracies (argmax of projections on the bank's
        directions), ``random`` (mean over ``n_random`` draws of as many Gaussian directions;
        ``best_random_any_draw`` is the luckiest draw at the luckiest layer),
        ``nearest_mean`` (leave-one-out upper bound); and ``best_layer``, ``best_bank``,
        ``best_random`` (best layer of the mean random accuracy), ``best_nearest_mean``,
        ``chance`` (1 / #classes) and ``n`` (sentences).
    """
    names = [n for n in names if n in bank.names]
    if len(names) < 2:
        raise ValueError(f"the bank must hold at least two of {list(BASIC_EMOTIONS)}")
    states, labels = heldout_states(model, tokenizer, bank.layers, sentences)
    keep = [i for i, y in enumerate(labels) if y in names]
    states, labels = states[keep], [labels[i] for i in keep]
    directions = bank.select(names=names).vectors.float()
    acc = projection_accuracy(states, labels, directions, names, center_states=center_states)
    gen = torch.Generator().manual_seed(seed)
    rand_all = torch.stack([
        projection_accuracy(states, labels, torch.randn(directions.shape, generator=gen), names,
                            center_states=center_states)
        for _ in range(n_random)])  # [n_random, L]
    rand = rand_all.mean(dim=0)
    ncm = nearest_mean_accuracy(states, labels)
    best = int(acc.argmax())
    return {
        "layers": bank.layers, "bank": acc.tolist(), "random": rand.tolist(),
        "nearest_mean": ncm.tolist(), "best_layer": bank.layers[best],
        "best_bank": float(acc[best]), "best_random": float(rand.max()),
        "best_random_any_draw": float(rand_all.max()),
        "best_nearest_mean": float(ncm.max()), "chance": 1.0 / len(names), "n": len(labels),
        "center_states": center_states,
    }


# --------------------------------------------------------------------------------------------
# Instruction phrasings
# --------------------------------------------------------------------------------------------

def instruction_sweep(model, tokenizer, *, phrasings: Sequence[str] | None = None,
                      queries: Sequence[str] | None = None,
                      emotions: Sequence[str] = BASIC_EMOTIONS, max_new_tokens: int = 48,
                      batch_size: int = 32, scorer: EmotionScorer | None = None,
                      progress: bool = True) -> list[dict]:
    """How emotional are the model's answers under each Method-EV instruction phrasing?

    For each phrasing, every query is answered neutrally and under each emotion; the
    classifier scores the answers.

    Returns
    -------
    list of dict
        Per phrasing: ``phrasing``, ``gain`` (mean over emotions of the target emotion's score
        under the instruction minus under the neutral prompt), ``hit_rate`` (fraction of
        emotional answers whose top basic emotion is the target), ``repetition``, and
        ``per_emotion`` {emotion: {score, gain, hit_rate}}.
    """
    instructions = load_instructions()
    phrasings = list(instructions["phrasings"]) if phrasings is None else list(phrasings)
    queries = load_queries()[:20] if queries is None else list(queries)
    scorer = scorer or EmotionScorer()
    for e in emotions:
        scorer.column(e)
    conditions = ["neutral", *emotions]
    prompts, keys = [], []
    for name in phrasings:
        phrasing = instructions["phrasings"][name]
        for condition in conditions:
            forms = None if condition == "neutral" else instructions["emotions"][condition]
            for q in queries:
                prompts.append(chat_prompt_ids(tokenizer, ev_messages(q, phrasing, forms)))
                keys.append((name, condition))
    responses = generate_responses(model, tokenizer, prompts, max_new_tokens=max_new_tokens,
                                   batch_size=batch_size, progress=progress,
                                   desc="instruction sweep")
    texts = tokenizer.batch_decode(responses, skip_special_tokens=True)
    scores = scorer.score(texts)
    out = []
    for name in phrasings:
        sel = {c: np.array([k == (name, c) for k in keys]) for c in conditions}
        neutral = scores[sel["neutral"]]
        per = {}
        for e in emotions:
            k = scorer.column(e)
            s = scores[sel[e]]
            per[e] = {"score": float(s[:, k].mean()),
                      "gain": float(s[:, k].mean() - neutral[:, k].mean()),
                      "hit_rate": float((s.argmax(axis=1) == k).mean())}
        emotional = np.concatenate([sel[e] for e in emotions]).reshape(len(emotions), -1).any(0)
        out.append({
            "phrasing": name,
            "gain": float(np.mean([p["gain"] for p in per.values()])),
            "hit_rate": float(np.mean([p["hit_rate"] for p in per.values()])),
            "repetition": float(np.mean([repetition(t) for t, m in zip(texts, emotional,
                                                                        strict=True) if m])),
            "per_emotion": per,
            "example": {c: texts[int(np.flatnonzero(sel[c])[0])] for c in conditions},
        })
    return out


# --------------------------------------------------------------------------------------------
# Extraction report (bench/results/extract.json)
# --------------------------------------------------------------------------------------------

def _cosine_summary(vectors: torch.Tensor) -> dict:
    """Off-diagonal pairwise cosines of ``[L, K, D]`` vectors: per-layer mean, overall min and
    max, and the full matrix at the middle layer."""
    from emokern.extract import pairwise_cosines

    cos = pairwise_cosines(vectors.float())
    k = cos.shape[1]
    off = cos[:, ~torch.eye(k, dtype=torch.bool)]  # [L, K(K-1)]
    return {"mean_per_layer": [round(float(x), 4) for x in off.mean(dim=1)],
            "min": round(float(off.min()), 4), "max": round(float(off.max()), 4),
            "middle_layer_matrix": [[round(float(x), 3) for x in row]
                                    for row in cos[cos.shape[0] // 2]]}


def ev_report(model, tokenizer, *, queries: Sequence[str] | None = None,
              emotions: Sequence[str] = BASIC_EMOTIONS, progress: bool = True,
              **extract_options) -> tuple[dict, object, object]:
    """Extract Method-EV vectors once (raw), time it, and measure what the issue asks for.

    Returns
    -------
    (report, raw_bank, centred_bank)
        ``report`` holds the wall time, machine load, per-layer ``|v| / |h|`` ratios (raw and
        centred), pairwise cosines (raw vs centred) and held-out accuracies per layer
        (raw, centred, random directions, nearest class mean).
    """
    import platform
    import time

    from emokern.bank import EmotionBank
    from emokern.extract import center_vectors, extract_ev

    queries = load_queries() if queries is None else list(queries)
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    started = time.perf_counter()
    raw = extract_ev(model, tokenizer, emotions=emotions, queries=queries, center=False,
                     progress=progress, **extract_options)
    seconds = time.perf_counter() - started
    load_after = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    meta = raw.metadata
    meta["centered"] = True
    centred = EmotionBank(center_vectors(raw.vectors), raw.names, raw.layers,
                          hidden_norm=raw.hidden_norm, metadata=meta)

    def ratios(bank):
        return [round(float(x), 4) for x in bank.norms().mean(dim=1) / bank.hidden_norm]

    held = {"raw": heldout_report(model, tokenizer, raw),
            "centred": heldout_report(model, tokenizer, centred)}
    report = {
        "task": f"Method EV, {len(emotions)} emotions x {len(queries)} queries, "
                f"{len(raw.layers)} layers",
        "seconds": round(seconds, 1),
        "seconds_generate": meta.get("seconds_generate"),
        "limit_seconds": 600,
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "load_average_before": load_before, "load_average_after": load_after,
                    "platform": platform.platform(), "torch": torch.__version__},
        "settings": {k: meta[k] for k in ("instruction", "max_new_tokens", "do_sample",
                                           "num_queries", "response_tokens")},
        "layers": raw.layers,
        "hidden_norm": [round(float(x), 3) for x in raw.hidden_norm],
        "norm_ratio_raw": ratios(raw),
        "norm_ratio_centred": ratios(centred),
        "cosines_raw": _cosine_summary(raw.vectors),
        "cosines_centred": _cosine_summary(centred.vectors),
        "heldout": held,
    }
    return report, raw, centred


def format_ev_report(report: dict) -> str:
    """Markdown rendering of :func:`ev_report`."""
    held = report["heldout"]
    lines = [
        "# Method EV extraction on the default model",
        "",
        f"- task: {report['task']}",
        f"- wall time: **{report['seconds']} s** (limit {report['limit_seconds']} s), of which "
        f"generation {report['seconds_generate']} s",
        f"- machine: {report['machine']['cpus']} CPUs, {report['machine']['torch_threads']} "
        f"torch threads, load average {report['machine']['load_average_before']} -> "
        f"{report['machine']['load_average_after']} (shared with other jobs)",
        f"- settings: {json.dumps(report['settings'])}",
        "",
        "Held-out classification (argmax of projections on the 6 directions, 132 sentences, "
        f"chance {held['raw']['chance']:.2f}):",
        "",
        "| directions | best layer | accuracy |",
        "|---|---|---|",
        f"| EV raw | {held['raw']['best_layer']} | {held['raw']['best_bank']:.3f} |",
        f"| EV centred | {held['centred']['best_layer']} | {held['centred']['best_bank']:.3f} |",
        f"| random (mean of 10 draws, best layer) | – | {held['raw']['best_random']:.3f} |",
        f"| random (luckiest of 10 draws x {len(report['layers'])} layers) | – | "
        f"{held['raw']['best_random_any_draw']:.3f} |",
        f"| nearest class mean (leave-one-out, upper bound) | – | "
        f"{held['raw']['best_nearest_mean']:.3f} |",
        "",
        "| layer | hidden norm | v/h raw | v/h centred | mean cos raw | "
        "mean cos centred | acc raw | acc centred | acc random | acc NCM |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for i, layer in enumerate(report["layers"]):
        lines.append(
            f"| {layer} | {report['hidden_norm'][i]:.2f} | {report['norm_ratio_raw'][i]:.3f} | "
            f"{report['norm_ratio_centred'][i]:.3f} | "
            f"{report['cosines_raw']['mean_per_layer'][i]:.3f} | "
            f"{report['cosines_centred']['mean_per_layer'][i]:.3f} | "
            f"{held['raw']['bank'][i]:.3f} | {held['centred']['bank'][i]:.3f} | "
            f"{held['raw']['random'][i]:.3f} | {held['raw']['nearest_mean'][i]:.3f} |")
    lines += ["", f"Pairwise cosines over all layers: raw {report['cosines_raw']['min']:.2f} .. "
              f"{report['cosines_raw']['max']:.2f}; centred "
              f"{report['cosines_centred']['min']:.2f} .. {report['cosines_centred']['max']:.2f}."]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# Command line: calibrate a shipped bank
# --------------------------------------------------------------------------------------------

def _write_json_atomic(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=2)
            fh.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def calibration_record(bank, best: dict, rows: Sequence[dict]) -> dict:
    """The record stored in ``calibration.json`` for one method: the chosen values plus their
    relative depth and strength (so :func:`emokern.extract.recommend` can transfer them to
    other models)."""
    layer = best["layers"][0]
    i = bank.layers.index(layer)
    ratio = float(bank.vectors[i].norm(dim=-1).mean() / bank.hidden_norm[i])
    n_layers = bank.fingerprint["num_layers"] if bank.fingerprint else max(bank.layers) + 1
    return {
        "recommended_alpha": best["alpha"],
        "recommended_layers": best["layers"],
        "relative_depth": round(layer / max(n_layers - 1, 1), 4),
        "relative_strength": round(best["alpha"] * ratio, 4),
        "centered": bool(bank.metadata.get("centered", True)),
        "fingerprint": bank.fingerprint,
        "gain": round(best["gain"], 4),
        "hit_rate": round(best["hit_rate"], 4),
        "repetition": round(best["repetition"], 4),
        "n_rows": len(rows),
    }


def _store_recommendation(method: str, path: Path, bank, best: dict, rows) -> None:
    from emokern.bank import EmotionBank

    record = calibration_record(bank, best, rows)
    data = {}
    with contextlib.suppress(FileNotFoundError, json.JSONDecodeError):
        data = json.loads(CALIBRATION_FILE.read_text(encoding="utf-8"))
    data[method] = record
    _write_json_atomic(CALIBRATION_FILE, data)
    meta = bank.metadata
    meta.update(recommended_alpha=best["alpha"], recommended_layers=best["layers"],
                recommendation="calibrated")
    updated = EmotionBank(bank.vectors, bank.names, bank.layers, hidden_norm=bank.hidden_norm,
                          metadata=meta)
    updated.save(path, dtype=torch.float16)


def _parse_layers(text: str) -> list:
    out = []
    for item in text.split(","):
        if "-" in item:
            a, b = (int(x) for x in item.split("-"))
            out.append(tuple(range(a, b + 1)))
        else:
            out.append(int(item))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m emokern.eval.calibrate {sweep,report,instructions}`` on the default model.

    * ``sweep --method ev [--write]``: the steering sweep of a bank; ``--write`` stores the
      recommendation in ``emokern/data/calibration.json`` and in the bank file.
    * ``report --out bench/results [--save-bank PATH]``: time a full Method-EV extraction and
      write ``extract.json`` / ``extract.md`` (norm ratios, cosines, held-out accuracies);
      optionally save the extracted bank (centred or not per ``DEFAULT_CENTER``).
    * ``instructions``: score every instruction phrasing with the classifier.
    """
    from emokern.bank import EmotionBank
    from emokern.models import load_model

    parser = argparse.ArgumentParser(prog="python -m emokern.eval.calibrate")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("sweep", help="steering sweep of a bank")
    p.add_argument("--method", choices=("ev", "concept"), default="ev")
    p.add_argument("--bank", help="bank file (default: the shipped bank of --method)")
    p.add_argument("--layers", default="6,9,12,15,18", help="e.g. 6,9,12 or 8-20 for a band")
    p.add_argument("--alphas", help="weights to try (default: 2,4,6,8 for ev, "
                                    "0.5,1,1.5,2 for concept, whose vectors are ~5x longer)")
    p.add_argument("--emotions", default="joy,fear,sadness")
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--json", help="write the sweep rows to this JSON file")
    p.add_argument("--write", action="store_true",
                   help="store the recommendation in calibration.json and the bank")
    p = sub.add_parser("report", help="time and measure a full Method-EV extraction")
    p.add_argument("--out", default="bench/results")
    p.add_argument("--save-bank", help="also save the extracted bank here")
    p = sub.add_parser("instructions", help="score the instruction phrasings")
    p.add_argument("--json", help="write the rows to this JSON file")
    args = parser.parse_args(argv)

    from emokern.extract import auto_threads

    auto_threads()
    model, tokenizer = load_model("default")
    if args.command == "sweep":
        path = Path(args.bank) if args.bank else EmotionBank.default_path(args.method)
        bank = EmotionBank.load(path)
        rows = calibrate(model, tokenizer, bank, layers=_parse_layers(args.layers),
                         alphas=[float(a) for a in (args.alphas or DEFAULT_ALPHAS[args.method])
                                 .split(",")],
                         emotions=args.emotions.split(","), max_new_tokens=args.max_new_tokens)
        print(format_sweep(rows))
        best = choose_recommendation(rows)
        print("recommendation:", json.dumps(best))
        if args.json:
            _write_json_atomic(Path(args.json), rows)
        if args.write:
            if not best:
                raise SystemExit("no fluent configuration in the sweep; nothing written")
            _store_recommendation(args.method, path, bank, best, rows)
            print(f"wrote {CALIBRATION_FILE} and {path}")
    elif args.command == "report":
        from emokern.extract import DEFAULT_CENTER

        report, raw, centred = ev_report(model, tokenizer)
        out = Path(args.out)
        _write_json_atomic(out / "extract.json", report)
        text = format_ev_report(report)
        fd, tmp = tempfile.mkstemp(dir=out, suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, out / "extract.md")
        print(text)
        if args.save_bank:
            (centred if DEFAULT_CENTER else raw).save(args.save_bank, dtype=torch.float16)
            print(f"saved {args.save_bank}")
    else:
        rows = instruction_sweep(model, tokenizer)
        for r in rows:
            print(f"{r['phrasing']:>16}: gain {r['gain']:+.3f}, hit rate {r['hit_rate']:.2f}, "
                  f"repetition {r['repetition']:.2f}")
        if args.json:
            _write_json_atomic(Path(args.json), rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

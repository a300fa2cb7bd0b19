r"""The steering sweep: how emotional and how fluent is text steered by a bank, per layer and
weight, and which setting to recommend.

* :func:`calibrate` — layers x weights x emotions x prompts, batched (each row of a batch
  carries its own layer, weight and emotion), scored by the ``nade`` classifier, a repetition
  measure and the unsteered model's perplexity (:mod:`emokern.eval.scorers`);
* :func:`choose_recommendation` turns its rows into the bank's default weight and
  recommended layers; :func:`format_sweep` renders them for ``docs/emotions.md``;
* :func:`store_recommendation` stores the choice in the calibration record
  (:func:`emokern.data.store_calibration`, read back by extraction) and in the bank file.

Steering here uses :class:`emokern.steering.Steerer` (the fused op at the output of a decoder
layer, one mix per sequence, ``positions="all"``: prompt and generated tokens) with one
single-layer steerer per swept layer, so every row of a batch can have its own layer, weight
and emotion.

``emokern calibrate sweep --method ev --write`` reruns the sweep for a shipped bank, stores the
chosen values and prints the table.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from emokern.bank import EmotionBank
from emokern.data import store_calibration
from emokern.emotions import BASIC_EMOTIONS
from emokern.eval.scorers import EmotionScorer, perplexity, repetition
from emokern.extract import generate_responses
from emokern.steering import Steerer
from emokern.tokens import chat_prompt_ids

__all__ = [
    "CALIBRATION_PROMPTS",
    "DEFAULT_WEIGHTS",
    "RowSteering",
    "calibrate",
    "calibration_record",
    "choose_recommendation",
    "format_sweep",
    "generate_steered",
    "parse_layers",
    "store_recommendation",
]

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


#: Weights swept by ``emokern calibrate sweep`` per method.
DEFAULT_WEIGHTS = {"ev": "2,4,6,8", "concept": "0.5,1,1.5,2"}


# --------------------------------------------------------------------------------------------
# Per-row steering
# --------------------------------------------------------------------------------------------

class RowSteering:
    """Each batch row steered at its own layers with its own mix, through
    :class:`emokern.steering.Steerer`.

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
    weights: Sequence[float],
    prompts: Sequence[str] = CALIBRATION_PROMPTS,
    emotions: Sequence[str] = ("joy", "fear", "sadness"),
    max_new_tokens: int = 40,
    batch_size: int = 32,
    scorer: EmotionScorer | None = None,
    fluency: bool = True,
    progress: bool = True,
) -> list[dict]:
    r"""Steering sweep: how emotional and how fluent is the steered text?

    Every combination (layer set, weight :math:`w`, emotion :math:`e`, prompt) is one row
    of a batched greedy generation; row :math:`b` adds :math:`w\,v_{e,l}` to the output
    of each decoder layer :math:`l` of its layer set at every position. Unsteered answers to the
    same prompts are the baseline.

    Parameters
    ----------
    model, tokenizer, bank
        The model the bank was extracted from (checked with ``bank.check_compatible``).
    layers : sequence of int or tuple of int
        Layer sets to try: an int steers one layer, a tuple steers all its layers at once.
    weights : sequence of float
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
        One row per (layer set, weight, emotion), plus baseline rows (``weight == 0``,
        ``emotion == "none"``, with ``scores`` and ``top_rates`` per emotion), each with
        ``layer`` (label, e.g. "12" or "8-20"), ``weight``,
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
    weights = [float(w) for w in weights]
    if not weights or not all(math.isfinite(w) and w > 0 for w in weights):
        raise ValueError(f"weights must be positive finite numbers, got {weights}")
    prompts = list(prompts)
    if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise ValueError("prompts must be a non-empty list of non-empty strings")
    scorer = scorer or EmotionScorer()
    emotions = list(emotions)
    for e in emotions:
        if e not in bank.names:
            raise ValueError(f"emotions: {e!r} is not in the bank ({bank.names})")
        scorer.column(e)

    configs = [((), 0.0, "none")] + [(ls, w, e) for ls in layer_sets for w in weights
                                     for e in emotions]
    rows_prompts, rows_mix, rows_config = [], [], []
    for c, (layer_set, weight, emotion) in enumerate(configs):
        for prompt in prompts:
            rows_prompts.append(prompt)
            rows_mix.append({layer: {emotion: weight} for layer in layer_set})
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
    for c, (layer_set, weight, emotion) in enumerate(configs):
        sel = config_of == c
        s = scores[sel]
        row = {"layer": _label(layer_set) if layer_set else "-", "layers": list(layer_set),
               "weight": weight, "emotion": emotion}
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
    r"""Pick the (layer set, weight) with the largest mean classifier gain over the swept
    emotions among those whose text stays fluent.

    Fluent means: mean repeated-3-gram fraction :math:`\le` ``max_repetition`` for every
    emotion, and median perplexity :math:`\le` ``max_perplexity_ratio`` x the unsteered
    median. Ties (gains within 0.01) go to the smaller weight.

    Returns
    -------
    dict
        ``layers`` (list of int), ``weight``, ``gain``, ``hit_rate``, ``repetition``,
        ``perplexity``; ``{}`` when no configuration is fluent.
    """
    base = [r for r in rows if r["emotion"] == "none"]
    base_ppl = base[0].get("perplexity", float("nan")) if base else float("nan")
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["emotion"] != "none":
            groups.setdefault((tuple(r["layers"]), r["weight"]), []).append(r)
    best = {}
    for (layers, weight), group in groups.items():
        rep = max(r["repetition"] for r in group)
        ppl = max(r.get("perplexity", float("nan")) for r in group)
        if rep > max_repetition:
            continue
        if math.isfinite(base_ppl) and math.isfinite(ppl) and ppl > max_perplexity_ratio * \
                base_ppl:
            continue
        gain = float(np.mean([r["gain"] for r in group]))
        better = not best or gain > best["gain"] + 0.01 or (
            abs(gain - best["gain"]) <= 0.01 and weight < best["weight"])
        if better:
            best = {"layers": list(layers), "weight": weight, "gain": gain,
                    "hit_rate": float(np.mean([r["hit_rate"] for r in group])),
                    "repetition": rep, "perplexity": ppl}
    return best


def format_sweep(rows: Sequence[dict]) -> str:
    """A Markdown table of :func:`calibrate` rows (one line per layer set x weight, one column
    group per emotion: classifier score / gain / hit rate / repetition)."""
    base = [r for r in rows if r["emotion"] == "none"]
    emotions = sorted({r["emotion"] for r in rows if r["emotion"] != "none"},
                      key=lambda e: BASIC_EMOTIONS.index(e) if e in BASIC_EMOTIONS else 99)
    head = "| layer | weight | " + " | ".join(f"{e} score (gain) / hit / rep" for e in emotions)
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
            groups.setdefault((r["layer"], r["weight"]), {})[r["emotion"]] = r
    for (layer, weight), by_e in groups.items():
        cells = []
        for e in emotions:
            r = by_e.get(e)
            cells.append("–" if r is None else f"{r['score']:.2f} ({r['gain']:+.2f}) / "
                         f"{r['hit_rate']:.2f} / {r['repetition']:.2f}")
        ppl = max(r.get("perplexity", float("nan")) for r in by_e.values())
        lines.append(f"| {layer} | {weight:g} | " + " | ".join(cells) + f" | {ppl:.1f} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# The recommendation
# --------------------------------------------------------------------------------------------

def calibration_record(bank, best: dict, rows: Sequence[dict]) -> dict:
    """The record stored in ``calibration.json`` for one method: the chosen values plus their
    relative depth and strength (so :func:`emokern.extract.recommend` can transfer them to
    other models)."""
    layer = best["layers"][0]
    i = bank.layers.index(layer)
    ratio = float(bank.vectors[i].norm(dim=-1).mean() / bank.hidden_norm[i])
    n_layers = bank.fingerprint["num_layers"] if bank.fingerprint else max(bank.layers) + 1
    return {
        "default_weight": best["weight"],
        "recommended_layers": best["layers"],
        "relative_depth": round(layer / max(n_layers - 1, 1), 4),
        "relative_strength": round(best["weight"] * ratio, 4),
        "centered": bool(bank.metadata.get("centered", True)),
        "fingerprint": bank.fingerprint,
        "gain": round(best["gain"], 4),
        "hit_rate": round(best["hit_rate"], 4),
        "repetition": round(best["repetition"], 4),
        "n_rows": len(rows),
    }


def store_recommendation(method: str, path: str | os.PathLike, bank: EmotionBank, best: dict,
                         rows: Sequence[dict], *,
                         calibration_path: str | os.PathLike | None = None) -> None:
    """Store the sweep's choice ``best`` (from :func:`choose_recommendation`) for ``method``.

    Writes :func:`calibration_record` into the calibration record
    (:func:`emokern.data.store_calibration`; default ``emokern/data/calibration.json``) and
    saves ``bank`` to ``path`` (float16) with the weight (metadata key ``default_weight``),
    ``recommended_layers`` and ``recommendation = "calibrated"`` in its metadata. Both writes
    are atomic.
    """
    store_calibration(method, calibration_record(bank, best, rows), calibration_path)
    meta = bank.metadata
    meta.update(default_weight=best["weight"], recommended_layers=best["layers"],
                recommendation="calibrated")
    updated = EmotionBank(bank.vectors, bank.names, bank.layers, hidden_norm=bank.hidden_norm,
                          metadata=meta)
    updated.save(Path(path), dtype=torch.float16)


def parse_layers(text: str) -> list:
    """Layer sets from the command line: ``"6,9,12"`` -> ``[6, 9, 12]``; ``"8-20"`` is the band
    ``(8, ..., 20)`` steered at once, so ``"6,8-10"`` -> ``[6, (8, 9, 10)]``."""
    out = []
    for item in text.split(","):
        if "-" in item:
            a, b = (int(x) for x in item.split("-"))
            out.append(tuple(range(a, b + 1)))
        else:
            out.append(int(item))
    return out


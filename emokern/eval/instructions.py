"""Method EV's inputs and outputs, measured: which instruction phrasing makes the model's
answers most emotional (:func:`instruction_sweep`), and the report of a full extraction
(:func:`ev_report`: wall time, norm ratios, cosines, held-out accuracies; rendered by
:func:`format_ev_report` into ``bench/results/extract.md``).

``emokern calibrate instructions`` and ``emokern calibrate report`` run them on the default
model.
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Sequence

import numpy as np
import torch

from emokern.bank import EmotionBank
from emokern.data import load_instructions, load_queries
from emokern.emotions import BASIC_EMOTIONS
from emokern.eval.heldout import heldout_report
from emokern.eval.scorers import EmotionScorer, repetition
from emokern.extract import (
    center_vectors,
    ev_messages,
    extract_ev,
    generate_responses,
    pairwise_cosines,
)
from emokern.tokens import chat_prompt_ids

__all__ = ["ev_report", "format_ev_report", "instruction_sweep"]


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
    """Extract Method-EV vectors once (raw), time it, and measure the vectors.

    Returns
    -------
    (report, raw_bank, centred_bank)
        ``report`` holds the wall time, machine load, per-layer ``|v| / |h|`` ratios (raw and
        centred), pairwise cosines (raw vs centred) and held-out accuracies per layer
        (raw, centred, random directions, nearest class mean).
    """
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

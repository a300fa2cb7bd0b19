"""The evaluation's report: a Markdown table per emotion and edit, and three plots (EPS vs
push weight per emotion, perplexity vs weight, and the trade-off of judge gain against topic
adherence for every edit: pushes, levels, caps, the recommendation), from the dict
:func:`emokern.eval.evaluation.evaluate` returns. Plots are PNGs written atomically through
:mod:`emokern.files`.

Tested through ``tests/eval/test_evaluation.py`` (the written report and plots).
"""

from __future__ import annotations

import io
import math
import os
from pathlib import Path

from emokern.files import atomic_write
from emokern.steering.mix import format_mix

__all__ = ["edit_kind", "engine_line", "format_report", "format_table", "plot_eps",
           "plot_perplexity", "plot_tradeoff", "split_label"]


def _fmt(value, spec: str = ".2f") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return format(value, spec)


#: Edit kinds by label prefix, in table order after the push weights.
_KINDS = (("rec", "rec"), ("@", "level"), ("<=", "cap"), (">=", "floor"), ("erase", "erase"))


def split_label(label: str) -> tuple[str, str]:
    """``(scope, edit)`` of a grid label: ``"[generated]=2"`` → ``("[generated]", "2")``,
    ``"[12]@8"`` → ``("[12]", "@8")``, ``"@8"`` → ``("", "@8")``."""
    text = str(label).strip()
    if not text.startswith("["):
        return "", text
    scope, _, edit = text.partition("]")
    return scope + "]", edit.removeprefix("=")


def edit_kind(label: str) -> str:
    """``"push"``, ``"rec"``, ``"level"``, ``"cap"``, ``"floor"`` or ``"erase"`` (of the edit,
    whatever its scope)."""
    edit = split_label(label)[1]
    return next((kind for prefix, kind in _KINDS if edit.startswith(prefix)), "push")


def _order(record: dict) -> tuple:
    scope, label = split_label(record["label"])
    kind = edit_kind(label)
    if kind == "push":
        return (0, scope, float(label))
    rank = 1 + [k for _, k in _KINDS].index(kind)
    value = label.lstrip("@<>=")
    return (rank, scope, float(value) if value and value not in ("rec", "erase") else
            record.get("weight") or 0.0)


def format_table(aggregates: list[dict], emotions: list[str]) -> str:
    """Markdown: one line per emotion and weight (as asked, and the weight applied: ``rec``
    resolves per emotion) with EPS, top share, EAS (and its change vs
    weight 0), gain, fidelity, topic adherence, perplexity, distinct-2, repeated 3-grams and the
    mean reading of the target."""
    head = ("| emotion | weight | applied | EPS | top | EAS | ΔEAS | gain | fidelity | adherence | "
            "ppl | distinct-2 | rep-3 | EmoLex | reading |")
    lines = [head, "|" + "---|" * 15]
    for emotion in emotions:
        records = sorted((a for a in aggregates if a["emotion"] == emotion), key=_order)
        for a in records:
            change = a.get("eas_change")
            change_txt = "–" if change is None or not math.isfinite(change) else f"{change:+.0%}"
            lines.append(
                f"| {emotion} | {a['label']} | {_fmt(a.get('weight'), 'g')} | {_fmt(a['eps'])} | "
                f"{_fmt(a['top'])} | {_fmt(a['eas'])} | {change_txt} | "
                f"{_fmt(a.get('gain'), '+.2f')} | {_fmt(a.get('fidelity'))} | "
                f"{_fmt(a.get('adherence'))} | {_fmt(a.get('perplexity'), '.1f')} | "
                f"{_fmt(a.get('distinct2'))} | {_fmt(a.get('rep3'))} | "
                f"{_fmt(a.get('lexicon'), '.3f')} | {_fmt(a.get('reading'), '+.2f')} |")
    return "\n".join(lines)


def format_report(result: dict) -> str:
    """The whole ``report.md``: configuration, the table, how to read it."""
    c = result["config"]
    rec = format_mix(c.get("recommended", {})).replace(",", ", ") or "none"
    band = (f" (unscoped edits at {c['band']})" if c.get("band") not in (None, c["layers"])
            else "")
    lines = [
        f"# emokern eval: {c['model']} / {c['bank']} ({c.get('method')})", "",
        f"{c['n_prompts']} prompts, {c['n_rows']} answers, {c['max_new_tokens']} new tokens, "
        f"{'sampled (seed ' + str(c['seed']) + ')' if c['do_sample'] else 'greedy'}; "
        f"steered layers {c['layers']}{band}; recipes (rec): {rec}.", "",
        format_table(result["aggregates"], c["emotions"]), "",
        "EPS: mean judge (nade) probability of the target over the six basic emotions; top: "
        "share of answers whose top emotion is the target; EAS: mean target intensity, ΔEAS "
        "its change vs the unsteered answers; gain: EPS minus the unsteered EPS; fidelity: "
        "MiniLM cosine to the unsteered answer; adherence: cosine to the prompt; ppl: median "
        "perplexity under the unsteered model; EmoLex: target word density; reading: the "
        "monitor's mean reading of the target "
        + ("(standard scores against the bank's neutral baseline)." if c.get("calibrated")
           else "(raw projections: the bank has no neutral baseline)."), "",
        f"{engine_line(result)}; generation {result['seconds']['generate']} s"
        + (f" (engine load {result['seconds']['engine_load']} s more)"
           if "engine_load" in result["seconds"] else "")
        + f", scoring {result['seconds']['score']} s on {result['machine'].get('cpu_model', '?')} "
        f"({result['machine'].get('torch_threads')} torch threads).",
    ]
    if c.get("engine") == "vllm":
        lines += ["", "The vLLM engine reads no emotions (its monitor reads the steered layers, "
                      "not the bank's detection layers): the reading column is empty."]
    return "\n".join(lines) + "\n"


def engine_line(result: dict) -> str:
    """Which engine generated the answers, and how."""
    c = result["config"]
    if c.get("engine") != "vllm":
        return (f"Engine hf: transformers generate, batches of {c.get('batch_size')} rows, a "
                f"mix per row")
    v = c.get("vllm", {})
    compiled = not v.get("settings", {}).get("enforce_eager", False)
    return (f"Engine vllm: vLLM {v.get('version', '?')} with the emokern plugin "
            f"({'compiled' if compiled else 'eager'}, "
            f"{v.get('settings', {}).get('dtype', '?')}), one LLM.generate call of "
            f"{c['n_rows']} requests, a mix per request")


def _figure():
    # matplotlib is heavy and only needed for the figures: imported on use.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | os.PathLike) -> Path:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return atomic_write(path, buffer.getvalue(), mode=0o644)


def _series(result: dict, emotion: str, key: str):
    numeric, rec = [], None
    for a in result["aggregates"]:
        if a["emotion"] != emotion or a.get(key) is None:
            continue
        if a["label"] == "rec":
            rec = (a["weight"], a[key])
        elif edit_kind(a["label"]) == "push" and not split_label(a["label"])[0]:
            numeric.append((float(a["label"]), a[key]))
    return sorted(numeric), rec


def _plot(result: dict, key: str, ylabel: str, path, *, log: bool = False) -> Path:
    plt = _figure()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for i, emotion in enumerate(result["config"]["emotions"]):
        numeric, rec = _series(result, emotion, key)
        color = f"C{i}"
        if numeric:
            ax.plot([x for x, _ in numeric], [y for _, y in numeric], "o-", color=color,
                    label=emotion)
        if rec is not None and rec[1] is not None:
            ax.plot([rec[0]], [rec[1]], "*", color=color, markersize=13,
                    markeredgecolor="k")
    if log:
        ax.set_yscale("log")
    ax.set_xlabel("weight (★ = the emotion's recommended weight)")
    ax.set_ylabel(ylabel)
    c = result["config"]
    ax.set_title(f"{c['bank']} bank, layers {c['layers']}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    written = _save(fig, path)
    plt.close(fig)
    return written


def plot_eps(result: dict, path: str | os.PathLike) -> Path:
    """EPS of each emotion against the weight (the recommended weight starred)."""
    return _plot(result, "eps", "EPS (judge probability of the target)", path)


def plot_perplexity(result: dict, path: str | os.PathLike) -> Path:
    """Median perplexity under the unsteered model against the weight, per emotion."""
    return _plot(result, "perplexity", "median perplexity (unsteered model)", path, log=True)


#: Marker per edit kind in the trade-off plot.
_MARKERS = {"push": "o", "rec": "*", "level": "^", "cap": "v", "floor": "s", "erase": "X"}


def plot_tradeoff(result: dict, path: str | os.PathLike) -> Path:
    """Per emotion, judge gain (EPS minus unsteered) against topic adherence relative to the
    unsteered answers, one point per edit (pushes ●, levels ▲, caps ▼, floors ■, erase ✖, the
    recommendation ★), each labelled; the shaded band is adherence below 0.8 of unsteered.
    A good edit sits up and to the right: the emotion expressed while the answer stays on the
    question."""
    plt = _figure()
    emotions = result["config"]["emotions"]
    cols = min(3, len(emotions))
    rows = (len(emotions) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    for ax, emotion in zip(axes.flat, emotions, strict=False):
        records = [a for a in result["aggregates"] if a["emotion"] == emotion]
        base = next((a for a in records if a["label"] == "0"), None)
        base_adh = base.get("adherence") if base else None
        ax.axvspan(0, 0.8, color="0.9")
        for a in records:
            if a["label"] == "0" or a.get("adherence") is None or not base_adh:
                continue
            kind = edit_kind(a["label"])
            x, y = a["adherence"] / base_adh, a.get("gain")
            if y is None or not math.isfinite(y):
                continue
            ax.plot([x], [y], _MARKERS[kind], color=f"C{list(_MARKERS).index(kind)}",
                    markersize=11 if kind == "rec" else 7, markeredgecolor="k")
            ax.annotate(a["label"], (x, y), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
        ax.axhline(0.0, color="k", lw=0.6)
        ax.axhline(0.08, color="C3", lw=0.6, ls="--")
        ax.set_xlim(0, 1.3)
        ax.set_title(emotion, fontsize=10)
        ax.set_xlabel("adherence / unsteered", fontsize=8)
        ax.set_ylabel("judge gain", fontsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(emotions):]:
        ax.set_visible(False)
    c = result["config"]
    fig.suptitle(f"{c['bank']} bank: gain vs adherence per edit (dashed: +0.08; shaded: "
                 f"adherence < 0.8 of unsteered)", fontsize=10)
    written = _save(fig, path)
    plt.close(fig)
    return written

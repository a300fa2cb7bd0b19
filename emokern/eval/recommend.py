r"""Per-emotion recipes: one weight does not fit every emotion, and a push is not always the way.

On the default model the concept bank moves sadness and disgust fluently at weight 2 but anger
only at 4; a single bank-wide weight either leaves anger unsteered or wrecks the others; and at
the weights that move an emotion a push can move it by leaving the question. The sweep here
runs the evaluation grid (:func:`emokern.eval.evaluation.evaluate`) over push weights and, on
a calibrated bank, projection levels (``@z``: the token's projection set to the standard score
``z``) on the project's own prompts (:data:`SWEEP_PROMPTS`: the calibration prompts and the
first extraction queries, never the evaluation prompts, so a recipe is reported on prompts it
was not chosen on) and, per emotion, chooses (:func:`choose`) the edit

.. math::
    e^* = \arg\max_{e \in E} \big(\mathrm{EPS}(e) - \mathrm{EPS}(0)\big),\quad
    E = \{e : \overline{\mathrm{distinct}_2}(e) \ge
               \min(0.7,\ 0.9\,\overline{\mathrm{distinct}_2}(0)),\
           \mathrm{median\ ppl}(e) \le 3\,\mathrm{median\ ppl}(0),\
           \overline{\mathrm{adherence}}(e) \ge 0.8\,\overline{\mathrm{adherence}}(0)\}

(ties within 0.01 go to the gentler edit). The choice is a recipe stored in the bank's metadata
(``recommended_weights``: mode, weight or level, layer band), read by
:meth:`emokern.EmotionBank.recommended` and by ``mix=[{"anger": "rec"}]``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from emokern.data import load_queries
from emokern.eval.calibration_sweep import CALIBRATION_PROMPTS
from emokern.eval.eval_report import edit_kind, split_label
from emokern.eval.evaluation import evaluate, grid_term, load_prompts
from emokern.stats import bootstrap_ci
from emokern.steering.mix import format_mix, scope_of

__all__ = ["DEFAULT_SWEEP_FACTORS", "DEFAULT_SWEEP_LEVELS", "SWEEP_PROMPTS", "choose",
           "format_study", "recipe_study", "store", "sweep"]

#: The project's prompts for the sweep: the 8 calibration prompts and the first 16 extraction
#: queries (none is an evaluation prompt).
SWEEP_PROMPTS = (*CALIBRATION_PROMPTS, *load_queries()[:16])

#: Push weights swept per extraction method, as multiples of the bank's default weight (which
#: extraction sets from the model's own hidden-state scale, :func:`emokern.extract.vectors.
#: recommend`): on the default model's banks (default weights 6 and 1.5) the EV sweep is
#: 2, 4, ..., 12 and the concept sweep 0.5, 1, 1.5, 2, 3, 4; on a model whose residual stream
#: is larger (Gemma 3 270M's EV bank: 27.1) the weights grow with it.
DEFAULT_SWEEP_FACTORS = {"ev": (1 / 3, 2 / 3, 1.0, 4 / 3, 5 / 3, 2.0),
                         "concept": (1 / 3, 2 / 3, 1.0, 4 / 3, 2.0, 8 / 3)}

#: Levels (standard scores against the neutral baseline) swept on a calibrated bank.
DEFAULT_SWEEP_LEVELS = (4.0, 8.0, 16.0, 32.0)


def sweep(model, tokenizer, bank, *, emotions=None, weights: Sequence[float] | None = None,
          levels: Sequence[float] | None = None, scopes: Sequence[str] = (),
          prompts: Sequence[str] = SWEEP_PROMPTS, max_new_tokens: int = 40,
          batch_size: int = 64, progress: bool = True, **options) -> dict:
    """Run the evaluation grid over push ``weights`` and ``levels`` on ``prompts`` (defaults:
    the project's sweep prompts, the method's :data:`DEFAULT_SWEEP_FACTORS` times the bank's
    default weight and, on a
    calibrated bank, :data:`DEFAULT_SWEEP_LEVELS`; ``levels=()`` sweeps pushes only), each
    also under every scope of ``scopes`` (the mix grammar's, e.g. ``"generated"`` or
    ``"10-14"``: ``[generated]=2``, ``[generated]@8``, so that a recipe may steer the
    generated tokens only, or another layer band); returns ``evaluate``'s result."""
    if weights is None:
        factors = DEFAULT_SWEEP_FACTORS.get(bank.method or "", DEFAULT_SWEEP_FACTORS["ev"])
        weights = [round(bank.default_weight * f, 3) for f in factors]
    if levels is None:
        levels = DEFAULT_SWEEP_LEVELS if bank.calibrated else ()
    edits = [*[f"{float(w):g}" for w in weights if float(w) != 0.0],
             *[f"@{float(z):g}" for z in levels]]
    scoped = [f"[{scope.strip('[]')}]" + (e if e.startswith("@") else f"={e}")
              for scope in scopes for e in edits]
    weights = [0.0, *[float(e) if not e.startswith("@") else e for e in edits], *scoped]
    return evaluate(model, tokenizer, bank, emotions=emotions, weights=weights,
                    prompts=list(prompts), max_new_tokens=max_new_tokens,
                    batch_size=batch_size, progress=progress, **options)


def choose(aggregates: Sequence[dict], *, min_distinct2: float = 0.7,
           min_distinct2_ratio: float = 0.9, max_perplexity_ratio: float = 3.0,
           min_adherence_ratio: float = 0.8) -> dict[str, dict]:
    """Per emotion, the on-topic fluent edit with the largest judge gain (module docstring).

    Parameters
    ----------
    aggregates : sequence of dict
        :func:`emokern.eval.metrics.aggregate` records (``emotion``, ``label``: a positive push
        weight such as ``"2"`` or a level such as ``"@8"``, ``weight``, ``gain``,
        ``distinct2``, ``perplexity``, ``adherence``).
    min_distinct2, min_distinct2_ratio, max_perplexity_ratio, min_adherence_ratio : float
        The constraints: mean distinct-2 at least ``min_distinct2`` — or, on a model whose own
        unsteered answers fall below it (a base model decoding greedily repeats itself: Gemma
        3 270M's read 0.51), at least ``min_distinct2_ratio`` of theirs —, median perplexity
        relative to unsteered, mean topic adherence relative to unsteered (a constraint whose
        measure is missing is not applied).

    Returns
    -------
    dict
        emotion -> a recipe record: ``{"mode": "push", "weight"}`` or ``{"mode": "level",
        "level"}``, with ``gain``, ``eps``, ``distinct2``, ``perplexity``, ``adherence_ratio``
        and ``fluent`` (False when no edit met the constraints: the gentlest push is recorded),
        and ``reading``, the mean calibrated reading measured at that edit, where the sweep's
        engine reads (the Hugging Face monitor; vLLM rows carry none).
    """
    out: dict[str, dict] = {}
    emotions = list(dict.fromkeys(a["emotion"] for a in aggregates))
    for emotion in emotions:
        records = [a for a in aggregates if a["emotion"] == emotion]
        base = [a for a in records if a["label"] == "0"]
        base_ppl = base[0]["perplexity"] if base else float("nan")
        base_adh = base[0].get("adherence", float("nan")) if base else float("nan")
        base_d2 = base[0].get("distinct2", float("nan")) if base else float("nan")
        least_d2 = (min(min_distinct2, min_distinct2_ratio * base_d2) if base_d2 == base_d2
                    else min_distinct2)
        pushes = sorted((a for a in records if a["label"] != "0"
                         and edit_kind(a["label"]) == "push" and a["weight"] > 0),
                        key=lambda a: a["weight"])
        levels = sorted((a for a in records if edit_kind(a["label"]) == "level"),
                        key=lambda a: float(split_label(a["label"])[1][1:]))
        if not pushes and not levels:
            continue

        def ratio(a, base_adh=base_adh):
            adh = a.get("adherence", float("nan"))
            return adh / base_adh if base_adh == base_adh and base_adh > 0 else float("nan")

        best = None
        for a in [*pushes, *levels]:  # gentler first within each mode: ties keep them
            fluent = a.get("distinct2", 1.0) >= least_d2
            ppl = a.get("perplexity", float("nan"))
            if base_ppl == base_ppl and ppl == ppl and ppl > max_perplexity_ratio * base_ppl:
                fluent = False
            r = ratio(a)
            if r == r and r < min_adherence_ratio:
                fluent = False
            if fluent and (best is None or a["gain"] > best["gain"] + 0.01):
                best = a
        chosen = best if best is not None else (pushes or levels)[0]
        edit = split_label(chosen["label"])[1]
        recipe = ({"mode": "level", "level": float(edit[1:])} if edit.startswith("@") else
                  {"mode": "push", "weight": round(float(chosen["weight"]), 6)})
        layers, positions = scope_of(grid_term(chosen["label"]))
        if layers is not None:
            recipe["layers"] = list(layers)
        if positions != "all":
            recipe["positions"] = positions
        recipe.update({"gain": round(chosen["gain"], 4), "eps": round(chosen["eps"], 4),
                       "distinct2": round(chosen.get("distinct2", float("nan")), 4),
                       "perplexity": round(chosen.get("perplexity", float("nan")), 2),
                       "adherence_ratio": round(ratio(chosen), 4),
                       "fluent": best is not None})
        reading = chosen.get("reading")  # none where the engine reads none (vLLM rows)
        if isinstance(reading, (int, float)) and math.isfinite(reading):
            recipe["reading"] = round(float(reading), 3)
        out[emotion] = recipe
    return out


def store(bank, choice: dict[str, dict], *, layers: Sequence[int] | None = None,
          prompts: int | None = None, reading: dict[str, float] | None = None):
    """A copy of ``bank`` whose metadata records ``choice`` (:func:`choose`'s recipes, or
    older ``{"weight": ...}`` records) as ``recommended_weights`` (each with its layer band,
    default the bank's recommended layers, the number of sweep prompts and, when given, the
    mean calibrated reading at that edit); vectors unchanged."""
    band = list(bank.recommended_layers if layers is None else layers)
    records = bank.recommended_weights
    for emotion, record in choice.items():
        entry = {k: v for k, v in record.items() if v == v}  # drop NaN: not JSON
        entry.setdefault("layers", band)  # a scoped edit's own layers stay
        if prompts is not None:
            entry["prompts"] = int(prompts)
        if reading and reading.get(emotion) is not None:
            entry["reading"] = round(float(reading[emotion]), 3)
        records[emotion] = entry
    return bank.replace(metadata={"recommended_weights": records})


def save_shipped(bank, path) -> None:
    """Save a shipped bank in float16 as before (its vectors are float16 values already, so the
    round trip is bit-identical)."""
    bank.save(path, dtype=torch.float16)


#: The targets a recipe is held to on prompts it was not chosen on.
RECIPE_TARGETS = {"gain": 0.08, "distinct2": 0.7, "adherence_ratio": 0.8}


def paired_intervals(rows: Sequence[Mapping], emotion: str, label: str, *,
                     n_boot: int = 2000, seed: int = 0) -> dict[str, list[float]]:
    r"""95% percentile-bootstrap intervals of an edit's held-out ``gain`` and
    ``adherence_ratio``, resampling prompts with their unsteered answer (paired):

    .. math::
        \mathrm{gain} = \overline{p_e(\text{edited})} - \overline{p_e(\text{unsteered})},
        \qquad \mathrm{ratio} = \overline{\mathrm{adh}(\text{edited})} /
        \overline{\mathrm{adh}(\text{unsteered})}

    over the prompts that have both answers (``rows``: scored evaluation rows; ``p_e`` the
    judge's probability of ``emotion``). Returns ``{"gain_ci": [lo, hi],
    "adherence_ratio_ci": [lo, hi]}``, empty when fewer than two prompts pair up."""
    base = {r["prompt"]: r for r in rows if r["emotion"] is None}
    pairs = [(r, base[r["prompt"]]) for r in rows
             if r["emotion"] == emotion and r["label"] == label and r["prompt"] in base]
    if len(pairs) < 2:
        return {}
    edited = np.array([[r["judge_p"][emotion], r["adherence"]] for r, _ in pairs], float)
    unsteered = np.array([[b["judge_p"][emotion], b["adherence"]] for _, b in pairs], float)
    out = {}
    for name, stat in (("gain_ci", lambda x, y: x[:, 0].mean() - y[:, 0].mean()),
                       ("adherence_ratio_ci", lambda x, y: x[:, 1].mean() / y[:, 1].mean())):
        low, high = bootstrap_ci(edited, unsteered, n_boot=n_boot, seed=seed, stat=stat)
        out[name] = [round(low, 4), round(high, 4)]
    return out


def grid_label(term) -> str:
    """A recipe's mix term (:meth:`emokern.bank.Recipe.mix_term`) as the label of its grid
    term: ``"2"``, ``"@16"``, ``"[generated]=2"``, ``"[12-18;generated]@8"``."""
    if isinstance(term, (int, float)):
        return f"{float(term):g}"
    return format_mix({"x": term})[1:]


def describe_recipe(record: Mapping) -> str:
    """``push 2``, ``level z = 16``, with the scope: ``push 2 (generated tokens)``."""
    text = (f"level z = {record['level']:g}" if record["mode"] == "level"
            else f"push {record['weight']:g}")
    scope = [*([f"layers {record['layers']}"] if "layers" in record else []),
             *([f"{record['positions']} tokens"] if "positions" in record else [])]
    return text + (f" ({', '.join(scope)})" if scope else "")


def recipe_study(model, tokenizer, bank, *, sweep_prompts: Sequence[str] = SWEEP_PROMPTS,
                 eval_prompts: Sequence[str] | None = None, emotions=None,
                 weights: Sequence[float] | None = None, levels: Sequence[float] | None = None,
                 scopes: Sequence[str] = (), max_new_tokens: int = 40, batch_size: int = 64,
                 progress: bool = True, **options) -> dict:
    """Choose each emotion's recipe on ``sweep_prompts`` (:func:`sweep`'s grid, ``scopes``
    included), then judge it on ``eval_prompts`` (default the evaluation prompts, which the
    sweep never sees) beside the recipe it replaces (scope included).

    Returns
    -------
    dict
        ``choice`` (:func:`choose`), ``bank`` (the bank with the recipes stored), ``sweep`` and
        ``heldout`` (:func:`emokern.eval.evaluation.evaluate` results; the held-out grid runs
        ``0``, ``rec`` with the recipes and the bank's old recipes, scope included) and ``rows``:
        per emotion the held-out gain, distinct-2 and adherence ratio of the recipe and of the
        old recipe, each with whether it meets :data:`RECIPE_TARGETS`.
    """
    eval_prompts = list(load_prompts() if eval_prompts is None else eval_prompts)
    swept = sweep(model, tokenizer, bank, emotions=emotions, weights=weights, levels=levels,
                  scopes=scopes, prompts=sweep_prompts, max_new_tokens=max_new_tokens,
                  batch_size=batch_size, progress=progress, **options)
    choice = choose(swept["aggregates"])
    with_recipes = store(bank, choice, prompts=len(sweep_prompts))
    old = {e: bank.recommended(e) for e in choice}
    old_labels = {e: grid_label(r.mix_term()) for e, r in old.items()}
    old_terms = [t for t in dict.fromkeys(old_labels.values()) if t != "0"]
    heldout = evaluate(model, tokenizer, with_recipes, emotions=list(choice),
                       weights=[0.0, "rec", *old_terms],
                       prompts=eval_prompts, max_new_tokens=max_new_tokens,
                       batch_size=batch_size, progress=progress, **options)
    rows = []
    for emotion, recipe in choice.items():
        records = {a["label"]: a for a in heldout["aggregates"] if a["emotion"] == emotion}
        base_adh = records["0"].get("adherence")

        def measured(label, base_adh=base_adh, records=records, emotion=emotion):
            a = records.get(label)
            if a is None:
                return None
            ratio = a.get("adherence", float("nan")) / base_adh if base_adh else float("nan")
            return {"gain": a["gain"], "distinct2": a.get("distinct2"),
                    "adherence_ratio": ratio, "perplexity": a.get("perplexity"),
                    **paired_intervals(heldout["rows"], emotion, label),
                    "met": bool(a["gain"] >= RECIPE_TARGETS["gain"]
                                and (a.get("distinct2") or 0) >= RECIPE_TARGETS["distinct2"]
                                and ratio >= RECIPE_TARGETS["adherence_ratio"])}

        was = old[emotion]
        rows.append({"emotion": emotion, "recipe": recipe, "recipe_heldout": measured("rec"),
                     "old": {"mode": was.mode, "strength": was.strength,
                             "term": old_labels[emotion]},
                     "old_heldout": measured(old_labels[emotion])})
    return {"choice": choice, "bank": with_recipes, "sweep": swept, "heldout": heldout,
            "rows": rows, "sweep_prompts": len(sweep_prompts), "eval_prompts": len(eval_prompts)}


def format_study(study: Mapping) -> str:
    """Markdown: per emotion the recipe chosen and, on the held-out prompts, its gain,
    distinct-2 and adherence ratio beside the old recipe's, and the count of emotions
    meeting :data:`RECIPE_TARGETS`."""
    def cell(m):
        if m is None:
            return "– | – | – | –"

        def value(key, spec):  # with its interval where the study measured one
            ci = m.get(f"{key}_ci")
            return f"{m[key]:{spec}}" + (f" ({ci[0]:{spec}}…{ci[1]:{spec}})" if ci else "")
        return (f"{value('gain', '+.2f')} | {m['distinct2']:.2f} | "
                f"{value('adherence_ratio', '.2f')} | {'yes' if m['met'] else 'no'}")

    lines = [f"Recipes chosen on {study['sweep_prompts']} of the project's prompts, judged on "
             f"{study['eval_prompts']} evaluation prompts they were not chosen on. Met: gain "
             f"≥ {RECIPE_TARGETS['gain']}, distinct-2 ≥ {RECIPE_TARGETS['distinct2']}, "
             f"adherence ≥ {RECIPE_TARGETS['adherence_ratio']} of unsteered; in parentheses "
             f"the 95% bootstrap interval over prompts.", "",
             "| emotion | recipe | gain | distinct-2 | adherence / unsteered | met | old recipe | "
             "gain | distinct-2 | adherence / unsteered | met |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in study["rows"]:
        was = row["old"]
        old = was.get("term", f"{was['strength']:g}")  # older studies: the push weight
        lines.append(f"| {row['emotion']} | {describe_recipe(row['recipe'])} | "
                     f"{cell(row['recipe_heldout'])} | {old} | {cell(row['old_heldout'])} |")
    met = sum(bool(r["recipe_heldout"] and r["recipe_heldout"]["met"]) for r in study["rows"])
    old_met = sum(bool(r["old_heldout"] and r["old_heldout"]["met"]) for r in study["rows"])
    lines += ["", f"Recipes meet the targets for {met} of {len(study['rows'])} emotions; the "
                  f"bank's old recipes for {old_met}."]
    return "\n".join(lines) + "\n"

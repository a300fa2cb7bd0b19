r"""Three studies on top of the evaluation grid, each a question a user asks of a bank on a
model, each answered on prompts the bank's recipes were not chosen on:

* **recipes** (:func:`emokern.eval.recommend.recipe_study`): does each emotion's recipe, chosen
  on the project's sweep prompts, raise the judge's probability of the emotion by ≥ 0.08 on the
  evaluation prompts while the answer stays fluent (distinct-2 ≥ 0.7) and on topic (adherence ≥
  0.8 of unsteered)?
* **dial** (:func:`level_dial`): is a level a dial? Each prompt is answered at three levels
  :math:`z_1 < z_2 < z_3` of one emotion (the token's projection set to that standard score);
  per prompt :math:`\rho = \mathrm{Spearman}((z_1, z_2, z_3), (p_1, p_2, p_3))`, :math:`p_j` the
  judge's probability of the emotion in answer :math:`j`; the dial works when the mean
  :math:`\bar\rho \ge 0.5` (:data:`DIAL_TARGET`).
* **erase** (:func:`erase_study`): on prompts that themselves evoke an emotion (sad news, an
  insult, a threat: :data:`EVOKING_PROMPTS`), does erasing it (projection clamped to the neutral
  level) or capping it (``<= 0``: only tokens above neutral are brought down) lower the judge's
  probability of it, at adherence ≥ 0.9 of the unsteered answers (:data:`ERASE_ADHERENCE`)?

:func:`run_studies` runs the three, through either generation engine
(:mod:`emokern.eval.engines`), and writes ``studies.json`` and ``studies.md``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from emokern.eval.evaluation import evaluate, load_prompts, sanitize
from emokern.eval.recommend import format_study, recipe_study
from emokern.files import write_json, write_text
from emokern.machine import machine_info
from emokern.stats import spearman

__all__ = ["DIAL_EMOTIONS", "DIAL_LEVELS", "DIAL_TARGET", "ERASE_ADHERENCE", "EVOKING_PROMPTS",
           "STUDIES", "dial_of_rows", "erase_of_rows", "erase_study", "format_studies",
           "level_dial", "run_studies"]

#: The studies :func:`run_studies` knows, in the order it runs them.
STUDIES = ("recipes", "dial", "erase")
#: The emotions whose level is held to be a dial, and the three levels (standard scores).
DIAL_EMOTIONS = ("sadness", "joy", "fear")
DIAL_LEVELS = (4.0, 8.0, 16.0)
#: The mean per-prompt Spearman a dial must reach.
DIAL_TARGET = 0.5
#: Adherence (relative to unsteered) an erase or cap must keep.
ERASE_ADHERENCE = 0.9

#: Prompts that evoke an emotion and still ask for something (so adherence means something).
EVOKING_PROMPTS = {
    "sadness": [
        "My dog died this morning. What should I do with his bed and toys?",
        "My grandmother passed away last week. Help me write a short thank-you note to her nurses.",
        "I failed my final exam after months of studying. How do I tell my parents?",
        "My best friend is moving to another country for good. What can I give her as a gift?",
        "Our family home was sold today and I keep thinking about my childhood there. How do I "
        "pack the old photos?",
        "I was laid off after twenty years at the same company. How do I update my CV?",
        "Nobody came to my birthday party. What should I do with all the leftover cake?",
        "My marriage is ending. How do we explain the divorce to our young children?",
    ],
    "anger": [
        "My neighbour parked in my driveway again and blocked me in for an hour. How do I write "
        "him a note?",
        "The airline lost my luggage and hung up on me twice. How do I file a complaint?",
        "A coworker took credit for my project in front of the whole team. What do I say to my "
        "manager?",
        "The repair shop charged me double what they quoted. How do I ask for a refund?",
        "Someone keyed my car in the parking lot. What should I do now?",
        "My landlord kept my deposit for damage I did not cause. How do I dispute it?",
        "A driver cut me off and then shouted at me. How do I report him?",
        "My roommate ate my food again after promising to stop. How do I bring it up?",
    ],
    "fear": [
        "I heard someone trying to open my front door at night. What should I do?",
        "My doctor wants to see me urgently about my test results. How do I prepare for the "
        "appointment?",
        "There is a wildfire a few miles from my town. What should I pack?",
        "I have to give a speech to five hundred people tomorrow. How do I get ready?",
        "My child did not come home from school and is not answering her phone. Who do I call?",
        "The plane is shaking badly in turbulence. How do I stay calm?",
        "I think someone is following me on my walk home. What do I do?",
        "A big storm is coming tonight and the power might go out. How do I get ready?",
    ],
}


def _by_prompt(rows: Sequence[dict], emotion: str) -> dict[tuple[str, str], float]:
    """``(prompt, label) -> judge probability of emotion`` for the rows of ``emotion`` and the
    unsteered rows."""
    return {(r["prompt"], r["label"]): r["judge_p"][emotion] for r in rows
            if r["emotion"] in (None, emotion)}


def level_dial(model, tokenizer, bank, *, emotions: Sequence[str] = DIAL_EMOTIONS,
               levels: Sequence[float] = DIAL_LEVELS, prompts: Sequence[str] | None = None,
               scope: str = "", **options) -> dict:
    r"""Answer every prompt at each of ``levels`` of each emotion and measure, per prompt, the
    Spearman :math:`\rho` of level vs the judge's probability of the emotion (module docstring).

    ``scope``: the levels' scope in the mix grammar (``"generated"``: on generated tokens
    only; default none). ``options`` go to :func:`~emokern.eval.evaluation.evaluate` (engine,
    batch size, ...).

    Returns
    -------
    dict
        ``levels``, ``emotions``: per emotion ``rho_mean``, ``rho_rows`` (prompts; one whose
        judge score does not change with the level counts as :math:`\rho = 0`),
        ``share_increasing`` (prompts with :math:`\rho = 1`), per level the mean judge
        probability ``p`` and mean ``adherence`` (``per_level``, unsteered first),
        ``met`` (:math:`\bar\rho` ≥ :data:`DIAL_TARGET`); ``seconds``.
    """
    levels = sorted(float(z) for z in levels)
    if len(levels) < 2:
        raise ValueError(f"levels: give at least two, got {levels}")
    prompts = list(load_prompts() if prompts is None else prompts)
    labels = _dial_labels(levels, scope)
    result = evaluate(model, tokenizer, bank, emotions=list(emotions), weights=[0.0, *labels],
                      prompts=prompts, **options)
    return {"levels": levels, "scope": scope,
            "emotions": dial_of_rows(result["rows"], emotions, levels, scope),
            "n_prompts": len(prompts), "seconds": result["seconds"]}


def _dial_labels(levels: Sequence[float], scope: str = "") -> list[str]:
    """The grid labels of the dial's levels: ``"@8"``, or ``"[generated]@8"`` with a scope."""
    return [(f"[{scope}]" if scope else "") + f"@{float(z):g}" for z in levels]


def dial_of_rows(rows: Sequence[dict], emotions: Sequence[str],
                 levels: Sequence[float], scope: str = "") -> dict[str, dict]:
    """:func:`level_dial`'s measures from the grid's scored ``rows`` (an unsteered row per
    prompt and one per prompt, emotion and level, labelled ``"@z"``, or ``"[scope]@z"``)."""
    labels = _dial_labels(levels, scope)
    prompts = list(dict.fromkeys(r["prompt"] for r in rows))
    out = {}
    for emotion in emotions:
        p = _by_prompt(rows, emotion)
        rhos = [spearman(levels, [p[(q, label)] for label in labels]) for q in prompts]
        # the same judge score at every level (ρ undefined) is a dial that does not turn: 0
        rhos = [r if r == r else 0.0 for r in rhos]
        rho = float(np.mean(rhos)) if rhos else float("nan")
        per_level = []
        for label in ["0", *labels]:
            mine = [r for r in rows if r["label"] == label and r["emotion"] in (None, emotion)]
            per_level.append({"label": label,
                              "p": float(np.mean([r["judge_p"][emotion] for r in mine])),
                              "adherence": float(np.mean([r["adherence"] for r in mine]))})
        out[emotion] = {
            "rho_mean": rho, "rho_rows": len(rhos),
            "share_increasing": float(np.mean([r > 0.999 for r in rhos])) if rhos else 0.0,
            "per_level": per_level, "met": bool(rho >= DIAL_TARGET)}
    return out


def erase_study(model, tokenizer, bank, *, prompts: Mapping[str, Sequence[str]] | None = None,
                edits: Sequence[str] = ("erase", "<=0"), **options) -> dict:
    """Erase and cap each emotion on prompts that evoke it (module docstring).

    ``prompts``: emotion -> prompts evoking it (default :data:`EVOKING_PROMPTS`); one grid of
    every prompt unsteered and each emotion's edits on its own prompts, judged there.
    ``options`` go to :func:`~emokern.eval.evaluation.evaluate`.

    Returns
    -------
    dict
        ``emotions``: per emotion, per edit (``"0"`` first) the mean judge probability ``p`` of
        the emotion and the mean ``adherence``; per edit ``lowered`` (``p`` below unsteered),
        ``adherence_ratio`` and ``met`` (lowered at adherence ≥ :data:`ERASE_ADHERENCE` of
        unsteered); ``seconds``.
    """
    prompts = {e: list(ps) for e, ps in (EVOKING_PROMPTS if prompts is None else prompts).items()}
    every = [q for ps in prompts.values() for q in ps]
    result = evaluate(model, tokenizer, bank, emotions=list(prompts), weights=[0.0, *edits],
                      prompts=every, prompts_of=prompts, **options)
    out = erase_of_rows(result["rows"], prompts, edits)
    return {"edits": list(edits), "emotions": out,
            "n_prompts": {e: len(ps) for e, ps in prompts.items()},
            "seconds": result["seconds"]}


def erase_of_rows(rows: Sequence[dict], prompts: Mapping[str, Sequence[str]],
                  edits: Sequence[str]) -> dict[str, dict]:
    """:func:`erase_study`'s measures from the grid's scored ``rows``: per emotion, on its own
    ``prompts`` only."""
    out = {}
    for emotion, own in prompts.items():
        mine = [r for r in rows if r["prompt"] in own and r["emotion"] in (None, emotion)]
        measured = {}
        for label in ["0", *edits]:
            these = [r for r in mine if r["label"] == label]
            measured[label] = {"p": float(np.mean([r["judge_p"][emotion] for r in these])),
                               "adherence": float(np.mean([r["adherence"] for r in these])),
                               "distinct2": float(np.mean([r["distinct2"] for r in these]))}
        base = measured["0"]
        for label in edits:
            m = measured[label]
            m["adherence_ratio"] = m["adherence"] / base["adherence"]
            m["lowered"] = bool(m["p"] < base["p"])
            m["met"] = bool(m["lowered"] and m["adherence_ratio"] >= ERASE_ADHERENCE)
        out[emotion] = measured
    return out


def format_studies(studies: Mapping) -> str:
    """Markdown of :func:`run_studies`' result: one section per study that ran."""
    config = studies["config"]
    lines = [f"# Studies: {config['bank']} on {config['model']}", "",
             f"Engine `{config['engine']}`, greedy, {config['max_new_tokens']} new tokens; "
             f"machine: {studies['machine'].get('cpu_model', '?')}. Wall time "
             f"{studies['seconds_total']:.0f} s.", ""]
    if "recipes" in studies:
        lines += ["## Recipes on held-out prompts", "", format_study(studies["recipes"]), ""]
    if "dial" in studies:
        dial = studies["dial"]
        lines += ["## Levels as a dial", "",
                  f"Levels {', '.join(f'{z:g}' for z in dial['levels'])} (standard scores"
                  f"{'; scope [' + dial['scope'] + ']' if dial.get('scope') else ''}) on "
                  f"{dial['n_prompts']} evaluation prompts; ρ̄ = mean per-prompt Spearman of level "
                  f"vs the judge's probability of the emotion; target ρ̄ ≥ {DIAL_TARGET}.", "",
                  "| emotion | ρ̄ | prompts with ρ = 1 | p: unsteered → levels | adherence: "
                  "unsteered → levels | met |", "|---|---|---|---|---|---|"]
        for emotion, d in dial["emotions"].items():
            ps = " → ".join(f"{x['p']:.2f}" for x in d["per_level"])
            adh = " → ".join(f"{x['adherence']:.2f}" for x in d["per_level"])
            lines.append(f"| {emotion} | {d['rho_mean']:+.2f} | {d['share_increasing']:.0%} | "
                         f"{ps} | {adh} | {'yes' if d['met'] else 'no'} |")
        lines.append("")
    if "erase" in studies:
        erase = studies["erase"]
        lines += ["## Erase and cap on prompts that evoke the emotion", "",
                  f"Met: the judge's probability of the emotion lowered at adherence ≥ "
                  f"{ERASE_ADHERENCE} of unsteered.", "",
                  "| emotion | prompts | edit | p (unsteered → edit) | adherence / unsteered | "
                  "distinct-2 | met |", "|---|---|---|---|---|---|---|"]
        for emotion, m in erase["emotions"].items():
            for label in erase["edits"]:
                e = m[label]
                lines.append(f"| {emotion} | {erase['n_prompts'][emotion]} | {label} | "
                             f"{m['0']['p']:.3f} → {e['p']:.3f} | {e['adherence_ratio']:.2f} | "
                             f"{e['distinct2']:.2f} | {'yes' if e['met'] else 'no'} |")
        lines.append("")
    return "\n".join(lines)


def run_studies(model, tokenizer, bank, *, out: str | os.PathLike | None = None,
                studies: Sequence[str] = STUDIES, heldout_prompts: int | None = None,
                model_name: str = "?", bank_name: str = "?", max_new_tokens: int = 40,
                progress: bool = True, dial: Mapping | None = None,
                erase: Mapping | None = None, **options) -> dict:
    """Run ``studies`` (names from :data:`STUDIES`) on ``bank`` and, with ``out``, write
    ``studies.json``, ``studies.md`` and (recipes) ``bank-with-recipes.safetensors`` there.

    The dial and erase studies run on the bank with the recipes just chosen when ``recipes``
    ran. ``heldout_prompts`` cuts the evaluation prompts (recipes and dial) to the first n;
    ``dial`` and ``erase`` are keywords of :func:`level_dial` and :func:`erase_study` (levels,
    emotions, prompts); ``options`` go to :func:`~emokern.eval.recommend.recipe_study` (its
    sweep's ``emotions``, ``weights``, ``levels``, ``scopes``, ``sweep_prompts``) and to every
    :func:`~emokern.eval.evaluation.evaluate` call (``engine="vllm"``, ``batch_size``, shared
    scorers ...).
    """
    unknown = [s for s in studies if s not in STUDIES]
    if unknown or not studies:
        raise ValueError(f"studies must be names from {STUDIES}, got {list(studies)}")
    started = time.perf_counter()
    eval_prompts = load_prompts()[:heldout_prompts] if heldout_prompts else load_prompts()
    shared = {"model_name": model_name, "bank_name": bank_name,
              "max_new_tokens": max_new_tokens, "progress": progress,
              **{k: v for k, v in options.items()
                 if k not in ("emotions", "weights", "levels", "scopes", "sweep_prompts")}}
    result: dict = {"config": {"model": model_name, "bank": bank_name,
                               "engine": options.get("engine", "hf"),
                               "max_new_tokens": max_new_tokens, "studies": list(studies),
                               "scopes": list(options.get("scopes", ()))},
                    "machine": machine_info()}
    if "recipes" in studies:
        study = recipe_study(model, tokenizer, bank, eval_prompts=eval_prompts,
                             max_new_tokens=max_new_tokens, progress=progress, **options,
                             model_name=model_name, bank_name=bank_name)
        if out is not None:
            Path(out).mkdir(parents=True, exist_ok=True)
            study["bank"].save(Path(out) / "bank-with-recipes.safetensors")
        result["recipes"] = {k: v for k, v in study.items()
                             if k not in ("bank", "sweep", "heldout")}
        result["recipes"]["seconds"] = {"sweep": study["sweep"]["seconds"],
                                        "heldout": study["heldout"]["seconds"]}
        bank = study["bank"]
    if "dial" in studies:
        result["dial"] = level_dial(model, tokenizer, bank,
                                    **{"prompts": eval_prompts, **(dial or {})}, **shared)
    if "erase" in studies:
        result["erase"] = erase_study(model, tokenizer, bank, **(erase or {}), **shared)
    result["seconds_total"] = round(time.perf_counter() - started, 1)
    if out is not None:
        write_json(Path(out) / "studies.json", sanitize(result))
        write_text(Path(out) / "studies.md", format_studies(result))
    return result

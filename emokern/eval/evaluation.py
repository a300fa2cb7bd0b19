r"""``emokern eval``: judge steering the way the emotion-vector papers do, by scorers that are
not the steered model.

The grid is emotions :math:`\times` weights :math:`\times` prompts, one greedy answer per cell,
plus one unsteered answer per prompt (weight 0, shared by every emotion). All rows go through
:func:`emokern.steering.generate` in batches of ``batch_size``, each row with its own mix, so
the whole grid costs ``ceil(rows / batch_size)`` generations. Each answer is then scored by

* the ``nade`` judge (intensities and probabilities over the six basic emotions,
  :class:`~emokern.eval.scorers.EmotionScorer`),
* NRC EmoLex word densities (:class:`~emokern.eval.lexicon.LexiconScorer`),
* semantic fidelity to the unsteered answer and topic adherence to the prompt
  (:class:`~emokern.eval.similarity.SentenceEmbedder`),
* perplexity under the unsteered model, distinct-2 and the repeated-3-gram rate,

and carries the monitor's readings (calibrated units when the bank has a neutral baseline).
:func:`~emokern.eval.metrics.aggregate` gives EPS/EAS per emotion and weight;
:mod:`emokern.eval.eval_report` writes ``report.md`` and the plots.

Everything that can be wrong with the input (unknown emotion, bad weight list, empty or
unreadable prompt file, unwritable output directory) raises one ``ValueError`` before the
model generates anything; ``results.json`` is written atomically at the end, so an interrupted
run leaves none.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from emokern.data import DATA_DIR
from emokern.emotions import BASIC_EMOTIONS
from emokern.eval.eval_report import format_report, plot_eps, plot_perplexity, plot_tradeoff
from emokern.eval.lexicon import LexiconScorer
from emokern.eval.metrics import aggregate
from emokern.eval.scorers import EmotionScorer, degeneration, perplexity
from emokern.eval.similarity import SentenceEmbedder
from emokern.files import write_json, write_text
from emokern.machine import machine_info
from emokern.steering import generate, parse_mix
from emokern.steering.mix import REC

__all__ = ["EVAL_PROMPTS_FILE", "REC", "check_emotions", "check_out_dir", "evaluate",
           "grid_rows", "load_prompts", "parse_weights", "sanitize"]

#: The built-in prompt set (60 everyday prompts, disjoint from the extraction queries and the
#: sweep prompts).
EVAL_PROMPTS_FILE = DATA_DIR / "eval_prompts.txt"


def load_prompts(path: str | os.PathLike | None = None) -> list[str]:
    """Prompts from a JSON list of strings or a text file with one prompt per line (blank
    lines and ``#`` comments skipped); default the built-in set.

    Raises
    ------
    ValueError
        Missing, unreadable, non-UTF-8 or empty file; a JSON value that is not a list of
        non-empty strings.
    """
    source = EVAL_PROMPTS_FILE if path is None else Path(path).expanduser()
    if not source.is_file():
        raise ValueError(f"prompts file {str(source)!r} does not exist or is not a file")
    try:
        text = source.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"prompts file {str(source)!r} cannot be read as UTF-8 text: {exc}") \
            from exc
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"prompts file {str(source)!r} looks like JSON but does not "
                             f"parse: {exc}") from exc
        if not isinstance(data, list) or not all(isinstance(p, str) and p.strip()
                                                 for p in data):
            raise ValueError(f"prompts file {str(source)!r} must hold a JSON list of non-empty "
                             f"strings")
        prompts = [p.strip() for p in data]
    else:
        prompts = [line.strip() for line in text.splitlines()]
        prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise ValueError(f"prompts file {str(source)!r} holds no prompt")
    return prompts


#: The edit terms of the grid besides push weights and ``rec``: a level ``@z``, a cap
#: ``<=z``, a floor ``>=z`` (standard scores against the bank's neutral baseline) and ``erase``;
#: each is the right-hand side of a term of the mix grammar (:func:`emokern.steering.parse_mix`).
EDIT_PREFIXES = ("@", "<=", ">=")
ERASE = "erase"


def _grid_term(term) -> dict:
    """The object form of one grid term, parsed by the mix grammar for a stand-in emotion."""
    text = str(term).strip()
    operator = "" if text.startswith(EDIT_PREFIXES) else "="
    try:
        return parse_mix(f"x{operator}{text}")["x"]
    except (TypeError, ValueError, KeyError) as exc:
        reason = str(exc).removeprefix("parse_mix: ").replace(" of 'x'", "")
        raise ValueError(f"weights: {term!r} is none of a number, 'rec', '@z' (level), "
                         f"'<=z' (cap), '>=z' (floor) or 'erase' ({reason})") from None


def parse_weights(text) -> list[float | str]:
    """The grid's edits from ``"-1,0,1,2,4"``, ``"rec"`` or a mix of modes
    (``"2,4,rec,@4,@8,<=0,erase"``), in the order given, without duplicates: push weights as
    floats; ``rec``; a level ``@z``, a cap ``<=z``, a floor ``>=z`` (``z`` a standard score
    against the bank's neutral baseline) and ``erase`` as their normalised strings
    (``"@8"``, ``"<=0"``). Each term is read by the mix grammar (``joy@8`` without the name).

    Raises
    ------
    ValueError
        An empty list, a term that is none of these, a non-finite number, a repeated term.
    """
    if isinstance(text, str):
        terms = [t.strip() for t in text.split(",")]
    elif isinstance(text, Sequence):
        terms = list(text)
    else:
        raise ValueError(f"weights must be a comma-separated string such as '-1,0,1,2,4' or "
                         f"'rec,@8', got {text!r}")
    out: list[float | str] = []
    for term in terms:
        parsed = _grid_term(term)
        value: float | str
        if isinstance(parsed, (int, float)):
            value = float(parsed)
        elif parsed == REC:
            value = REC
        elif str(term).strip().lower() == ERASE:
            value = ERASE
        else:
            (field, z), = parsed.items()
            value = f"{dict(level='@', max='<=', min='>=')[field]}{z:g}"
        if value in out:
            raise ValueError(f"weights: {term!r} is given twice")
        out.append(value)
    if not out:
        raise ValueError("weights must not be empty")
    return out


def edit_mix(emotion: str, term: float | str, bank) -> tuple[dict, float]:
    """The mix of one grid term for ``emotion`` and the push weight it applies (NaN for a
    level, cap, floor or erase: they apply no fixed weight). ``rec`` is the emotion's recipe
    (:meth:`emokern.EmotionBank.recommended`)."""
    if term == REC:  # the emotion's recipe: a push weight or a level
        recipe = bank.recommended(emotion)
        weight = recipe.strength if recipe.mode == "push" else float("nan")
        return {emotion: recipe.mix_term()}, weight
    parsed = _grid_term(term)
    weight = float(parsed) if isinstance(parsed, (int, float)) else float("nan")
    return {emotion: parsed}, weight


def check_emotions(emotions, bank, judge_labels: Sequence[str] = BASIC_EMOTIONS) -> list[str]:
    """Emotions to evaluate: each must be in the bank and known to the judge (default: the
    judge's emotions the bank has)."""
    if emotions is None:
        chosen = [e for e in judge_labels if e in bank.names]
        if not chosen:
            raise ValueError(f"the bank has none of the judge's emotions {list(judge_labels)}; "
                             f"it has {bank.names}")
        return chosen
    if isinstance(emotions, str):
        emotions = [e.strip() for e in emotions.split(",") if e.strip()]
    emotions = list(emotions)
    if not emotions:
        raise ValueError("emotions must not be empty")
    for e in emotions:
        if e not in bank.names:
            raise ValueError(f"emotions: unknown emotion {e!r}; the bank has {bank.names}")
        if e not in judge_labels:
            raise ValueError(f"emotions: {e!r} is not one the judge scores "
                             f"({list(judge_labels)})")
    if len(set(emotions)) != len(emotions):
        raise ValueError(f"emotions lists a name twice: {emotions}")
    return emotions


def check_out_dir(out: str | os.PathLike) -> Path:
    """Create ``out`` (and parents) and prove it writable by creating and removing a file."""
    path = Path(out).expanduser()
    if path.exists() and not path.is_dir():
        raise ValueError(f"out {str(path)!r} exists and is not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".emokern-write-test-"):
            pass
    except OSError as exc:
        raise ValueError(f"out {str(path)!r} is not a writable directory: {exc}") from exc
    return path


def grid_rows(prompts: Sequence[str], emotions: Sequence[str], weights: Sequence[float | str],
              bank) -> list[dict]:
    """The grid as rows ``{prompt, emotion, label, weight, mix}``: one unsteered row per
    prompt (``emotion`` None, label ``"0"``), then per emotion and edit term (except weight
    0) one row per prompt (:func:`edit_mix`: ``rec`` resolved by
    ``bank.recommended_weight``; levels, caps and erase as mixes in reading units)."""
    rows = [{"prompt": p, "emotion": None, "label": "0", "weight": 0.0, "mix": {}}
            for p in prompts]
    for emotion in emotions:
        for asked in weights:
            if asked == 0.0:
                continue
            mix, weight = edit_mix(emotion, asked, bank)
            label = asked if isinstance(asked, str) else f"{asked:g}"
            rows += [{"prompt": p, "emotion": emotion, "label": label, "weight": weight,
                      "mix": dict(mix)} for p in prompts]
    return rows


def sanitize(value):
    """``value`` with NaN/inf floats replaced by None (JSON has no NaN), recursively."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (np.floating, np.integer)):
        return sanitize(value.item())
    if isinstance(value, dict):
        return {k: sanitize(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [sanitize(v) for v in value]
    return value


def _generate(model, tokenizer, bank, rows, *, batch_size, max_new_tokens, layers, seed,
              do_sample, progress) -> None:
    starts = range(0, len(rows), batch_size)
    bar = tqdm(starts, desc="eval: generate", unit="batch", disable=not progress)
    for start in bar:
        chunk = rows[start:start + batch_size]
        out = generate(model, tokenizer, bank, [r["prompt"] for r in chunk],
                       [r["mix"] for r in chunk], max_new_tokens=max_new_tokens, layers=layers,
                       do_sample=do_sample, seed=seed + start)
        for row, result in zip(chunk, out, strict=True):
            row["text"] = result["text"]
            row["n_tokens"] = result["n_tokens"]
            row["projections"] = result["projections"]
            if result.get("readings") is not None:
                row["readings"] = result["readings"]


def _score(model, tokenizer, rows, emotions, *, scorer, lexicon, embedder, fluency) -> None:
    texts = [r["text"] for r in rows]
    intensities, probs = scorer.judge(texts)
    densities = lexicon.score(texts)
    distinct2, rep3 = degeneration(texts)
    baseline = {r["prompt"]: r["text"] for r in rows if r["emotion"] is None}
    fidelity = embedder.similarity(texts, [baseline[r["prompt"]] for r in rows])
    adherence = embedder.similarity(texts, [r["prompt"] for r in rows])
    ppl = perplexity(model, tokenizer, texts) if fluency else [float("nan")] * len(rows)
    for i, row in enumerate(rows):
        row["judge"] = {e: float(intensities[i, scorer.column(e)]) for e in scorer.emotions}
        row["judge_p"] = {e: float(probs[i, scorer.column(e)]) for e in scorer.emotions}
        row["lexicon"] = {e: float(densities[i, lexicon.column(e)]) for e in lexicon.emotions}
        row["fidelity"] = float(fidelity[i])
        row["adherence"] = float(adherence[i])
        row["distinct2"] = float(distinct2[i])
        row["rep3"] = float(rep3[i])
        row["perplexity"] = float(ppl[i])


def evaluate(model, tokenizer, bank, *, emotions=None, weights="-1,0,1,2,4,rec", prompts=None,
             max_new_tokens: int = 40, seed: int = 0, batch_size: int = 64,
             layers="auto", do_sample: bool = False, out: str | os.PathLike | None = None,
             fluency: bool = True, progress: bool = True, scorer: EmotionScorer | None = None,
             lexicon: LexiconScorer | None = None, embedder: SentenceEmbedder | None = None,
             model_name: str = "?", bank_name: str = "?") -> dict:
    """Run the evaluation grid and return (and, with ``out``, write) its results.

    Parameters
    ----------
    model, tokenizer, bank
        The model and a bank extracted from it (checked before generating).
    emotions : str, list of str or None
        Emotions to steer (default: the six basic emotions the bank has).
    weights : str or list
        Edits (:func:`parse_weights`): push weights (``0`` is the unsteered baseline, always
        run), ``"rec"`` (each emotion's recommended weight), levels ``"@z"``, caps ``"<=z"``,
        floors ``">=z"`` and ``"erase"`` in reading units (they need a calibrated bank).
    prompts : list of str, path or None
        The prompts, a prompts file (:func:`load_prompts`), or None for the built-in set.
    max_new_tokens, seed, do_sample
        Generation settings (greedy by default; ``seed`` seeds sampling).
    batch_size : int
        Rows per generation.
    layers : "auto" or list of int
        Steered layers (default the bank's recommended layers).
    out : path, optional
        Directory for ``results.json``, ``report.md`` and the PNG plots.
    fluency : bool
        Score perplexity under the unsteered model.

    Returns
    -------
    dict
        ``config``, ``machine``, ``seconds``, ``aggregates`` (one record per emotion and
        weight, :func:`emokern.eval.metrics.aggregate`) and ``rows`` (every answer with its
        scores and readings).
    """
    # Every check before any generation.
    emotions = check_emotions(emotions, bank)
    weights = parse_weights(weights)
    if not bank.calibrated and any(isinstance(w, str) and w != REC for w in weights):
        raise ValueError("weights: levels, caps and erase are standard scores against the "
                         "bank's neutral baseline, and this bank has none (add one with "
                         "emokern extract's neutral baseline)")
    if prompts is None or isinstance(prompts, (str, os.PathLike)):
        prompts = load_prompts(prompts)
    else:
        prompts = list(prompts)
        if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
            raise ValueError("prompts must be a non-empty list of non-empty strings")
    for name, value, low in (("max_new_tokens", max_new_tokens, 1),
                             ("batch_size", batch_size, 1), ("seed", seed, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    out_dir = check_out_dir(out) if out is not None else None
    bank.check_compatible(model)
    rows = grid_rows(prompts, emotions, weights, bank)
    scorer = scorer or EmotionScorer()
    lexicon = lexicon or LexiconScorer()
    embedder = embedder or SentenceEmbedder()

    started = time.perf_counter()
    _generate(model, tokenizer, bank, rows, batch_size=batch_size, max_new_tokens=max_new_tokens,
              layers=layers, seed=seed, do_sample=do_sample, progress=progress)
    generated = time.perf_counter()
    _score(model, tokenizer, rows, emotions, scorer=scorer, lexicon=lexicon, embedder=embedder,
           fluency=fluency)
    result = {
        "config": {"model": model_name, "bank": bank_name, "method": bank.method,
                   "emotions": emotions,
                   "weights": [w if isinstance(w, str) else float(w) for w in weights],
                   "recommended": {e: bank.recommended(e).mix_term() for e in emotions},
                   "layers": list(bank.recommended_layers) if layers == "auto" else list(layers),
                   "n_prompts": len(prompts), "n_rows": len(rows),
                   "max_new_tokens": max_new_tokens, "seed": seed, "do_sample": do_sample,
                   "batch_size": batch_size, "calibrated": bank.calibrated,
                   "judge": "nade", "judge_emotions": list(scorer.emotions)},
        "machine": machine_info(),
        "seconds": {"generate": round(generated - started, 1),
                    "score": round(time.perf_counter() - generated, 1)},
        "aggregates": aggregate(rows, list(scorer.emotions)),
        "rows": rows,
    }
    result["aggregates"] = [a for a in result["aggregates"] if a["emotion"] in emotions]
    if out_dir is not None:
        write_results(result, out_dir)
    return result


def write_results(result: dict, out_dir: str | os.PathLike) -> list[Path]:
    """Write ``results.json``, ``report.md`` and the plots into ``out_dir``, each atomically."""
    out_dir = Path(out_dir)
    written = [write_json(out_dir / "results.json", sanitize(result))]
    written.append(write_text(out_dir / "report.md", format_report(result)))
    written.append(plot_eps(result, out_dir / "eps.png"))
    written.append(plot_perplexity(result, out_dir / "perplexity.png"))
    written.append(plot_tradeoff(result, out_dir / "tradeoff.png"))
    return written

"""``make demo`` / ``emokern demo``: one batch of the default model, a different mix per row.
Tested in ``tests/test_cli.py``."""

from __future__ import annotations

import textwrap
import time

from emokern.bank import EmotionBank
from emokern.models import load_model
from emokern.steering import generate

PROMPT = "Tell me about your plans for this weekend."


def demo_mixes(weight: float) -> list[dict[str, float]]:
    """Five rows: unsteered, joy, fear, sadness, and joy suppressed (weights in bank units)."""
    return [{}, {"joy": weight}, {"fear": weight}, {"sadness": weight}, {"joy": -weight}]


def run_demo(max_new_tokens: int = 40, prompt: str = PROMPT, *, model: str = "default",
             bank: str = "default") -> list[dict]:
    """Generate ``prompt`` under five mixes in one batch; print texts and emotion readings.

    Parameters
    ----------
    max_new_tokens : int
    prompt : str
    model : "default" (SmolLM2-135M-Instruct) or a local checkpoint directory
    bank : "default" (the shipped EV bank) or a bank file extracted from ``model``

    Returns
    -------
    list of dict
        The rows of :func:`emokern.steering.generate`.
    """
    start = time.perf_counter()
    lm, tokenizer = load_model(model)
    emotions = EmotionBank.load_default("ev") if bank == "default" else EmotionBank.load(bank)
    weight = emotions.default_weight or 1.0
    name = "SmolLM2-135M-Instruct" if model == "default" else model
    print(f"model {name} loaded in {time.perf_counter() - start:.1f} s; "
          f"bank: {len(emotions.names)} emotions, steering layers {emotions.recommended_layers} "
          f"at weight {weight:g}")
    start = time.perf_counter()
    rows = generate(lm, tokenizer, emotions, prompt, demo_mixes(weight),
                    max_new_tokens=max_new_tokens)
    seconds = time.perf_counter() - start
    print(f"\nprompt: {prompt!r} — {len(rows)} rows, one batched generate, {seconds:.1f} s\n")
    for row in rows:
        mix = ", ".join(f"{k}={v:+g}" for k, v in row["mix"].items()) or "unsteered"
        print(f"[{mix}]")
        print(textwrap.indent(textwrap.fill(row["text"].strip(), 96), "    "), "\n")
    calibrated = rows[0]["readings"] is not None
    key = "readings" if calibrated else "projections"
    names = list(rows[0][key])
    print("emotion readings of the generating states at the bank's detection layers, "
          + ("as standard scores (0 = as neutral text, +1 = one neutral spread above):"
             if calibrated else "as raw projections (the bank has no neutral baseline):"))
    print(f"{'row':<14}" + "".join(f"{n:>10}" for n in names))
    for row in rows:
        mix = ", ".join(f"{k}={v:+g}" for k, v in row["mix"].items()) or "unsteered"
        print(f"{mix[:13]:<14}" + "".join(f"{row[key][n]:>+10.2f}" for n in names))
    return rows

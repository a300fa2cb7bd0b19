"""``make demo`` / ``emokern demo``: one batch of the default model, a different mix per row."""

from __future__ import annotations

import textwrap
import time

PROMPT = "Tell me about your plans for this weekend."


def demo_mixes(alpha: float) -> list[dict[str, float]]:
    """Five rows: unsteered, joy, fear, sadness, and joy suppressed (weights in bank units)."""
    return [{}, {"joy": alpha}, {"fear": alpha}, {"sadness": alpha}, {"joy": -alpha}]


def run_demo(max_new_tokens: int = 40, prompt: str = PROMPT) -> list[dict]:
    """Generate ``prompt`` under five mixes in one batch; print texts and emotion readings.

    Returns the rows of :func:`emokern.steering.generate`.
    """
    from emokern.bank import EmotionBank
    from emokern.models import load_model
    from emokern.steering import generate

    start = time.perf_counter()
    model, tokenizer = load_model("default")
    bank = EmotionBank.load_default("ev")
    alpha = bank.recommended_alpha
    print(f"model SmolLM2-135M-Instruct loaded in {time.perf_counter() - start:.1f} s; "
          f"bank: {len(bank.names)} emotions, steering layers {bank.recommended_layers} "
          f"at weight {alpha:g}")
    start = time.perf_counter()
    rows = generate(model, tokenizer, bank, prompt, demo_mixes(alpha),
                    max_new_tokens=max_new_tokens)
    seconds = time.perf_counter() - start
    print(f"\nprompt: {prompt!r} — {len(rows)} rows, one batched generate, {seconds:.1f} s\n")
    for row in rows:
        mix = ", ".join(f"{k}={v:+g}" for k, v in row["mix"].items()) or "unsteered"
        print(f"[{mix}]")
        print(textwrap.indent(textwrap.fill(row["text"].strip(), 96), "    "), "\n")
    names = list(rows[0]["projections"])
    print("mean projection of the generating states on each emotion direction "
          "(steered layers, before steering):")
    print(f"{'row':<14}" + "".join(f"{n:>10}" for n in names))
    for row in rows:
        mix = ", ".join(f"{k}={v:+g}" for k, v in row["mix"].items()) or "unsteered"
        print(f"{mix[:13]:<14}" + "".join(f"{row['projections'][n]:>+10.2f}" for n in names))
    return rows

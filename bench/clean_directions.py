r"""Do emotion directions get better when the main directions of neutral text are projected out?

For each bank layer :math:`l`, the model's neutral answers to the project's queries (greedy,
Method EV's neutral instruction) give per-answer mean hidden states :math:`m_{i,l}`; their
principal components :math:`U_l` (the fewest that explain ``share`` of the variance of the
centred means) are removed from every emotion vector,

.. math::
    v'_{l,k} = v_{l,k} - U_l U_l^\top v_{l,k},

the neutral baseline is recomputed for :math:`v'` from the same answers, and the held-out
6-way classification (132 sentences, argmax of standard scores, per layer:
:func:`emokern.extract.neutral_readings.detection_accuracy`) is compared with the original
bank's. Run on both built-in models' EV banks::

    python bench/clean_directions.py --model default --bank default-ev \
        --out bench/results/clean-directions-default.json
    python bench/clean_directions.py --model gemma3-270m --bank gemma3-270m-ev \
        --out bench/results/clean-directions-gemma.json

The verdict (keep the option only if it raises held-out accuracy on both models) is in
``docs/models.md``.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from emokern.bank import EmotionBank
from emokern.data import load_heldout
from emokern.extract.hidden import generate_responses, span_hidden_states
from emokern.extract.neutral_readings import detection_accuracy, neutral_prompts, neutral_stats
from emokern.files import write_json
from emokern.machine import auto_threads, machine_info
from emokern.models import load_model
from emokern.tokens import pad_id


def neutral_components(means: torch.Tensor, share: float) -> list[torch.Tensor]:
    """Per layer the principal directions ``[D, r]`` of ``means [N, L, D]`` that explain
    ``share`` of the variance (the fewest such, at least one)."""
    out = []
    for layer in range(means.shape[1]):
        x = means[:, layer].double()
        x = x - x.mean(dim=0)
        _, s, vh = torch.linalg.svd(x, full_matrices=False)
        explained = (s ** 2).cumsum(0) / (s ** 2).sum()
        r = int((explained < share).sum()) + 1
        out.append(vh[:r].T)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--bank", default="default-ev")
    parser.add_argument("--shares", default="0.25,0.5,0.75")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    started = time.perf_counter()
    auto_threads()
    model, tokenizer = load_model(args.model)
    bank = EmotionBank.named(args.bank)
    prompts = neutral_prompts(tokenizer)
    responses = generate_responses(model, tokenizer, prompts, desc="neutral: generate")
    sequences = [p + r for p, r in zip(prompts, responses, strict=True)]
    spans = [(len(p), len(p) + len(r)) for p, r in zip(prompts, responses, strict=True)]
    sums, counts, _ = span_hidden_states(model, sequences, spans, layers=bank.layers,
                                         pad_token_id=pad_id(tokenizer), batch_size=16)
    keep = counts > 0
    sums, counts = sums[keep], counts[keep]
    means = sums / counts[:, None, None]
    sentences = load_heldout()
    ids = [list(tokenizer(t, add_special_tokens=False)["input_ids"]) for _, t in sentences]
    labels = [e for e, _ in sentences]
    held, held_counts, _ = span_hidden_states(model, ids, [(1, len(x)) for x in ids],
                                              layers=bank.layers, pad_token_id=pad_id(tokenizer),
                                              batch_size=32)
    states = held / held_counts[:, None, None].clamp_min(1)

    def accuracy(vectors):
        mean, std = neutral_stats(sums, counts, vectors)
        candidate = EmotionBank(vectors, bank.names, bank.layers, hidden_norm=bank.hidden_norm,
                                metadata=bank.metadata, neutral_mean=mean, neutral_std=std)
        return [round(float(a), 4) for a in detection_accuracy(states, labels, candidate)]

    rows = [{"share": 0.0, "components": [0] * len(bank.layers),
             "accuracy": accuracy(bank.vectors.float())}]
    for share in (float(s) for s in args.shares.split(",")):
        basis = neutral_components(means, share)
        vectors = bank.vectors.float().clone()
        for i, u in enumerate(basis):
            u = u.float()
            vectors[i] = vectors[i] - (vectors[i] @ u) @ u.T
        rows.append({"share": share, "components": [int(u.shape[1]) for u in basis],
                     "accuracy": accuracy(vectors)})
    for row in rows:
        best = max(range(len(bank.layers)), key=lambda i: row["accuracy"][i])
        row["best_layer"], row["best_accuracy"] = bank.layers[best], row["accuracy"][best]
        print(f"share {row['share']:.2f}: best layer {row['best_layer']} accuracy "
              f"{row['best_accuracy']:.3f} (components per layer {row['components']})")
    write_json(args.out, {"model": args.model, "bank": args.bank, "layers": list(bank.layers),
                          "neutral_answers": int(keep.sum()), "rows": rows,
                          "seconds": round(time.perf_counter() - started, 1),
                          "machine": machine_info()})
    print(json.dumps({"wrote": args.out}))


if __name__ == "__main__":
    main()

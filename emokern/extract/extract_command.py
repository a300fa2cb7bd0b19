"""One call that checks its arguments, loads a model, extracts a bank and saves it: what
``emokern extract`` runs (see :mod:`emokern.cli`)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch

from emokern.data import load_concepts, load_instructions, load_queries
from emokern.emotions import BASIC_EMOTIONS
from emokern.extract.checks import check_names
from emokern.extract.concept import extract_concept
from emokern.extract.ev import extract_ev
from emokern.models import load_model

__all__ = ["METHODS", "extract_main"]

#: The extraction methods: Method EV (:mod:`emokern.extract.ev`) and Method concept
#: (:mod:`emokern.extract.concept`).
METHODS = ("ev", "concept")


def extract_main(
    model_name: str | os.PathLike = "default",
    method: str = "ev",
    emotions: Sequence[str] | None = None,
    queries_path: str | os.PathLike | None = None,
    out_path: str | os.PathLike | None = None,
    *,
    layers: Sequence[int] | None = None,
    dtype=torch.float16,
    progress: bool = True,
    **options,
):
    """Check the arguments, load the model, extract a bank and save it (float16 by default).

    Everything that can be checked without the model (method, emotion names, the queries
    file, the output directory) is checked before the model is loaded; the bank is written
    atomically, so a failure never leaves a half-written file.

    Parameters
    ----------
    model_name : "default" or path
    method : {"ev", "concept"}
    emotions : sequence of str, optional
        Emotions (ev) or categories (concept); default the method's set.
    queries_path : path, optional
        Queries file for Method EV (one per line).
    out_path : path, optional
        Where to save the bank (``.safetensors``); None saves nothing.
    layers : sequence of int, optional
    dtype : torch.dtype
        Storage dtype of the saved vectors.
    **options
        Passed to :func:`extract_ev` / :func:`extract_concept`.

    Returns
    -------
    EmotionBank
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method == "ev":
        known = list(load_instructions()["emotions"])
        names = check_names(BASIC_EMOTIONS if emotions is None else emotions, known,
                            "emotions", "emotion")
        queries = load_queries(queries_path)
    else:
        if queries_path is not None:
            raise ValueError("queries_path applies to method 'ev' only")
        names = None if emotions is None else check_names(
            emotions, list(load_concepts()["categories"]), "emotions", "category")
    if out_path is not None:
        out_path = Path(out_path).expanduser()
        if out_path.suffix != ".safetensors":
            raise ValueError(f"out_path must end in .safetensors, got {str(out_path)!r}")
        if not out_path.parent.is_dir():
            raise ValueError(f"out_path's directory {str(out_path.parent)!r} does not exist")

    model, tokenizer = load_model(model_name)
    if method == "ev":
        bank = extract_ev(model, tokenizer, emotions=names, queries=queries, layers=layers,
                          progress=progress, **options)
    else:
        bank = extract_concept(model, tokenizer, categories=names, layers=layers,
                               progress=progress, **options)
    if out_path is not None:
        bank.save(out_path, dtype=dtype)
    return bank

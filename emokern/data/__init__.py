"""The project-written data files in ``emokern/data/`` and the one place that reads them.

* ``queries.txt`` — 118 everyday queries for Method EV (:func:`load_queries`);
* ``instructions.json`` — Method EV's instruction phrasings and the emotion words they fill in
  (:func:`load_instructions`);
* ``concepts.json`` — Method concept's categories and carrier sentences (:func:`load_concepts`);
* ``heldout.jsonl`` — labelled emotional sentences never used for extraction
  (:func:`load_heldout`);
* ``calibration.json`` — the recommended steering weight and layers measured by the calibration
  sweep (:func:`load_calibration`, :func:`store_calibration`): extraction reads it here, the
  evaluation writes it here, so neither depends on the other;
* ``banks/`` — the shipped banks of the default model (:data:`BANKS_DIR`).

Every file was written for emokern (see ``docs/emotions.md`` for how each was chosen). Loaders
take an optional path to read a user's own file of the same format; bad input is a
``ValueError`` (``TypeError`` for a non-path argument) that names the argument and the file.

Tested in ``tests/test_data.py``.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

from emokern.files import write_json

__all__ = [
    "BANKS_DIR",
    "CALIBRATION_FILE",
    "CONCEPTS_FILE",
    "DATA_DIR",
    "HELDOUT_FILE",
    "INSTRUCTIONS_FILE",
    "QUERIES_FILE",
    "load_calibration",
    "load_concepts",
    "load_heldout",
    "load_instructions",
    "load_queries",
    "store_calibration",
    "text_hash",
]

DATA_DIR = Path(__file__).resolve().parent
QUERIES_FILE = DATA_DIR / "queries.txt"
INSTRUCTIONS_FILE = DATA_DIR / "instructions.json"
CONCEPTS_FILE = DATA_DIR / "concepts.json"
HELDOUT_FILE = DATA_DIR / "heldout.jsonl"
CALIBRATION_FILE = DATA_DIR / "calibration.json"
BANKS_DIR = DATA_DIR / "banks"


def text_hash(items: Sequence[str] | str) -> str:
    """SHA-256 (first 16 hex digits) of a text set, joined by newlines: names the source set in
    a bank's metadata, so two banks from the same queries can be recognised."""
    text = items if isinstance(items, str) else "\n".join(items)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _read_text(path, argument: str) -> str:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{argument} must be a path, got {type(path).__name__}")
    path = Path(path).expanduser()
    if not path.is_file():
        raise ValueError(f"{argument} {str(path)!r} does not exist or is not a file")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{argument} {str(path)!r} is not UTF-8 text: {exc}") from exc


def load_queries(path: str | os.PathLike | None = None) -> list[str]:
    """Queries for Method EV, one per line (blank lines and ``#`` comments skipped).

    Parameters
    ----------
    path : path, optional
        A UTF-8 text file; default the project's set ``emokern/data/queries.txt`` (118
        everyday queries written for emokern).

    Raises
    ------
    ValueError
        If the file does not exist or holds no query.
    """
    text = _read_text(QUERIES_FILE if path is None else path, "queries_path")
    queries = [line.strip() for line in text.splitlines()]
    queries = [q for q in queries if q and not q.startswith("#")]
    if not queries:
        raise ValueError(f"queries_path {str(path or QUERIES_FILE)!r} holds no query (it is "
                         f"empty or only blank/comment lines)")
    return queries


def _load_json(path, default: Path, argument: str) -> dict:
    text = _read_text(default if path is None else path, argument)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{argument} {str(path or default)!r} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{argument} {str(path or default)!r} must hold a JSON object")
    return data


def load_instructions(path: str | os.PathLike | None = None) -> dict:
    """The instruction phrasings of Method EV (``emokern/data/instructions.json``).

    Returns
    -------
    dict
        ``default`` (phrasing id), ``phrasings`` (id -> {system, user, neutral_system,
        neutral_user}; ``{noun}``, ``{adjective}`` and ``{query}`` are filled in) and
        ``emotions`` (name -> {noun, adjective}).
    """
    data = _load_json(path, INSTRUCTIONS_FILE, "instructions_path")
    for key in ("default", "phrasings", "emotions"):
        if key not in data:
            raise ValueError(f"instructions file lacks the key {key!r}")
    return data


def load_concepts(path: str | os.PathLike | None = None) -> dict:
    """The emotion-concept sets (``emokern/data/concepts.json``): ``categories`` (name ->
    concept words/phrases) and ``carriers`` (neutral sentences with one ``{concept}`` slot)."""
    data = _load_json(path, CONCEPTS_FILE, "concepts_path")
    for key in ("categories", "carriers"):
        if key not in data:
            raise ValueError(f"concepts file lacks the key {key!r}")
    return data


def load_heldout(path: str | os.PathLike | None = None) -> list[tuple[str, str]]:
    """Held-out emotional sentences ``[(emotion, text), ...]`` (``emokern/data/heldout.jsonl``,
    22 per basic emotion, written for emokern and never used for extraction)."""
    text = _read_text(HELDOUT_FILE if path is None else path, "heldout_path")
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            rows.append((str(item["emotion"]), str(item["text"])))
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ValueError(f"heldout_path line {number} is not a JSON object with 'emotion' "
                             f"and 'text': {exc}") from exc
    if not rows:
        raise ValueError("heldout_path holds no sentence")
    return rows


def load_calibration(path: str | os.PathLike | None = None) -> dict:
    """The calibration record ``emokern/data/calibration.json`` ({} when absent).

    Returns
    -------
    dict
        Method (``"ev"``, ``"concept"``) -> the record :func:`store_calibration` stored:
        ``default_weight`` (the bank-wide steering weight), ``recommended_layers``,
        ``relative_depth``, ``relative_strength``, ``centered``, ``fingerprint`` and the sweep's
        measures. A record that still names the weight ``recommended_alpha`` (as files of
        earlier versions do) is read with it as ``default_weight``.
    """
    path = CALIBRATION_FILE if path is None else Path(path)
    if not Path(path).is_file():
        return {}
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    for record in data.values():
        if isinstance(record, dict) and "recommended_alpha" in record:
            record.setdefault("default_weight", record["recommended_alpha"])
            del record["recommended_alpha"]
    return data


def store_calibration(method: str, record: dict, path: str | os.PathLike | None = None
                      ) -> Path:
    """Store ``record`` as the calibration of ``method``, keeping the other methods' records.

    The file is rewritten atomically (:func:`emokern.files.write_json`); an absent or
    unreadable file starts empty. Returns the path written (default
    ``emokern/data/calibration.json``).
    """
    path = CALIBRATION_FILE if path is None else Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        data = {}
    data[method] = record
    return write_json(path, data)

"""The emotion bank's file: the safetensors layout, the metadata schema, and safe reading and
writing. :class:`emokern.EmotionBank` (``emokern/bank.py``) is the object; this module is
everything about its bytes on disk. Tested in ``tests/test_bankfile.py`` (and through
``EmotionBank.save``/``load`` in ``tests/test_bank.py``).

Layout
------
A safetensors file (never a pickle) with tensors

* ``vectors`` [L, K, D] (float32, or float16/bfloat16 for small shipped files),
* ``hidden_norm`` [L] float32 (optional),
* ``neutral_mean``, ``neutral_std`` [L, K] float32 (optional, together): the neutral baseline
  of the readings (see :meth:`emokern.EmotionBank.standardize`),

and, in the header metadata (all strings), ``format`` = ``"emokern.bank/1"`` (:data:`FORMAT`)
and the JSON encodings of ``names`` (list of K str), ``layers`` (list of L int) and
``metadata`` (dict, :func:`check_metadata`). Files without the optional tensors or metadata
keys (older banks) load as before.

Metadata schema
---------------
Keys with a known meaning must have the JSON type :data:`TYPED_KEYS` gives. The bank-wide
default weight is ``default_weight``; files written before it was named so carry
``recommended_alpha`` (:data:`RENAMED_KEYS`), which is read as ``default_weight``, so the
metadata of a loaded bank only ever holds the current name.
"""

from __future__ import annotations

import json
import math
import operator
from datetime import datetime, timezone
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_save

from emokern.errors import failing
from emokern.files import atomic_write
from emokern.version import __version__

fail = failing("EmotionBank")

__all__ = ["FORMAT", "RENAMED_KEYS", "SAVE_DTYPES", "TENSORS", "TYPED_KEYS", "as_int",
           "check_int_list", "check_metadata", "check_names", "read", "write"]

FORMAT = "emokern.bank/1"
SAVE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
#: Metadata keys with a known meaning, and the JSON type each must have.
TYPED_KEYS = {
    "method": (str,),
    "source_hash": (str,),
    "emokern_version": (str,),
    "fingerprint": (dict,),
    "default_weight": (int, float),
    "recommended_alpha": (int, float),
    "recommended_layers": (list,),
    "recommended_weights": (dict,),
    "detection_layers": (list,),
    "neutral": (dict,),
    "created": (str,),
}
#: Older metadata key -> its current name (read from older files and arguments, never written).
RENAMED_KEYS = {"recommended_alpha": "default_weight"}
#: The tensors a bank file may hold.
TENSORS = ("vectors", "hidden_norm", "neutral_mean", "neutral_std")


# ------------------------------------------------------------------------------- schema


def as_int(value, message: str) -> int:
    """``value`` as a Python int (numpy and 0-d torch integers too), refusing bools and floats."""
    if isinstance(value, bool):
        fail(TypeError, message)
    try:
        return operator.index(value)
    except TypeError:
        fail(TypeError, message)


def check_int_list(name: str, values, *, unique: bool = True) -> list[int]:
    """``values`` as a list of non-negative ints (layer indices), unique unless told."""
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        fail(TypeError, f"{name} must be a list of ints, got {type(values).__name__}")
    values = [as_int(v, f"{name} must be a list of ints, got an element {v!r}") for v in values]
    for v in values:
        if v < 0:
            fail(ValueError, f"{name} must be non-negative (0-based decoder-layer indices), "
                             f"got {v}")
    if unique and len(set(values)) != len(values):
        dupes = sorted({v for v in values if values.count(v) > 1})
        fail(ValueError, f"{name} must be unique, got duplicates {dupes}")
    return values


def check_names(names) -> list[str]:
    """``names`` as a list of unique non-empty strings."""
    if isinstance(names, (str, bytes)) or not hasattr(names, "__iter__"):
        fail(TypeError, f"names must be a list of str, got {type(names).__name__}")
    names = list(names)
    for n in names:
        if not isinstance(n, str) or not n:
            fail(TypeError, f"names must be non-empty strings, got {n!r}")
    if len(set(names)) != len(names):
        dupes = sorted({n for n in names if names.count(n) > 1})
        fail(ValueError, f"names must be unique, got duplicates {dupes}")
    return names


#: How a recipe expresses an emotion: a push by a weight, or a level (a standard score).
RECIPE_MODES = ("push", "level")
#: Which tokens a recipe steers (the mix scope's positions).
RECIPE_POSITIONS = ("all", "prompt", "generated")


def check_metadata(metadata, layers: list[int]) -> dict:
    """A validated deep copy of ``metadata`` for a bank of decoder ``layers``.

    Every value must be JSON (no NaN); the keys of :data:`TYPED_KEYS` have their types;
    ``default_weight`` is finite; ``recommended_layers``/``detection_layers`` are non-empty
    subsets of ``layers``; each ``recommended_weights`` record (a recipe) has a ``mode`` in
    :data:`RECIPE_MODES` (absent: ``"push"``) with a finite ``weight`` (push) or ``level``
    (level, a standard score), optionally ``positions`` in :data:`RECIPE_POSITIONS` and a
    ``layers`` band inside ``layers``. Older keys (:data:`RENAMED_KEYS`) come
    back under their current name (giving both names with different values is an error).
    """
    if metadata is None:
        return {}
    if not isinstance(metadata, dict):
        fail(TypeError, f"metadata must be a dict, got {type(metadata).__name__}")
    for key, value in metadata.items():
        if not isinstance(key, str):
            fail(TypeError, f"metadata keys must be str, got {key!r}")
        try:
            json.dumps(value, allow_nan=False)
        except (TypeError, ValueError) as exc:
            fail(type(exc), f"metadata[{key!r}] is not JSON-serialisable ({exc})")
        expected = TYPED_KEYS.get(key)
        if expected is not None and (isinstance(value, bool) or not isinstance(value, expected)):
            names = " or ".join(t.__name__ for t in expected)
            fail(TypeError, f"metadata[{key!r}] must be {names}, got {type(value).__name__}")
    for key in ("default_weight", "recommended_alpha"):
        weight = metadata.get(key)
        if weight is not None and not math.isfinite(weight):
            fail(ValueError, f"metadata[{key!r}] must be finite, got {weight}")
    for key in ("recommended_layers", "detection_layers"):
        if key in metadata:
            rec = check_int_list(f"metadata[{key!r}]", metadata[key])
            unknown = [layer for layer in rec if layer not in layers]
            if unknown or not rec:
                fail(ValueError, f"metadata[{key!r}] must be a non-empty subset of the bank's "
                                 f"layers {layers}, got {rec}")
    for name, record in (metadata.get("recommended_weights") or {}).items():
        where = f"metadata['recommended_weights'][{name!r}]"
        mode = record.get("mode", "push") if isinstance(record, dict) else None
        if mode not in RECIPE_MODES:
            fail(ValueError, f"{where} must be a dict whose 'mode' is one of {RECIPE_MODES} "
                             f"(absent: push), got {record!r}")
        key = "weight" if mode == "push" else "level"
        value = record.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not math.isfinite(value):
            fail(ValueError, f"{where} must be a dict with a finite {key!r}, got {record!r}")
        if record.get("positions", "all") not in RECIPE_POSITIONS:
            fail(ValueError, f"{where}['positions'] must be one of {RECIPE_POSITIONS}, got "
                             f"{record.get('positions')!r}")
        if "layers" in record:
            band = check_int_list(f"{where}['layers']", record["layers"])
            if not band or any(layer not in layers for layer in band):
                fail(ValueError, f"{where}['layers'] must be a non-empty subset of the bank's "
                                 f"layers {layers}, got {band}")
    # A JSON round trip is a deep copy that also normalises tuples to lists, so a bank's
    # metadata equals what a saved-and-loaded copy reads back.
    checked = json.loads(json.dumps(metadata))
    for old, new in RENAMED_KEYS.items():
        if old in checked:
            value = checked.pop(old)
            if new in checked and checked[new] != value:
                fail(ValueError, f"metadata gives both {new!r} ({checked[new]}) and its older "
                                 f"name {old!r} ({value}); give {new!r} only")
            checked.setdefault(new, value)
    return checked


# ---------------------------------------------------------------------------------- I/O


def write(path, vectors: torch.Tensor, names: list[str], layers: list[int], metadata: dict, *,
          hidden_norm: torch.Tensor | None = None, neutral_mean: torch.Tensor | None = None,
          neutral_std: torch.Tensor | None = None, dtype: torch.dtype = torch.float32) -> Path:
    """Write a validated bank's fields to ``path`` in the layout above, atomically
    (:func:`emokern.files.atomic_write`: a failure never leaves a partial file nor clobbers an
    existing one). ``vectors`` are stored in ``dtype`` (refused when they overflow it or
    underflow to zero); ``emokern_version`` and ``created`` are added to the stored metadata
    when absent. Returns the path."""
    if dtype not in SAVE_DTYPES:
        fail(TypeError, f"dtype must be torch.float32, torch.float16 or torch.bfloat16, got "
                        f"{dtype!r}")
    path = Path(path)
    if path.is_dir():
        fail(ValueError, f"path {str(path)!r} is a directory; give a file name such as "
                         f"bank.safetensors")
    stored = vectors.detach().to(device="cpu", dtype=dtype).contiguous()
    if not bool(torch.isfinite(stored).all()):
        fail(ValueError, f"vectors overflow {dtype} (largest |value| "
                         f"{vectors.abs().max().item():.3g}); save in float32")
    if not bool((stored.float().norm(dim=-1) > 0).all()):
        fail(ValueError, f"some vectors underflow to zero in {dtype}; save in float32")
    tensors = {"vectors": stored}
    if hidden_norm is not None:
        tensors["hidden_norm"] = hidden_norm.detach().to("cpu", torch.float32)
    if neutral_mean is not None:
        tensors["neutral_mean"] = neutral_mean.to("cpu").contiguous()
        tensors["neutral_std"] = neutral_std.to("cpu").contiguous()
    metadata = dict(metadata)
    metadata.setdefault("emokern_version", __version__)
    metadata.setdefault("created", datetime.now(timezone.utc).isoformat(timespec="seconds"))
    header = {
        "format": FORMAT,
        "names": json.dumps(list(names)),
        "layers": json.dumps(list(layers)),
        "metadata": json.dumps(metadata, allow_nan=False),
    }
    return atomic_write(path, safetensors_save(tensors, metadata=header), mode=0o644)


def invalid(path, reason: str) -> ValueError:
    """The one error of a file that is not a valid bank (naming the file)."""
    return ValueError(f"EmotionBank.load: {str(path)!r} is not a valid emotion bank: {reason}")


def read(path) -> dict:
    """The fields of the bank file at ``path``, as :class:`~emokern.EmotionBank`'s keyword
    arguments: ``vectors`` (float32), ``names``, ``layers``, ``metadata`` (as stored; the
    bank's constructor validates it), ``hidden_norm``, ``neutral_mean``, ``neutral_std``
    (float32 or None), all on the CPU.

    Only safetensors is read (never pickle). A missing file raises FileNotFoundError; a
    truncated or corrupt file, a wrong ``format``, missing header keys or ``vectors``, an
    unknown tensor, unparsable JSON or non-float vectors raise :func:`invalid`'s ValueError.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"EmotionBank.load: no bank file at {str(path)!r}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            header = fh.metadata() or {}
            keys = set(fh.keys())
            tensors = {k: fh.get_tensor(k) for k in keys}
    except Exception as exc:  # safetensors raises its own error types for corrupt files
        raise invalid(path, f"cannot read it as safetensors (truncated or corrupt?): "
                            f"{exc}") from exc
    if header.get("format") != FORMAT:
        raise invalid(path, f"header 'format' is {header.get('format')!r}, expected "
                            f"{FORMAT!r}")
    missing = [k for k in ("names", "layers", "metadata") if k not in header]
    if missing:
        raise invalid(path, f"header lacks {missing}")
    if "vectors" not in keys:
        raise invalid(path, f"no 'vectors' tensor (found {sorted(keys)})")
    extra = keys - set(TENSORS)
    if extra:
        raise invalid(path, f"unexpected tensors {sorted(extra)}")
    try:
        names = json.loads(header["names"])
        layers = json.loads(header["layers"])
        metadata = json.loads(header["metadata"])
    except json.JSONDecodeError as exc:
        raise invalid(path, f"header JSON does not parse: {exc}") from exc
    if not isinstance(metadata, dict):
        raise invalid(path, f"header 'metadata' must be a JSON object, got "
                            f"{type(metadata).__name__}")
    vectors = tensors["vectors"]
    if not vectors.is_floating_point():
        raise invalid(path, f"vectors have dtype {vectors.dtype}")
    fields = {"vectors": vectors.float(), "names": names, "layers": layers, "metadata": metadata}
    for key in ("hidden_norm", "neutral_mean", "neutral_std"):
        value = tensors.get(key)
        fields[key] = None if value is None else value.float()
    return fields

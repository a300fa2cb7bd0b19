r"""llama.cpp control vectors: an emotion mix out as a GGUF file, such files in as a bank.

llama.cpp (``llama-cli``/``llama-server --control-vector FILE``, ``--control-vector-scaled
FILE:S``) adds a fixed vector to the residual stream after chosen transformer blocks. The
file is GGUF with

* ``general.architecture = "controlvector"``,
* ``controlvector.model_hint`` (str): the model's architecture as llama.cpp names it
  (``"llama"``, ``"gemma3"``), informative only (llama.cpp does not check it),
* ``controlvector.layer_count`` (int32): the number of direction tensors,
* one float32 1-D tensor ``direction.N`` of ``n_embd`` values per steered block.

Layer conventions side by side
------------------------------
emokern: the vector of layer ``l`` lives at the output of decoder layer ``l`` (0-based), i.e.
``hidden_states[l + 1]``; steering at ``l`` adds to that output.

llama.cpp: ``direction.N`` is added to the output of block ``N`` (0-based, the ``il`` of the
model's graph, after the block's residual add), for ``N = 1 .. n_layer - 1``; block 0 is
never steered, and ``direction.0`` is rejected by its loader. So **emokern layer ``l`` is
``direction.l``**: the same decoder-layer output in both tools, and a file written here
steers exactly where ``emokern.steer`` would. Only emokern's layer 0 has no counterpart.

Caveat on llama.cpp's own generator (``llama-cvector-generator``): it *measures* the direction
it names ``direction.N`` at the output of block ``N - 1`` (``hidden_states[N]``) and llama.cpp
*adds* it at the output of block ``N``: a shift of one layer between measurement and use.
repeng does the same. Files from those tools are read here by where llama.cpp applies them
(``direction.N`` becomes bank layer ``N``), so steering with the imported bank reproduces what
llama.cpp does with the file.

Mixes and weights
-----------------
A file holds one vector per layer, so the mix is folded in: for a mix of pushes ``{k: w_k}``
(the mix grammar of :mod:`emokern.steering.mix`; levels, caps, floors and erase depend on each
token's projection and cannot be written, nor can ``rec`` of an emotion whose recipe is a
level: one clear error names it and its push weight) over the chosen layers ``L``,

.. math::
    \text{direction.}l = s \sum_k w_k\, v_{l,k}, \qquad
    s = 1/|L|\ (\text{spread="divide"})\ \text{or}\ 1\ (\text{"each"}),

which is what :func:`emokern.steer` adds at layer ``l`` for that mix (``positions="all"``,
``norm_preserving=False``; emokern's default ``spread="divide"``). llama.cpp at strength 1 then
steers as ``emokern.steer(model, bank, [mix], layers=L, spread=spread)`` does; a strength ``S``
(``--control-vector-scaled FILE:S``) multiplies every weight by ``S``. Reading a file back
gives the folded vectors: a bank with one emotion whose weight 1.0 under ``spread="each"`` at
all its layers reproduces llama.cpp at strength 1.

Files are written atomically (:func:`emokern.files.atomic_write`) and read with the ``gguf``
package; anything that is not such a file (a pickle, a model GGUF, a quantized or 2-D
direction, layer 0 or a layer beyond the model) is one ValueError naming the file.
Tested in ``tests/interop/test_llamacpp.py``.
"""

from __future__ import annotations

import argparse
import numbers
import os
import re
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from emokern.bank import EmotionBank
from emokern.errors import failing
from emokern.files import atomic_write
from emokern.steering.config import SteeringConfig
from emokern.steering.mix import asks_rec, format_mix, is_push, mix_to_weights, normalize_mix

fail = failing("emokern.interop")

__all__ = ["ARCHITECTURE", "bank_from_control_vectors", "bank_from_directions", "export_main",
           "mix_directions", "model_hint_for", "read_control_vector", "write_control_vector"]

ARCHITECTURE = "controlvector"
KEY_HINT = f"{ARCHITECTURE}.model_hint"
KEY_LAYER_COUNT = f"{ARCHITECTURE}.layer_count"
_DIRECTION = re.compile(r"direction\.(\d+)")
# transformers' model_type -> llama.cpp's general.architecture, where they differ.
_LLAMACPP_ARCH = {"gemma3_text": "gemma3", "mistral": "llama", "smollm3": "smollm3"}


def model_hint_for(bank: EmotionBank) -> str:
    """llama.cpp's architecture name for the bank's model (``controlvector.model_hint``):
    transformers' ``model_type`` from the bank's fingerprint, renamed where llama.cpp names
    it differently (``gemma3_text`` -> ``gemma3``); ``"unknown"`` without a fingerprint."""
    arch = (bank.fingerprint or {}).get("architecture")
    if not isinstance(arch, str) or not arch:
        return "unknown"
    return _LLAMACPP_ARCH.get(arch, arch)


def _model_layers(bank: EmotionBank) -> int | None:
    count = (bank.fingerprint or {}).get("num_layers")
    return count if isinstance(count, int) and not isinstance(count, bool) else None


def _steered_layers(bank: EmotionBank, layers, spread: str) -> tuple[list[int], float]:
    """``(layers, scale)`` as :func:`emokern.steer` would resolve them (the one place steering
    settings are checked), refusing layer 0, which llama.cpp never steers."""
    n_model = _model_layers(bank) or max(bank.layers) + 1
    config = SteeringConfig.resolve(bank, n_model, layers=layers, spread=spread, monitor=False,
                                    who="emokern.interop")
    if 0 in config.layers:
        fail(ValueError, "layers: layer 0 cannot be exported: llama.cpp never steers the "
                         "output of block 0 (its loader rejects direction.0); choose "
                         "layers >= 1")
    return sorted(config.layers), config.scale


def _push_weights(bank: EmotionBank, mix) -> torch.Tensor:
    """The push weights ``[K]`` of one mix; levels and bounds (``rec`` with a level recipe
    included) are refused, naming the emotion."""
    if not isinstance(mix, (Mapping, str)) or not normalize_mix(mix, who="emokern.interop"):
        fail(ValueError, f"mix must be a non-empty dict of emotion -> weight (e.g. "
                         f"{{'joy': 2.0}}) or mix string ('joy=2'), got {mix!r}")
    given = normalize_mix(mix, bank.names, who="emokern.interop")
    normal = normalize_mix(given, bank.names, recommended=bank.recommended,
                           who="emokern.interop")
    for name, term in normal.items():
        if not is_push(term):
            rec = " (its recipe)" if asks_rec(given[name]) else ""
            fail(ValueError, f"mix[{name!r}] is {format_mix({name: term})!r}{rec}, a level or "
                             f"bound: a llama.cpp control vector adds one fixed vector per "
                             f"layer, so it carries push weights only (a level depends on each "
                             f"token's projection); give a weight, e.g. "
                             f"{name}={bank.recommended_weight(name):g} (the emotion's "
                             f"recommended push weight)")
    return mix_to_weights([normal], bank.names, "mix", who="emokern.interop")[0]


def mix_directions(bank: EmotionBank, mix, *, layers="auto", spread: str = "divide"
                   ) -> dict[int, np.ndarray]:
    r"""The per-layer vectors one shared mix adds: ``{l: s · Σ_k w_k v_{l,k}}``.

    Parameters
    ----------
    bank : EmotionBank
    mix : dict or str
        Pushes in the mix grammar (:mod:`emokern.steering.mix`): emotion -> weight (1.0 = one
        vector as extracted; ``"rec"`` = the emotion's recipe, which must be a push), as a
        dict or a string such as ``"joy=2,fear=0.5"``. Levels, caps, floors and erase depend
        on each token's projection, which a fixed vector cannot: they are refused, and so is
        ``rec`` for an emotion whose recipe is a level (the error gives its push weight,
        :meth:`~emokern.EmotionBank.recommended_weight`, to use instead).
    layers : "auto" or list of int
        Bank layers, each ``>= 1``; ``"auto"`` = ``bank.recommended_layers``.
    spread : {"divide", "each"}
        ``s = 1/len(layers)`` or 1, as in :func:`emokern.steer`.

    Returns
    -------
    dict of int -> ndarray [D] float32
        Sorted by layer; summed in float32 on the CPU. ValueError (nothing written by the
        callers) for a mix whose weights fit float32 but whose summed vector does not.
    """
    weights = _push_weights(bank, mix)
    chosen, scale = _steered_layers(bank, layers, spread)
    out = {}
    for layer in chosen:
        delta = torch.zeros(bank.dim, dtype=torch.float32)
        for k, weight in enumerate(weights.tolist()):
            if weight != 0.0:
                delta += weight * bank.vector(bank.names[k], layer).detach().to("cpu",
                                                                                torch.float32)
        delta *= scale
        if not bool(torch.isfinite(delta).all()):  # weights within float32, their sum beyond
            fail(ValueError, f"mix {mix!r}: the vector it adds at layer {layer} overflows "
                             f"float32 (weights up to {weights.abs().max().item():.3g}); a "
                             f"control vector must be finite: use smaller weights")
        out[layer] = delta.numpy()
    return out


def _gguf_bytes(directions: Mapping[int, np.ndarray], model_hint: str) -> bytes:
    """The GGUF file of ``directions`` as bytes (``gguf`` writes to a path, so a private
    temporary directory holds it until the atomic write)."""
    import gguf  # a dependency of emokern (transformers reads GGUF models with it)

    with tempfile.TemporaryDirectory(prefix="emokern-cvec-") as tmp:
        scratch = Path(tmp) / "control_vector.gguf"
        writer = gguf.GGUFWriter(str(scratch), ARCHITECTURE)
        writer.add_string(KEY_HINT, model_hint)
        writer.add_int32(KEY_LAYER_COUNT, len(directions))
        for layer, vector in sorted(directions.items()):
            writer.add_tensor(f"direction.{layer}",
                              np.ascontiguousarray(vector, dtype=np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        return scratch.read_bytes()


def write_control_vector(bank: EmotionBank, mix, path, *, layers="auto",
                         spread: str = "divide", model_hint: str | None = None) -> Path:
    """Write ``mix`` over ``layers`` of ``bank`` as a llama.cpp control vector, atomically.

    Parameters
    ----------
    bank : EmotionBank
    mix : dict or str
        Emotion -> weight or ``"rec"``, pushes only (see :func:`mix_directions`).
    path : str or PathLike
        The ``.gguf`` file to write (replaced only once completely written).
    layers : "auto" or list of int
        Bank layers ``>= 1`` (llama.cpp never steers block 0); default the bank's recommended
        layers. ``direction.l`` is written for each (see the module docstring).
    spread : {"divide", "each"}
        How weights spread over the layers, folded into the vectors: ``"divide"`` (emokern's
        default) makes llama.cpp at strength 1 steer as ``emokern.steer`` does by default.
    model_hint : str, optional
        ``controlvector.model_hint``; default :func:`model_hint_for` the bank.

    Returns
    -------
    Path
    """
    if not isinstance(bank, EmotionBank):
        fail(TypeError, f"bank must be an EmotionBank, got {type(bank).__name__}")
    if model_hint is None:
        model_hint = model_hint_for(bank)
    if not isinstance(model_hint, str) or not model_hint:
        fail(TypeError, f"model_hint must be a non-empty str, got {model_hint!r}")
    directions = mix_directions(bank, mix, layers=layers, spread=spread)
    total = _model_layers(bank)
    if total is not None and max(directions) >= total:
        fail(ValueError, f"layers: layer {max(directions)} is outside the bank's model, which "
                         f"has {total} decoder layers")
    return atomic_write(path, _gguf_bytes(directions, model_hint))


# -------------------------------------------------------------------------------- reading


def _field_value(reader, key: str):
    """``(value, gguf type name)`` of a scalar or string field, or ``(None, None)``."""
    field = reader.get_field(key)
    if field is None:
        return None, None
    kind = field.types[0].name if field.types else "?"
    try:
        return field.contents(), kind
    except Exception:  # a malformed field: reported by the caller as a wrong type
        return None, kind


def _open(path: Path):
    import gguf

    if not path.is_file():
        fail(FileNotFoundError, f"no control vector file at {str(path)!r}")
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if magic != b"GGUF":
        fail(ValueError, f"{str(path)!r} is not a GGUF file (it starts with {magic!r}); a "
                         f"llama.cpp control vector is GGUF (pickles are never read)")
    try:
        return gguf.GGUFReader(str(path))
    except Exception as exc:  # gguf raises several types for a truncated or corrupt file
        fail(ValueError, f"{str(path)!r} is not a readable GGUF file: {exc}")


def _read(path, num_layers: int | None) -> tuple[dict[int, np.ndarray], str | None]:
    import gguf

    path = Path(path)
    reader = _open(path)
    where = repr(str(path))
    arch, _ = _field_value(reader, "general.architecture")
    if arch != ARCHITECTURE:
        fail(ValueError, f"{where} is not a control vector: general.architecture is "
                         f"{arch!r}, expected {ARCHITECTURE!r}")
    count, kind = _field_value(reader, KEY_LAYER_COUNT)
    if kind is None:
        fail(ValueError, f"{where} has no {KEY_LAYER_COUNT}")
    if isinstance(count, bool) or not isinstance(count, numbers.Integral) or count < 0:
        fail(ValueError, f"{where}: {KEY_LAYER_COUNT} must be a non-negative integer, got "
                         f"{count!r} ({kind})")
    hint, _ = _field_value(reader, KEY_HINT)
    if not reader.tensors:
        fail(ValueError, f"{where} holds no direction tensors")
    directions: dict[int, np.ndarray] = {}
    dim = None
    for tensor in reader.tensors:
        match = _DIRECTION.fullmatch(tensor.name)
        if match is None:
            fail(ValueError, f"{where}: tensor {tensor.name!r} is not named direction.N")
        layer = int(match.group(1))
        if layer == 0:
            fail(ValueError, f"{where}: direction.0 is out of range: llama.cpp never steers "
                             f"block 0 (layers start at 1)")
        if num_layers is not None and layer >= num_layers:
            fail(ValueError, f"{where}: {tensor.name} is out of range for a model of "
                             f"{num_layers} decoder layers (1..{num_layers - 1})")
        if layer in directions:
            fail(ValueError, f"{where}: layer {layer} appears twice ({tensor.name})")
        if tensor.tensor_type != gguf.GGMLQuantizationType.F32:
            fail(ValueError, f"{where}: {tensor.name} is {tensor.tensor_type.name}; control "
                             f"vector directions must be F32")
        if len(tensor.shape) != 1:
            fail(ValueError, f"{where}: {tensor.name} must be 1-D, got shape "
                             f"{[int(n) for n in tensor.shape]}")
        vector = np.array(tensor.data, dtype=np.float32).reshape(-1)
        if dim is None:
            dim = vector.shape[0]
        elif vector.shape[0] != dim:
            fail(ValueError, f"{where}: {tensor.name} has {vector.shape[0]} values, the "
                             f"other directions {dim}")
        if not np.isfinite(vector).all():
            fail(ValueError, f"{where}: {tensor.name} has NaN or inf")
        directions[layer] = vector
    return dict(sorted(directions.items())), hint if isinstance(hint, str) else None


def read_control_vector(path, *, num_layers: int | None = None) -> dict[int, np.ndarray]:
    """Read a llama.cpp control vector: ``{layer: vector}``.

    Parameters
    ----------
    path : str or PathLike
        A GGUF control vector (written by :func:`write_control_vector`, llama.cpp's
        ``llama-cvector-generator``, repeng, ...).
    num_layers : int, optional
        The model's decoder-layer count: a ``direction.N`` with ``N >= num_layers`` is out of
        range.

    Returns
    -------
    dict of int -> ndarray [D] float32
        Keyed by emokern layer, which is llama.cpp's ``N`` (both name the output of decoder
        layer ``N``; see the module docstring), sorted.

    Raises
    ------
    FileNotFoundError
        No such file.
    ValueError
        Not GGUF (a pickle, say), ``general.architecture`` not ``"controlvector"``, no
        integer ``controlvector.layer_count``, a tensor not named ``direction.N`` with
        ``N >= 1`` (and ``< num_layers``), not float32, not 1-D, of another length than the
        others, or not finite.
    """
    return _read(path, num_layers)[0]


def bank_from_directions(directions: Mapping[str, Mapping[int, np.ndarray]], *,
                         metadata: dict | None = None) -> EmotionBank:
    """A bank of named per-layer directions (one emotion each), built through
    :class:`EmotionBank`'s constructor.

    Parameters
    ----------
    directions : dict of str -> dict of int -> array [D]
        Emotion name -> ``{layer: vector}`` (emokern layers); every emotion must cover the
        same layers.
    metadata : dict, optional
        The bank's metadata (e.g. where the vectors came from).

    Returns
    -------
    EmotionBank
        ``vectors [L, K, D]`` float32, the layers sorted; the bank checks finiteness and
        non-zero norms.
    """
    if not isinstance(directions, Mapping) or not directions:
        fail(ValueError, "directions must be a non-empty dict of emotion -> {layer: vector}")
    names = list(directions)
    first = directions[names[0]]
    if not isinstance(first, Mapping) or not first:
        fail(ValueError, f"directions[{names[0]!r}] must be a non-empty dict of layer -> vector")
    layers = sorted(first)
    for name in names[1:]:
        got = directions[name]
        if not isinstance(got, Mapping) or sorted(got) != layers:
            fail(ValueError, f"directions[{name!r}] covers layers "
                             f"{sorted(got) if isinstance(got, Mapping) else got!r}, but "
                             f"{names[0]!r} covers {layers}: every emotion needs the same layers")
    rows = []
    for layer in layers:
        row = []
        for name in names:
            vector = directions[name][layer]
            if isinstance(vector, torch.Tensor):
                vector = vector.detach().to("cpu", torch.float32).numpy()
            row.append(np.asarray(vector, dtype=np.float32).reshape(-1))
        dims = {v.shape[0] for v in row}
        if len(dims) != 1:
            fail(ValueError, f"the vectors of layer {layer} differ in length: {sorted(dims)}")
        rows.append(np.stack(row))
    if len({r.shape[1] for r in rows}) != 1:
        fail(ValueError, "the vectors differ in length between layers")
    vectors = torch.from_numpy(np.stack(rows))
    return EmotionBank(vectors, names, layers, metadata=metadata)


def bank_from_control_vectors(files, *, num_layers: int | None = None) -> EmotionBank:
    """A bank from llama.cpp control vector files, one emotion per file.

    Parameters
    ----------
    files : dict of str -> path, or list of paths
        Emotion name -> file; a list names each emotion by its file's stem
        (``joy.gguf`` -> ``"joy"``). Every file must cover the same layers.
    num_layers : int, optional
        The model's decoder-layer count, to refuse out-of-range layers.

    Returns
    -------
    EmotionBank
        ``bank.vector(name, l)`` is the file's ``direction.l``; metadata records
        ``source = "llama.cpp control vector"``, the files and their model hints.
        Steering it with weight ``S``, ``spread="each"`` over all its layers, does what
        ``--control-vector-scaled FILE:S`` does in llama.cpp.
    """
    if isinstance(files, (str, os.PathLike)):
        files = [files]
    if isinstance(files, Mapping):
        named = {str(k): Path(v) for k, v in files.items()}
    elif isinstance(files, Sequence) and files:
        named = {}
        for f in files:
            stem = Path(f).stem
            if stem in named:
                fail(ValueError, f"two files give the emotion name {stem!r}; pass a dict of "
                                 f"name -> file")
            named[stem] = Path(f)
    else:
        fail(ValueError, f"files must be a dict of emotion -> path or a non-empty list of "
                         f"paths, got {files!r}")
    if not named:
        fail(ValueError, "files is empty")
    directions, hints = {}, {}
    for name, path in named.items():
        directions[name], hints[name] = _read(path, num_layers)
    metadata = {"source": "llama.cpp control vector",
                "files": {name: str(path) for name, path in named.items()},
                "model_hints": hints}
    return bank_from_directions(directions, metadata=metadata)


# -------------------------------------------------------------------------------- CLI


def export_main(args: argparse.Namespace) -> int:
    """``emokern export``: write a bank's mix as a llama.cpp control vector.

    ``args`` holds ``bank`` (an :class:`EmotionBank` or a bank ``.safetensors`` path), ``mix``
    (pushes in the mix grammar: a string such as ``"joy=2,fear=0.5"`` or a non-empty dict),
    ``out`` (the ``.gguf`` path) and optionally ``layers`` (``"auto"``
    or comma-separated ints), ``spread`` (default ``"divide"``) and ``model_hint``. Prints the
    file written and the llama.cpp command line that uses it; returns 0.
    """
    bank = args.bank if isinstance(args.bank, EmotionBank) else EmotionBank.load(args.bank)
    layers = getattr(args, "layers", None) or "auto"
    if isinstance(layers, str) and layers != "auto":
        try:
            layers = [int(x) for x in layers.split(",") if x.strip()]
        except ValueError:
            fail(ValueError, f"--layers must be 'auto' or comma-separated ints, got {layers!r}")
    spread = getattr(args, "spread", None) or "divide"
    hint = getattr(args, "model_hint", None) or model_hint_for(bank)
    chosen, _ = _steered_layers(bank, layers, spread)
    path = write_control_vector(bank, args.mix, args.out, layers=chosen, spread=spread,
                                model_hint=hint)
    mix = format_mix(normalize_mix(args.mix, bank.names, recommended=bank.recommended,
                                   who="emokern.interop"))
    print(f"emokern export: wrote {path} (mix {mix}, layers {chosen}, spread={spread}, "
          f"model hint {hint!r})")
    print(f"  use it with: llama-cli -m MODEL.gguf --control-vector {path}")
    return 0

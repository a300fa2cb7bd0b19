"""EmotionBank: per-layer emotion vectors of one model, with metadata, stored in safetensors.

Layer convention
----------------
Layers are 0-based decoder-layer indices. The vector of layer ``l`` lives in the residual
stream at the *output* of decoder layer ``l``, i.e. ``hidden_states[l + 1]`` of a transformers
forward with ``output_hidden_states=True`` (``hidden_states[0]`` is the embedding output).
Steering at layer ``l`` adds to the output of decoder layer ``l``.

File format
-----------
A safetensors file (never a pickle); its layout, metadata schema and safe I/O live in
:mod:`emokern.bankfile`. Tested in ``tests/test_bank.py``.
"""

from __future__ import annotations

import json
import operator
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from emokern import bankfile
from emokern.bankfile import SAVE_DTYPES, check_int_list, check_metadata, check_names
from emokern.data import BANKS_DIR
from emokern.errors import failing
from emokern.models import BUILTIN_MODELS, DEFAULT_MODEL, decoder_layers, model_fingerprint

fail = failing("EmotionBank")

METHODS = ("ev", "concept")
_FINGERPRINT_FIELDS = (
    ("architecture", "architecture"),
    ("hidden_size", "hidden size"),
    ("num_layers", "layer count"),
    ("vocab_size", "vocabulary size"),
    ("embedding_hash", "input-embedding hash"),
)


@dataclass(frozen=True)
class Recipe:
    r"""How to express one emotion on the bank's model, as measured by a sweep
    (:func:`emokern.eval.recommend.choose`), or the bank-wide default push when unmeasured.

    Attributes
    ----------
    emotion : str
    mode : {"push", "level"}
        ``push``: add ``strength`` times the vector (:math:`x + w v`); ``level``: set the
        token's projection to the standard score ``strength`` against the bank's neutral
        baseline (:math:`\langle y, u\rangle = \mu + z\sigma` at every steered layer).
    strength : float
        The weight (push) or the level ``z``.
    layers : tuple of int
        The layer band it steers.
    positions : {"all", "prompt", "generated"}
        The tokens it steers.
    measured : dict
        What the sweep measured at the choice (judge gain, adherence ratio, distinct-2,
        perplexity, prompts, ...); empty for the default push.
    bank_layers : tuple of int
        The bank's recommended layers (where a steerer steers by default): a recipe on exactly
        those carries no layer scope in its :meth:`mix_term`.
    """

    emotion: str
    mode: str
    strength: float
    layers: tuple[int, ...]
    positions: str = "all"
    measured: dict = field(default_factory=dict, compare=False)
    bank_layers: tuple[int, ...] = field(default=(), compare=False)

    def mix_term(self) -> float | dict:
        """The recipe as a mix value: the weight, or ``{"level": z}``, with its layers and
        positions (the mix's scope, :mod:`emokern.steering.mix`) where they are not the bank's
        recommended layers and every token: ``{"weight": 1.0, "layers": [14], "positions":
        "generated"}``."""
        term = {"weight" if self.mode == "push" else "level": float(self.strength)}
        if set(self.layers) != set(self.bank_layers):
            term["layers"] = sorted(self.layers)
        if self.positions != "all":
            term["positions"] = self.positions
        return term["weight"] if set(term) == {"weight"} else term


def _check_neutral(mean, std, n_layers: int, n_names: int, device):
    if mean is None and std is None:
        return None, None
    if mean is None or std is None:
        fail(ValueError, "neutral_mean and neutral_std go together: give both or neither")
    checked = []
    for name, value in (("neutral_mean", mean), ("neutral_std", std)):
        if not isinstance(value, torch.Tensor):
            fail(TypeError, f"{name} must be a torch.Tensor, got {type(value).__name__}")
        if not value.is_floating_point():
            fail(TypeError, f"{name} must be floating point, got {value.dtype}")
        if tuple(value.shape) != (n_layers, n_names):
            fail(ValueError, f"{name} must have shape [{n_layers}, {n_names}] (layers x emotions), "
                             f"got {list(value.shape)}")
        if not bool(torch.isfinite(value).all()):
            fail(ValueError, f"{name} must be finite")
        checked.append(value.detach().to(device=device, dtype=torch.float32))
    if not bool((checked[1] > 0).all()):
        fail(ValueError, "neutral_std must be positive (a spread of zero makes standard scores "
                         "infinite)")
    return checked[0], checked[1]


class EmotionBank:
    r"""Emotion vectors of one model: K named emotions at L decoder layers, D dims each.

    Parameters
    ----------
    vectors : Tensor [L, K, D]
        Floating point (float32 from extraction; :meth:`to` may give float16/bfloat16), finite,
        no vector of zero norm (a steering vector needs a direction).
    names : list of str
        K unique emotion names, in the order of ``vectors``' second axis.
    layers : list of int
        L unique 0-based decoder-layer indices. ``vectors[i]`` belongs to the residual stream
        at the output of decoder layer ``layers[i]``, i.e. ``hidden_states[layers[i] + 1]`` of
        a transformers forward with ``output_hidden_states=True``.
    hidden_norm : Tensor [L], optional
        Per-layer mean L2 norm of the hidden states seen during extraction (float32, > 0);
        the scale against which a vector's size is judged.
    neutral_mean, neutral_std : Tensor [L, K], optional (both or neither)
        The neutral baseline of the readings: per layer and emotion, the mean projection
        :math:`\mu_{l,k}` of neutral responses' tokens on the unit direction of
        ``vectors[l, k]`` and the spread :math:`\sigma_{l,k} > 0` of the per-response mean
        projection over neutral responses (:meth:`standardize` turns readings into
        standard scores against them).
    metadata : dict, optional
        str -> JSON-able values. Known keys: ``method`` ("ev" or "concept"), ``source_hash``
        (hash of the prompt set), ``emokern_version``, ``fingerprint`` (the model's
        :func:`emokern.models.model_fingerprint`), ``default_weight`` (float: the
        bank-wide default weight; ``recommended_alpha`` in older files is read as it),
        ``recommended_layers`` (list of bank layers), ``recommended_weights`` (emotion ->
        ``{"weight": float, "layers": [...], ...}``: the per-emotion recommendation),
        ``detection_layers`` (the bank layers whose readings detect emotions best),
        ``neutral`` (how the neutral baseline was measured), ``created`` (ISO time); anything
        else is kept as free-form extras (e.g. ``centered``, ``instruction``).

    Raises
    ------
    TypeError, ValueError
        One clear error naming the first bad argument.
    """

    def __init__(self, vectors, names, layers, *, hidden_norm=None, metadata=None,
                 neutral_mean=None, neutral_std=None):
        names = check_names(names)
        layers = check_int_list("layers", layers)
        if not isinstance(vectors, torch.Tensor):
            fail(TypeError, f"vectors must be a torch.Tensor, got {type(vectors).__name__}")
        if vectors.dtype not in SAVE_DTYPES:
            fail(TypeError, f"vectors must be float32, float16 or bfloat16, got {vectors.dtype}")
        if vectors.dim() != 3:
            fail(ValueError, f"vectors must be [L, K, D], got shape {list(vectors.shape)}")
        n_layers, n_names, dim = vectors.shape
        if not names or not layers:
            fail(ValueError, f"a bank needs at least one emotion and one layer, got {len(names)} "
                             f"names and {len(layers)} layers")
        if n_layers != len(layers) or n_names != len(names) or dim < 1:
            fail(ValueError, f"vectors has shape {list(vectors.shape)} but there are {len(layers)} "
                             f"layers and {len(names)} names (expected [{len(layers)}, "
                             f"{len(names)}, D >= 1])")
        norms = vectors.detach().float().norm(dim=-1)
        if not bool(torch.isfinite(vectors).all()):
            bad = (~torch.isfinite(vectors).all(dim=-1)).nonzero()[0].tolist()
            fail(ValueError, f"vectors must be finite; the vector of {names[bad[1]]!r} at layer "
                             f"{layers[bad[0]]} has NaN or inf")
        if not bool((norms > 0).all()):
            bad = (norms <= 0).nonzero()[0].tolist()
            fail(ValueError, f"the vector of {names[bad[1]]!r} at layer {layers[bad[0]]} has zero "
                             "norm; an emotion vector needs a direction")
        if hidden_norm is not None:
            if not isinstance(hidden_norm, torch.Tensor):
                fail(TypeError, "hidden_norm must be a torch.Tensor, got "
                                f"{type(hidden_norm).__name__}")
            if not hidden_norm.is_floating_point():
                fail(TypeError, f"hidden_norm must be floating point, got {hidden_norm.dtype}")
            if tuple(hidden_norm.shape) != (n_layers,):
                fail(ValueError, f"hidden_norm must have shape [{n_layers}] (one per layer), got "
                                 f"{list(hidden_norm.shape)}")
            if not bool((torch.isfinite(hidden_norm) & (hidden_norm > 0)).all()):
                fail(ValueError, "hidden_norm must be finite and positive")
            hidden_norm = hidden_norm.detach().to(device=vectors.device, dtype=torch.float32)
        neutral_mean, neutral_std = _check_neutral(neutral_mean, neutral_std, n_layers,
                                                   n_names, vectors.device)
        self._metadata = check_metadata(metadata, layers)
        self._neutral_mean = neutral_mean
        self._neutral_std = neutral_std
        self._vectors = vectors.detach()
        self._names = names
        self._layers = layers
        self._hidden_norm = hidden_norm
        self._index = {n: i for i, n in enumerate(names)}

    # ---------------------------------------------------------------------------------------
    # Read-only views
    # ---------------------------------------------------------------------------------------

    @property
    def vectors(self) -> torch.Tensor:
        """Tensor [L, K, D]."""
        return self._vectors

    @property
    def names(self) -> list[str]:
        """The K emotion names (a copy)."""
        return list(self._names)

    @property
    def layers(self) -> list[int]:
        """The L decoder-layer indices (a copy); see the class docstring for the convention."""
        return list(self._layers)

    @property
    def hidden_norm(self) -> torch.Tensor | None:
        """Tensor [L] float32 of mean hidden-state norms at extraction, or None."""
        return self._hidden_norm

    @property
    def metadata(self) -> dict:
        """The metadata dict (a deep copy: editing it does not change the bank)."""
        return json.loads(json.dumps(self._metadata))

    @property
    def method(self) -> str | None:
        """Extraction method ("ev" or "concept"), or None when unrecorded."""
        return self._metadata.get("method")

    @property
    def fingerprint(self) -> dict | None:
        """The fingerprint of the model the bank was extracted from, or None."""
        fp = self._metadata.get("fingerprint")
        return dict(fp) if fp is not None else None

    @property
    def default_weight(self) -> float:
        """The bank-wide default weight (of a single emotion; ``metadata["default_weight"]``,
        ``"recommended_alpha"`` in older files): 1.0 when unrecorded, i.e. adding the vector
        as extracted. :meth:`recommended_weight` falls back to it."""
        return float(self._metadata.get("default_weight", 1.0))

    @property
    def recommended_alpha(self) -> float:
        """Deprecated name of :attr:`default_weight`."""
        return self.default_weight

    @property
    def recommended_layers(self) -> list[int]:
        """Recommended layers to steer; the middle bank layer when unrecorded."""
        rec = self._metadata.get("recommended_layers")
        if rec:
            return list(rec)
        return [self._layers[len(self._layers) // 2]]

    def recommended_weight(self, name: str) -> float:
        """The recommended push weight of emotion ``name``: its own, measured by the
        per-emotion sweep (``metadata["recommended_weights"]``), else (unmeasured, or its
        recipe is a level: :meth:`recommended`) the bank-wide :attr:`default_weight`. Unknown
        names raise ValueError."""
        self.index(name)
        record = (self._metadata.get("recommended_weights") or {}).get(name)
        if record is not None and record.get("mode", "push") == "push":
            return float(record["weight"])
        return self.default_weight

    def recommended(self, name: str) -> Recipe:
        """How to express emotion ``name`` on this model: its :class:`Recipe` (mode, strength,
        layer band, positions) as the per-emotion sweep chose it, else a push at
        :attr:`default_weight` on :attr:`recommended_layers`. ``"anger=rec"`` in a mix uses it.

        Examples
        --------
        >>> bank = EmotionBank.load_default()
        >>> bank.recommended("joy").mode in ("push", "level")
        True
        """
        self.index(name)
        record = (self._metadata.get("recommended_weights") or {}).get(name)
        band = tuple(self.recommended_layers)
        if record is None:
            return Recipe(name, "push", self.default_weight, band, bank_layers=band)
        mode = record.get("mode", "push")
        measured = {k: v for k, v in record.items()
                    if k not in ("mode", "weight", "level", "layers", "positions")}
        return Recipe(name, mode, float(record["weight" if mode == "push" else "level"]),
                      tuple(record.get("layers") or band), record.get("positions", "all"),
                      measured, band)

    def recipe_layers(self, names=None) -> list[int]:
        """The layers the recipes of ``names`` (default: every emotion) steer beyond
        :attr:`recommended_layers`, sorted: what a steerer with ``layers="auto"`` steers
        besides those, so that every ``rec`` can be honoured."""
        band = set(self.recommended_layers)
        extra = {layer for name in (self.names if names is None else names)
                 for layer in self.recommended(name).layers} - band
        return sorted(extra)

    @property
    def recommended_weights(self) -> dict[str, dict]:
        """The per-emotion recommendations (emotion -> ``{"weight", "layers", ...}``; a copy,
        empty when unrecorded)."""
        return json.loads(json.dumps(self._metadata.get("recommended_weights") or {}))

    @property
    def detection_layers(self) -> list[int]:
        """Layers whose readings tell emotions apart best (``metadata["detection_layers"]``,
        chosen on held-out sentences); :attr:`recommended_layers` when unrecorded."""
        rec = self._metadata.get("detection_layers")
        return list(rec) if rec else self.recommended_layers

    @property
    def calibrated(self) -> bool:
        """Whether the bank has a neutral baseline (readings in standard scores)."""
        return self._neutral_mean is not None

    @property
    def neutral_mean(self) -> torch.Tensor | None:
        """Tensor [L, K] float32: mean projection of neutral text, or None."""
        return self._neutral_mean

    @property
    def neutral_std(self) -> torch.Tensor | None:
        """Tensor [L, K] float32: spread of neutral responses' mean projections, or None."""
        return self._neutral_std

    def neutral_stats(self, layers) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mean [L', K], std [L', K])`` of the neutral baseline at decoder ``layers``.

        Raises
        ------
        ValueError
            When the bank has no neutral baseline, or a layer is not in the bank.
        """
        if not self.calibrated:
            fail(ValueError, "the bank has no neutral baseline (neutral_mean/neutral_std); "
                             "compute one with emokern.extract.neutral_baseline")
        if isinstance(layers, int) and not isinstance(layers, bool):
            layers = [layers]
        idx = torch.tensor([self.layer_index(layer) for layer in layers], dtype=torch.long,
                           device=self._neutral_mean.device)
        return self._neutral_mean.index_select(0, idx), self._neutral_std.index_select(0, idx)

    def standardize(self, projections: torch.Tensor, layers, names=None) -> torch.Tensor:
        r"""Raw readings as standard scores against the neutral baseline.

        .. math:: z_{\dots,l,k} = (p_{\dots,l,k} - \mu_{l,k}) / \sigma_{l,k}

        0 reads as neutral text, +2 as two neutral spreads above it.

        Parameters
        ----------
        projections : Tensor [..., L', K']
            Raw projections on the unit directions (what the monitor reads), at ``layers``.
        layers : list of int
            The L' decoder layers of the second-to-last axis.
        names : list of str, optional
            The K' emotions of the last axis (default all of the bank's, in order).

        Returns
        -------
        Tensor [..., L', K'] float32
        """
        mean, std = self.neutral_stats(layers)
        if names is not None:
            cols = torch.tensor([self.index(n) for n in names], dtype=torch.long,
                                device=mean.device)
            mean, std = mean.index_select(1, cols), std.index_select(1, cols)
        if projections.shape[-2:] != mean.shape:
            fail(ValueError, f"projections must end in [{mean.shape[0]}, {mean.shape[1]}] (layers "
                             f"x emotions), got {list(projections.shape)}")
        return (projections.float() - mean.to(projections.device)) / std.to(projections.device)

    def replace(self, *, metadata=None, neutral_mean=None, neutral_std=None) -> EmotionBank:
        """A copy with new ``metadata`` (merged over the current one) and/or a new neutral
        baseline; the vectors are shared, unchanged."""
        meta = self.metadata
        meta.update(metadata or {})
        if neutral_mean is None and neutral_std is None:
            neutral_mean, neutral_std = self._neutral_mean, self._neutral_std
        return EmotionBank(self._vectors, self._names, self._layers,
                           hidden_norm=self._hidden_norm, metadata=meta,
                           neutral_mean=neutral_mean, neutral_std=neutral_std)

    @property
    def n_emotions(self) -> int:
        """K."""
        return len(self._names)

    @property
    def n_layers(self) -> int:
        """L."""
        return len(self._layers)

    @property
    def dim(self) -> int:
        """D, the hidden size."""
        return int(self._vectors.shape[-1])

    @property
    def device(self) -> torch.device:
        return self._vectors.device

    @property
    def dtype(self) -> torch.dtype:
        return self._vectors.dtype

    def __len__(self) -> int:
        return len(self._names)

    def __contains__(self, name) -> bool:
        return name in self._index

    def __repr__(self) -> str:
        fp = self._metadata.get("fingerprint") or {}
        model = fp.get("architecture", "?")
        return (f"EmotionBank(method={self.method!r}, model={model!r}, "
                f"emotions={self.n_emotions} {self._names[:6]}"
                f"{'...' if self.n_emotions > 6 else ''}, layers={self._layers}, D={self.dim}, "
                f"dtype={self.dtype}, device={self.device})")

    # ---------------------------------------------------------------------------------------
    # Lookup and selection
    # ---------------------------------------------------------------------------------------

    def index(self, name: str) -> int:
        """Position of emotion ``name`` on the K axis."""
        try:
            return self._index[name]
        except (KeyError, TypeError):
            fail(ValueError, f"unknown emotion {name!r}; the bank has {self._names}")

    def layer_index(self, layer: int) -> int:
        """Position of decoder layer ``layer`` on the L axis."""
        message = f"unknown layer {layer!r}; the bank has layers {self._layers}"
        try:
            as_int = None if isinstance(layer, bool) else operator.index(layer)
        except TypeError:
            as_int = None
        if as_int is None or as_int not in self._layers:
            fail(ValueError, message)
        return self._layers.index(as_int)

    def vector(self, name: str, layer: int) -> torch.Tensor:
        """The vector [D] of emotion ``name`` at decoder layer ``layer`` (a view)."""
        return self._vectors[self.layer_index(layer), self.index(name)]

    def layer_vectors(self, layer: int) -> torch.Tensor:
        """All K vectors [K, D] at decoder layer ``layer`` (a view), in ``names`` order."""
        return self._vectors[self.layer_index(layer)]

    def select(self, names=None, layers=None) -> EmotionBank:
        """A bank with only ``names`` and ``layers``, in the order given (None keeps all).

        Unknown names or layers raise one ValueError listing the valid ones. The metadata is
        kept; ``recommended_layers`` is restricted to the kept layers (dropped if none remain).
        """
        if names is None:
            names = self._names
        elif isinstance(names, str):
            names = [names]
        names = check_names(names)
        unknown = [n for n in names if n not in self._index]
        if unknown:
            fail(ValueError, f"unknown emotions {unknown}; the bank has {self._names}")
        if layers is None:
            layers = self._layers
        elif not hasattr(layers, "__iter__"):
            layers = [layers]
        layers = check_int_list("layers", layers)
        missing = [layer for layer in layers if layer not in self._layers]
        if missing:
            fail(ValueError, f"unknown layers {missing}; the bank has layers {self._layers}")
        if not names or not layers:
            fail(ValueError, "select needs at least one emotion and one layer")
        li = torch.tensor([self._layers.index(layer) for layer in layers],
                          device=self._vectors.device)
        ki = torch.tensor([self._index[n] for n in names], device=self._vectors.device)
        vectors = self._vectors.index_select(0, li).index_select(1, ki).clone()
        hidden = None if self._hidden_norm is None else self._hidden_norm.index_select(0, li)
        metadata = self.metadata
        for key in ("recommended_layers", "detection_layers"):
            if key in metadata:
                kept = [layer for layer in metadata[key] if layer in layers]
                if kept:
                    metadata[key] = kept
                else:
                    del metadata[key]
        if "recommended_weights" in metadata:
            weights = {}
            for name, record in metadata["recommended_weights"].items():
                if name not in names:
                    continue
                if "layers" in record:
                    record["layers"] = [layer for layer in record["layers"] if layer in layers]
                    if not record["layers"]:
                        del record["layers"]
                weights[name] = record
            metadata["recommended_weights"] = weights
        mean = std = None
        if self.calibrated:
            mean = self._neutral_mean.index_select(0, li).index_select(1, ki)
            std = self._neutral_std.index_select(0, li).index_select(1, ki)
        return EmotionBank(vectors, names, layers, hidden_norm=hidden, metadata=metadata,
                           neutral_mean=mean, neutral_std=std)

    def to(self, device=None, dtype=None) -> EmotionBank:
        """A copy on ``device`` with vectors in ``dtype`` (float32/float16/bfloat16);
        ``hidden_norm`` stays float32."""
        if dtype is not None and dtype not in SAVE_DTYPES:
            fail(TypeError, f"dtype must be float32, float16 or bfloat16, got {dtype!r}")
        vectors = self._vectors.to(device=device, dtype=dtype)
        if vectors is self._vectors:
            vectors = vectors.clone()
        hidden = None if self._hidden_norm is None else self._hidden_norm.to(device=device)
        mean = None if self._neutral_mean is None else self._neutral_mean.to(device=device)
        std = None if self._neutral_std is None else self._neutral_std.to(device=device)
        return EmotionBank(vectors, self._names, self._layers, hidden_norm=hidden,
                           metadata=self._metadata, neutral_mean=mean, neutral_std=std)

    # ---------------------------------------------------------------------------------------
    # Statistics
    # ---------------------------------------------------------------------------------------

    def norms(self) -> torch.Tensor:
        """L2 norms [L, K] float32: ``norms[i, k] = ||vectors[i, k]||``."""
        return self._vectors.float().norm(dim=-1)

    def cosine(self, layer: int) -> torch.Tensor:
        """Cosine similarities [K, K] float32 of the vectors at decoder layer ``layer``:
        ``C[j, k] = <v_j, v_k> / (||v_j|| ||v_k||)``."""
        v = self.layer_vectors(layer).float()
        unit = v / v.norm(dim=-1, keepdim=True)
        return unit @ unit.T

    # ---------------------------------------------------------------------------------------
    # Compatibility with a model
    # ---------------------------------------------------------------------------------------

    def check_compatible(self, model, *, strict: bool = True) -> None:
        """Raise ValueError if the bank does not belong to ``model``.

        Always checks that the model's hidden size equals D and that every bank layer exists
        in the model. With a recorded fingerprint it also compares architecture, hidden size,
        layer count, vocabulary size and (if ``strict``) the input-embedding hash, which tells
        apart two models of the same shape. All differences are reported in one message.
        """

        try:
            current = model_fingerprint(model)
        except (AttributeError, NotImplementedError) as exc:
            fail(TypeError, f"cannot fingerprint the model ({type(model).__name__}): {exc}")
        problems = []
        recorded = self._metadata.get("fingerprint")
        if recorded:
            for key, label in _FINGERPRINT_FIELDS:
                if key == "embedding_hash" and not strict:
                    continue
                if key in recorded and recorded[key] != current[key]:
                    problems.append(f"{label}: bank {recorded[key]!r}, model {current[key]!r}")
        if current["hidden_size"] != self.dim and not any("hidden" in p for p in problems):
            problems.append(f"hidden size: bank vectors have D = {self.dim}, model "
                            f"{current['hidden_size']}")
        n_model = len(decoder_layers(model))
        outside = [layer for layer in self._layers if layer >= n_model]
        if outside:
            problems.append(f"layers {outside} do not exist in the model (it has {n_model} "
                            f"decoder layers, 0..{n_model - 1})")
        if problems:
            what = f"{recorded.get('architecture')} {recorded.get('model_class', '')}".strip() \
                if recorded else "another model"
            fail(ValueError, f"bank (extracted from {what}) is not compatible with this "
                             f"{type(model).__name__}: " + "; ".join(problems))

    # ---------------------------------------------------------------------------------------
    # Files
    # ---------------------------------------------------------------------------------------

    def save(self, path, *, dtype: torch.dtype = torch.float32) -> Path:
        """Write the bank to a safetensors file, atomically (:func:`emokern.bankfile.write`).

        The bytes go to a temporary file in the same directory, which replaces ``path`` only
        once completely written and flushed, so a failure never leaves a partial file nor
        clobbers an existing bank. ``emokern_version`` and ``created`` are added to the saved
        metadata when absent.

        Parameters
        ----------
        path : str or PathLike
        dtype : torch.float32, torch.float16 or torch.bfloat16
            Storage dtype of the vectors (float16 halves the size of shipped banks);
            ``load`` always returns float32.

        Returns
        -------
        Path
        """
        return bankfile.write(path, self._vectors, self._names, self._layers, self.metadata,
                              hidden_norm=self._hidden_norm, neutral_mean=self._neutral_mean,
                              neutral_std=self._neutral_std, dtype=dtype)

    @classmethod
    def load(cls, path, *, device="cpu") -> EmotionBank:
        """Read a bank saved by :meth:`save`; vectors are returned as float32 on ``device``.

        Only safetensors is read (never pickle; :func:`emokern.bankfile.read`). A missing file
        raises FileNotFoundError; a truncated or corrupt file, missing keys or metadata, shapes
        that do not match the names and layers, or non-finite values raise one ValueError
        naming the file. Files of older versions (metadata ``recommended_alpha``) load too.
        """
        fields = bankfile.read(path)
        for key, value in fields.items():
            if isinstance(value, torch.Tensor):
                fields[key] = value.to(device)
        try:
            return cls(**fields)
        except (TypeError, ValueError) as exc:
            raise bankfile.invalid(path, str(exc).removeprefix("EmotionBank: ")) from exc

    @classmethod
    def default_path(cls, method: str = "ev", *, model: str = DEFAULT_MODEL) -> Path:
        """Path of the shipped bank of built-in ``model`` (``"default"``, ``"gemma3-270m"``)
        for ``method`` ("ev" or "concept"): ``emokern/data/banks/<model>-<method>.safetensors``."""
        if method not in METHODS:
            fail(ValueError, f"method must be one of {METHODS}, got {method!r}")
        if model not in BUILTIN_MODELS:
            fail(ValueError, f"model must be one of {BUILTIN_MODELS}, got {model!r}")
        return BANKS_DIR / f"{model}-{method}.safetensors"

    @classmethod
    def load_default(cls, method: str = "ev", *, model: str = DEFAULT_MODEL,
                     device="cpu") -> EmotionBank:
        """The shipped bank of a built-in model (default: SmolLM2-135M-Instruct; also
        ``model="gemma3-270m"``).

        ``method`` is ``"ev"`` (emotion-conditioned vs neutral responses) or ``"concept"``
        (emotion-concept word sets). The files live in ``emokern/data/banks/``.
        """
        path = cls.default_path(method, model=model)
        if not path.is_file():
            raise FileNotFoundError(
                f"EmotionBank.load_default: the shipped bank {str(path)!r} is missing; "
                f"rebuild it with `emokern prepare --model {model}` or reinstall emokern"
            )
        return cls.load(path, device=device)

    @classmethod
    def named(cls, spec: str | os.PathLike, *, device="cpu") -> EmotionBank:
        """A bank as every command and the vLLM plugin name it: ``"default"`` or ``"ev"`` (the
        default model's shipped EV bank), ``"concept"`` (its concept bank),
        ``"<model>-<method>"`` (a built-in model's shipped bank, e.g. ``"gemma3-270m-ev"``), or
        the path of a bank file.

        Raises
        ------
        ValueError
            ``spec`` is none of these.
        """
        text = str(spec)
        if text in ("default", *METHODS):
            return cls.load_default("ev" if text == "default" else text, device=device)
        for model in BUILTIN_MODELS:
            for method in METHODS:
                if text == f"{model}-{method}":
                    return cls.load_default(method, model=model, device=device)
        if not Path(text).expanduser().is_file():
            shipped = ", ".join(f"'{m}-{k}'" for m in BUILTIN_MODELS for k in METHODS)
            fail(ValueError, f"bank must be 'default', 'ev', 'concept', a shipped bank ({shipped}) "
                             f"or a bank file; {text!r} is none of these")
        return cls.load(Path(text).expanduser(), device=device)

    # ---------------------------------------------------------------------------------------
    # Reports
    # ---------------------------------------------------------------------------------------

    def summary(self) -> str:
        """A human-readable report: metadata, names, per-layer vector norms and hidden norms."""
        lines = [repr(self), "", "metadata:"]
        meta = self._metadata
        for key in sorted(meta):
            value = meta[key]
            if key == "fingerprint" and isinstance(value, dict):
                value = ", ".join(f"{k}={v}" for k, v in value.items())
            lines.append(f"  {key}: {value}")
        if not meta:
            lines.append("  (none)")
        lines += ["", f"emotions ({self.n_emotions}): {', '.join(self._names)}",
                  f"recommended: default weight={self.default_weight:g}, "
                  f"layers={self.recommended_layers}"]
        per_emotion = self._metadata.get("recommended_weights") or {}
        if per_emotion:
            lines.append("per emotion: " + ", ".join(
                f"{n}={r['weight']:g}" for n, r in per_emotion.items()))
        lines += [f"readings: {'calibrated (neutral baseline)' if self.calibrated else 'raw'}, "
                  f"detection layers {self.detection_layers}", ""]
        norms = self.norms().cpu()
        lines.append(f"{'layer':>5}  {'hidden':>8}  {'|v| min':>8}  {'|v| mean':>8}  "
                     f"{'|v| max':>8}  {'mean |v|/hidden':>15}")
        for i, layer in enumerate(self._layers):
            row = norms[i]
            if self._hidden_norm is not None:
                h = float(self._hidden_norm[i])
                hidden_txt, ratio_txt = f"{h:8.3g}", f"{float(row.mean()) / h:15.3g}"
            else:
                hidden_txt, ratio_txt = f"{'-':>8}", f"{'-':>15}"
            lines.append(f"{layer:>5}  {hidden_txt}  {float(row.min()):8.3g}  "
                         f"{float(row.mean()):8.3g}  {float(row.max()):8.3g}  {ratio_txt}")
        return "\n".join(lines)

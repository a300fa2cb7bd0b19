r"""From mean hidden states to a bank: centring, pairwise cosines, the recommended steering
weight and layers, and the :class:`~emokern.bank.EmotionBank` itself.

The recommendation comes from the calibration record (``emokern/data/calibration.json``, read
through :func:`emokern.data.load_calibration`), written by the calibration sweep
(``emokern calibrate sweep --write``, :mod:`emokern.eval.calibration_sweep`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from emokern.bank import EmotionBank
from emokern.data import load_calibration
from emokern.version import __version__

__all__ = ["center_vectors", "emokern_version", "make_bank", "pairwise_cosines", "recommend"]


def center_vectors(vectors: torch.Tensor) -> torch.Tensor:
    r"""Remove the component shared by all emotions: :math:`v_{l,k} - \frac1K\sum_j v_{l,j}`.

    Parameters
    ----------
    vectors : Tensor [L, K, D] with K >= 2

    Returns
    -------
    Tensor [L, K, D], summing to zero over K.
    """
    if vectors.dim() != 3 or vectors.shape[1] < 2:
        raise ValueError(f"vectors must be [L, K, D] with K >= 2 to be centred, got shape "
                         f"{list(vectors.shape)}")
    return vectors - vectors.mean(dim=1, keepdim=True)


def pairwise_cosines(vectors: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of every pair of emotions at every layer: ``[L, K, D] -> [L, K, K]``."""
    unit = vectors / vectors.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return unit @ unit.transpose(1, 2)


def emokern_version() -> str:
    """The installed emokern's version, recorded in every bank's metadata."""
    return __version__


def recommend(vectors: torch.Tensor, layers: Sequence[int], hidden_norm: torch.Tensor,
              num_layers: int, method: str, centered: bool, fingerprint: dict) -> dict:
    r"""Recommended steering weight and layers for a new bank, from the calibration record.

    When the calibration was measured on the same model (same fingerprint), method and
    centring, its values are used as they are. Otherwise they are transferred: the layer at the
    same relative depth (nearest extracted layer), and the weight that gives the same relative
    steering strength :math:`w\,\overline{\lVert v_{l}\rVert}/\overline{\lVert h_l\rVert}`
    (weight :math:`w` times the mean vector norm over emotions, relative to the mean hidden
    norm). A transferred value is a
    starting point only; calibrate the bank on its own model for real use.

    Parameters
    ----------
    vectors : Tensor [L, K, D]
    layers : L ints
        The decoder layers of ``vectors``' rows.
    hidden_norm : Tensor [L]
    num_layers : int
        Decoder layers of the model.
    method : {"ev", "concept"}
    centered : bool
    fingerprint : dict
        :func:`emokern.models.model_fingerprint` of the model.

    Returns
    -------
    dict
        The bank metadata: ``default_weight`` (float, the bank-wide default weight: the
        key the bank file reads), ``recommended_layers`` (list of int) and ``recommendation``
        ("calibrated", "transferred" or "heuristic").
    """
    record = load_calibration().get(method, {})
    same = (record.get("fingerprint") == fingerprint
            and record.get("centered") == centered)
    if same and all(layer in layers for layer in record["recommended_layers"]):
        return {"default_weight": float(record["default_weight"]),
                "recommended_layers": list(record["recommended_layers"]),
                "recommendation": "calibrated"}
    depth = float(record.get("relative_depth", 0.4))
    strength = float(record.get("relative_strength", 0.5))
    target = depth * max(num_layers - 1, 1)
    layer = min(layers, key=lambda x: abs(x - target))
    i = list(layers).index(layer)
    ratio = float(vectors[i].norm(dim=-1).mean() / hidden_norm[i].clamp_min(1e-12))
    weight = strength / ratio if ratio > 0 else 1.0
    return {"default_weight": round(float(weight), 2), "recommended_layers": [int(layer)],
            "recommendation": "transferred" if record else "heuristic"}


def make_bank(vectors: torch.Tensor, names: Sequence[str], layers: Sequence[int],
              hidden_norm: torch.Tensor, metadata: dict, *, neutral_mean=None,
              neutral_std=None) -> EmotionBank:
    """An :class:`~emokern.bank.EmotionBank` of float32 ``vectors [L, K, D]`` (with the
    neutral baseline ``[L, K]`` when given)."""
    return EmotionBank(vectors.float().contiguous(), list(names), list(layers),
                       hidden_norm=hidden_norm.float(), metadata=metadata,
                       neutral_mean=neutral_mean, neutral_std=neutral_std)

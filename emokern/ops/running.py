"""Running per-sequence statistics of emotion projections, updated in place by ``steer_``.
Tested with the ops, in ``tests/ops/test_steer.py`` and ``tests/ops/test_steer_packed.py``."""

from __future__ import annotations

import torch


class RunningProjections:
    """Running sum, count and newest value of each sequence's emotion projections.

    The fused op updates it in place over *masked* token rows only::

        sum[b, k]  += p[b, t, k]
        count[b]   += 1
        last[b, k]  = p[b, t, k]      (newest masked row)

    Parameters
    ----------
    batch : int
        Number of sequences B.
    n_emotions : int
        Number of emotion directions K.
    device : torch.device or str, optional
        Where the statistics live (the device of the hidden states they follow).

    Attributes
    ----------
    sum : Tensor [B, K], float32
    count : Tensor [B], int64
    last : Tensor [B, K], float32 (NaN until a sequence has a counted row)
    """

    def __init__(self, batch: int, n_emotions: int, device: torch.device | str = "cpu"):
        for name, value in (("batch", batch), ("n_emotions", n_emotions)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"RunningProjections: {name} must be a positive int, "
                                 f"got {value!r}")
        self.sum = torch.zeros(batch, n_emotions, dtype=torch.float32, device=device)
        self.count = torch.zeros(batch, dtype=torch.int64, device=device)
        self.last = torch.full((batch, n_emotions), float("nan"), device=device)

    @property
    def batch(self) -> int:
        return self.sum.shape[0]

    @property
    def n_emotions(self) -> int:
        return self.sum.shape[1]

    @property
    def device(self) -> torch.device:
        return self.sum.device

    def mean(self) -> torch.Tensor:
        """Mean projection per sequence and emotion, ``[B, K]`` (NaN where nothing was counted)."""
        return self.sum / self.count[:, None]

    def reset(self, rows=None) -> None:
        """Zero the statistics of ``rows`` (all sequences when None), in place.

        ``rows`` is anything that indexes dimension 0: an int, a list, a slice or a tensor.
        """
        index = slice(None) if rows is None else rows
        self.sum[index] = 0.0
        self.count[index] = 0
        self.last[index] = float("nan")

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(sum, count, last)``, the order the op takes them in."""
        return self.sum, self.count, self.last

    def __repr__(self) -> str:
        return (f"RunningProjections(batch={self.batch}, n_emotions={self.n_emotions}, "
                f"device={self.device})")

"""Running emotion readings of a steerer: per sequence, steered layer and emotion.

The op updates the statistics in place at every covered token (see
:class:`emokern.RunningProjections`); :class:`Monitor` only stacks and divides them, on
request, through the steerer's public :attr:`~emokern.steering.Steerer.running`,
:attr:`~emokern.steering.Steerer.trajectory_steps` and
:meth:`~emokern.steering.Steerer.clear_trajectory`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from emokern.errors import failing
from emokern.ops.running import RunningProjections

fail = failing("emokern.steer")

if TYPE_CHECKING:  # the steerer builds its monitor: only the annotation points back
    from emokern.steering.steerer import Steerer

__all__ = ["Monitor"]


class Monitor:
    """Running emotion readings of a :class:`~emokern.steering.Steerer`, per sequence, steered
    layer and emotion.

    Attributes
    ----------
    names : tuple of str
        The K emotions (columns).
    layers : tuple of int
        The L monitored decoder layers (by default the steered ones).
    running : tuple of RunningProjections
        One per monitored layer, updated in place by the op (``sum [B, K]``, ``count [B]``,
        ``last [B, K]``).
    """

    def __init__(self, steerer: Steerer) -> None:
        self._steerer = steerer

    @property
    def names(self) -> tuple[str, ...]:
        return self._steerer.names

    @property
    def layers(self) -> tuple[int, ...]:
        """The monitored decoder layers (the steered ones unless ``monitor_layers`` said
        otherwise)."""
        return self._steerer.monitor_layers

    @property
    def calibrated(self) -> bool:
        """Whether readings are standard scores (the bank has a neutral baseline)."""
        return bool(self._steerer.bank.calibrated)

    def standardized(self) -> torch.Tensor:
        r"""The mean readings as standard scores against the bank's neutral baseline,
        ``[B, L, K]``: :math:`z = (\mathrm{mean} - \mu_{l,k}) / \sigma_{l,k}` (0 = as
        neutral text, +2 = two neutral spreads above; raises ValueError for a bank without a
        baseline)."""
        return self._steerer.bank.standardize(self.mean(), list(self.layers),
                                              names=list(self.names))

    def readings(self) -> torch.Tensor:
        """One reading per sequence and emotion, ``[B, K]``: :meth:`standardized` averaged over
        the monitored layers (the raw :meth:`mean` averaged when the bank has no baseline)."""
        values = self.standardized() if self.calibrated else self.mean()
        return values.mean(dim=1)

    @property
    def running(self) -> tuple[RunningProjections, ...]:
        return self._steerer.running

    def _stack(self, attribute: str) -> torch.Tensor:
        return torch.stack([getattr(r, attribute).to("cpu") for r in self._steerer.running],
                           dim=1)

    def mean(self) -> torch.Tensor:
        r"""Mean projection of each sequence's covered tokens, ``[B, L, K]`` float32.

        ``mean[b, l, k] = (1 / n_b) Σ_t <x_{b,t}^{(l)}, v_{l,k}> / ||v_{l,k}||`` over the
        ``n_b`` non-padding tokens of row ``b`` that the monitor covers, where
        ``x^{(l)}`` is the output of decoder layer ``l`` before steering. NaN for a row with
        no covered token yet.
        """
        return self._stack("sum") / self.count()[:, None, None]

    def last(self) -> torch.Tensor:
        """Projections of each sequence's newest covered token, ``[B, L, K]`` (NaN before any)."""
        return self._stack("last")

    def count(self) -> torch.Tensor:
        """Covered tokens per sequence, ``[B]`` int64 (the same at every steered layer)."""
        return self._steerer.running[0].count.to("cpu").clone()

    def trajectory(self) -> torch.Tensor:
        """Projections of the state that chose each generated token, ``[S, B, L, K]``.

        Row ``s`` holds, for every sequence, the projections at the position whose logits
        produced generated token ``s``: the last prompt token for ``s = 0`` (prefill), then
        the token fed at decode step ``s``. ``S`` counts the forwards since the last prompt
        forward, so ``S = max_new_tokens`` after a ``generate`` that ran to the end. Recorded
        at every forward whatever ``positions`` and ``monitor`` cover.

        Raises
        ------
        ValueError
            When the steerer was made without ``trajectory=True``.
        """
        steerer = self._steerer
        if not steerer.records_trajectory:
            fail(ValueError, "trajectory was not recorded; pass trajectory=True to steer()")
        steps = steerer.trajectory_steps
        if not steps:
            return torch.zeros(0, steerer.batch_size, len(steerer.monitor_layers),
                               len(steerer.names))
        return torch.stack(steps)

    def summary(self, calibrated: bool = False) -> list[dict[str, float]]:
        """Per sequence, each emotion's reading averaged over the monitored layers: the raw
        mean projection, or with ``calibrated`` the standard score (:meth:`readings`)."""
        means = self.readings() if calibrated else self.mean().mean(dim=1)
        return [{name: float(means[b, k]) for k, name in enumerate(self.names)}
                for b in range(means.shape[0])]

    def reset(self, rows=None) -> None:
        """Zero the statistics of ``rows`` (every sequence when None) and, for all rows, the
        trajectory."""
        for running in self._steerer.running:
            running.reset(rows)
        self._steerer.clear_trajectory()

    def __repr__(self) -> str:
        return (f"Monitor(batch={self._steerer.batch_size}, layers={list(self.layers)}, "
                f"emotions={list(self.names)})")

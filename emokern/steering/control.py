r"""Closed-loop intensity: each row's weights follow its own reading towards a requested level.

A user asks for "a little sad" (``target=[{"sadness": 1.0}]``) in the calibrated units of the
readings (standard scores against the bank's neutral baseline: 0 = as neutral text, 2 = two
neutral spreads above, :meth:`emokern.EmotionBank.standardize`) instead of guessing a weight.
Between decode steps the controller updates, for every row :math:`b` and targeted emotion
:math:`k`,

.. math::
    z_t &= \frac{1}{|M|}\sum_{l\in M} \frac{p_{t,l,k} - \mu_{l,k}}{\sigma_{l,k}}
        &&\text{(the newest token's reading at the monitored layers } M)\\
    \hat z_t &= \hat z_{t-1} + \beta\,(z_t - \hat z_{t-1})
        &&\text{(smoothing, } \beta = \texttt{smoothing})\\
    w_{t+1} &= \operatorname{clip}\big(w_t + g\,r_k\,(T_{b,k} - \hat z_t),\
               -c\,r_k,\ c\,r_k\big)
        &&\text{(integral step, gain } g\text{, bound } c = \texttt{max\_scale})

where :math:`r_k > 0` is the emotion's recommended push weight (the scale on which weights of
this emotion make sense: :meth:`~emokern.EmotionBank.recommended_weight`, the recipe's weight,
or the bank-wide default when the emotion's recipe is a level, since the controller moves
push weights) and :math:`T_{b,k}` the target. It starts, at the prompt, from the
feed-forward guess :math:`w_0 = \operatorname{clip}(r_k\,T_{b,k} / \bar z_k, \pm c\,r_k)`, where
:math:`\bar z_k` is the reading the recommended weight produced in the sweep (1 when
unrecorded), and :math:`\hat z_0` = the last prompt token's reading.

Properties: **bounded** (:math:`|w| \le c\,r_k` always); **monotone** (the step is increasing
in the error :math:`T - \hat z`, and :math:`w_0` in :math:`T`: a higher target never gives a
lower weight at the same reading); rows without a target for an emotion keep weight 0 for it.
Defaults (measured on the default model, ``docs/eval-default.md``): ``gain`` 0.1 (a full
neutral spread of error moves the weight by a tenth of the recommended weight per token),
``smoothing`` 0.3 (single tokens' readings are noisy), ``max_scale`` 2.

Every step is in-place arithmetic on preallocated device tensors (``lerp_``, ``sub``/``div``
with ``out=``, ``clamp_`` with tensor bounds): no allocation, no ``.item()``, no host sync,
so decoding stays CUDA-graph friendly.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from emokern.errors import failing

fail = failing("emokern.steer")

__all__ = ["DEFAULT_CONTROL", "Controller"]

#: Default controller settings (see the module docstring).
DEFAULT_CONTROL = {"gain": 0.1, "smoothing": 0.3, "max_scale": 2.0}


def _target_mask(target, names: Sequence[str], n_rows: int) -> torch.Tensor:
    """1.0 where a row asks for a level of an emotion (dict keys), 0.0 elsewhere."""
    if isinstance(target, torch.Tensor):
        return torch.ones(n_rows, len(names))
    return torch.tensor([[1.0 if name in row else 0.0 for name in names] for row in target])


class Controller:
    """The closed-loop weights of a :class:`~emokern.steering.Steerer` made with ``target=``
    (see the module docstring for the law, its gains and bounds).

    It reads and writes the steerer only through its public buffers:
    :attr:`~emokern.steering.Steerer.devices`, :attr:`~emokern.steering.Steerer.applied`
    (written in place), :attr:`~emokern.steering.Steerer.scale` and
    :attr:`~emokern.steering.Steerer.step_projections` (read), plus ``bank``, ``names`` and
    ``monitor_layers``.

    Parameters
    ----------
    steerer : Steerer
    target : list of dict or Tensor
        As given to :func:`~emokern.steering.steer` (its keys say which emotions are set).
    targets : Tensor [B, K]
        ``target`` as validated weights (:func:`~emokern.steering.mix.mix_to_weights`).
    control : dict, optional
        ``gain`` (> 0), ``smoothing`` (in (0, 1]), ``max_scale`` (> 0).
    """

    def __init__(self, steerer, target, targets: torch.Tensor, control=None) -> None:
        bank = steerer.bank
        if not bank.calibrated:
            fail(ValueError, "target levels are standard scores against the bank's neutral "
                             "baseline, and this bank has none (emokern.extract."
                             "neutral_baseline adds one)")
        settings = dict(DEFAULT_CONTROL)
        if control is not None:
            if not isinstance(control, Mapping):
                fail(TypeError, f"control must be a dict, got {type(control).__name__}")
            unknown = sorted(set(control) - set(DEFAULT_CONTROL))
            if unknown:
                fail(ValueError, f"control has unknown settings {unknown}; known: "
                                 f"{sorted(DEFAULT_CONTROL)}")
            settings.update(control)
        for key, value in settings.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                fail(ValueError, f"control[{key!r}] must be a positive number, got {value!r}")
        if settings["smoothing"] > 1:
            fail(ValueError, f"control['smoothing'] must be in (0, 1], got "
                             f"{settings['smoothing']}")
        if len(steerer.devices) != 1:
            fail(ValueError, "target= needs the steered and monitored layers on one device")
        self.settings = settings
        self._steerer = steerer
        self.device = steerer.devices[0]
        names = list(steerer.names)
        # The scale of push weights, not the recipe: the controller's output is a push weight
        # (a level recipe has none; recommended_weight then gives the bank-wide default).
        rec = torch.tensor([abs(bank.recommended_weight(n)) or 1.0 for n in names])
        records = bank.recommended_weights
        zref = torch.tensor([float((records.get(n) or {}).get("reading") or 1.0) for n in names])
        self._rec = rec.to(self.device)
        self._zref = zref.clamp_min(0.25).to(self.device)
        mean, std = bank.neutral_stats(list(steerer.monitor_layers))
        cols = torch.tensor([bank.index(n) for n in names])
        # A tensor, not a Python number: dividing by an int wraps it into a new tensor.
        self._inv_layers = torch.tensor(1.0 / len(steerer.monitor_layers), device=self.device)
        self._mu = [m.to(self.device) for m in mean.index_select(1, cols)]  # per layer [K]
        self._sigma = [s.to(self.device) for s in std.index_select(1, cols)]
        self._target = targets.to(self.device)
        self._mask = _target_mask(target, names, targets.shape[0]).to(self.device)
        self.steps = 0

    def allocate(self, batch: int) -> None:
        """Preallocate the state for ``batch`` rows (called by the steerer)."""
        if batch != self._target.shape[0]:
            fail(ValueError, f"target has {self._target.shape[0]} rows but the steerer "
                             f"{batch}")
        k = self._target.shape[1]
        zeros = lambda: torch.zeros(batch, k, device=self.device)  # noqa: E731
        self._w, self._ema, self._z, self._tmp, self._sum = (zeros() for _ in range(5))
        bound = (self.settings["max_scale"] * self._rec).expand(batch, k).contiguous()
        self._hi, self._lo = bound, -bound
        self._step = (self.settings["gain"] * self._rec * self._mask).contiguous()  # [B, K]
        self._applied = self._steerer.applied[self.device]
        # Python scalars would be wrapped into fresh tensors at every step: keep tensors.
        self._scale = torch.tensor(float(self._steerer.scale), device=self.device)
        views = self._steerer.step_projections
        self._views = [v[:, 0] for v in views] if views is not None else []
        self.steps = 0

    def set_target(self, target, targets: torch.Tensor) -> None:
        """New levels, same rows (between or during generations)."""
        self._target.copy_(targets.to(self.device))
        self._mask.copy_(_target_mask(target, self._steerer.names, targets.shape[0]))
        torch.mul(self._mask, self.settings["gain"] * self._rec, out=self._step)

    def _reading(self, projections: Sequence[torch.Tensor]) -> torch.Tensor:
        """Mean standard score over the monitored layers into ``self._z``, in place."""
        self._z.zero_()
        for p, mu, sigma in zip(projections, self._mu, self._sigma, strict=True):
            torch.sub(p, mu, out=self._tmp)
            self._tmp.div_(sigma)
            self._z.add_(self._tmp)
        return self._z.mul_(self._inv_layers)

    def _apply(self) -> None:
        self._w.clamp_(min=self._lo, max=self._hi)
        self._w.mul_(self._mask)
        torch.mul(self._w, self._scale, out=self._applied)
        self._sum.add_(self._w)

    def start(self, projections: Sequence[torch.Tensor]) -> None:
        """At the prompt: the reading of each row's last prompt token (``[B, K]`` per monitored
        layer) starts the smoothed reading; the weights start at the feed-forward guess."""
        self._ema.copy_(self._reading(projections))
        torch.div(self._target, self._zref, out=self._w)
        self._w.mul_(self._rec)
        self._sum.zero_()
        self.steps = 0
        self._apply()

    def update(self) -> None:
        """After a decode step: smooth the newest reading (the preallocated views of the
        steerer's step buffers), step the weights, clip, apply."""
        self._ema.lerp_(self._reading(self._views), self.settings["smoothing"])
        torch.sub(self._target, self._ema, out=self._tmp)
        self._tmp.mul_(self._step)
        self._w.add_(self._tmp)
        self._apply()
        self.steps += 1

    def weights(self) -> torch.Tensor:
        """The current weights ``[B, K]`` (user units, a CPU copy)."""
        return self._w.detach().to("cpu").clone()

    def mean_weights(self) -> torch.Tensor:
        """The weights averaged over the steps of the current generation, ``[B, K]`` (CPU)."""
        return (self._sum / max(self.steps + 1, 1)).to("cpu")

    def reading(self) -> torch.Tensor:
        """The smoothed reading ``[B, K]`` the controller acts on (CPU copy)."""
        return self._ema.detach().to("cpu").clone()

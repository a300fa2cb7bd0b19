"""The steering configuration: every setting of a steerer, validated once, against a bank and
a model's number of decoder layers, into a frozen :class:`SteeringConfig`.

Every entry point that steers builds its settings here: :class:`~emokern.steering.Steerer`
(and so :func:`emokern.steer`) from its keyword arguments, the vLLM plugin from its engine
settings. :meth:`SteeringConfig.resolve` needs plain values only (a bank and a layer count; no
Hugging Face model), so each error is raised once, in one wording, naming the entry point the
user called and the argument::

    config = SteeringConfig.resolve(bank, n_model_layers=30, layers="auto", spread="divide")
    config.layers          # (12,): "auto" = bank.recommended_layers (+ the recipes' bands)
    config.band            # (12,): where an edit without a layer scope applies
    config.scale           # 1.0: the factor of every band layer's weights (1/L, "divide")

Tested in ``tests/steering/test_config.py``.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from emokern.errors import failing

fail = failing("emokern.steer")

#: Which tokens a steerer steers (and, by default, reads): every token, the prompt's, or the
#: generated ones.
POSITIONS = ("all", "prompt", "generated")
#: How a weight spreads over the ``L`` steered layers: ``w / L`` at each, or ``w`` at each.
SPREADS = ("divide", "each")

__all__ = ["POSITIONS", "SPREADS", "SteeringConfig", "check_layers"]


def check_layers(layers, bank, n_model_layers: int, *, argument: str = "layers",
                 who: str = "emokern.steer") -> tuple[int, ...]:
    """The decoder layers ``layers`` names, in the order given: ``"auto"`` (the bank's
    recommended layers), one index or a list of distinct indices, each inside the model
    (``0 <= l < n_model_layers``) and covered by the bank. One TypeError/ValueError
    ``"<who>: <argument> ..."`` otherwise (``who``: the entry point the user called)."""
    if isinstance(layers, str):
        if layers != "auto":
            fail(ValueError, f"{argument} must be 'auto' or a list of layer indices, got "
                             f"{layers!r}", who)
        chosen = tuple(int(i) for i in bank.recommended_layers)
    else:
        if isinstance(layers, int) and not isinstance(layers, bool):
            layers = [layers]
        if not isinstance(layers, Sequence) or len(layers) == 0:
            fail(ValueError, f"{argument} must be 'auto' or a non-empty list of layer indices, "
                             f"got {layers!r}", who)
        for layer in layers:
            if isinstance(layer, bool) or not isinstance(layer, numbers.Integral):
                fail(TypeError, f"{argument} must hold ints, got {layer!r}", who)
        chosen = tuple(int(i) for i in layers)
    if len(set(chosen)) != len(chosen):
        fail(ValueError, f"{argument} lists a layer twice: {list(chosen)}", who)
    for layer in chosen:
        if not 0 <= layer < n_model_layers:
            fail(ValueError, f"{argument}: layer {layer} is outside the model, which has "
                             f"{n_model_layers} decoder layers (0..{n_model_layers - 1})", who)
        if layer not in bank.layers:
            fail(ValueError, f"{argument}: layer {layer} has no vectors in the bank, which "
                             f"covers layers {list(bank.layers)}", who)
    return chosen


@dataclass(frozen=True)
class SteeringConfig:
    """The validated settings of one steerer (build it with :meth:`resolve`).

    Attributes
    ----------
    names : tuple of str
        The ``K`` emotions, steered and read (the columns of weights and readings).
    layers : tuple of int
        The ``L`` steered decoder layers, in the order given (``"auto"``: the bank's
        :attr:`~emokern.EmotionBank.recommended_layers`, then the layers its recipes steer
        beyond them, :meth:`~emokern.EmotionBank.recipe_layers`, so that every ``rec`` is
        honoured).
    band : tuple of int
        Where an edit without a layer scope of its own applies (``docs/design.md``, scope):
        the layers given, or for ``"auto"`` the bank's recommended layers.
    monitor_layers : tuple of int
        Where readings are taken: the steered layers unless ``monitor_layers`` said otherwise
        (``"auto"``: the bank's :attr:`~emokern.EmotionBank.detection_layers`).
    positions : {"all", "prompt", "generated"}
        The tokens steered.
    monitor : {"all", "prompt", "generated"} or None
        The tokens the running readings cover (None: no running readings).
    trajectory : bool
        Whether each generated token's projections are recorded.
    spread : {"divide", "each"}
        How a weight spreads over the steered layers (:attr:`scale`).
    norm_preserving : bool
        Rescale each steered row to its norm before steering.
    backend : str or None
        The op backend to force (None: the best for each device).
    """

    names: tuple[str, ...]
    layers: tuple[int, ...]
    band: tuple[int, ...]
    monitor_layers: tuple[int, ...]
    positions: str = "all"
    monitor: str | None = "all"
    trajectory: bool = False
    spread: str = "divide"
    norm_preserving: bool = False
    backend: str | None = None

    @classmethod
    def resolve(
        cls,
        bank,
        n_model_layers: int,
        *,
        layers: str | Sequence[int] = "auto",
        positions: str = "all",
        norm_preserving: bool = False,
        monitor: bool | str | None = True,
        trajectory: bool = False,
        spread: str = "divide",
        emotions: Sequence[str] | None = None,
        backend: str | None = None,
        monitor_layers: str | Sequence[int] | None = None,
        band: Sequence[int] | None = None,
        who: str = "emokern.steer",
    ) -> SteeringConfig:
        """Validate every setting against ``bank`` and a model of ``n_model_layers`` decoder
        layers; the one place a steering setting is checked.

        Parameters
        ----------
        bank : EmotionBank
        n_model_layers : int
            The model's number of decoder layers (steered layers must exist there).
        layers, positions, norm_preserving, monitor, trajectory, spread, emotions, backend, \
monitor_layers
            As documented by :func:`emokern.steer` (``monitor``: True = over ``positions``,
            False or None = off, or one of :data:`POSITIONS`).
        band : sequence of int, optional
            Where an edit without a layer scope applies, some of ``layers`` (default: the
            layers given, or for ``"auto"`` the bank's recommended layers); what
            :meth:`settings` gives back.
        who : str
            The entry point named in errors (``"emokern.steer"``, ``"emokern.vllm"``).

        Returns
        -------
        SteeringConfig
            Resolving its own :meth:`settings` again gives an equal configuration.

        Raises
        ------
        TypeError, ValueError
            ``"<who>: <argument> ..."``, for the first bad argument: an unknown or repeated
            emotion, a layer outside the model or the bank, an unknown ``positions``,
            ``monitor`` or ``spread``, a non-bool ``norm_preserving``.
        """
        names = tuple(bank.names) if emotions is None else tuple(emotions)
        if isinstance(emotions, str) or len(names) == 0:
            fail(ValueError, f"emotions must be a non-empty list of emotion names, got "
                             f"{emotions!r}", who)
        for name in names:
            if name not in bank.names:
                fail(ValueError, f"emotions names unknown emotion {name!r}; the bank has "
                                 f"{list(bank.names)}", who)
        if len(set(names)) != len(names):
            fail(ValueError, f"emotions lists a name twice: {list(names)}", who)
        chosen = check_layers(layers, bank, n_model_layers, who=who)
        if band is not None:
            band = check_layers(band, bank, n_model_layers, argument="band", who=who)
            if not set(band) <= set(chosen):
                fail(ValueError, f"band {list(band)} must be some of the steered layers "
                                 f"{list(chosen)}", who)
        elif layers == "auto":
            band = chosen
            chosen = chosen + tuple(bank.recipe_layers(names))
        else:
            band = chosen
        if positions not in POSITIONS:
            fail(ValueError, f"positions must be one of {POSITIONS}, got {positions!r}", who)
        if monitor is True:
            policy = positions
        elif monitor is False or monitor is None:
            policy = None
        elif monitor in POSITIONS:
            policy = monitor
        else:
            fail(ValueError, f"monitor must be True, False or one of {POSITIONS}, got "
                             f"{monitor!r}", who)
        if spread not in SPREADS:
            fail(ValueError, f"spread must be one of {SPREADS}, got {spread!r}", who)
        if not isinstance(norm_preserving, bool):
            fail(TypeError, f"norm_preserving must be a bool, got "
                            f"{type(norm_preserving).__name__}", who)
        if monitor_layers is None:
            watched = chosen
        elif isinstance(monitor_layers, str):
            if monitor_layers != "auto":
                fail(ValueError, f"monitor_layers must be None, 'auto' or a list of layer "
                                 f"indices, got {monitor_layers!r}", who)
            watched = check_layers(bank.detection_layers, bank, n_model_layers,
                                   argument="monitor_layers", who=who)
        else:
            watched = check_layers(monitor_layers, bank, n_model_layers,
                                   argument="monitor_layers", who=who)
        return cls(names=names, layers=chosen, band=band, monitor_layers=watched,
                   positions=positions,
                   monitor=policy, trajectory=bool(trajectory), spread=spread,
                   norm_preserving=norm_preserving, backend=backend)

    @property
    def scale(self) -> float:
        """The factor between a weight and what each layer of the :attr:`band` adds: ``1 /
        len(band)`` for ``spread="divide"``, 1 for ``"each"`` (a term with a layer scope of
        its own spreads over those: :func:`~emokern.steering.mix.edit_scope`)."""
        return 1.0 / len(self.band) if self.spread == "divide" else 1.0

    @property
    def reads(self) -> bool:
        """Whether anything reads projections (running readings or the trajectory)."""
        return self.monitor is not None or self.trajectory

    def settings(self) -> dict:
        """The keyword arguments of :meth:`resolve` that give this configuration back (for
        checking it against another bank or model)."""
        values = asdict(self)
        values["emotions"] = values.pop("names")
        return values

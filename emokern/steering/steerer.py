"""The steerer: a different emotion mix per sequence of a Hugging Face model, with running
readings.

:func:`steer` installs the fused op :func:`torch.ops.emokern.steer_` at the output of chosen
decoder layers of a transformers model; ``model.generate`` then runs unchanged (KV cache,
greedy or sampling, any batch size) while every sequence of the batch gets its own mix of
emotion vectors and the op reads each token's projections onto every emotion direction::

    with emokern.steer(model, bank, mix=[{"joy": 2.0}, {"sadness": 1.5, "fear": 0.5}, {}]) as s:
        out = model.generate(**enc, max_new_tokens=64)
    s.monitor.mean()       # [B, L, K]

How it works
------------
* One forward **pre-hook on the module that owns the decoder layers** (``LlamaModel``,
  ``GPT2Model``; it sees every forward, from ``generate`` or a plain ``model(**enc)``) reads
  the batch size, the number of new tokens ``T``, the 2-D ``attention_mask`` and derives the
  past length ``P = attention_mask.shape[1] - T`` (from the cache when there is no mask). A
  forward that feeds one token after a past (``P > 0, T == 1``) is a decode step: its token
  was **generated**. Every other forward feeds **prompt** tokens: the prefill (``P == 0``),
  the chunks of a chunked prefill and the rest of a prompt continued from a cache
  (``T > 1``). A forward with ``P == 0`` starts new sequences: the monitor restarts. The
  columns ``attention_mask[:, -T:]`` say which new tokens are real: left padding is never
  steered nor counted. Everything is derived from shapes, so nothing syncs with the device.
  (Out of scope: speculative/assisted decoding, which feeds several generated tokens at once,
  and 4-D attention masks such as a static cache's.)
* One forward **hook per steered decoder layer** calls the op in place on the layer's output
  (transformers 5 returns a Tensor, 4.x a tuple whose element 0 is the hidden state). The
  argument tuples of the decode step are built once, at install: the hot path is one list
  lookup and one op call per steered layer, with no allocation, no Python loop over rows and
  no host sync; the per-step padding mask is ``copy_``-ed into a preallocated buffer.
* :meth:`Steerer.set_mix` validates a new mix and ``copy_``-es it into the preallocated
  weights, so mixes change between (or during) ``generate`` calls without reinstalling.
* A mix with levels, caps or floors (``"sadness@1.5"``, ``"anger<=0.5"``; calibrated units)
  adds, at each steered layer, the op's ``bounds [B, 2, K]`` (``μ_l + z σ_l`` from the bank's
  neutral baseline, preallocated like the weights) and the Gram matrix of the layer's unit
  directions (computed once); a mix without them calls the op exactly as before.
* A scoped mix (``"anger[12;generated]=1"``: an edit at some steered layers or on some tokens
  only, :func:`~emokern.steering.mix.edit_scope`) gets its own weights and bounds per position
  kind and steered layer; the prompt forward's calls and the decode step's read different
  ones. A mix without scope steers the band's layers with the shared weights, as before.

Units and spreading over layers
-------------------------------
A weight multiplies the bank's vectors: weight 1.0 adds one vector as extracted. The vector of
bank layer ``l`` lives at the output of decoder layer ``l`` (the layer convention of
``docs/design.md``), and the residual stream carries
every addition forward, so adding ``w · v`` at each of ``L`` layers pushes the stream by about
``L · w · v`` (measured on the default model: the raw vector at all 13 layers of a band wrecks
the text already at weight 0.25, while one middle layer at weight 3–4 steers fluently). With
the default ``spread="divide"`` each of the ``L`` steered layers therefore adds
``(w / L) · v_l``: the same weight means about the same total push whatever the band, the
band's mean vector times ``w``. ``spread="each"`` adds the full ``w · v_l`` at every layer
(what forward-hook libraries do).

Readings
--------
The op reads the projections ``p_k = <x, v_k> / ||v_k||`` of each token's hidden state *as
the layer produced it, before steering* (the model's own state at that layer). The monitor
keeps, per steered layer, a :class:`~emokern.RunningProjections` over the tokens it covers;
the statistics restart at every forward without past (a new batch of sequences).

This module is one cohesive thing, the steerer's state and hooks (with its :func:`steer`
factory), hence its length; the settings' validation (:class:`SteeringConfig`), mixes, model
plumbing, the monitor and the controller live in the sibling modules, which use only the
steerer's documented properties.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from emokern.errors import failing
from emokern.models import decoder_layers
from emokern.ops import RunningProjections, resolve_backend, runner_for, unit_gram
from emokern.steering.adapters import ForwardInputs, layers_owner, module_device, past_length
from emokern.steering.config import POSITIONS, SPREADS, SteeringConfig, check_layers
from emokern.steering.control import Controller
from emokern.steering.mix import mix_to_weights, raw_bounds, scoped_edits
from emokern.steering.monitor import Monitor

fail = failing("emokern.steer")

# POSITIONS, SPREADS and check_layers live in emokern.steering.config; kept importable here.
__all__ = ["POSITIONS", "SPREADS", "Steerer", "check_layers", "steer"]


def _covers(policy: str | None, prompt_forward: bool) -> bool:
    """Whether a forward of prompt tokens (``prompt_forward``) or of one generated token is
    covered by ``policy`` (one of :data:`POSITIONS`, or None for nothing)."""
    if policy is None:
        return False
    return policy == "all" or (policy == "prompt") == prompt_forward


# -------------------------------------------------------------------------------- steerer


class Steerer:
    """Per-sequence emotion steering of a transformers model; see :func:`steer`.

    ``Steerer(model, bank, mix, **settings)`` validates ``settings`` (the keyword arguments
    of :func:`steer` other than ``target`` and ``control``) through
    :meth:`SteeringConfig.resolve`; ``config=`` passes an already resolved
    :class:`~emokern.steering.config.SteeringConfig` instead (checked again against this bank
    and model).

    The public state the controller and the monitor use: :attr:`config`, :attr:`names`,
    :attr:`layers`, :attr:`monitor_layers`, :attr:`batch_size`, :attr:`devices`,
    :attr:`applied`, :attr:`scale`, :attr:`step_projections`, :attr:`running`,
    :attr:`trajectory_steps`.
    """

    def __init__(self, model: nn.Module, bank, mix=None, *, target=None, control=None,
                 config: SteeringConfig | None = None, **settings) -> None:
        if not isinstance(model, nn.Module):
            fail(TypeError, f"model must be a torch.nn.Module, got {type(model).__name__}")
        layer_list = decoder_layers(model)
        bank.check_compatible(model)
        if config is not None:
            if settings:
                fail(TypeError, f"give config or settings, not both (got config and "
                                f"{sorted(settings)})")
            if not isinstance(config, SteeringConfig):
                fail(TypeError, f"config must be a SteeringConfig, got {type(config).__name__}")
            settings = config.settings()
        unknown = sorted(set(settings) - set(_SETTINGS))
        if unknown:
            fail(TypeError, f"unknown setting(s) {unknown}; known: {sorted(_SETTINGS)}")
        config = SteeringConfig.resolve(bank, len(layer_list), **settings)
        names, chosen = config.names, config.layers
        if target is not None:
            if mix is not None:
                fail(ValueError, "give either mix (fixed weights) or target (closed-loop "
                                 "levels), not both")
            targets = mix_to_weights(target, names, "target")
            mix = torch.zeros_like(targets)
        elif mix is None:
            fail(TypeError, "steer needs mix= (one dict of weights per sequence) or target=")
        self.config = config
        self.bank = bank
        self.names = names
        self.layers = chosen
        weights, z_bounds, scope = self._edits(mix)
        reads = config.reads or target is not None
        watched = config.monitor_layers if reads else ()

        self.model = model
        self.monitor_layers = watched if watched else chosen
        # One slot per hooked layer: the steered layers and the monitored ones, in depth order.
        self._slot_layers = tuple(sorted(set(chosen) | set(watched)))
        self._steered = [layer in chosen for layer in self._slot_layers]
        self._in_band = [layer in config.band for layer in self._slot_layers]
        self._watched = [reads and layer in self.monitor_layers for layer in self._slot_layers]
        # The op's read buffers follow the slots (depth order); readings follow monitor_layers
        # (the order given): position i of the readings is watched slot _read_order[i].
        watched_slots = [layer for layer in self._slot_layers if layer in watched]
        self._read_order = [watched_slots.index(layer) for layer in watched]
        self._layer_modules = [layer_list[i] for i in self._slot_layers]
        self._owner = layers_owner(model, layer_list)
        self._inputs = ForwardInputs(self._owner.forward)
        fallback = next((p.device for p in model.parameters()), torch.device("cpu"))
        self._devices = [module_device(m, fallback) for m in self._layer_modules]
        # The raw op of each device, without the public wrapper's per-call validation (the
        # steerer validates everything once, at install and set_mix); resolving loads kernels.
        self._ops = {d: runner_for(resolve_backend(config.backend, d))
                     for d in set(self._devices)}
        self._grad_probe = next(model.parameters(), None)

        # Vectors of the steered layers and chosen emotions, float32 [K, D] on each layer's
        # device; checked once here because the raw op skips the wrapper's value checks.
        columns = [bank.index(name) for name in names]
        bank_layers = list(bank.layers)
        self._vectors = []
        for layer, device in zip(self._slot_layers, self._devices, strict=True):
            vectors = torch.as_tensor(bank.vectors[bank_layers.index(layer)])[columns]
            vectors = vectors.to(device=device, dtype=torch.float32).contiguous()
            norms = vectors.norm(dim=1)
            bad = ~(torch.isfinite(norms) & (norms > 0))
            if bool(bad.any()):
                k = int(bad.nonzero()[0, 0])
                fail(ValueError, f"the bank's vector of {names[k]!r} at layer {layer} has zero "
                                 f"or non-finite norm")
            self._vectors.append(vectors)
        # Levels and bounds: the neutral baseline of each steered layer (calibrated units to
        # raw ones) and the Gram matrix of its unit directions, made when a mix first needs them.
        self._grams: dict[int, torch.Tensor] = {}
        self._neutral: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._z_bounds = None
        self._bounds = None
        self._scope = None
        self._scoped = None
        raw = self._raw_bounds(z_bounds)

        self._handles: list = []
        self._trajectory: list[torch.Tensor] = []
        self._pending_trajectory = None
        self._prompt_step_recorded = False
        self.controller = None
        if target is not None:
            self.controller = Controller(self, target, targets, control)
        self._allocate(weights, z_bounds, raw, scope)
        self.monitor = Monitor(self) if config.reads else None

    # ------------------------------------------------------------------------- buffers

    def _edits(self, mix):
        """``(weights [B, K], z_bounds or None, scope [B, 2, L, K] or None)`` of a mix,
        validated against the bank and this steerer's layers, band and positions."""
        config = self.config
        return scoped_edits(self.bank, mix, self.names, layers=config.layers, band=config.band,
                            positions=config.positions, spread=config.spread)

    def _scoped_edits(self, weights: torch.Tensor, raw: list | None, scope: torch.Tensor
                      ) -> list[list]:
        """Per position kind (prompt, generated) and hooked slot, ``(weights [B, K], raw
        bounds [B, 2, K] or None)`` on the slot's device for a scoped mix
        (:func:`~emokern.steering.mix.edit_scope`): ``weights × scope`` and the bounds open
        where the scope is 0; None for slots that only read."""
        out = []
        for phase in range(2):
            row = []
            for slot, device in enumerate(self._devices):
                if not self._steered[slot]:
                    row.append(None)
                    continue
                factor = scope[:, phase, self.layers.index(self._slot_layers[slot])]  # [B, K]
                bounds = None
                if raw is not None:
                    open_ = torch.tensor([-float("inf"), float("inf")], device=device)[:, None]
                    inside = (factor > 0).to(device)[:, None, :]
                    bounds = torch.where(inside, raw[slot], open_).contiguous()
                row.append(((weights * factor).to(device), bounds))
            out.append(row)
        return out

    def _raw_bounds(self, z_bounds: torch.Tensor | None) -> list | None:
        """Per hooked slot, ``z_bounds [B, 2, K]`` (standard scores) as raw bounds on the
        slot's device, ``μ + zσ`` from the bank's neutral baseline at the slot's layer (None
        for slots that only read); None when the mix has no level or bound. Validates only:
        nothing of the steerer changes."""
        if z_bounds is None:
            return None
        out = []
        for slot, (layer, device) in enumerate(zip(self._slot_layers, self._devices,
                                                   strict=True)):
            if not self._steered[slot]:
                out.append(None)
                continue
            if slot not in self._neutral:
                mean, std = self.bank.neutral_stats([layer])
                cols = torch.tensor([self.bank.index(n) for n in self.names], device=mean.device)
                self._neutral[slot] = (mean[0, cols].to(device), std[0, cols].to(device))
                self._grams[slot] = unit_gram(self._vectors[slot]).to(device)
            mean, std = self._neutral[slot]
            out.append(raw_bounds(z_bounds, mean, std, names=self.names, layers=[layer])
                       .contiguous())
        return out

    def _allocate(self, weights: torch.Tensor, z_bounds: torch.Tensor | None = None,
                  raw: list | None = None, scope: torch.Tensor | None = None) -> None:
        """Preallocate everything the decode step touches, for batch ``weights.shape[0]``."""
        batch, n_emotions = weights.shape
        self.batch_size = batch
        self._weights = weights  # user units, on CPU; what set_mix replaced last
        self._z_bounds, self._bounds = z_bounds, raw
        self._scope = scope
        self._scoped = None if scope is None else self._scoped_edits(weights, raw, scope)
        self._applied = {}
        self._zeros = {}
        self._decode_mask = {}
        self._no_rows = {}
        for device in set(self._devices):
            self._applied[device] = (weights * self.config.scale).to(device)
            self._zeros[device] = torch.zeros(batch, n_emotions, device=device)
            self._decode_mask[device] = torch.ones(batch, 1, dtype=torch.bool, device=device)
            self._no_rows[device] = torch.zeros(batch, 1, dtype=torch.bool, device=device)
        watched_devices = [d for d, w in zip(self._devices, self._watched, strict=True) if w]
        self._running = [RunningProjections(batch, n_emotions, device)
                         for device in watched_devices]
        # Per watched slot, the newest token's projections [B, 1, K] of each decode step: the
        # trajectory's step and the controller's reading.
        self._step_proj = None
        if self.config.trajectory or self.controller is not None:
            self._step_proj = [torch.zeros(batch, 1, n_emotions, device=device)
                               for device in watched_devices]
        self._trajectory_step = self._step_proj if self.config.trajectory else None
        self._trajectory.clear()
        if self.controller is not None:
            self.controller.allocate(batch)
        # The decode step's op arguments, built once: (vectors, weights, mask, norm_preserving,
        # proj_out, run_sum, run_count, run_last) per layer, or None to skip the layer.
        self._decode_calls = self._calls(prompt_forward=False, masks=self._decode_mask,
                                         no_rows=self._no_rows,
                                         proj_out=self._step_proj)
        self._active: list = [None] * len(self._slot_layers)

    def _calls(self, prompt_forward: bool, masks: dict, no_rows: dict, proj_out) -> list:
        """The op's arguments per slot. ``proj_out`` holds one buffer per *watched* slot."""
        calls = []
        watched_index = 0
        # A scoped mix steers every steered layer with its own weights and bounds per position
        # kind (zero and open outside each term's scope); a plain one the band's layers.
        scoped = None if self._scoped is None else self._scoped[0 if prompt_forward else 1]
        for slot, device in enumerate(self._devices):
            steered = self._steered[slot] if scoped is not None else self._in_band[slot]
            steer_on = steered and _covers(self.positions, prompt_forward)
            watched = self._watched[slot]
            count_on = watched and _covers(self.monitor_positions, prompt_forward)
            mask = masks[device]
            out = proj_out[watched_index] if proj_out is not None and watched else None
            running = self._running[watched_index].tensors() if count_on \
                else (None, None, None)
            watched_index += int(watched)
            if steer_on:
                # Levels and bounds only when the mix has some: otherwise the op's arguments
                # (and its cost) are those of a plain push.
                if scoped is None:
                    weights = self._applied[device]
                    bounds = None if self._bounds is None else self._bounds[slot]
                else:
                    weights, bounds = scoped[slot]
                leveled = () if bounds is None else (bounds, self._grams[slot])
                calls.append((self._vectors[slot], weights, mask, self.norm_preserving, out,
                              *running, *leveled))
            elif count_on:
                # Count without steering: zero weights add exactly 0.0 to every masked row.
                calls.append((self._vectors[slot], self._zeros[device], mask, False, out,
                              *running))
            elif out is not None:
                # Read the trajectory only: no row masked, so nothing is written or counted.
                calls.append((self._vectors[slot], self._zeros[device], no_rows[device], False,
                              out, None, None, None))
            else:
                calls.append(None)
        return calls

    # ------------------------------------------------------------------------- mixes

    @property
    def weights(self) -> torch.Tensor:
        """The current mix's push weights ``[B, K]`` over :attr:`names`, in the bank's
        units."""
        return self._weights.clone()

    @property
    def z_bounds(self) -> torch.Tensor | None:
        """The current mix's levels and bounds ``[B, 2, K]`` (lower, upper) in calibrated
        units (standard scores against the bank's neutral baseline; ``±inf`` open), or None
        when it has none."""
        return None if self._z_bounds is None else self._z_bounds.clone()

    @property
    def bounds(self) -> dict[int, torch.Tensor] | None:
        """Per steered layer, the raw bounds ``[B, 2, K]`` the op applies there
        (:func:`~emokern.steering.mix.raw_bounds`: ``μ_l + z σ_l``), CPU copies; None when the
        mix has no level or bound."""
        if self._bounds is None:
            return None
        return {layer: raw.to("cpu").clone()
                for layer, raw in zip(self._slot_layers, self._bounds, strict=True)
                if raw is not None}

    def set_mix(self, mix) -> None:
        """Replace every sequence's mix without reinstalling.

        Validates ``mix`` like :func:`steer` (raising before anything changes), then
        ``copy_``-es the new weights (and bounds) into the preallocated tensors the hooks read,
        so it is safe between ``generate`` calls and also during one (e.g. from a
        ``LogitsProcessor``): the next forward uses the new mix. A mix with a different number
        of rows reallocates the buffers and restarts the monitor (do that between ``generate``
        calls); so does, for the op's arguments only, a mix that brings the first levels or
        bounds or drops the last ones, and a scoped mix (its weights and bounds per position
        kind and layer are built anew).
        """
        weights, z_bounds, scope = self._edits(mix)
        if self.controller is not None:
            fail(ValueError, "this steerer sets its weights from target= (closed loop); "
                             "change the levels with set_target")
        raw = self._raw_bounds(z_bounds)
        if weights.shape[0] != self.batch_size:
            self._allocate(weights, z_bounds, raw, scope)
            return
        self._weights = weights
        for applied in self._applied.values():
            applied.copy_(weights * self.config.scale)
        if scope is not None or self._scope is not None:
            # Scoped edits: built anew with their call arguments (per position kind and layer).
            self._z_bounds, self._bounds, self._scope = z_bounds, raw, scope
            self._scoped = None if scope is None else self._scoped_edits(weights, raw, scope)
            self._decode_calls = self._calls(prompt_forward=False, masks=self._decode_mask,
                                             no_rows=self._no_rows, proj_out=self._step_proj)
            return
        if raw is not None and self._bounds is not None:
            for buffer, new in zip(self._bounds, raw, strict=True):
                if buffer is not None:
                    buffer.copy_(new)
            self._z_bounds = z_bounds
        elif raw is not None or self._bounds is not None:
            self._z_bounds, self._bounds = z_bounds, raw
            self._decode_calls = self._calls(prompt_forward=False, masks=self._decode_mask,
                                             no_rows=self._no_rows, proj_out=self._step_proj)

    def set_target(self, target) -> None:
        """Replace the closed-loop levels (same batch size; see :func:`steer`'s ``target``);
        validated before anything changes."""
        if self.controller is None:
            fail(ValueError, "this steerer has fixed weights (mix=); set_target needs a "
                             "steerer made with target=")
        targets = mix_to_weights(target, self.names, "target")
        if targets.shape[0] != self.batch_size:
            fail(ValueError, f"target has {targets.shape[0]} rows, the steerer {self.batch_size}")
        self.controller.set_target(target, targets)

    # ------------------------------------------------------------------ settings (public)
    # Read from the one configuration the steerer owns (:attr:`config`), never copied.

    @property
    def positions(self) -> str:
        """The steered tokens (``"all"``, ``"prompt"`` or ``"generated"``)."""
        return self.config.positions

    @property
    def monitor_positions(self) -> str | None:
        """The tokens the running readings cover (None: no running readings)."""
        return self.config.monitor

    @property
    def norm_preserving(self) -> bool:
        return self.config.norm_preserving

    @property
    def spread(self) -> str:
        return self.config.spread

    # ------------------------------------------------------------------------ buffers (public)

    @property
    def devices(self) -> tuple[torch.device, ...]:
        """The distinct devices of the hooked (steered and monitored) layers, in depth order."""
        return tuple(dict.fromkeys(self._devices))

    @property
    def scale(self) -> float:
        """What each steered layer adds per unit of weight (:attr:`SteeringConfig.scale`:
        ``1 / L`` for ``spread="divide"``, 1 for ``"each"``)."""
        return self.config.scale

    @property
    def applied(self) -> dict[torch.device, torch.Tensor]:
        """Per device, the ``[B, K]`` float32 weights the hooks pass to the op: the current
        weights times :attr:`scale`. The op reads these very tensors (captured once per
        allocation): change them only in place (``copy_``, ``out=``), between forwards; a new
        batch size (:meth:`set_mix`) allocates new ones."""
        return dict(self._applied)

    @property
    def step_projections(self) -> tuple[torch.Tensor, ...] | None:
        """Per monitored layer, the ``[B, 1, K]`` projections of the newest token of the last
        decode step (what the trajectory records and the controller reads), written in place
        by the op; None unless ``trajectory=True`` or ``target=``. Read-only."""
        return None if self._step_proj is None else self._in_reading_order(self._step_proj)

    # ------------------------------------------------------------------------ readings

    @property
    def running(self) -> tuple[RunningProjections, ...]:
        """The running statistics the op updates, one per steered layer (``sum [B, K]``,
        ``count [B]``, ``last [B, K]`` on the layer's device); read them through
        :attr:`monitor`."""
        return self._in_reading_order(self._running)

    def _in_reading_order(self, per_slot) -> tuple:
        """Per-watched-slot items (depth order) in the order of :attr:`monitor_layers`."""
        return tuple(per_slot[i] for i in self._read_order)

    @property
    def records_trajectory(self) -> bool:
        """Whether each generated token's projections are recorded (``trajectory=True``)."""
        return self.config.trajectory

    @property
    def trajectory_steps(self) -> tuple[torch.Tensor, ...]:
        """The recorded steps since the last prompt forward, each ``[B, L, K]`` on the CPU
        (empty when not recording); :meth:`Monitor.trajectory` stacks them."""
        return tuple(self._trajectory)

    def clear_trajectory(self) -> None:
        """Forget the recorded steps (the next forward starts a new trajectory)."""
        self._trajectory.clear()

    # --------------------------------------------------------------------- install / hooks

    @property
    def installed(self) -> bool:
        return bool(self._handles)

    def install(self) -> Steerer:
        """Register the hooks (idempotent); returns ``self``."""
        if self._handles:
            return self
        handles = [self._owner.register_forward_pre_hook(self._before_forward, with_kwargs=True)]
        if self.config.trajectory or self.controller is not None:
            handles.append(self._owner.register_forward_hook(self._after_forward))
        for slot, module in enumerate(self._layer_modules):
            handles.append(module.register_forward_hook(self._layer_hook(slot)))
        self._handles = handles
        return self

    def remove(self) -> None:
        """Remove every hook: the model computes exactly what it computed before install."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._active = [None] * len(self._slot_layers)

    def __enter__(self) -> Steerer:
        return self.install()

    def __exit__(self, *exc_info) -> None:
        self.remove()

    def _layer_hook(self, slot: int):
        op = self._ops[self._devices[slot]]
        steerer = self  # _active is swapped per forward: read it through the steerer

        def hook(module, args, output):
            call = steerer._active[slot]
            if call is not None:
                # transformers 5 returns the hidden state itself, 4.x a tuple led by it.
                op(output if isinstance(output, torch.Tensor) else output[0], *call)

        return hook

    def _before_forward(self, module, args, kwargs):
        inputs = self._inputs
        tokens = inputs.get("input_ids", args, kwargs)
        if tokens is None:
            tokens = inputs.get("inputs_embeds", args, kwargs)
        if tokens is None:
            fail(ValueError, "the forward got neither input_ids nor inputs_embeds")
        batch, new_tokens = tokens.shape[0], tokens.shape[1]
        if batch != self.batch_size:
            fail(ValueError, f"the mix has {self.batch_size} rows but the model got a batch of "
                             f"{batch}; give one mix per sequence (num_return_sequences and "
                             f"beam search expand the batch: repeat each mix accordingly)")
        if self._grad_probe is not None and self._grad_probe.requires_grad \
                and torch.is_grad_enabled():
            fail(RuntimeError, "steering modifies hidden states in place and is for inference: "
                               "run the forward under torch.no_grad() or torch.inference_mode() "
                               "(model.generate already does)")
        attention_mask = inputs.get("attention_mask", args, kwargs)
        if attention_mask is not None:
            if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
                fail(ValueError, "steering needs a 2-D attention_mask [B, past + T] to find "
                                 "left padding (4-D masks, e.g. from a static cache, are not "
                                 "supported)")
            past = attention_mask.shape[1] - new_tokens
        else:
            past = past_length(inputs.get("past_key_values", args, kwargs))
        if past > 0 and new_tokens == 1:
            # The decode step: everything preallocated.
            for buffer in self._decode_mask.values():
                if attention_mask is None:
                    buffer.fill_(True)
                else:
                    buffer.copy_(attention_mask[:, -1:])
            self._active = self._decode_calls
            self._pending_trajectory = None
            return None

        if past == 0 and self.monitor is not None:
            self.monitor.reset()
        # Prompt forwards (and multi-token continuations) allocate their masks.
        masks, no_rows = {}, {}
        real = None if attention_mask is None else attention_mask[:, -new_tokens:].to(torch.bool)
        for device in self._decode_mask:
            masks[device] = None if real is None else real.to(device).contiguous()
            no_rows[device] = torch.zeros(batch, new_tokens, dtype=torch.bool, device=device)
        proj_out = None
        if self._step_proj is not None:
            proj_out = [torch.zeros(batch, new_tokens, len(self.names), device=device)
                        for device, w in zip(self._devices, self._watched, strict=True) if w]
            self._pending_trajectory = (proj_out, real)
        self._active = self._calls(True, masks, no_rows, proj_out)
        return None

    def _after_forward(self, module, args, output):
        pending = self._pending_trajectory
        if pending is None:
            if self.controller is not None:
                # On the device, in place, no host sync: the next step's weights.
                self.controller.update()
            if not self.config.trajectory:
                return None
            step = torch.stack([out[:, 0].to("cpu")
                                for out in self._in_reading_order(self._trajectory_step)], dim=1)
            self._trajectory.append(step)
            self._prompt_step_recorded = False
        else:
            proj_out, real = pending
            proj_out = self._in_reading_order(proj_out)
            # The newest real token of each row chose the next token.
            n_tokens = proj_out[0].shape[1]
            if real is None:
                newest = torch.full((proj_out[0].shape[0],), n_tokens - 1)
            else:
                positions = torch.arange(n_tokens, device=real.device).expand_as(real)
                newest = torch.where(real, positions, 0).amax(dim=1).to("cpu")
            rows = torch.arange(newest.shape[0])
            if self.controller is not None:
                self.controller.start([out[rows.to(out.device), newest.to(out.device)]
                                       for out in proj_out])
            self._pending_trajectory = None
            if not self.config.trajectory:
                return None
            step = torch.stack([out.to("cpu")[rows, newest] for out in proj_out], dim=1)
            # Of consecutive prompt forwards (a chunked prefill), only the last one's newest
            # token chooses a generated token: it replaces the previous chunk's step.
            if self._prompt_step_recorded and self._trajectory:
                self._trajectory[-1] = step
            else:
                self._trajectory.append(step)
            self._prompt_step_recorded = True
        return None

    def __repr__(self) -> str:
        state = "installed" if self.installed else "not installed"
        return (f"Steerer(batch={self.batch_size}, layers={list(self.layers)}, "
                f"emotions={list(self.names)}, positions={self.positions!r}, "
                f"spread={self.spread!r}, {state})")


def steer(model: nn.Module, bank, mix=None, *, target=None, control=None,
          config: SteeringConfig | None = None, **settings) -> Steerer:
    r"""Steer ``model`` with one emotion mix per sequence; a context manager.

    At each steered decoder layer ``l`` (output side), every non-padding token row ``x`` of
    sequence ``b`` that ``positions`` covers becomes

    .. math::
        y = x + s \sum_k w_{b,k}\, v_{l,k}, \qquad
        s = 1/L\ (\text{spread="divide"})\ \text{or}\ 1\ (\text{"each"}),

    rescaled to ``||x||`` when ``norm_preserving``; ``L`` is the number of steered layers and
    ``v_{l,k}`` the bank's vector of emotion ``k`` at layer ``l``.

    Parameters
    ----------
    model : transformers model
        Llama family (SmolLM2, Llama, Qwen2, Mistral, Gemma) or GPT-2; found through
        :func:`emokern.models.decoder_layers`.
    bank : EmotionBank
        Vectors extracted from this model (checked with ``bank.check_compatible(model)``).
    mix : list of (dict or str), or Tensor [B, K]
        One mix per sequence in the grammar of :mod:`emokern.steering.mix`: a dict (emotion →
        push weight, 1.0 = one vector as extracted, negative suppresses; ``"rec"`` = the
        emotion's recipe, ``bank.recommended(name)``, a push or a level; ``"erase"``; or
        ``{"weight", "level", "min", "max"}``) or a mix string (``"joy=2,sadness@1.5,
        anger<=0.5"``); ``{}`` leaves the row unsteered. Or float push weights whose columns
        follow ``emotions`` (default ``bank.names``). ``B`` must equal the batch of every
        forward. Levels, caps and floors are standard scores against the bank's neutral
        baseline (a calibrated bank): at steered layer ``l`` the op gets raw bounds
        ``μ_l + z σ_l`` (:attr:`Steerer.bounds`) and the Gram matrix of the directions, and
        sets every covered token's projection exactly after the pushes (``docs/design.md``
        §2; they are the same on every layer, not spread).
    layers : "auto" or list of int
        Decoder layers (0-based) to steer; "auto" = ``bank.recommended_layers``. Each must be
        in the bank and in the model.
    band : list of int, optional
        Where a mix term without a layer scope applies, some of ``layers`` (default: all of
        them; for ``"auto"`` the bank's recommended layers, the recipes' own bands steered
        beside them); ``s = 1/len(band)`` for ``"divide"``. Scoped terms
        (``anger[16-18]=1``) apply at their own layers, which must be steered.
    positions : {"all", "prompt", "generated"}
        Which tokens to steer: every token, the prompt (the tokens of the prefill, or of any
        forward feeding several tokens), or the generated tokens (fed one per decode step).
        Left padding is never steered nor counted.
    norm_preserving : bool
        Rescale each steered row to its norm before steering.
    monitor : bool or {"all", "prompt", "generated"}
        Keep running projections: True = over the tokens ``positions`` steers, a string = over
        those positions (steered or not), False = off. Restart at every forward without
        past (a new batch of sequences).
    trajectory : bool
        Also record each generated token's projections (``s.monitor.trajectory()``).
    spread : {"divide", "each"}
        How a weight is spread over the steered layers (see the module docstring).
    emotions : list of str, optional
        Restrict the columns (steered and read) to these bank emotions.
    backend : str, optional
        Force an op backend ("reference", "cpu", "triton", "cuda").
    monitor_layers : None, "auto" or list of int
        Where the monitor (and trajectory) read: None = the steered layers; "auto" = the
        bank's :attr:`~emokern.EmotionBank.detection_layers` (chosen for telling emotions
        apart on held-out sentences, independently of where steering works best); a list =
        those layers. A monitored layer that is also steered is read by the steering call
        itself (no extra pass); any other one gets a zero-weight call that only reads.
    target : list of dict or Tensor [B, K], optional
        Closed-loop intensity instead of ``mix``: per sequence, the reading each emotion should
        reach, in the standard scores of the bank's neutral baseline (0 = as neutral text,
        2 = two neutral spreads above). Between decode steps each row's weights follow its
        running reading (:class:`~emokern.steering.control.Controller`: bounded, monotone, on
        the device, no host sync). Needs a calibrated bank.
    control : dict, optional
        Controller settings (``gain``, ``smoothing``, ``max_scale``; see
        :class:`~emokern.steering.control.Controller`).
    config : SteeringConfig, optional
        The settings above (``layers`` to ``monitor_layers``) already resolved
        (:meth:`SteeringConfig.resolve`), instead of giving them one by one.
    **settings
        ``layers``, ``band``, ``positions``, ``norm_preserving``, ``monitor``, ``trajectory``,
        ``spread``, ``emotions``, ``backend``, ``monitor_layers`` as above: validated once, by
        :meth:`SteeringConfig.resolve`, the parameter list the signature shows.

    Returns
    -------
    Steerer
        Installed on ``__enter__`` (or ``.install()``), removed on ``__exit__`` (``.remove()``);
        ``.monitor`` (a :class:`Monitor`, None when monitor and trajectory are off) and
        ``.set_mix(mix)``.

    Raises
    ------
    TypeError, ValueError
        Before anything is installed: unknown emotion, non-finite weight, a malformed or
        conflicting mix term, a level or bound with an uncalibrated bank, bad ``layers``,
        ``monitor_layers`` or ``positions``, both or neither of ``mix`` and ``target``, a
        target for an emotion the bank lacks or with an uncalibrated bank, a bank for another
        model, an unsupported architecture. A forward whose
        batch differs from the number of mixes raises ValueError before any layer runs.
    """
    return Steerer(model, bank, mix, target=target, control=control, config=config,
                   **settings)


#: The settings :func:`steer` forwards to :meth:`SteeringConfig.resolve` (its keyword-only
#: parameters but ``who``): one parameter list for both.
_SETTINGS = {name: p for name, p in inspect.signature(SteeringConfig.resolve).parameters.items()
             if p.kind is inspect.Parameter.KEYWORD_ONLY and name != "who"}


def _shared_signature(function) -> inspect.Signature:
    """``function``'s signature with ``**settings`` spelled out as the settings' own
    parameters (for ``help()`` and editors)."""
    signature = inspect.signature(function)
    head = [p for p in signature.parameters.values() if p.kind is not p.VAR_KEYWORD]
    return signature.replace(parameters=head + list(_SETTINGS.values()))


steer.__signature__ = _shared_signature(steer)

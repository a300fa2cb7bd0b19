"""Slots: the persistent per-request state the packed op reads inside vLLM's compiled graph.

vLLM packs the tokens of every scheduled request into one ``[N, D]`` tensor. The way vLLM's
LoRA maps tokens to adapters, each request that carries a mix owns *slots*, rows of the
per-layer ``slot_weights[l] [S, K]``, and before every forward each token is given its
request's slot in ``token_slot [N_max]`` (``-1``: no steering). A steered request owns four
slots: one for its prompt tokens, one for its generated tokens — so the op's per-slot running
statistics of the generated slot are the readings over generated tokens only (what the Hugging
Face monitor gives with ``monitor="generated"``), and a mix's scope can steer one kind and not
the other (:func:`~emokern.steering.mix.edit_scope`) — and two for *replayed* prompt and
generated tokens: after a preemption vLLM recomputes a request's tokens (those its prefix cache
no longer holds); they are steered the same but were read already, so their statistics go to
the replay slots, which are never read. Readings are thus exact across preemptions. Weights are
per layer because a scope can steer an emotion at some of the steered layers only.

With levels on (``additional_config`` ``"levels": true``), each slot also has bounds per
steered layer, ``bounds[l] [S, 2, K]`` in raw units: a request's levels and bounds come in
standard scores and are turned into ``μ_l + z σ_l`` with the bank's neutral baseline of each
layer once, when the request gets its slots; slots without any are open (``±inf``).

Everything here is plain torch/numpy, importable without vLLM (tested in ``tests/vllm``).
The tensors are allocated once; a step only ``copy_``-es into them, so the graph that reads
them never changes (``docs/design.md``, house habit 4).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import numpy as np
import torch

from emokern.steering.mix import raw_bounds
from emokern.vllm.internals import derived_index, external_id

__all__ = ["SlotTable"]


class SlotTable:
    """Persistent buffers and the request → slot bookkeeping of one engine.

    Parameters
    ----------
    n_layers : int
        Steered layers ``L`` (one set of running statistics each).
    n_emotions : int
        ``K``.
    max_requests : int
        Requests with slots alive at once, preempted ones included (each owns four slots, so
        ``S = 4 * max_requests``).
    max_tokens : int
        ``N_max``: the most tokens one forward carries (vLLM's ``max_num_batched_tokens``).
    scale : float
        Applied weight = user weight × ``scale`` (``1 / len(band)`` for ``spread="divide"``)
        at the band's layers, for a mix without scope.
    band : sequence of bool, optional
        Per steered layer, whether it is in the band (where a mix without scope applies);
        default every layer.
    keep_readings : int
        Readings of finished requests kept for :meth:`readings` (oldest dropped first).
    neutral : (Tensor [L, K], Tensor [L, K]), optional
        The bank's neutral baseline (mean, std) at the steered layers: given, the table holds
        per-slot bounds (levels on); None, it holds none and a request with bounds is refused.

    Attributes
    ----------
    slot_weights : list of L Tensors [S, K] float32
    token_slot : Tensor [N_max] int32
    run_sum, run_count, run_last : list of L Tensors [S, K] float32, [S] int64, [S, K] float32
    bounds : list of L Tensors [S, 2, K] float32 (raw units, ``±inf`` open), or None
        Levels off: None.
    """

    def __init__(self, n_layers: int, n_emotions: int, max_requests: int, max_tokens: int,
                 *, scale: float = 1.0, band: Sequence[bool] | None = None,
                 keep_readings: int = 4096, device="cpu",
                 neutral: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        n_slots = 4 * max_requests
        self.n_layers, self.n_emotions, self.n_slots = n_layers, n_emotions, n_slots
        self.max_requests = max_requests
        self.scale = float(scale)
        band = [True] * n_layers if band is None else list(band)
        # [2, L, 1] the plain scale per position kind and layer: scale in the band, else 0
        self._plain = torch.tensor([[[self.scale if b else 0.0] for b in band]] * 2)
        # One tensor per layer (not views of one [L, S, K] tensor): the compiled graph then
        # mutates distinct inputs, with no aliasing for AOTAutograd to untangle.
        self.slot_weights = [torch.zeros(n_slots, n_emotions, device=device)
                             for _ in range(n_layers)]
        self.token_slot = torch.full((max_tokens,), -1, dtype=torch.int32, device=device)
        self.run_sum = [torch.zeros(n_slots, n_emotions, device=device) for _ in range(n_layers)]
        self.run_count = [torch.zeros(n_slots, dtype=torch.int64, device=device)
                          for _ in range(n_layers)]
        self.run_last = [torch.zeros(n_slots, n_emotions, device=device) for _ in range(n_layers)]
        self.bounds = None
        if neutral is not None:
            mean, std = (t.detach().to(device=device, dtype=torch.float32) for t in neutral)
            if mean.shape != (n_layers, n_emotions) or std.shape != (n_layers, n_emotions):
                raise ValueError(f"emokern.vllm: neutral must be (mean, std) of shape "
                                 f"[{n_layers}, {n_emotions}], got {list(mean.shape)} and "
                                 f"{list(std.shape)}")
            self._neutral = (mean, std)
            self._open = torch.tensor([-float("inf"), float("inf")], device=device)[:, None]
            self.bounds = [self._open.expand(2, n_emotions).repeat(n_slots, 1, 1).contiguous()
                           for _ in range(n_layers)]
        # request r owns slots 4r (prompt), 4r + 1 (generated), 4r + 2 and 4r + 3 (replayed
        # prompt and generated tokens)
        self._free = list(range(max_requests - 1, -1, -1))
        self._pair: dict[str, int | None] = {}  # req_id -> r, None = no slots
        self._read_upto: dict[str, int] = {}  # req_id -> positions < this were read
        self._finished: OrderedDict[str, dict] = OrderedDict()
        self._keep = keep_readings
        self._filled = 0

    # ------------------------------------------------------------------ requests

    def known(self, req_id: str) -> bool:
        return req_id in self._pair

    @property
    def capacity(self) -> int:
        """Requests that can hold slots at once (``max_requests``)."""
        return self.max_requests

    @property
    def in_use(self) -> int:
        """Requests holding slots now (``emokern_slots_in_use``, :mod:`emokern.vllm.metrics`)."""
        return self.capacity - len(self._free)

    @property
    def levels(self) -> bool:
        """Whether the slots hold bounds (levels on)."""
        return self.bounds is not None

    def add(self, req_id: str, weights: torch.Tensor | None, *, read: bool = False,
            running: Sequence[str] = (), z_bounds: torch.Tensor | None = None,
            scope: torch.Tensor | None = None) -> None:
        """Register ``req_id`` with weights ``[K]`` (user units) or None (unsteered), and
        optionally levels and bounds ``z_bounds [2, K]`` (standard scores, ``±inf`` open;
        levels on only) and a scope ``[2, L, K]`` (:func:`~emokern.steering.mix.edit_scope`:
        the factor per position kind and steered layer; None: the plain ``scale`` at the
        band's layers).

        A steered request gets fresh slots with zeroed statistics; so does an unsteered one
        when ``read`` (its slots weigh zero: the op adds exactly 0 and reads). When every slot
        is taken, a request not in ``running`` (a preempted one) gives its slots up (its
        readings then restart when it resumes). The slots' weights at layer ``l`` are
        ``weights × factor[p, l]`` and their bounds ``μ_l + z σ_l`` where the factor is
        positive (open elsewhere and without ``z_bounds``), ``p`` the slot's position kind.
        """
        raw = None
        if z_bounds is not None:
            if self.bounds is None:
                raise ValueError("emokern.vllm: a request with levels or bounds reached an "
                                 "engine without levels (additional_config['emokern']"
                                 "['levels'])")
            if weights is None:
                weights = torch.zeros(self.n_emotions)
            raw = raw_bounds(z_bounds[None], *self._neutral, who="emokern.vllm")  # [L, 1, 2, K]
        if req_id in self._pair:
            self.release(req_id, keep=False)
        if weights is None and not read:
            self._pair[req_id] = None
            return
        if not self._free:
            busy = set(running)
            idle = next((r for r, p in self._pair.items() if p is not None and r not in busy),
                        None)
            if idle is None:
                raise RuntimeError(f"emokern.vllm: all {self.capacity} steering slots are "
                                   f"in use; raise additional_config['emokern']['max_requests']")
            self.release(idle, keep=False)  # unknown again: registered afresh on resuming
        pair = self._free.pop()
        rows = slice(4 * pair, 4 * pair + 4)
        factor = self._plain if scope is None else scope.float()  # [2, L, 1 or K]
        # slot 4r + j is of position kind j % 2 (prompt, generated)
        kinds = torch.tensor([0, 1, 0, 1])
        for layer, buffer in enumerate(self.slot_weights):
            at = factor[kinds, layer].expand(4, self.n_emotions)
            buffer[rows] = 0 if weights is None else weights.float()[None] * at
        for t in (*self.run_sum, *self.run_count, *self.run_last):
            t[rows] = 0
        if self.bounds is not None:
            for layer, bounds in enumerate(self.bounds):
                if raw is None:
                    bounds[rows] = self._open
                else:
                    inside = (factor[kinds, layer] > 0).expand(4, self.n_emotions)[:, None]
                    bounds[rows] = torch.where(inside.to(bounds.device), raw[layer],
                                               self._open)
        self._pair[req_id] = pair
        self._read_upto[req_id] = 0

    def release(self, req_id: str, *, keep: bool = True) -> None:
        """Free ``req_id``'s slots; with ``keep``, store its readings for :meth:`readings`."""
        pair = self._pair.pop(req_id, None)
        self._read_upto.pop(req_id, None)
        if pair is None:
            return
        if keep:
            self._finished[req_id] = self._reading(pair)
            while len(self._finished) > self._keep:
                self._finished.popitem(last=False)
        self._free.append(pair)

    def _reading(self, pair: int) -> dict:
        out = {}
        for key, slot in (("", 4 * pair + 1), ("prompt_", 4 * pair)):
            count = torch.stack([c[slot] for c in self.run_count]).cpu()
            total = torch.stack([s[slot] for s in self.run_sum]).cpu()
            mean = total / count[:, None].clamp_min(1)
            mean[count == 0] = float("nan")
            out[key + "mean"], out[key + "count"] = mean, int(count[0])
        out["last"] = torch.stack([s[4 * pair + 1] for s in self.run_last]).cpu()
        return out

    def readings(self, req_ids: Sequence[str] | None = None, *,
                 family: bool = False) -> dict[str, dict]:
        """Readings by request id: ``{"mean": [L, K], "last": [L, K], "count": int,
        "prompt_mean": [L, K], "prompt_count": int}`` over the generated (``prompt_``: prompt)
        tokens fed so far (live requests) or in all (finished ones).

        An id may be vLLM's internal id or the id the user gave (internal = ``<id>-<8 hex>``).
        With ``family``, each wanted id ``X`` also collects the requests vLLM's OpenAI server
        derives from one HTTP request ``X``: ``X-<i>`` (the i-th prompt), ``X_<i>`` and
        ``<j>_X...`` (the j-th of ``n`` samples); the result is then keyed by those ids (the
        random suffix removed).
        """
        out: dict[str, dict] = {}
        live = {r: self._reading(p) for r, p in self._pair.items() if p is not None}
        for store in (self._finished, live):
            for rid, reading in store.items():
                if req_ids is None:
                    out[rid] = reading
                    continue
                external = external_id(rid)
                for wanted in req_ids:
                    if rid == wanted or external == wanted:
                        out[wanted] = reading
                    elif family and derived_index(external, wanted) is not None:
                        out[external] = reading
        return out

    # ------------------------------------------------------------------ each step

    def fill(self, req_ids: Sequence[str], num_scheduled: np.ndarray, num_computed: np.ndarray,
             num_prompt: np.ndarray) -> None:
        """Write ``token_slot`` for one forward.

        Tokens are packed request by request, ``num_scheduled[i]`` tokens of request ``i``
        starting at its position ``num_computed[i]``; a token at a position ``>=
        num_prompt[i]`` was generated (it gets the generated slot), the others the prompt slot;
        a token at a position the request had read before a preemption gets the replay slot of
        its kind.
        """
        n_req = len(req_ids)
        pairs = np.array([-1 if (p := self._pair.get(r)) is None else p for r in req_ids],
                         dtype=np.int64)
        n_tok = int(num_scheduled[:n_req].sum())
        if self._filled > n_tok:
            self.token_slot[n_tok:self._filled] = -1
        self._filled = n_tok
        if n_tok == 0:
            return
        if (pairs < 0).all():
            self.token_slot[:n_tok] = -1
            return
        counts = num_scheduled[:n_req]
        req_index = np.repeat(np.arange(n_req), counts)
        starts = np.cumsum(counts) - counts
        position = num_computed[:n_req][req_index] + (np.arange(n_tok) - starts[req_index])
        generated = position >= num_prompt[:n_req][req_index]
        read_upto = np.array([self._read_upto.get(r, 0) for r in req_ids], dtype=np.int64)
        replayed = position < read_upto[req_index]
        pair = pairs[req_index]
        slot = np.where(pair < 0, -1, 4 * pair + 2 * replayed + generated)
        self.token_slot[:n_tok] = torch.from_numpy(slot.astype(np.int32))
        ends = num_computed[:n_req] + counts
        for i, rid in enumerate(req_ids):
            if pairs[i] >= 0 and ends[i] > read_upto[i]:
                self._read_upto[rid] = int(ends[i])

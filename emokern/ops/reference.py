"""Plain-PyTorch reference of every emokern op: test oracle, fallback and benchmark baseline.

Each ``ref_<op>`` computes in float32 whatever the storage dtype and has exactly the
semantics documented in docs/design.md §2. Arguments are assumed valid (the public wrappers in
:mod:`emokern.ops.steer`, :mod:`~emokern.ops.steer_packed`, :mod:`~emokern.ops.scale_neurons`
validate them); the reference favours clarity over speed.

Tested against float64 transcriptions of the definitions in ``tests/ops/test_steer.py``,
``tests/ops/test_steer_packed.py`` and ``tests/ops/test_scale_neurons.py``.
"""

from __future__ import annotations

import torch

#: Lower bound of ``||y||`` in the norm-preserving rescale ``y · ||x|| / max(||y||, EPS)``.
NORM_EPS = 1e-6


def ref_steer_(
    hidden: torch.Tensor,
    vectors: torch.Tensor,
    weights: torch.Tensor,
    mask: torch.Tensor | None = None,
    norm_preserving: bool = False,
    proj_out: torch.Tensor | None = None,
    run_sum: torch.Tensor | None = None,
    run_count: torch.Tensor | None = None,
    run_last: torch.Tensor | None = None,
) -> None:
    r"""Steer ``hidden`` in place and read its projections on the emotion directions.

    For each token row :math:`x = h_{b,t}` (before steering)

    .. math::
        p_k = \langle x, v_k \rangle / \lVert v_k \rVert, \qquad
        y = x + \sum_k w_{b,k} v_k, \qquad
        y \leftarrow y \cdot \lVert x \rVert / \max(\lVert y \rVert, \epsilon)
        \ \text{(if norm\_preserving)}

    and ``hidden[b, t] = y`` where ``mask[b, t]`` (every row when ``mask`` is None).

    Parameters
    ----------
    hidden : Tensor [B, T, D], float32/bfloat16/float16
        Residual-stream states, modified in place on masked rows.
    vectors : Tensor [K, D]
        Emotion vectors (any floating dtype; used in float32).
    weights : Tensor [B, K], float32
        Each sequence's mix weights.
    mask : Tensor [B, T], bool, optional
        Rows to steer and to count in the running statistics.
    norm_preserving : bool
        Rescale each steered row to its input norm.
    proj_out : Tensor [B, T, K], float32, optional
        Receives :math:`p` of every row (masked or not).
    run_sum, run_count, run_last : Tensor [B, K] float32, [B] int64, [B, K] float32, optional
        Running statistics over masked rows: ``run_sum += p``, ``run_count += 1``, and
        ``run_last`` = :math:`p` of the newest masked row (unchanged when a sequence has none).
    """
    batch, seq_len, dim = hidden.shape
    slots = torch.arange(batch, device=hidden.device, dtype=torch.int32)[:, None]
    token_slot = slots.expand(batch, seq_len)
    if mask is not None:
        token_slot = torch.where(mask.to(torch.bool), token_slot, -1)
    try:
        rows, copied = hidden.view(batch * seq_len, dim), False
    except RuntimeError:  # rows that cannot be flattened by a view: work on a copy
        rows, copied = hidden.reshape(batch * seq_len, dim), True
    flat_proj = None if proj_out is None else proj_out.view(batch * seq_len, -1)
    ref_steer_packed_(rows, None, vectors, weights, token_slot.reshape(-1), norm_preserving,
                      flat_proj, run_sum, run_count, run_last)
    if copied:
        hidden.copy_(rows.view(batch, seq_len, dim))


def ref_steer_packed_(
    hidden: torch.Tensor,
    residual: torch.Tensor | None,
    vectors: torch.Tensor,
    slot_weights: torch.Tensor,
    token_slot: torch.Tensor,
    norm_preserving: bool = False,
    proj_out: torch.Tensor | None = None,
    run_sum: torch.Tensor | None = None,
    run_count: torch.Tensor | None = None,
    run_last: torch.Tensor | None = None,
) -> None:
    r"""The packed-token layout of :func:`ref_steer_`: tokens of many sequences in one
    ``[N, D]`` tensor, each token naming its sequence's slot (what serving engines pass).

    For each token :math:`i < N` with slot :math:`s = \mathrm{token\_slot}[i]`, in float32,
    with :math:`x = h_i + r_i` (the residual stream; :math:`r_i = 0` without ``residual``):

    .. math::
        p_k = \langle x, v_k \rangle / \lVert v_k \rVert, \qquad
        y = x + \sum_k W_{s,k} v_k \ \text{(if } s \ge 0\text{)}, \qquad
        y \leftarrow y \cdot \lVert x \rVert / \max(\lVert y \rVert, \epsilon)
        \ \text{(if norm\_preserving)}

    ``hidden[i] = y - residual[i]`` (so ``hidden + residual`` becomes ``y``; ``residual`` is
    never written); a token with ``s < 0`` is left untouched and not counted.

    Parameters
    ----------
    hidden : Tensor [N, D], float32/bfloat16/float16
        Modified in place on tokens with a slot.
    residual : Tensor [N, D] or None
        The other half of a split residual stream (same dtype as ``hidden``); read only.
    vectors : Tensor [K, D]
    slot_weights : Tensor [S, K], float32
        One mix per slot.
    token_slot : Tensor [N_max], int32, N_max >= N
        Each token's slot in ``[-1, S)``; only the first N entries are read.
    norm_preserving : bool
    proj_out : Tensor [N_max, K], float32, optional
        Receives :math:`p` of the first N tokens (with or without a slot).
    run_sum, run_count, run_last : Tensor [S, K] float32, [S] int64, [S, K] float32, optional
        Per-slot running statistics over tokens with a slot; ``run_last`` = :math:`p` of the
        slot's newest (highest ``i``) token in this call.
    """
    n_tokens = hidden.shape[0]
    n_slots = slot_weights.shape[0]
    slot = token_slot[:n_tokens].long()
    steered = slot >= 0
    x = hidden.float() if residual is None else hidden.float() + residual.float()
    v = vectors.float()
    p = x @ (v / v.norm(dim=1, keepdim=True)).T  # [N, K]
    delta = (slot_weights.float() @ v)[slot.clamp_min(0)]  # [N, D]
    y = x + delta
    if norm_preserving:
        y = y * (x.norm(dim=-1, keepdim=True) / y.norm(dim=-1, keepdim=True).clamp_min(NORM_EPS))
    if residual is not None:
        y = y - residual.float()
    hidden.copy_(torch.where(steered[:, None], y.to(hidden.dtype), hidden))
    if proj_out is not None:
        proj_out[:n_tokens].copy_(p)
    if run_sum is not None:
        # One-hot [N, S] of counted tokens: sums and counts per slot by matmul (no scatter).
        onehot = (slot[:, None] == torch.arange(n_slots, device=hidden.device)) & steered[:, None]
        run_sum.add_(onehot.float().T @ p)
        run_count.add_(onehot.sum(dim=0).to(run_count.dtype))
        positions = torch.arange(n_tokens, device=hidden.device)[:, None].expand(-1, n_slots)
        newest = torch.where(onehot, positions, -1).amax(dim=0) if n_tokens else \
            torch.full((n_slots,), -1, device=hidden.device)  # [S]
        last = p[newest.clamp_min(0)] if n_tokens else run_last
        run_last.copy_(torch.where((newest >= 0)[:, None], last, run_last))


def ref_scale_neurons_(act: torch.Tensor, neuron_idx: torch.Tensor, scale: float) -> None:
    r"""Scale a set of neurons (last-dimension columns) of ``act`` in place.

    For every row :math:`r` of ``act`` (all leading dimensions) and every listed neuron
    :math:`j \in \mathrm{neuron\_idx}`, in float32 whatever the storage dtype:

    .. math::
        a_{r,j} \leftarrow s \cdot a_{r,j}

    Every other entry is left untouched (bit for bit); an empty ``neuron_idx`` changes nothing.

    Parameters
    ----------
    act : Tensor [..., F], float32/bfloat16/float16
        MLP intermediate activations, modified in place.
    neuron_idx : Tensor [M], int64
        Distinct neuron indices in ``[0, F)``.
    scale : float
        :math:`s`; 0 ablates (zeroes) the neurons.
    """
    if neuron_idx.numel() == 0:
        return
    cols = act.index_select(-1, neuron_idx)
    act.index_copy_(act.dim() - 1, neuron_idx, (cols.float() * scale).to(act.dtype))

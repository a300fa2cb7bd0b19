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

#: Relative pivot below which a clamped direction counts as dependent on the earlier active
#: ones (``sin²`` of its angle to their span; 1e-4 is 0.57°): it is dropped from the active set.
#: ``kLevelPivotEps`` in ``csrc/levels.h``.
LEVEL_PIVOT_EPS = 1e-4


def unit_gram(vectors: torch.Tensor) -> torch.Tensor:
    r"""The Gram matrix of the unit emotion directions, :math:`G_{ij} = \langle u_i, u_j\rangle`
    with :math:`u_k = v_k / \lVert v_k\rVert`: float32 ``[K, K]``, computed in float64.

    The ops take it beside ``bounds`` (it depends on the vectors only): compute it once per
    set of vectors and pass it to every call, so a call allocates nothing.
    """
    v = vectors.detach().double()
    u = v / v.norm(dim=1, keepdim=True)
    return (u @ u.T).float().contiguous()


def level_coefficients(gram: torch.Tensor, p_after: torch.Tensor, lower: torch.Tensor,
                       upper: torch.Tensor) -> torch.Tensor:
    r"""The active-set solve of projection levels and bounds, for many rows at once.

    Per row, with targets :math:`t_k = \mathrm{clip}(p'_k, lo_k, hi_k)` and the active set
    :math:`A = \{k : t_k \ne p'_k\}`, solves :math:`G_{AA}\, a_A = t_A - p'_A` (:math:`a_k = 0`
    off :math:`A`) by a Cholesky factorisation in index order, inactive rows and columns replaced
    by the identity; a direction whose pivot is below ``LEVEL_PIVOT_EPS · G_kk`` (dependent on
    the earlier active ones) is dropped from :math:`A`. The same steps, in the same order, as
    ``level_coefficients`` in ``csrc/levels.h``.

    Parameters
    ----------
    gram : Tensor [K, K] float32
        :func:`unit_gram` of the vectors.
    p_after : Tensor [N, K] float32
        Projections on the unit directions after the pushes (and the norm-preserving rescale).
    lower, upper : Tensor [N, K] float32
        Each row's bounds (``-inf`` / ``+inf``: open; a level is ``lower == upper``).

    Returns
    -------
    Tensor [N, K] float32
        The coefficients :math:`a` of the unit directions.
    """
    n_rows, n_vec = p_after.shape
    gap = torch.minimum(torch.maximum(p_after, lower), upper) - p_after  # t - p'
    factor = torch.zeros(n_rows, n_vec, n_vec, dtype=torch.float32, device=p_after.device)
    z = torch.zeros(n_rows, n_vec, dtype=torch.float32, device=p_after.device)
    active = torch.zeros(n_rows, n_vec, dtype=torch.bool, device=p_after.device)
    for i in range(n_vec):
        row = torch.zeros(n_rows, n_vec, dtype=torch.float32, device=p_after.device)
        for j in range(i):
            s = gram[i, j] - (row[:, :j] * factor[:, j, :j]).sum(dim=1)
            row[:, j] = torch.where(active[:, j], s / factor[:, j, j], 0.0)
        d = gram[i, i] - (row[:, :i] ** 2).sum(dim=1)
        keep = (gap[:, i] != 0) & (d > LEVEL_PIVOT_EPS * gram[i, i])
        row = torch.where(keep[:, None], row, 0.0)
        diag = torch.where(keep, d.clamp_min(0).sqrt(), 1.0)
        row[:, i] = diag
        factor[:, i] = row
        z[:, i] = torch.where(keep, (gap[:, i] - (row[:, :i] * z[:, :i]).sum(dim=1)) / diag, 0.0)
        active[:, i] = keep
    a = torch.zeros(n_rows, n_vec, dtype=torch.float32, device=p_after.device)
    for i in reversed(range(n_vec)):
        s = z[:, i] - (factor[:, i + 1:, i] * a[:, i + 1:]).sum(dim=1)
        a[:, i] = torch.where(active[:, i], s / factor[:, i, i], 0.0)
    return a


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
    bounds: torch.Tensor | None = None,
    gram: torch.Tensor | None = None,
) -> None:
    r"""Steer ``hidden`` in place and read its projections on the emotion directions.

    For each token row :math:`x = h_{b,t}` (before steering)

    .. math::
        p_k = \langle x, v_k \rangle / \lVert v_k \rVert, \qquad
        y = x + \sum_k w_{b,k} v_k, \qquad
        y \leftarrow y \cdot \lVert x \rVert / \max(\lVert y \rVert, \epsilon)
        \ \text{(if norm\_preserving)}

    then, with ``bounds``, the projection levels and bounds of :func:`ref_steer_packed_`
    (``bounds[b]`` for every row of sequence ``b``), and ``hidden[b, t] = y`` where
    ``mask[b, t]`` (every row when ``mask`` is None).

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
    bounds : Tensor [B, 2, K], float32, optional
        Each sequence's lower (``bounds[b, 0]``) and upper (``bounds[b, 1]``) bound of every
        projection after the edit, in raw projection units.
    gram : Tensor [K, K], float32, optional
        :func:`unit_gram` of ``vectors``; required with ``bounds``.
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
                      flat_proj, run_sum, run_count, run_last, bounds, gram)
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
    bounds: torch.Tensor | None = None,
    gram: torch.Tensor | None = None,
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

    Then, with ``bounds`` (per slot, lower :math:`lo = B_{s,0}`, upper :math:`hi = B_{s,1}`),
    the levels: with :math:`u_k = v_k / \lVert v_k\rVert` and :math:`G = ` ``gram``, the
    projections after the pushes are :math:`p'_k = c\,(p_k + \sum_j W_{s,j} \lVert v_j\rVert
    G_{jk})` (:math:`c` the norm-preserving scale, 1 without it), and

    .. math::
        y \leftarrow y + \textstyle\sum_{k \in A} a_k u_k, \qquad
        G_{AA}\, a_A = \mathrm{clip}(p'_A, lo_A, hi_A) - p'_A

    over the active set :math:`A = \{k : p'_k \notin [lo_k, hi_k]\}` (:func:`level_coefficients`):
    every bound is met exactly (up to rounding) when the active directions are independent.

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
    bounds : Tensor [S, 2, K], float32, optional
        Per slot, the lower and upper bound of every projection after the edit (raw units;
        ``-inf``/``+inf`` open, equal bounds a level).
    gram : Tensor [K, K], float32, optional
        :func:`unit_gram` of ``vectors``; required with ``bounds``.
    """
    n_tokens = hidden.shape[0]
    n_slots = slot_weights.shape[0]
    slot = token_slot[:n_tokens].long()
    steered = slot >= 0
    x = hidden.float() if residual is None else hidden.float() + residual.float()
    v = vectors.float()
    p = x @ (v / v.norm(dim=1, keepdim=True)).T  # [N, K]
    weights = slot_weights.float()[slot.clamp_min(0)]  # [N, K]
    y = x + weights @ v
    scale = torch.ones(n_tokens, 1, dtype=torch.float32, device=hidden.device)
    if norm_preserving:
        scale = x.norm(dim=-1, keepdim=True) / y.norm(dim=-1, keepdim=True).clamp_min(NORM_EPS)
        y = y * scale
    if bounds is not None:
        norms = v.norm(dim=1)
        p_after = scale * (p + (weights * norms) @ gram)
        row_bounds = bounds.float()[slot.clamp_min(0)]  # [N, 2, K]
        a = level_coefficients(gram, p_after, row_bounds[:, 0], row_bounds[:, 1])
        y = y + (a / norms) @ v
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

"""Plain-PyTorch reference of every emokern op: test oracle, fallback and benchmark baseline.

Each ``ref_<op>`` computes in float32 whatever the storage dtype and has exactly the
semantics documented in docs/design.md §2. Arguments are assumed valid (the public wrappers in
:mod:`emokern.ops.library` validate them); the reference favours clarity over speed.
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
    batch, seq_len, _ = hidden.shape
    x = hidden.float()
    v = vectors.float()
    p = x @ (v / v.norm(dim=1, keepdim=True)).T  # [B, T, K]
    y = x + (weights.float() @ v)[:, None, :]
    if norm_preserving:
        y = y * (x.norm(dim=-1, keepdim=True) / y.norm(dim=-1, keepdim=True).clamp_min(NORM_EPS))
    steered = torch.ones(batch, seq_len, dtype=torch.bool, device=hidden.device)
    if mask is not None:
        steered = mask.to(torch.bool)
    hidden.copy_(torch.where(steered[..., None], y.to(hidden.dtype), hidden))
    if proj_out is not None:
        proj_out.copy_(p)
    if run_sum is not None:
        counted = steered.float()  # [B, T]
        run_sum.add_(torch.einsum("bt,btk->bk", counted, p))
        run_count.add_(steered.sum(dim=1).to(run_count.dtype))
        # Index of the newest counted row per sequence (-1 when none).
        positions = torch.arange(seq_len, device=hidden.device).expand(batch, seq_len)
        newest = torch.where(steered, positions, -1).amax(dim=1)  # [B]
        has_any = newest >= 0
        last = p[torch.arange(batch, device=hidden.device), newest.clamp_min(0)]  # [B, K]
        run_last.copy_(torch.where(has_any[:, None], last, run_last))

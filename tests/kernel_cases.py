"""The kernel-case harness shared by the GPU-kernel tests (``tests/ops/test_triton.py``: Triton,
under the interpreter without a GPU; ``tests/ops/test_cuda.py``: the CUDA kernel, emulated on the
CPU or compiled on a GPU): case builders, strided views, one run-and-compare harness.

Tolerances follow flash-attention's rule, element by element: each element's error against a
float32 reference may be at most twice the error of the reference itself run in the same storage
dtype *at that element*, plus ``atol + rtol`` times the element's own scale (its magnitude, or
the magnitude of the terms it is made of: :func:`term_scales`). A bound taken over the whole
tensor would let a small element be off by the error of the largest one.
"""

from __future__ import annotations

import math
import zlib

import pytest
import torch

import emokern
from emokern.ops.reference import NORM_EPS, ref_steer_, ref_steer_packed_

#: ``(dtype, mask kind)`` of the reference comparisons: every mask kind in bfloat16 (the serving
#: dtype), random masks in the others.
DTYPE_MASK_CASES = [
    (torch.bfloat16, "none"), (torch.bfloat16, "random"), (torch.bfloat16, "all"),
    (torch.float16, "random"), (torch.float32, "random"),
]


def case_seed(*parts: str) -> int:
    """A seed that depends only on the case's name (``hash()`` of a string changes with every
    process, so a failure could not be reproduced)."""
    return zlib.crc32("/".join(parts).encode())


def gpu(test):
    """Mark ``test`` as needing a CUDA device (marker ``gpu``), skipped without one."""
    skip = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
    return pytest.mark.gpu(skip(test))


def make_mask(kind: str, batch: int, seq_len: int, gen: torch.Generator):
    if kind == "none":
        return None
    if kind == "all":
        return torch.ones(batch, seq_len, dtype=torch.bool)
    mask = torch.rand(batch, seq_len, generator=gen) < 0.5
    if batch > 1:
        mask[0] = False  # a sequence with nothing to steer or count
    # The newest masked row well before the end: run_last must come from an earlier chunk.
    mask[-1, seq_len // 2:] = False
    mask[-1, max(0, seq_len // 2 - 1)] = True
    return mask


def random_inputs(shape, dtype, gen):
    batch, seq_len, dim, n_vec = shape
    hidden = (torch.randn(batch, seq_len, dim, generator=gen) * 3).to(dtype)
    vectors = torch.randn(n_vec, dim, generator=gen)
    weights = torch.randn(batch, n_vec, generator=gen) * 2 / math.sqrt(n_vec)
    return hidden, vectors, weights


def steer_twice(fn, hiddens, vectors, weights, mask, norm, with_proj=True, with_run=True):
    """Two calls (two decode or prefill steps) sharing one RunningProjections; returns the
    steered hiddens, the projections of each call and the running statistics."""
    batch, seq_len, _ = hiddens[0].shape
    run = emokern.RunningProjections(batch, vectors.shape[0], device=hiddens[0].device)
    projs = []
    for hidden in hiddens:
        proj = None
        if with_proj:
            proj = torch.full((batch, seq_len, vectors.shape[0]), float("nan"),
                              device=hidden.device)
        fn(hidden, vectors, weights, mask, norm, proj,
           *(run.tensors() if with_run else (None, None, None)))
        projs.append(proj)
    return hiddens, projs, run


def assert_flash_close(name: str, out, ref32, ref_low, rtol: float = 1e-5, *,
                       atol: float = 1e-5, scale=None):
    """Flash-attention's rule per element: for every element ``i``

    ``|out_i - ref32_i| <= 2 |ref_low_i - ref32_i| + atol + rtol * s_i``

    with ``s_i = max(|ref32_i|, scale_i)`` (``scale``: the magnitude of the terms the element is
    made of, :func:`term_scales`, for elements that cancellation makes small) — each element
    against its own scale and its own low-precision rounding (NaN allowed only where the
    reference has NaN)."""
    out, ref32, ref_low = out.float().cpu(), ref32.float().cpu(), ref_low.float().cpu()
    assert out.shape == ref32.shape == ref_low.shape, f"{name}: shapes differ"
    assert torch.equal(out.isnan(), ref32.isnan()), f"{name}: NaN pattern differs"
    out, ref32, ref_low = (t.double().nan_to_num() for t in (out, ref32, ref_low))
    own = ref32.abs()
    if scale is not None:
        own = torch.maximum(own, scale.double().cpu().nan_to_num().expand_as(own))
    err = (out - ref32).abs()
    bound = 2 * (ref_low - ref32).abs() + atol + rtol * own
    bad = err > bound
    if bool(bad.any()):
        worst = int(((err - bound) / bound).flatten().argmax())
        at = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), err.shape))
        raise AssertionError(
            f"{name}: {int(bad.sum())} of {err.numel()} elements off; worst at {at}: got "
            f"{out[at].item():.6g}, float32 reference {ref32[at].item():.6g}, storage-dtype "
            f"reference {ref_low[at].item():.6g}: error {err[at].item():.3g} > bound "
            f"{bound[at].item():.3g} (2 x {(ref_low - ref32).abs()[at].item():.3g} + {atol:g} + "
            f"{rtol:g} x {own[at].item():.3g})")


def term_scales(hidden, residual, vectors, slot_weights, token_slot, norm_preserving):
    """Per element, the magnitude of the terms each output of ``steer_packed_`` is made of
    (float64), the scale its float32 rounding error grows with: ``(hidden [N, D], proj [N, K],
    run_sum [S, K], run_last [S, K])``. With ``x = h + r``: a projection ``sum_j |x_j| |u_kj|``,
    a steered element ``c (|x_j| + sum_k |W_sk| |v_kj|) + |r_j|`` (``c`` the norm-preserving
    rescale), a slot's sum the sum of its tokens' projection scales, its last the largest."""
    n_tokens = hidden.shape[0]
    n_slots = slot_weights.shape[0]
    slot = token_slot[:n_tokens].long().cpu()
    h = hidden.double().cpu()
    r = torch.zeros_like(h) if residual is None else residual.double().cpu()
    x, ax = h + r, h.abs() + r.abs()
    v = vectors.double().cpu()
    u = v / v.norm(dim=1, keepdim=True)
    proj = ax @ u.abs().T
    w = slot_weights.double().cpu()[slot.clamp_min(0)]
    terms = ax + w.abs() @ v.abs()
    if norm_preserving:
        y = x + w @ v
        terms = terms * x.norm(dim=1, keepdim=True) / y.norm(dim=1, keepdim=True).clamp_min(
            NORM_EPS)
    onehot = (slot[:, None] == torch.arange(n_slots)) & (slot >= 0)[:, None]
    run_sum = onehot.double().T @ proj
    run_last = (onehot.double()[:, :, None] * proj[:, None, :]).amax(dim=0) if n_tokens else \
        torch.zeros(n_slots, vectors.shape[0], dtype=torch.float64)
    return terms + r.abs(), proj, run_sum, run_last


def batched_term_scales(hidden, vectors, weights, mask, norm_preserving):
    """:func:`term_scales` of ``steer_`` (one slot per sequence, -1 where ``mask`` is False):
    ``(hidden [B, T, D], proj [B, T, K], run_sum [B, K], run_last [B, K])``."""
    batch, seq_len, dim = hidden.shape
    token_slot = torch.arange(batch, dtype=torch.int32)[:, None].expand(batch, seq_len)
    if mask is not None:
        token_slot = torch.where(mask.cpu(), token_slot, -1)
    h, p, run_sum, run_last = term_scales(hidden.reshape(batch * seq_len, dim), None, vectors,
                                          weights, token_slot.reshape(-1), norm_preserving)
    return h.view(batch, seq_len, dim), p.view(batch, seq_len, -1), run_sum, run_last


def assert_matches_reference(outs, projs, run, hiddens, vectors, weights, args, mask, bases,
                             bases_before, make_view, with_proj, with_run):
    """Compare two kernel calls (from :func:`steer_twice`) with the reference run in float32
    and in the storage dtype (flash-attention's rule); unmasked rows must stay bit-identical
    and nothing outside a strided view may be written."""
    ref_low, projs_low, run_low = steer_twice(ref_steer_, [h.clone() for h in hiddens],
                                               vectors, weights, **args)
    ref32, projs32, run32 = steer_twice(ref_steer_, [h.float() for h in hiddens], vectors,
                                         weights, **args)
    steered = torch.ones(hiddens[0].shape[:2], dtype=torch.bool) if mask is None else mask
    scales = [batched_term_scales(h, vectors, weights, mask, args["norm"]) for h in hiddens]
    for i, (out, h_in) in enumerate(zip(outs, hiddens, strict=True)):
        out = out.cpu()
        assert out.dtype == h_in.dtype
        assert torch.equal(out[~steered], h_in[~steered]), f"call {i}: unmasked rows changed"
        assert_flash_close(f"call {i} hidden", out[steered], ref32[i][steered],
                           ref_low[i][steered], scale=scales[i][0][steered])
        if with_proj:
            assert_flash_close(f"call {i} proj_out", projs[i], projs32[i], projs_low[i],
                               scale=scales[i][1])
    if make_view is not None:
        for base, before in zip(bases, bases_before, strict=True):
            outside = torch.ones_like(base, dtype=torch.bool)
            make_view(outside).fill_(False)
            assert torch.equal(base[outside], before[outside]), "wrote outside the view"
    if with_run:
        assert torch.equal(run.count.cpu(), run32.count)
        assert_flash_close("running.sum", run.sum, run32.sum, run_low.sum,
                           scale=sum(sc[2] for sc in scales))
        assert_flash_close("running.last", run.last, run32.last, run_low.last,
                           scale=torch.maximum(scales[0][3], scales[1][3]))


class View:
    """A non-contiguous ``[B, T, D]`` view of a larger buffer: ``view(base)`` makes it,
    ``view.base_shape(shape)`` is the shape of a buffer holding a ``shape`` view."""

    def __init__(self, name, base_shape, view):
        self.name, self.base_shape, self._view = name, base_shape, view

    def __call__(self, base):
        return self._view(base)

    def __repr__(self):
        return self.name


VIEWS = [
    View("every-other-token", lambda s: (s[0], 2 * s[1], s[2]), lambda b: b[:, ::2]),
    View("narrow-last-dim", lambda s: (s[0], s[1], s[2] + 5), lambda b: b[..., 3:-2]),
    View("time-major", lambda s: (s[1], s[0], s[2]), lambda b: b.transpose(0, 1)),
]


def to_device(device, *tensors):
    """``tensors`` on ``device`` (None stays None)."""
    return [None if t is None else t.to(device) for t in tensors]


def check_against_reference(fn, hidden_in, vectors, weights, mask, norm, make_view=None,
                            with_proj=True, with_run=True, device="cpu"):
    """Two calls of ``fn`` (the kernel, with ``emokern::steer_``'s positional arguments) and of
    the reference (storage dtype and float32) sharing running statistics, every output compared
    by :func:`assert_matches_reference`. The inputs live on the CPU; ``fn`` runs on ``device``.
    ``make_view`` (a :class:`View`) steers a non-contiguous view of a larger buffer whose other
    elements must stay untouched."""
    hiddens = [hidden_in, hidden_in.flip(1).contiguous()]
    args = dict(mask=mask, norm=norm, with_proj=with_proj, with_run=with_run)
    vectors_dev, weights_dev, mask_dev = to_device(device, vectors, weights, mask)
    if make_view is None:
        bases = views = [h.clone().to(device) for h in hiddens]
    else:
        bases = [torch.randn(make_view.base_shape(h.shape)).to(h.dtype).to(device)
                 for h in hiddens]
        views = [make_view(base) for base in bases]
        for view, h in zip(views, hiddens, strict=True):
            assert not view.is_contiguous() and view.stride(2) == 1
            view.copy_(h)
    bases_before = [b.clone() for b in bases]
    outs, projs, run = steer_twice(fn, views, vectors_dev, weights_dev, **dict(args, mask=mask_dev))
    assert_matches_reference(outs, projs, run, hiddens, vectors, weights, args, mask,
                             bases, bases_before, make_view, with_proj, with_run)


# --- the packed-token layout (emokern::steer_packed_) --------------------------------------------

#: How the first N entries of ``token_slot`` are laid out: ``runs`` (each request's tokens
#: contiguous, as serving engines pack them, padding at the end), ``random`` (slots interleaved
#: token by token, -1 included), ``none`` (every token untouched), ``one`` (every token in one
#: slot).
SLOT_LAYOUTS = ("runs", "random", "none", "one")


def make_token_slot(layout: str, n_tokens: int, n_max: int, n_slots: int,
                    gen: torch.Generator) -> torch.Tensor:
    """``token_slot [n_max]`` int32 with its first ``n_tokens`` entries laid out as ``layout``;
    the tail holds valid slots, which a kernel must not read (a kernel looking past N for a
    slot's newest token would miss its ``run_last``)."""
    token_slot = torch.randint(0, n_slots, (n_max,), generator=gen, dtype=torch.int32)
    if layout == "runs":
        cuts = torch.sort(torch.randint(0, n_tokens + 1, (n_slots,), generator=gen)).values
        head = torch.full((n_tokens,), -1, dtype=torch.int32)
        start = 0
        for slot, end in zip(torch.randperm(n_slots, generator=gen).tolist(), cuts.tolist(),
                             strict=True):
            head[start:end] = slot
            start = end
        head[max(0, n_tokens - 2):] = -1  # padding tokens at the end
    elif layout == "random":
        head = torch.randint(-1, n_slots, (n_tokens,), generator=gen, dtype=torch.int32)
    elif layout == "none":
        head = torch.full((n_tokens,), -1, dtype=torch.int32)
    elif layout == "one":
        head = torch.zeros(n_tokens, dtype=torch.int32)
    else:
        raise ValueError(f"unknown slot layout {layout!r}")
    token_slot[:n_tokens] = head
    return token_slot


def packed_inputs(n_tokens, dim, n_vec, n_slots, dtype, residual, gen):
    """``(hidden [N, D], residual [N, D] or None, vectors [K, D], slot_weights [S, K])``; the
    last slot's weights are zero (an unsteered request)."""
    hidden = (torch.randn(n_tokens, dim, generator=gen) * 3).to(dtype)
    res = (torch.randn(n_tokens, dim, generator=gen) * 3).to(dtype) if residual else None
    vectors = torch.randn(n_vec, dim, generator=gen)
    slot_weights = torch.randn(n_slots, n_vec, generator=gen) * 2 / math.sqrt(n_vec)
    slot_weights[-1] = 0.0
    return hidden, res, vectors, slot_weights


def _packed_twice(fn, hiddens, residuals, vectors, slot_weights, token_slots, norm, n_max,
                  with_proj, with_run, device):
    """Two calls of ``fn`` (``emokern::steer_packed_``'s positional arguments) sharing one
    RunningProjections, on ``device``; ``proj_out`` rows past N start as -7."""
    n_vec, n_slots = vectors.shape[0], slot_weights.shape[0]
    run = emokern.RunningProjections(n_slots, n_vec, device=device)
    projs = []
    for hidden, res, token_slot in zip(hiddens, residuals, token_slots, strict=True):
        proj = None
        if with_proj:
            proj = torch.full((n_max, n_vec), -7.0, device=device)
        fn(hidden, res, vectors, slot_weights, token_slot, norm, proj,
           *(run.tensors() if with_run else (None, None, None)))
        projs.append(proj)
    return projs, run


def check_packed_against_reference(fn, hidden_in, residual, vectors, slot_weights, token_slot,
                                   norm, *, with_proj=True, with_run=True, device="cpu",
                                   row_stride=None):
    """Two calls of ``fn`` (the second with the rows reversed and the slots rolled) against
    ``ref_steer_packed_`` in float32 and in the storage dtype (flash-attention's rule): tokens
    without a slot stay bit-identical, ``residual`` is never written, ``proj_out`` past N is
    untouched, counts are exact. ``row_stride`` (> D) steers rows of a wider buffer whose other
    columns must stay untouched."""
    n_tokens, dim = hidden_in.shape
    n_max = token_slot.shape[0]
    hiddens = [hidden_in, hidden_in.flip(0).contiguous()]
    residuals = [residual, None if residual is None else residual.flip(0).contiguous()]
    token_slots = [token_slot, torch.cat([token_slot[:n_tokens].roll(1), token_slot[n_tokens:]])]
    # The kernel's inputs, on its device (hidden possibly inside a wider buffer).
    vectors_dev, weights_dev = to_device(device, vectors, slot_weights)
    if row_stride is None:
        bases = views = [h.clone().to(device) for h in hiddens]
    else:
        bases = [torch.randn(n_tokens, row_stride).to(hidden_in.dtype).to(device)
                 for _ in hiddens]
        views = [base[:, 2:2 + dim] for base in bases]
        for view, h in zip(views, hiddens, strict=True):
            view.copy_(h)
    bases_before = [b.clone() for b in bases]
    res_dev = to_device(device, *residuals)
    res_before = [None if r is None else r.clone() for r in res_dev]
    slots_dev = to_device(device, *token_slots)
    slots_before = [s.clone() for s in slots_dev]
    projs, run = _packed_twice(fn, views, res_dev, vectors_dev, weights_dev, slots_dev, norm,
                               n_max, with_proj, with_run, device)
    # The reference, in the storage dtype and in float32.
    low = [h.clone() for h in hiddens]
    projs_low, run_low = _packed_twice(ref_steer_packed_, low, residuals, vectors, slot_weights,
                                       token_slots, norm, n_max, True, True, "cpu")
    f32 = [h.float() for h in hiddens]
    projs32, run32 = _packed_twice(ref_steer_packed_, f32, [None if r is None else r.float()
                                                           for r in residuals],
                                   vectors, slot_weights, token_slots, norm, n_max, True, True,
                                   "cpu")
    scales = [term_scales(h, r, vectors, slot_weights, t, norm)
              for h, r, t in zip(hiddens, residuals, token_slots, strict=True)]
    for i, (view, h_in) in enumerate(zip(views, hiddens, strict=True)):
        out = view.cpu()
        steered = token_slots[i][:n_tokens] >= 0
        assert out.dtype == h_in.dtype
        assert torch.equal(out[~steered], h_in[~steered]), f"call {i}: unsteered tokens changed"
        assert_flash_close(f"call {i} hidden", out[steered], f32[i][steered], low[i][steered],
                           scale=scales[i][0][steered])
        if res_dev[i] is not None:
            assert torch.equal(res_dev[i], res_before[i]), f"call {i}: residual was written"
        assert torch.equal(slots_dev[i], slots_before[i]), f"call {i}: token_slot was written"
        if with_proj:
            assert bool((projs[i][n_tokens:] == -7.0).all()), f"call {i}: proj_out past N written"
            assert_flash_close(f"call {i} proj_out", projs[i][:n_tokens], projs32[i][:n_tokens],
                               projs_low[i][:n_tokens], scale=scales[i][1])
    if row_stride is not None:
        for base, before in zip(bases, bases_before, strict=True):
            outside = torch.ones_like(base, dtype=torch.bool)
            outside[:, 2:2 + dim] = False
            assert torch.equal(base[outside].cpu(), before[outside].cpu()), \
                "wrote outside the rows"
    if with_run:
        assert torch.equal(run.count.cpu(), run32.count)
        assert_flash_close("running.sum", run.sum, run32.sum, run_low.sum,
                           scale=sum(sc[2] for sc in scales))
        assert_flash_close("running.last", run.last, run32.last, run_low.last,
                           scale=torch.maximum(scales[0][3], scales[1][3]))


#: ``(N, N_max, D, K, S)`` of the packed-layout comparisons: row mode (N < 64, one token a
#: program or block) with D = 7, 64, 577 (several D tiles) and K = 33; dot/chunk mode (N >= 64,
#: 16 tokens a program or block) with D = 31 and 200.
PACKED_SHAPES = {
    "decode-N5": (5, 8, 64, 6, 7),
    "D7-K33": (9, 12, 7, 33, 4),
    "rows-D577-K17": (3, 3, 577, 17, 3),
    "dot-D200": (70, 80, 200, 5, 6),
    "dot-D31-K20": (130, 140, 31, 20, 9),
}
#: ``(dtype, residual, norm_preserving, slot layout)`` run on every packed shape.
PACKED_CASES = [
    (torch.bfloat16, True, True, "runs"), (torch.bfloat16, True, False, "random"),
    (torch.bfloat16, False, False, "runs"), (torch.float16, False, True, "random"),
    (torch.float32, True, True, "random"),
]


def packed_case(case: str, dtype, residual: bool, layout: str):
    """The inputs of one packed comparison: ``(hidden, residual, vectors, slot_weights,
    token_slot)``, seeded by the case's name."""
    n_tokens, n_max, dim, n_vec, n_slots = PACKED_SHAPES[case]
    gen = torch.Generator().manual_seed(case_seed(case, str(dtype), str(residual), layout))
    hidden, res, vectors, slot_weights = packed_inputs(n_tokens, dim, n_vec, n_slots, dtype,
                                                       residual, gen)
    token_slot = make_token_slot(layout, n_tokens, n_max, n_slots, gen)
    return hidden, res, vectors, slot_weights, token_slot


def check_packed_graph_replays(packed_fn, batched_fn, device="cuda"):
    """Both ops captured in CUDA graphs over persistent buffers and replayed three times, with
    new states, weights, token slots and masks written into the captured tensors by ``copy_``
    between replays (the serving pattern); every replay is compared with the reference. The
    packed op runs at N = 24 (row mode) and N = 80 (dot/chunk mode) within N_max = 96."""
    gen = torch.Generator().manual_seed(11)
    dim, n_vec, n_slots, n_max, dtype = 576, 6, 8, 96, torch.bfloat16
    vectors_cpu = torch.randn(n_vec, dim, generator=gen)
    vectors = vectors_cpu.to(device)
    for n_tokens in (24, 80):
        hidden = torch.zeros(n_tokens, dim, dtype=dtype, device=device)
        residual = torch.zeros_like(hidden)
        token_slot = torch.full((n_max,), -1, dtype=torch.int32, device=device)
        slot_weights = torch.zeros(n_slots, n_vec, device=device)
        proj = torch.zeros(n_max, n_vec, device=device)
        run = emokern.RunningProjections(n_slots, n_vec, device=device)
        args = (hidden, residual, vectors, slot_weights, token_slot, True, proj, *run.tensors())
        packed_fn(*args)  # compile outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            packed_fn(*args)
        run.reset()
        ref_run = emokern.RunningProjections(n_slots, n_vec)
        for step in range(3):
            h, r, _, w = packed_inputs(n_tokens, dim, n_vec, n_slots, dtype, True, gen)
            slots = make_token_slot(("runs", "random", "runs")[step], n_tokens, n_max, n_slots,
                                    gen)
            for dst, src in ((hidden, h), (residual, r), (slot_weights, w), (token_slot, slots)):
                dst.copy_(src)
            graph.replay()
            want, want32, want_proj = h.clone(), h.float(), torch.empty(n_max, n_vec)
            ref_steer_packed_(want, r, vectors_cpu, w, slots, True, want_proj,
                              *ref_run.tensors())
            ref_steer_packed_(want32, r.float(), vectors_cpu, w, slots, True)
            assert_flash_close(f"N={n_tokens} replay {step} hidden", hidden, want32, want)
            torch.testing.assert_close(proj[:n_tokens].cpu(), want_proj[:n_tokens], rtol=1e-5,
                                       atol=1e-3)
        assert torch.equal(run.count.cpu(), ref_run.count)
        torch.testing.assert_close(run.sum.cpu(), ref_run.sum, rtol=1e-5, atol=1e-2)
        torch.testing.assert_close(run.last.cpu(), ref_run.last, rtol=1e-5, atol=1e-3,
                                   equal_nan=True)
    # The batched op, a decode step with a mask changed between replays.
    batch = 8
    hidden = torch.zeros(batch, 1, dim, dtype=dtype, device=device)
    weights = torch.zeros(batch, n_vec, device=device)
    mask = torch.ones(batch, 1, dtype=torch.bool, device=device)
    run = emokern.RunningProjections(batch, n_vec, device=device)
    args = (hidden, vectors, weights, mask, True, None, *run.tensors())
    batched_fn(*args)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        batched_fn(*args)
    run.reset()
    ref_run = emokern.RunningProjections(batch, n_vec)
    for step in range(3):
        h = (torch.randn(batch, 1, dim, generator=gen) * 3).to(dtype)
        w = torch.randn(batch, n_vec, generator=gen)
        m = torch.rand(batch, 1, generator=gen) < 0.7
        for dst, src in ((hidden, h), (weights, w), (mask, m)):
            dst.copy_(src)
        graph.replay()
        want, want32 = h.clone(), h.float()
        ref_steer_(want, vectors_cpu, w, m, True, None, *ref_run.tensors())
        ref_steer_(want32, vectors_cpu, w, m, True)
        assert_flash_close(f"batched replay {step} hidden", hidden, want32, want)
    assert torch.equal(run.count.cpu(), ref_run.count)
    torch.testing.assert_close(run.sum.cpu(), ref_run.sum, rtol=1e-5, atol=1e-2)
    torch.testing.assert_close(run.last.cpu(), ref_run.last, rtol=1e-5, atol=1e-3, equal_nan=True)

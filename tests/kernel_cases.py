"""The kernel-case harness shared by the GPU-kernel tests (``tests/ops/test_triton.py``: Triton,
under the interpreter without a GPU; ``tests/ops/test_cuda.py``: the CUDA kernel, emulated on the
CPU or compiled on a GPU): case builders, strided views, one run-and-compare harness.

Tolerances follow flash-attention's rule: the kernel's error against a float32 reference may be
at most twice the error of the reference itself run in the same storage dtype, plus a small atol.
"""

from __future__ import annotations

import math
import zlib

import pytest
import torch

import emokern
from emokern.ops.reference import ref_steer_

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


def assert_flash_close(name: str, out, ref32, ref_low, rtol: float = 1e-5):
    """``max|out - ref32| <= 2 max|ref_low - ref32| + atol`` with ``atol = rtol * max|ref32|``
    (NaN allowed only where the reference has NaN)."""
    out, ref32, ref_low = out.float().cpu(), ref32.float().cpu(), ref_low.float().cpu()
    assert torch.equal(out.isnan(), ref32.isnan()), f"{name}: NaN pattern differs"
    out, ref32, ref_low = (t.nan_to_num() for t in (out, ref32, ref_low))
    err = (out - ref32).abs().max().item() if out.numel() else 0.0
    ref_err = (ref_low - ref32).abs().max().item() if out.numel() else 0.0
    atol = rtol * max(1.0, ref32.abs().max().item() if out.numel() else 0.0)
    assert err <= 2 * ref_err + atol, (
        f"{name}: error {err:.3g} > 2 x reference error {ref_err:.3g} + atol {atol:.3g}")


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
    for i, (out, h_in) in enumerate(zip(outs, hiddens, strict=True)):
        out = out.cpu()
        assert out.dtype == h_in.dtype
        assert torch.equal(out[~steered], h_in[~steered]), f"call {i}: unmasked rows changed"
        assert_flash_close(f"call {i} hidden", out[steered], ref32[i][steered],
                           ref_low[i][steered])
        if with_proj:
            assert_flash_close(f"call {i} proj_out", projs[i], projs32[i], projs_low[i])
    if make_view is not None:
        for base, before in zip(bases, bases_before, strict=True):
            outside = torch.ones_like(base, dtype=torch.bool)
            make_view(outside).fill_(False)
            assert torch.equal(base[outside], before[outside]), "wrote outside the view"
    if with_run:
        assert torch.equal(run.count.cpu(), run32.count)
        assert_flash_close("running.sum", run.sum, run32.sum, run_low.sum)
        assert_flash_close("running.last", run.last, run32.last, run_low.last)


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

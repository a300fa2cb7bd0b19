"""Argument checks shared by the op modules: the storage dtypes an op may modify, one tensor's
type/dtype/shape/device, and a :class:`~emokern.ops.running.RunningProjections`. Each check
takes the op's ``fail`` (``emokern.errors.failing("emokern.<op>")``), so the message names the
op the user called. Covered by ``tests/ops/test_steer.py`` and ``test_steer_packed.py``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from emokern.ops.running import RunningProjections

#: The dtypes of the tensors the ops modify (``hidden``, ``act``).
HIDDEN_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_tensor(fail: Callable, name: str, value, shape: tuple, dtype: torch.dtype | None,
                 device) -> None:
    """``value`` is a tensor of ``dtype`` (any when None), ``shape`` and ``device``."""
    if not isinstance(value, torch.Tensor):
        fail(TypeError, f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if dtype is not None and value.dtype != dtype:
        fail(TypeError, f"{name} must be {dtype}, got {value.dtype}")
    if tuple(value.shape) != tuple(shape):
        fail(ValueError, f"{name} must have shape {list(shape)}, got {list(value.shape)}")
    if value.device != device:
        fail(ValueError, f"{name} is on {value.device} but hidden is on {device}")


def check_running(fail: Callable, running, rows: int, n_vec: int, device) -> None:
    """``running`` holds contiguous statistics of ``rows`` sequences (or slots) and ``n_vec``
    vectors: ``sum [rows, K]`` float32, ``count [rows]`` int64, ``last [rows, K]`` float32."""
    if not isinstance(running, RunningProjections):
        fail(TypeError, f"running must be an emokern.RunningProjections, got "
                        f"{type(running).__name__}")
    check_tensor(fail, "running.sum", running.sum, (rows, n_vec), torch.float32, device)
    check_tensor(fail, "running.count", running.count, (rows,), torch.int64, device)
    check_tensor(fail, "running.last", running.last, (rows, n_vec), torch.float32, device)
    for name, t in zip(("sum", "count", "last"), running.tensors(), strict=True):
        if not t.is_contiguous():
            fail(ValueError, f"running.{name} must be contiguous")


def check_vector_norms(fail: Callable, vectors: torch.Tensor) -> None:
    """Every vector has a nonzero finite norm (reads the tensor: a host sync on a GPU)."""
    norms = vectors.float().norm(dim=1)
    bad = ~(torch.isfinite(norms) & (norms > 0))
    if bool(bad.any()):
        fail(ValueError, f"vectors[{int(bad.nonzero()[0, 0])}] has zero or non-finite norm; an "
                         f"emotion vector needs a direction")


def check_bounds(fail: Callable, bounds, gram, rows: int, n_vec: int, device,
                 check_values: bool) -> None:
    """``bounds [rows, 2, K]`` and ``gram [K, K]``, float32, contiguous, given together; with
    ``check_values`` (reads the tensors) every bound is a number (±inf allowed) with
    ``lower <= upper``, and ``gram`` is finite."""
    if (bounds is None) != (gram is None):
        fail(ValueError, "bounds and gram go together (gram = emokern.ops.unit_gram(vectors)), "
                         f"got {'bounds without gram' if gram is None else 'gram without bounds'}")
    if bounds is None:
        return
    check_tensor(fail, "bounds", bounds, (rows, 2, n_vec), torch.float32, device)
    check_tensor(fail, "gram", gram, (n_vec, n_vec), torch.float32, device)
    for name, t in (("bounds", bounds), ("gram", gram)):
        if not t.is_contiguous():
            fail(ValueError, f"{name} must be contiguous")
    if check_values:
        if bool(bounds.isnan().any()):
            fail(ValueError, "bounds must not be NaN (use -inf / +inf for an open side)")
        bad = bounds[:, 0] > bounds[:, 1]
        if bool(bad.any()):
            row, k = (int(i) for i in bad.nonzero()[0])
            fail(ValueError, f"bounds[{row}, :, {k}]: lower {bounds[row, 0, k].item()} is above "
                             f"upper {bounds[row, 1, k].item()}")
        if not bool(torch.isfinite(gram).all()):
            fail(ValueError, "gram must be finite (emokern.ops.unit_gram(vectors))")

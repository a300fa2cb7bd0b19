r"""Triton backend of ``emokern::scale_neurons_``: scale a set of neurons in place.

For every row :math:`r` of ``act [..., F]`` and every listed neuron :math:`j`:

.. math::
    a_{r,j} \leftarrow s \cdot a_{r,j} \quad \text{(float32 compute, stored in act's dtype)}

Kernel design: a 2-D grid of ``(row blocks, index blocks)``; program ``(p, q)`` loads
``BLOCK_M`` neuron indices once and touches the ``[BLOCK_R, BLOCK_M]`` tile of those columns in
``BLOCK_R`` rows (a gather, a multiply, a scatter; other columns are never read or written).
The launch configuration is a pure function of ``M`` (no autotuning: autotuned launches are
illegal during CUDA-graph capture); offsets are int64. The launcher allocates nothing, never
reads data and never syncs the host, so it is CUDA-graph- and ``torch.compile``-safe; an
empty index set launches nothing. Tested on CPU tensors under ``TRITON_INTERPRET=1``.

Tested in ``tests/ops/test_triton.py`` and ``tests/ops/test_scale_neurons.py``.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from emokern.ops import dispatch
from emokern.ops.scale_neurons import activation_rows

#: Rows per program.
BLOCK_R = 16
#: Upper bound of the neuron indices per program.
MAX_BLOCK_M = 128


@triton.jit
def _scale_neurons_kernel(act_ptr, idx_ptr, n_rows, n_idx, row_stride, scale,
                          BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    ms = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = ms < n_idx
    cols = tl.load(idx_ptr + ms, mask=m_ok, other=0).to(tl.int64)
    ok = (rows < n_rows)[:, None] & m_ok[None, :]
    offsets = rows[:, None] * row_stride + cols[None, :]
    x = tl.load(act_ptr + offsets, mask=ok, other=0.0)
    y = x.to(tl.float32) * scale
    tl.store(act_ptr + offsets, y.to(act_ptr.dtype.element_ty), mask=ok)


def launch_config(n_idx: int) -> tuple[int, int]:
    """``(BLOCK_R, BLOCK_M)`` for ``M = n_idx`` indices: ``BLOCK_M = next_pow2(M)``, between 16
    and :data:`MAX_BLOCK_M`."""
    return BLOCK_R, min(MAX_BLOCK_M, max(16, triton.next_power_of_2(max(n_idx, 1))))


def triton_scale_neurons_(act: torch.Tensor, neuron_idx: torch.Tensor, scale: float) -> None:
    """Run the kernel (arguments assumed valid: the public wrapper checks them)."""
    n_idx = neuron_idx.shape[0]
    if n_idx == 0 or act.numel() == 0:
        return
    rows, row_stride = activation_rows(act)
    block_r, block_m = launch_config(n_idx)
    grid = (triton.cdiv(rows, block_r), triton.cdiv(n_idx, block_m))
    with torch.cuda.device(act.device) if act.is_cuda else contextlib.nullcontext():
        _scale_neurons_kernel[grid](act, neuron_idx, rows, n_idx, row_stride, float(scale),
                                    BLOCK_R=block_r, BLOCK_M=block_m)


_cuda_registration = None


def register_cuda_kernel(*, override: bool = False) -> bool:
    """Register :func:`triton_scale_neurons_` as the CUDA kernel of ``emokern::scale_neurons_``,
    so ``torch.ops.emokern.scale_neurons_`` on CUDA tensors (and inside ``torch.compile``
    graphs) runs it instead of the composite reference.

    Returns
    -------
    bool
        True if the Triton kernel is (now, or already was) the registered CUDA kernel; False if
        another CUDA kernel was present and ``override`` was False.
    """
    global _cuda_registration
    if _cuda_registration is not None:
        return True
    # The schema exists: importing emokern.ops (this module's package) defined it.
    if not override and torch._C._dispatch_has_kernel_for_dispatch_key(
            "emokern::scale_neurons_", "CUDA"):
        return False
    lib = torch.library.Library("emokern", "IMPL")
    lib.impl("scale_neurons_", triton_scale_neurons_, "CUDA")
    _cuda_registration = lib
    return True


# Not registered as the CUDA kernel when chosen (no on_cuda): the ablator runs it through
# runner_for; register_cuda_kernel is for callers of torch.ops.emokern.scale_neurons_.
dispatch.register_runner("scale_neurons_", "triton", triton_scale_neurons_)

"""The op ``emokern::scale_neurons_`` (neuron ablation: scale a set of MLP intermediate neurons
in place; :mod:`emokern.steering.ablate` installs it on a model): its schema, fake kernel,
argument checks, layout rule (:func:`activation_rows`) and public wrapper
:func:`scale_neurons_`. Reference: :func:`emokern.ops.reference.ref_scale_neurons_`; kernels:
``csrc/cpu/ablate_cpu.cpp`` (registered by :mod:`emokern.ops.build`) and
:mod:`emokern.ops.triton_ablate` (Triton covers CUDA: there is no compiled CUDA kernel).
"""

from __future__ import annotations

import math

import torch

from emokern.errors import failing
from emokern.ops import dispatch
from emokern.ops.checks import HIDDEN_DTYPES
from emokern.ops.dispatch import resolve_backend, runner_for
from emokern.ops.reference import ref_scale_neurons_

OP = "scale_neurons_"
#: Derived once from the reference's signature: ``(Tensor(a!) act, Tensor neuron_idx,
#: float scale) -> ()``.
SCHEMA = dispatch.op_schema(ref_scale_neurons_, ("act",))

torch.library.define(f"emokern::{OP}", SCHEMA)
torch.library.impl(f"emokern::{OP}", "CompositeExplicitAutograd")(ref_scale_neurons_)


@torch.library.register_fake(f"emokern::{OP}")
def _fake(*args) -> None:
    return None  # in place, returns nothing: tracing needs no shapes


dispatch.register_op(OP, backends=("reference", "cpu", "triton"), reference=ref_scale_neurons_,
                     dispatcher=torch.ops.emokern.scale_neurons_.default,
                     kernels={"triton": "emokern.ops.triton_ablate"})

_fail = failing(f"emokern.{OP}")


def validate_scale_neurons_args(act, neuron_idx, scale, check_values: bool) -> None:
    """Check every argument of :func:`scale_neurons_`; one clear error naming the first bad one.

    Metadata checks never sync with the device. ``check_values`` adds the data checks (every
    index in ``[0, F)``, strictly increasing, a finite scale), which read ``neuron_idx``: skipped
    under ``torch.compile`` and CUDA-graph capture, where the caller checked once.
    """
    fail = _fail
    if not isinstance(act, torch.Tensor):
        fail(TypeError, f"act must be a torch.Tensor, got {type(act).__name__}")
    if act.dtype not in HIDDEN_DTYPES:
        fail(TypeError, f"act must be float32, bfloat16 or float16, got {act.dtype}")
    if act.dim() < 1:
        fail(ValueError, "act must have at least one dimension [..., F], got a scalar")
    if act.shape[-1] > 1 and act.stride(-1) != 1:
        fail(ValueError, f"act must have a contiguous last dimension (stride 1), got strides "
                         f"{list(act.stride())}")
    if not isinstance(neuron_idx, torch.Tensor):
        fail(TypeError, f"neuron_idx must be a torch.Tensor, got {type(neuron_idx).__name__}")
    if neuron_idx.dtype != torch.int64:
        fail(TypeError, f"neuron_idx must be int64, got {neuron_idx.dtype}")
    if neuron_idx.dim() != 1:
        fail(ValueError, f"neuron_idx must be [M], got shape {list(neuron_idx.shape)}")
    if neuron_idx.device != act.device:
        fail(ValueError, f"neuron_idx is on {neuron_idx.device} but act is on {act.device}")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        fail(TypeError, f"scale must be a float, got {type(scale).__name__}")
    if check_values:
        if not math.isfinite(scale):
            fail(ValueError, f"scale must be finite, got {scale}")
        features = act.shape[-1]
        if neuron_idx.numel():
            if bool((neuron_idx < 0).any()) or bool((neuron_idx >= features).any()):
                fail(ValueError, f"neuron_idx values must be in [0, {features}) (F = "
                                 f"act.shape[-1])")
            if neuron_idx.numel() > 1 and not bool((neuron_idx[1:] > neuron_idx[:-1]).all()):
                fail(ValueError, "neuron_idx must be strictly increasing (sorted, distinct): "
                                 "pass torch.unique(neuron_idx)")


def activation_rows(act: torch.Tensor) -> tuple[int, int]:
    """``(rows, row_stride)`` of ``act [..., F]`` seen as ``[rows, F]`` (size-1 dimensions are
    free), or one ValueError when its leading dimensions do not collapse into one stride or
    its rows overlap: the layout test of the C++ kernel, from metadata only."""
    rows, stride, have = (0 if act.numel() == 0 else 1), act.shape[-1], False
    for size, step in zip(reversed(act.shape[:-1]), reversed(act.stride()[:-1]), strict=True):
        if size == 1 or rows == 0:
            continue
        if not have:
            stride, have = step, True
        elif step != stride * rows:
            _fail(ValueError, f"act's leading dimensions must collapse into rows of one stride, "
                              f"got shape {list(act.shape)} and strides {list(act.stride())}; "
                              f"pass act.contiguous() and copy back")
        rows *= size
    if rows > 1 and act.shape[-1] and stride < act.shape[-1]:
        _fail(ValueError, f"act's rows overlap in memory (strides {list(act.stride())}); an "
                          f"in-place op needs distinct rows")
    return rows, stride

def scale_neurons_(act: torch.Tensor, neuron_idx: torch.Tensor, scale: float = 0.0, *,
                   backend: str | None = None) -> None:
    r"""Scale a set of neurons (last-dimension columns) of ``act`` in place.

    For every row :math:`r` (all leading dimensions) and listed neuron
    :math:`j \in \mathrm{neuron\_idx}`, in float32: :math:`a_{r,j} \leftarrow s\,a_{r,j}`. Other
    entries are untouched bit for bit; an empty ``neuron_idx`` changes nothing. ``scale=0``
    ablates the neurons.

    Parameters
    ----------
    act : Tensor [..., F], float32/bfloat16/float16
        E.g. an MLP's intermediate activation ``act_fn(gate) * up`` (the input of
        ``down_proj``). Leading dimensions must collapse into rows of one stride, with a
        contiguous last dimension.
    neuron_idx : Tensor [M], int64
        Strictly increasing (sorted, distinct) indices in ``[0, F)``, on ``act``'s device.
    scale : float
        Finite.
    backend : {"reference", "cpu", "triton"}, optional
        Force a backend; default ``$EMOKERN_BACKEND`` or the best one for ``act.device``.

    Raises
    ------
    TypeError, ValueError
        Naming the bad argument, before anything is modified.

    Examples
    --------
    >>> a = torch.ones(2, 5)
    >>> scale_neurons_(a, torch.tensor([1, 3]), 0.0)
    >>> a
    tensor([[1., 0., 1., 0., 1.],
            [1., 0., 1., 0., 1.]])
    """
    capturing = isinstance(act, torch.Tensor) and act.is_cuda \
        and torch.cuda.is_current_stream_capturing()
    validate_scale_neurons_args(act, neuron_idx, scale, check_values=not capturing
                                and not torch.compiler.is_compiling())
    chosen = resolve_backend(backend, act.device, "scale_neurons_")
    activation_rows(act)  # one layout rule on every backend (the C++ kernel checks it too)
    runner_for(chosen, "scale_neurons_")(act, neuron_idx, float(scale))

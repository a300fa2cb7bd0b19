"""The op ``emokern::steer_`` (batched steering): its schema, fake kernel, argument checks and
public wrapper :func:`steer_`. Reference: :func:`emokern.ops.reference.ref_steer_`; kernels:
``csrc/cpu``, ``csrc/cuda`` (registered by :mod:`emokern.ops.build`) and
:mod:`emokern.ops.triton_steer`; backend choice: :mod:`emokern.ops.dispatch`. The checks
mirror ``csrc/steer.h`` message for message. Semantics: ``docs/design.md`` §2.
"""

from __future__ import annotations

import torch

from emokern.errors import failing
from emokern.ops import dispatch
from emokern.ops.checks import (
    HIDDEN_DTYPES,
    check_bounds,
    check_running,
    check_tensor,
    check_vector_norms,
)
from emokern.ops.dispatch import (
    environ_get,
    has_kernel,
    kernels_loaded,
    resolve_backend,
    runner_for,
)
from emokern.ops.reference import ref_steer_, unit_gram
from emokern.ops.running import RunningProjections

OP = "steer_"
#: The arguments the op writes (alias-annotated ``Tensor(a!)`` in the schema).
MUTATES = ("hidden", "proj_out", "run_sum", "run_count", "run_last")
#: Derived once from the reference's signature:
#: ``(Tensor(a!) hidden, Tensor vectors, Tensor weights, Tensor? mask, bool norm_preserving,
#: Tensor(b!)? proj_out, Tensor(c!)? run_sum, Tensor(d!)? run_count, Tensor(e!)? run_last,
#: Tensor? bounds=None, Tensor? gram=None) -> ()``
SCHEMA = dispatch.op_schema(ref_steer_, MUTATES)

torch.library.define(f"emokern::{OP}", SCHEMA)
torch.library.impl(f"emokern::{OP}", "CompositeExplicitAutograd")(ref_steer_)


@torch.library.register_fake(f"emokern::{OP}")
def _fake(*args) -> None:
    return None  # in place, returns nothing: tracing needs no shapes


_call_dispatcher = torch.ops.emokern.steer_.default
dispatch.register_op(OP, backends=dispatch.BACKENDS, reference=ref_steer_,
                     dispatcher=_call_dispatcher, kernels={"triton": "emokern.ops.triton_steer"})

_fail = failing(f"emokern.{OP}")


def rows_disjoint(hidden: torch.Tensor) -> bool:
    """Whether the ``[B, T]`` rows of ``hidden [B, T, D]`` (last stride 1) occupy disjoint
    memory: the inner of the two row strides is at least ``D`` and the outer one spans the
    whole inner dimension (the same test as ``rows_disjoint`` in ``csrc/steer.h``)."""
    dim = hidden.shape[2]
    (size_a, size_b), (stride_a, stride_b) = hidden.shape[:2], hidden.stride()[:2]
    if size_a <= 1:
        return size_b <= 1 or stride_b >= dim
    if size_b <= 1:
        return stride_a >= dim
    if stride_a > stride_b:
        size_a, size_b, stride_a, stride_b = size_b, size_a, stride_b, stride_a
    return stride_a >= dim and stride_b >= stride_a * size_a


def _check_fast(hidden, vectors, weights, mask, proj_out, running) -> None:
    """The checks the C++ kernel cannot make, kept to a few attribute reads."""
    device = hidden.device
    for name, value in (("vectors", vectors), ("weights", weights), ("mask", mask),
                        ("proj_out", proj_out)):
        if value is not None and value.device != device:
            _fail(ValueError, f"{name} is on {value.device} but hidden is on {device}")
    if not vectors.is_floating_point():  # before the wrapper's float32 conversion
        _fail(TypeError, f"vectors must be floating point, got {vectors.dtype}")
    if running is not None:
        if not isinstance(running, RunningProjections):
            _fail(TypeError, f"running must be an emokern.RunningProjections, got "
                             f"{type(running).__name__}")
        if hidden.dim() != 3 or vectors.dim() != 2:
            return  # the kernel names hidden or vectors
        want = (hidden.shape[0], vectors.shape[0])
        if running.sum.shape != want or running.sum.device != device:
            _fail(ValueError, f"running holds statistics for [B, K] = {list(running.sum.shape)} "
                              f"on {running.sum.device}; this call needs {want} on {device}")


def validate_steer_args(hidden, vectors, weights, mask, proj_out, running, check_values: bool,
                        bounds=None, gram=None):
    """Check every argument of :func:`steer_` and raise one clear error naming the first bad one.

    Metadata checks are free of host syncs. ``check_values`` adds the data checks (finite
    weights, nonzero finite vector norms), which read the tensors; the C++ kernel makes those
    checks itself before writing, so its callers skip them here.
    """
    if not isinstance(hidden, torch.Tensor):
        _fail(TypeError, f"hidden must be a torch.Tensor, got {type(hidden).__name__}")
    if hidden.dtype not in HIDDEN_DTYPES:
        _fail(TypeError, f"hidden must be float32, bfloat16 or float16, got {hidden.dtype}")
    if hidden.dim() != 3:
        _fail(ValueError, f"hidden must be [B, T, D], got shape {list(hidden.shape)}")
    batch, seq_len, dim = hidden.shape
    if hidden.stride(2) != 1 and dim > 1:
        _fail(ValueError, f"hidden must have a contiguous last dimension (stride 1), got strides "
                          f"{list(hidden.stride())}; pass hidden.contiguous() and copy back")
    if not rows_disjoint(hidden):
        _fail(ValueError, f"hidden rows overlap in memory (strides {list(hidden.stride())}); "
                          f"an in-place op needs distinct rows")
    device = hidden.device
    if not isinstance(vectors, torch.Tensor):
        _fail(TypeError, f"vectors must be a torch.Tensor, got {type(vectors).__name__}")
    if not vectors.is_floating_point():
        _fail(TypeError, f"vectors must be floating point, got {vectors.dtype}")
    if vectors.dim() != 2 or vectors.shape[1] != dim or vectors.shape[0] < 1:
        _fail(ValueError, f"vectors must be [K, D] with K >= 1 and D = {dim} (hidden's last "
                          f"dimension), got shape {list(vectors.shape)}")
    n_vec = vectors.shape[0]
    check_tensor(_fail, "vectors", vectors, (n_vec, dim), None, device)
    check_tensor(_fail, "weights", weights, (batch, n_vec), torch.float32, device)
    if mask is not None:
        check_tensor(_fail, "mask", mask, (batch, seq_len), torch.bool, device)
    if proj_out is not None:
        check_tensor(_fail, "proj_out", proj_out, (batch, seq_len, n_vec), torch.float32, device)
        if not proj_out.is_contiguous():
            _fail(ValueError, "proj_out must be contiguous")
    if running is not None:
        check_running(_fail, running, batch, n_vec, device)
    check_bounds(_fail, bounds, gram, batch, n_vec, device, check_values)
    if check_values:
        if not bool(torch.isfinite(weights).all()):
            _fail(ValueError, "weights must be finite (found NaN or inf)")
        check_vector_norms(_fail, vectors)


def steer_(
    hidden: torch.Tensor,
    vectors: torch.Tensor,
    weights: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    norm_preserving: bool = False,
    proj_out: torch.Tensor | None = None,
    running: RunningProjections | None = None,
    backend: str | None = None,
    bounds: torch.Tensor | None = None,
    gram: torch.Tensor | None = None,
) -> None:
    r"""Add each sequence's emotion mix to ``hidden`` in place and read emotion projections.

    For every token row :math:`x = h_{b,t}` (the input, before steering), in float32:

    .. math::
        p_k = \langle x, v_k\rangle / \lVert v_k\rVert, \qquad
        y = x + \textstyle\sum_k w_{b,k}\, v_k, \qquad
        y \leftarrow y\,\lVert x\rVert / \max(\lVert y\rVert, 10^{-6})\ \text{(norm\_preserving)}

    then, with ``bounds``, the projection levels and bounds: every projection of the edited
    row on :math:`u_k = v_k/\lVert v_k\rVert` is brought into
    ``[bounds[b, 0, k], bounds[b, 1, k]]`` by the smallest correction in the span of the
    brought directions (a level is equal bounds; see :func:`~emokern.ops.steer_packed.steer_packed_`
    and ``docs/design.md`` §2 for the solve). ``hidden[b, t] = y`` on masked rows;
    ``proj_out[b, t] = p`` on every row (the input's projections); ``running`` accumulates ``p``
    over masked rows. One pass over ``hidden`` on the fused backends (two on rows a bound moves).

    Parameters
    ----------
    hidden : Tensor [B, T, D], float32/bfloat16/float16
        Modified in place. Any strides with a contiguous last dimension.
    vectors : Tensor [K, D]
        Emotion vectors, K >= 1, none of zero norm.
    weights : Tensor [B, K], float32
        One row of mix weights per sequence; must be finite.
    mask : Tensor [B, T], bool, optional
        Rows to steer and count; None steers and counts every row.
    norm_preserving : bool
        Rescale each steered row to the norm it had before steering.
    proj_out : Tensor [B, T, K], float32, optional
        Receives the projections of every row of the input.
    running : RunningProjections, optional
        Running sum / count / newest projections per sequence (masked rows only).
    backend : {"reference", "cpu", "triton", "cuda"}, optional
        Force a backend; default ``$EMOKERN_BACKEND`` or the best one for ``hidden.device``.
    bounds : Tensor [B, 2, K], float32, optional
        Each sequence's lower (``bounds[b, 0]``) and upper (``bounds[b, 1]``) bound of every
        projection after the edit, in raw projection units; ``-inf``/``+inf`` leave a side
        open, equal bounds set a level. ``emokern.steering`` converts reading units.
    gram : Tensor [K, K], float32, optional
        :func:`~emokern.ops.reference.unit_gram` of ``vectors``; computed here when omitted
        (an allocation: pass it to keep calls allocation-free).

    Raises
    ------
    TypeError, ValueError
        Naming the bad argument, before anything is modified.

    Examples
    --------
    >>> h = torch.randn(2, 5, 64)
    >>> v = torch.randn(3, 64)
    >>> w = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.5, 0.5]])
    >>> run = RunningProjections(2, 3)
    >>> steer_(h, v, w, running=run)
    >>> run.mean().shape
    torch.Size([2, 3])
    """
    # Fast path: CPU tensors on the C++ kernel, which checks every shape, dtype, layout and value
    # itself (same messages) before writing. Here only what the kernel cannot see: devices (a
    # meta or CUDA argument routes the call to another kernel), the Python type of running and
    # the backend choice: a few attribute reads and one dict lookup.
    if bounds is not None and gram is None and isinstance(vectors, torch.Tensor):
        gram = unit_gram(vectors)
    try:
        if running is None:
            run = (None, None, None)
        elif type(running) is RunningProjections:
            run = (running.sum, running.count, running.last)
        else:
            run = None  # the full path names it
        fast = run is not None and hidden.is_cpu and vectors.is_cpu and weights.is_cpu \
            and (mask is None or mask.is_cpu) and (proj_out is None or proj_out.is_cpu) \
            and (running is None or (run[0].is_cpu and run[1].is_cpu and run[2].is_cpu)) \
            and (backend or environ_get("EMOKERN_BACKEND") or "cpu") == "cpu" \
            and (kernels_loaded.get(("steer_", "CPU")) or has_kernel("steer_", "CPU"))
    except AttributeError:  # not tensors: the full path names the argument
        fast = False
    if fast:
        try:
            _call_dispatcher(hidden, vectors, weights, mask, bool(norm_preserving), proj_out, *run,
                             bounds, gram)
        except (TypeError, ValueError, RuntimeError) as exc:
            # Nothing was written. A running of the wrong size is named as the full path names
            # it (checked here, off the hot path); the dispatcher's own argument errors (e.g. a
            # list) by our checks; the kernel's errors are ours already.
            if running is not None and hidden.dim() == 3 and vectors.dim() == 2 \
                    and run[0].shape != (hidden.shape[0], vectors.shape[0]):
                _check_fast(hidden, vectors, weights, mask, proj_out, running)
            if isinstance(exc, RuntimeError):
                validate_steer_args(hidden, vectors, weights, mask, proj_out, running, False,
                                    bounds, gram)
            raise
        return
    for name, value in (("hidden", hidden), ("vectors", vectors), ("weights", weights)):
        if not isinstance(value, torch.Tensor):
            _fail(TypeError, f"{name} must be a torch.Tensor, got {type(value).__name__}")
    chosen = resolve_backend(backend, hidden.device)
    if chosen == "cpu":
        # The C++ kernel checks shapes, dtypes, layouts and values itself, with the same
        # messages, before writing. Devices are checked here (a meta or CUDA argument would
        # route the call to another kernel), and the Python-level RunningProjections.
        _check_fast(hidden, vectors, weights, mask, proj_out, running)
    else:
        capturing = hidden.is_cuda and torch.cuda.is_current_stream_capturing()
        validate_steer_args(hidden, vectors, weights, mask, proj_out, running,
                            not capturing and not torch.compiler.is_compiling(), bounds, gram)
    run = running.tensors() if running is not None else (None, None, None)
    if vectors.dtype != torch.float32 or not vectors.is_contiguous():
        vectors = vectors.float().contiguous()
    runner_for(chosen)(hidden, vectors, weights.contiguous(),
                       None if mask is None else mask.contiguous(),
                       bool(norm_preserving), proj_out, *run, bounds, gram)


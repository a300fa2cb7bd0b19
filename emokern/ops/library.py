"""The op layer: every emokern op's schema, fake kernel, reference registration, backend
choice, argument checks and public wrapper — ``steer_`` (batched), ``steer_packed_`` (packed
tokens, for serving engines) and ``scale_neurons_`` (neuron ablation).

One schema per op, defined once here; backends only attach implementations:

* ``CompositeExplicitAutograd`` — the reference (:mod:`emokern.ops.reference`), so each op
  exists on every device even when nothing compiled;
* ``CPU`` — the C++ kernels (``csrc/cpu``), loaded by :mod:`emokern.ops.build`; a
  backend-specific kernel takes precedence over the composite one;
* ``CUDA`` — the CUDA kernels (``csrc/cuda``) when built against a CUDA torch, else the Triton
  kernels (:mod:`emokern.ops.triton_steer`, :mod:`emokern.ops.triton_ablate`).

One module on purpose (~700 lines): the three ops share the backend choice
(:func:`resolve_backend`, :func:`runner_for`) and the habit of checking every argument before
anything is written; the wrappers' checks mirror ``csrc/steer.h`` message for message.
Semantics: ``docs/design.md`` §2.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

from emokern.ops import build
from emokern.ops.reference import ref_scale_neurons_, ref_steer_, ref_steer_packed_
from emokern.ops.running import RunningProjections

BACKENDS = ("reference", "cpu", "triton", "cuda")
#: The ops of the steering family (Triton registers itself as their CUDA kernel).
_STEER_OPS = ("steer_", "steer_packed_")
#: The backends each op has: scale_neurons_ has no compiled CUDA kernel (Triton covers CUDA).
OP_BACKENDS = {"steer_": BACKENDS, "steer_packed_": BACKENDS,
               "scale_neurons_": ("reference", "cpu", "triton")}
HIDDEN_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

torch.library.define(
    "emokern::steer_",
    "(Tensor(a!) hidden, Tensor vectors, Tensor weights, Tensor? mask, bool norm_preserving, "
    "Tensor(b!)? proj_out, Tensor(c!)? run_sum, Tensor(d!)? run_count, Tensor(e!)? run_last) -> ()",
)
torch.library.impl("emokern::steer_", "CompositeExplicitAutograd")(ref_steer_)
torch.library.define(
    "emokern::steer_packed_",
    "(Tensor(a!) hidden, Tensor? residual, Tensor vectors, Tensor slot_weights, "
    "Tensor token_slot, bool norm_preserving, Tensor(b!)? proj_out, Tensor(c!)? run_sum, "
    "Tensor(d!)? run_count, Tensor(e!)? run_last) -> ()",
)
torch.library.impl("emokern::steer_packed_", "CompositeExplicitAutograd")(ref_steer_packed_)


@torch.library.register_fake("emokern::steer_")
def _steer_fake(hidden, vectors, weights, mask, norm_preserving, proj_out, run_sum, run_count,
                run_last) -> None:
    return None


@torch.library.register_fake("emokern::steer_packed_")
def _steer_packed_fake(hidden, residual, vectors, slot_weights, token_slot, norm_preserving,
                       proj_out, run_sum, run_count, run_last) -> None:
    return None


def _fail(exc: type[Exception], message: str, op: str = "steer_"):
    raise exc(f"emokern.{op}: {message}")


def _check_tensor(name: str, value, shape: tuple, dtype: torch.dtype | None, device) -> None:
    if not isinstance(value, torch.Tensor):
        _fail(TypeError, f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if dtype is not None and value.dtype != dtype:
        _fail(TypeError, f"{name} must be {dtype}, got {value.dtype}")
    if tuple(value.shape) != shape:
        _fail(ValueError, f"{name} must have shape {list(shape)}, got {list(value.shape)}")
    if value.device != device:
        _fail(ValueError, f"{name} is on {value.device} but hidden is on {device}")


def _check_running(running, batch: int, n_vec: int, device) -> None:
    if not isinstance(running, RunningProjections):
        _fail(TypeError, f"running must be an emokern.RunningProjections, got "
                         f"{type(running).__name__}")
    _check_tensor("running.sum", running.sum, (batch, n_vec), torch.float32, device)
    _check_tensor("running.count", running.count, (batch,), torch.int64, device)
    _check_tensor("running.last", running.last, (batch, n_vec), torch.float32, device)
    for name, t in zip(("sum", "count", "last"), running.tensors(), strict=True):
        if not t.is_contiguous():
            _fail(ValueError, f"running.{name} must be contiguous")


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


def validate_steer_args(hidden, vectors, weights, mask, proj_out, running, check_values: bool):
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
    _check_tensor("vectors", vectors, (n_vec, dim), None, device)
    _check_tensor("weights", weights, (batch, n_vec), torch.float32, device)
    if mask is not None:
        _check_tensor("mask", mask, (batch, seq_len), torch.bool, device)
    if proj_out is not None:
        _check_tensor("proj_out", proj_out, (batch, seq_len, n_vec), torch.float32, device)
        if not proj_out.is_contiguous():
            _fail(ValueError, "proj_out must be contiguous")
    if running is not None:
        _check_running(running, batch, n_vec, device)
    if check_values:
        if not bool(torch.isfinite(weights).all()):
            _fail(ValueError, "weights must be finite (found NaN or inf)")
        norms = vectors.float().norm(dim=1)
        bad = ~(torch.isfinite(norms) & (norms > 0))
        if bool(bad.any()):
            k = int(bad.nonzero()[0, 0])
            _fail(ValueError, f"vectors[{k}] has zero or non-finite norm; an emotion vector "
                              f"needs a direction")


_call_dispatcher = torch.ops.emokern.steer_.default


def _call_triton(*args) -> None:
    from emokern.ops.triton_steer import triton_steer_  # Triton is an optional extra

    triton_steer_(*args)


_ENVIRON = os.environ
#: CPython's dict behind os.environ and its key encoding (None where they differ).
_ENVIRON_DATA = getattr(_ENVIRON, "_data", None)
_ENVIRON_KEYS = {name: _ENVIRON.encodekey(name) for name in ("EMOKERN_BACKEND", "TRITON_INTERPRET")
                 } if _ENVIRON_DATA is not None and hasattr(_ENVIRON, "encodekey") else {}


def environ_get(name: str) -> str | None:
    """``os.environ.get(name)``, read on every call (so a variable set while the program runs,
    by a test or a notebook, takes effect at once), costing one dict lookup when it is unset.

    ``os.environ.get`` of an unset name raises and catches a ``KeyError`` inside
    ``Mapping.get`` (~0.9 us, a third of a decode-size ``steer_`` call); CPython's
    ``os.environ`` keeps its entries in the dict ``_data`` under encoded names, every change
    made through ``os.environ`` updates it, and this looks there first. Where ``os.environ`` is
    not that object (replaced, another Python), it falls back to ``os.environ.get``.
    """
    key = _ENVIRON_KEYS.get(name)
    if key is not None and os.environ is _ENVIRON and key not in _ENVIRON_DATA:
        return None
    return os.environ.get(name)


def available_backends() -> dict[str, bool]:
    """Which backends can run here, without compiling anything.

    Returns
    -------
    dict
        ``{"reference": True, "cpu": bool, "triton": bool, "cuda": bool}``: ``cpu``/``cuda`` are
        True when the kernel is loaded or loads without a compile (an ahead-of-time build or a
        finished JIT build in the cache). Compiling is an explicit step:
        :func:`emokern.ops.build.load_cpu` / :func:`~emokern.ops.build.load_cuda`, which the
        first op call on that device also makes (``emokern info --build`` from the shell).
    """
    return {
        "reference": True,
        "cpu": build.cpu_ready(),
        "triton": build.triton_usable(),
        "cuda": build.cuda_ready(),
    }


def resolve_backend(backend: str | None, device: torch.device, op: str = "steer_") -> str:
    """The backend of ``emokern::<op>`` on ``device``: the forced one (argument, then
    ``EMOKERN_BACKEND``) or the fastest available one (a compiled kernel of that op when it is
    built, Triton on CUDA, else the reference).

    Raises
    ------
    ValueError
        For a backend the op does not have (``OP_BACKENDS``), or one that cannot run on
        ``device`` (``"cpu"`` needs CPU tensors, ``"cuda"`` CUDA tensors, ``"triton"`` CUDA
        tensors or CPU tensors under ``TRITON_INTERPRET=1``): the dispatcher would otherwise
        silently run another kernel.
    """
    backend = backend or environ_get("EMOKERN_BACKEND") or None
    # Whether Triton may run on CPU tensors depends on the interpreter: part of the key.
    key = (op, backend, device.type, environ_get("TRITON_INTERPRET") == "1")
    if key not in _resolved:  # decode calls are microseconds: decide once per device type
        _resolved[key] = _resolve(op, backend, device)
    return _resolved[key]


_resolved: dict[tuple[str, str | None, str, bool], str] = {}


def _backend_runs_on(backend: str, device: torch.device) -> bool:
    if backend == "reference":
        return True
    if backend == "triton":
        return device.type == "cuda" or (device.type == "cpu"
                                         and environ_get("TRITON_INTERPRET") == "1")
    return device.type == backend


def _has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether the compiled kernel of ``op`` is loaded for ``"CPU"``/``"CUDA"`` (an
    ahead-of-time build made from older sources may lack an op: the reference then runs).
    Decided once (a plain dict lookup afterwards, which ``torch.compile`` traces through)."""
    key = (op, dispatch_key)
    if key not in _kernels:
        loaded = build.load_cpu() if dispatch_key == "CPU" else build.load_cuda()
        _kernels[key] = loaded and torch._C._dispatch_has_kernel_for_dispatch_key(
            f"emokern::{op}", dispatch_key)
    return _kernels[key]


_kernels: dict[tuple[str, str], bool] = {}


def _resolve(op: str, backend: str | None, device: torch.device) -> str:
    allowed = OP_BACKENDS[op]
    if backend is not None:
        if backend not in allowed:
            note = "" if "cuda" in allowed else " (this op has no compiled CUDA kernel; Triton " \
                                                "covers CUDA)"
            _fail(ValueError, f"backend must be one of {allowed}{note}, got {backend!r}", op)
        if not _backend_runs_on(backend, device):
            usable = [b for b in allowed if _backend_runs_on(b, device)]
            _fail(ValueError, f"backend {backend!r} cannot run on {device.type} tensors; use "
                              f"{usable} (or no backend, to choose automatically)", op)
        return backend
    if device.type == "cpu":
        return "cpu" if _has_kernel(op, "CPU") else "reference"
    if device.type == "cuda":
        if "cuda" in allowed and _has_kernel(op, "CUDA"):
            return "cuda"
        if build.triton_usable():
            if op in _STEER_OPS:
                from emokern.ops.triton_steer import register_cuda_kernel  # optional extra

                register_cuda_kernel()  # so torch.ops / torch.compile on CUDA run Triton too
            return "triton"
    return "reference"


def _call_triton_packed(*args) -> None:
    from emokern.ops.triton_steer import triton_steer_packed_  # Triton is an optional extra

    triton_steer_packed_(*args)


#: Per op: (reference, Triton launcher, dispatcher entry): what runner_for returns.
_RUNNERS = {
    "steer_": (ref_steer_, _call_triton, _call_dispatcher),
    "steer_packed_": (ref_steer_packed_, _call_triton_packed,
                      torch.ops.emokern.steer_packed_.default),
}


def runner_for(backend: str, op: str = "steer_") -> Callable[..., None]:
    """The callable that runs ``emokern::<op>`` on ``backend`` (positional arguments in the
    schema's order), without the public wrapper's per-call validation: for callers that
    validated their arguments once (the steerer's hot path, a serving engine's layers, the
    ablator's hooks). Loads (or compiles) the kernel."""
    reference, triton, dispatcher = _RUNNERS[op]
    if backend == "reference":
        return reference
    if backend == "triton":
        return triton
    if not _has_kernel(op, backend.upper()):
        _fail(RuntimeError, f"the {backend!r} backend is not available here (see `emokern info`)",
              op)
    return dispatcher


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
) -> None:
    r"""Add each sequence's emotion mix to ``hidden`` in place and read emotion projections.

    For every token row :math:`x = h_{b,t}` (the input, before steering), in float32:

    .. math::
        p_k = \langle x, v_k\rangle / \lVert v_k\rVert, \qquad
        y = x + \textstyle\sum_k w_{b,k}\, v_k, \qquad
        y \leftarrow y\,\lVert x\rVert / \max(\lVert y\rVert, 10^{-6})\ \text{(norm\_preserving)}

    ``hidden[b, t] = y`` on masked rows; ``proj_out[b, t] = p`` on every row; ``running``
    accumulates ``p`` over masked rows. One pass over ``hidden`` on the fused backends.

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
            and (_kernels.get(("steer_", "CPU")) or _has_kernel("steer_", "CPU"))
    except AttributeError:  # not tensors: the full path names the argument
        fast = False
    if fast:
        try:
            _call_dispatcher(hidden, vectors, weights, mask, bool(norm_preserving), proj_out, *run)
        except (TypeError, ValueError, RuntimeError) as exc:
            # Nothing was written. A running of the wrong size is named as the full path names
            # it (checked here, off the hot path); the dispatcher's own argument errors (e.g. a
            # list) by our checks; the kernel's errors are ours already.
            if running is not None and hidden.dim() == 3 and vectors.dim() == 2 \
                    and run[0].shape != (hidden.shape[0], vectors.shape[0]):
                _check_fast(hidden, vectors, weights, mask, proj_out, running)
            if isinstance(exc, RuntimeError):
                validate_steer_args(hidden, vectors, weights, mask, proj_out, running, False)
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
                            check_values=not capturing and not torch.compiler.is_compiling())
    run = running.tensors() if running is not None else (None, None, None)
    if vectors.dtype != torch.float32 or not vectors.is_contiguous():
        vectors = vectors.float().contiguous()
    runner_for(chosen)(hidden, vectors, weights.contiguous(),
                    None if mask is None else mask.contiguous(),
                    bool(norm_preserving), proj_out, *run)


def _packed_fail(exc: type[Exception], message: str):
    _fail(exc, message, op="steer_packed_")


def validate_steer_packed_args(hidden, residual, vectors, slot_weights, token_slot, proj_out,
                               running, check_values: bool) -> None:
    """Check every argument of :func:`steer_packed_`; one clear error naming the first bad one.

    Metadata checks never sync with the device. ``check_values`` adds the data checks (finite
    weights, nonzero finite vector norms, every slot index in ``[-1, S)``), which read tensors:
    skipped under ``torch.compile`` and CUDA-graph capture, where the caller checked once.
    """
    fail = _packed_fail
    for name, value in (("hidden", hidden), ("vectors", vectors), ("slot_weights", slot_weights),
                        ("token_slot", token_slot)):
        if not isinstance(value, torch.Tensor):
            fail(TypeError, f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if hidden.dtype not in HIDDEN_DTYPES:
        fail(TypeError, f"hidden must be float32, bfloat16 or float16, got {hidden.dtype}")
    if hidden.dim() != 2:
        fail(ValueError, f"hidden must be [N, D], got shape {list(hidden.shape)}")
    n_tokens, dim = hidden.shape
    if hidden.stride(1) != 1 and dim > 1 or n_tokens > 1 and hidden.stride(0) < dim:
        fail(ValueError, f"hidden must have distinct rows with a contiguous last dimension, got "
                         f"strides {list(hidden.stride())}")
    device = hidden.device

    def check(name, value, shape, dtype):
        if not isinstance(value, torch.Tensor):
            fail(TypeError, f"{name} must be a torch.Tensor, got {type(value).__name__}")
        if dtype is not None and value.dtype != dtype:
            fail(TypeError, f"{name} must be {dtype}, got {value.dtype}")
        if tuple(value.shape) != tuple(shape):
            fail(ValueError, f"{name} must have shape {list(shape)}, got {list(value.shape)}")
        if value.device != device:
            fail(ValueError, f"{name} is on {value.device} but hidden is on {device}")

    if residual is not None:
        check("residual", residual, (n_tokens, dim), hidden.dtype)
        if residual.stride(1) != 1 and dim > 1:
            fail(ValueError, "residual must have a contiguous last dimension")
    if not vectors.is_floating_point():
        fail(TypeError, f"vectors must be floating point, got {vectors.dtype}")
    if vectors.dim() != 2 or vectors.shape[1] != dim or vectors.shape[0] < 1:
        fail(ValueError, f"vectors must be [K, D] with K >= 1 and D = {dim} (hidden's last "
                         f"dimension), got shape {list(vectors.shape)}")
    check("vectors", vectors, vectors.shape, None)
    n_vec = vectors.shape[0]
    if slot_weights.dim() != 2 or slot_weights.shape[0] < 1:
        fail(ValueError, f"slot_weights must be [S, K] with S >= 1, got shape "
                         f"{list(slot_weights.shape)}")
    n_slots = slot_weights.shape[0]
    check("slot_weights", slot_weights, (n_slots, n_vec), torch.float32)
    if token_slot.dim() != 1 or token_slot.shape[0] < n_tokens:
        fail(ValueError, f"token_slot must be [N_max] with N_max >= N = {n_tokens}, got shape "
                         f"{list(token_slot.shape)}")
    check("token_slot", token_slot, token_slot.shape, torch.int32)
    if proj_out is not None:
        if proj_out.dim() != 2 or proj_out.shape[0] < n_tokens:
            fail(ValueError, f"proj_out must be [N_max, K] with N_max >= {n_tokens}, got shape "
                             f"{list(proj_out.shape)}")
        check("proj_out", proj_out, (proj_out.shape[0], n_vec), torch.float32)
        if not proj_out.is_contiguous():
            fail(ValueError, "proj_out must be contiguous")
    if running is not None:
        if not isinstance(running, RunningProjections):
            fail(TypeError, f"running must be an emokern.RunningProjections, got "
                            f"{type(running).__name__}")
        check("running.sum", running.sum, (n_slots, n_vec), torch.float32)
        check("running.count", running.count, (n_slots,), torch.int64)
        check("running.last", running.last, (n_slots, n_vec), torch.float32)
        for name, t in zip(("sum", "count", "last"), running.tensors(), strict=True):
            if not t.is_contiguous():
                fail(ValueError, f"running.{name} must be contiguous")
    if check_values:
        if not bool(torch.isfinite(slot_weights).all()):
            fail(ValueError, "slot_weights must be finite (found NaN or inf)")
        norms = vectors.float().norm(dim=1)
        bad = ~(torch.isfinite(norms) & (norms > 0))
        if bool(bad.any()):
            fail(ValueError, f"vectors[{int(bad.nonzero()[0, 0])}] has zero or non-finite norm; "
                             f"an emotion vector needs a direction")
        used = token_slot[:n_tokens]
        if n_tokens and bool(((used < -1) | (used >= n_slots)).any()):
            fail(ValueError, f"token_slot values must be in [-1, {n_slots}) (S = "
                             f"slot_weights.shape[0]); -1 leaves a token untouched")


def steer_packed_(
    hidden: torch.Tensor,
    vectors: torch.Tensor,
    slot_weights: torch.Tensor,
    token_slot: torch.Tensor,
    *,
    residual: torch.Tensor | None = None,
    norm_preserving: bool = False,
    proj_out: torch.Tensor | None = None,
    running: RunningProjections | None = None,
    backend: str | None = None,
) -> None:
    r""":func:`steer_` for packed tokens: ``hidden [N, D]`` holds the tokens of many sequences
    (a serving engine's flattened batch), each naming its sequence's slot.

    For every token :math:`i < N` with slot :math:`s = \mathrm{token\_slot}[i]` and
    :math:`x = h_i + r_i` (``residual`` :math:`r`, or 0), in float32:

    .. math::
        p_k = \langle x, v_k\rangle / \lVert v_k\rVert, \qquad
        y = x + \textstyle\sum_k W_{s,k}\, v_k \ (s \ge 0), \qquad
        y \leftarrow y\,\lVert x\rVert / \max(\lVert y\rVert, 10^{-6})\
        \text{(norm\_preserving)}

    ``hidden[i] = y - residual[i]`` for tokens with a slot (``residual`` is never written);
    ``proj_out[i] = p`` for every token; ``running`` accumulates ``p`` per slot. A token with
    slot ``-1`` is left untouched and not counted. Only the first ``N = hidden.shape[0]``
    entries of ``token_slot`` and ``proj_out`` are used, so buffers sized for the largest batch
    are allocated once and stay valid under CUDA-graph capture. The batched op :func:`steer_`
    is the case ``token_slot = b`` where ``mask[b, t]`` else ``-1``.

    Parameters
    ----------
    hidden : Tensor [N, D], float32/bfloat16/float16
        Modified in place.
    vectors : Tensor [K, D]
    slot_weights : Tensor [S, K], float32
        One mix per slot (a request, or a request's prompt/generated part).
    token_slot : Tensor [N_max], int32
        Each token's slot in ``[-1, S)``.
    residual : Tensor [N, D], optional
        Same dtype as ``hidden``; the stream is ``hidden + residual``.
    norm_preserving : bool
    proj_out : Tensor [N_max, K], float32, optional
    running : RunningProjections(S, K), optional
    backend : {"reference", "cpu", "triton", "cuda"}, optional
        Force a backend; default ``$EMOKERN_BACKEND`` or the best one for ``hidden.device``
        (choosing loads the compiled kernels, or registers Triton as the CUDA kernel, so that
        ``torch.ops.emokern.steer_packed_`` inside a compiled graph runs the same kernel).

    Notes
    -----
    On CUDA, Triton compiles one variant per shape class: run each token count once before
    capturing a CUDA graph.

    Raises
    ------
    TypeError, ValueError
        Naming the bad argument, before anything is modified.
    """
    capturing = isinstance(hidden, torch.Tensor) and hidden.is_cuda \
        and torch.cuda.is_current_stream_capturing()
    validate_steer_packed_args(hidden, residual, vectors, slot_weights, token_slot, proj_out,
                               running, check_values=not capturing
                               and not torch.compiler.is_compiling())
    chosen = resolve_backend(backend, hidden.device, "steer_packed_")
    run = running.tensors() if running is not None else (None, None, None)
    if vectors.dtype != torch.float32 or not vectors.is_contiguous():
        vectors = vectors.float().contiguous()
    runner_for(chosen, "steer_packed_")(hidden, residual, vectors, slot_weights.contiguous(),
                                        token_slot.contiguous(), bool(norm_preserving),
                                        proj_out, *run)


# ------------------------------------------------------------------------ scale_neurons_
# Neuron ablation: scale a set of MLP intermediate neurons in place (emokern.steering.ablate
# installs it on a model). Same conventions as steer_: one schema, the reference as the
# composite kernel, the C++ CPU kernel (csrc/cpu/ablate_cpu.cpp) and Triton
# (emokern/ops/triton_ablate.py) attached per device.

torch.library.define("emokern::scale_neurons_",
                     "(Tensor(a!) act, Tensor neuron_idx, float scale) -> ()")
torch.library.impl("emokern::scale_neurons_", "CompositeExplicitAutograd")(ref_scale_neurons_)


@torch.library.register_fake("emokern::scale_neurons_")
def _scale_neurons_fake(act, neuron_idx, scale) -> None:
    return None


_call_scale_neurons = torch.ops.emokern.scale_neurons_.default


def _scale_fail(exc: type[Exception], message: str):
    _fail(exc, message, op="scale_neurons_")


def validate_scale_neurons_args(act, neuron_idx, scale, check_values: bool) -> None:
    """Check every argument of :func:`scale_neurons_`; one clear error naming the first bad one.

    Metadata checks never sync with the device. ``check_values`` adds the data checks (every
    index in ``[0, F)``, strictly increasing, a finite scale), which read ``neuron_idx``: skipped
    under ``torch.compile`` and CUDA-graph capture, where the caller checked once.
    """
    fail = _scale_fail
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
        import math

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
            _scale_fail(ValueError, f"act's leading dimensions must collapse into rows of one "
                                    f"stride, got shape {list(act.shape)} and strides "
                                    f"{list(act.stride())}; pass act.contiguous() and copy back")
        rows *= size
    if rows > 1 and act.shape[-1] and stride < act.shape[-1]:
        _scale_fail(ValueError, f"act's rows overlap in memory (strides {list(act.stride())}); an "
                                f"in-place op needs distinct rows")
    return rows, stride


def _call_triton_scale(act, neuron_idx, scale) -> None:
    from emokern.ops.triton_ablate import triton_scale_neurons_  # Triton is an optional extra

    triton_scale_neurons_(act, neuron_idx, scale)


_RUNNERS["scale_neurons_"] = (ref_scale_neurons_, _call_triton_scale, _call_scale_neurons)


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

"""The op ``emokern::steer_packed_`` (steering packed tokens, as serving engines pass them): its
schema, fake kernel, argument checks and public wrapper :func:`steer_packed_`. Reference:
:func:`emokern.ops.reference.ref_steer_packed_`; kernels: ``csrc/cpu``, ``csrc/cuda``
(registered by :mod:`emokern.ops.build`) and :mod:`emokern.ops.triton_steer`; backend choice:
:mod:`emokern.ops.dispatch`. The checks mirror ``csrc/steer.h`` message for message.
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
from emokern.ops.dispatch import resolve_backend, runner_for
from emokern.ops.reference import ref_steer_packed_, unit_gram
from emokern.ops.running import RunningProjections

OP = "steer_packed_"
#: The arguments the op writes (alias-annotated ``Tensor(a!)`` in the schema).
MUTATES = ("hidden", "proj_out", "run_sum", "run_count", "run_last")
#: Derived once from the reference's signature:
#: ``(Tensor(a!) hidden, Tensor? residual, Tensor vectors, Tensor slot_weights,
#: Tensor token_slot, bool norm_preserving, Tensor(b!)? proj_out, Tensor(c!)? run_sum,
#: Tensor(d!)? run_count, Tensor(e!)? run_last, Tensor? bounds=None, Tensor? gram=None) -> ()``
SCHEMA = dispatch.op_schema(ref_steer_packed_, MUTATES)

torch.library.define(f"emokern::{OP}", SCHEMA)
torch.library.impl(f"emokern::{OP}", "CompositeExplicitAutograd")(ref_steer_packed_)


@torch.library.register_fake(f"emokern::{OP}")
def _fake(*args) -> None:
    return None  # in place, returns nothing: tracing needs no shapes


dispatch.register_op(OP, backends=dispatch.BACKENDS, reference=ref_steer_packed_,
                     dispatcher=torch.ops.emokern.steer_packed_.default,
                     kernels={"triton": "emokern.ops.triton_steer"})

_fail = failing(f"emokern.{OP}")


def validate_steer_packed_args(hidden, residual, vectors, slot_weights, token_slot, proj_out,
                               running, check_values: bool, bounds=None, gram=None) -> None:
    """Check every argument of :func:`steer_packed_`; one clear error naming the first bad one.

    Metadata checks never sync with the device. ``check_values`` adds the data checks (finite
    weights, nonzero finite vector norms, every slot index in ``[-1, S)``), which read tensors:
    skipped under ``torch.compile`` and CUDA-graph capture, where the caller checked once.
    """
    fail = _fail
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
        check_tensor(fail, name, value, shape, dtype, device)

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
        check_running(fail, running, n_slots, n_vec, device)
    check_bounds(fail, bounds, gram, n_slots, n_vec, device, check_values)
    if check_values:
        if not bool(torch.isfinite(slot_weights).all()):
            fail(ValueError, "slot_weights must be finite (found NaN or inf)")
        check_vector_norms(fail, vectors)
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
    bounds: torch.Tensor | None = None,
    gram: torch.Tensor | None = None,
) -> None:
    r""":func:`~emokern.ops.steer.steer_` for packed tokens: ``hidden [N, D]`` holds the
    tokens of many sequences (a serving engine's flattened batch), each naming its sequence's
    slot.

    For every token :math:`i < N` with slot :math:`s = \mathrm{token\_slot}[i]` and
    :math:`x = h_i + r_i` (``residual`` :math:`r`, or 0), in float32:

    .. math::
        p_k = \langle x, v_k\rangle / \lVert v_k\rVert, \qquad
        y = x + \textstyle\sum_k W_{s,k}\, v_k \ (s \ge 0), \qquad
        y \leftarrow y\,\lVert x\rVert / \max(\lVert y\rVert, 10^{-6})\
        \text{(norm\_preserving)}

    With ``bounds`` (per slot :math:`s`, lower :math:`lo = B_{s,0}` and upper
    :math:`hi = B_{s,1}`, raw projection units), the levels and bounds follow: with
    :math:`u_k = v_k/\lVert v_k\rVert`, :math:`G` = ``gram`` and :math:`c` the
    norm-preserving scale (1 without it), the projections after the pushes are
    :math:`p'_k = c\,(p_k + \sum_j W_{s,j}\lVert v_j\rVert G_{jk})`, the active set is
    :math:`A = \{k : p'_k \notin [lo_k, hi_k]\}` and

    .. math::
        y \leftarrow y + \textstyle\sum_{k\in A} a_k u_k, \qquad
        G_{AA}\, a_A = \mathrm{clip}(p'_A, lo_A, hi_A) - p'_A,

    so every active projection lands on its bound (up to rounding; a direction dependent on
    earlier active ones is dropped: :func:`~emokern.ops.reference.level_coefficients`).

    ``hidden[i] = y - residual[i]`` for tokens with a slot (``residual`` is never written);
    ``proj_out[i] = p`` for every token; ``running`` accumulates ``p`` per slot. A token with
    slot ``-1`` is left untouched and not counted. Only the first ``N = hidden.shape[0]``
    entries of ``token_slot`` and ``proj_out`` are used, so buffers sized for the largest batch
    are allocated once and stay valid under CUDA-graph capture. The batched op
    :func:`~emokern.ops.steer.steer_` is the case ``token_slot = b`` where ``mask[b, t]`` else
    ``-1``.

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
    bounds : Tensor [S, 2, K], float32, optional
        Per slot, lower and upper bounds of the projections after the edit (``-inf``/``+inf``
        open; equal bounds a level).
    gram : Tensor [K, K], float32, optional
        :func:`~emokern.ops.reference.unit_gram` of ``vectors``; computed when omitted (pass it
        under CUDA-graph capture: no allocation).
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
    if bounds is not None and gram is None and isinstance(vectors, torch.Tensor):
        gram = unit_gram(vectors)
    validate_steer_packed_args(hidden, residual, vectors, slot_weights, token_slot, proj_out,
                               running, not capturing and not torch.compiler.is_compiling(),
                               bounds, gram)
    chosen = resolve_backend(backend, hidden.device, "steer_packed_")
    run = running.tensors() if running is not None else (None, None, None)
    if vectors.dtype != torch.float32 or not vectors.is_contiguous():
        vectors = vectors.float().contiguous()
    runner_for(chosen, "steer_packed_")(hidden, residual, vectors, slot_weights.contiguous(),
                                        token_slot.contiguous(), bool(norm_preserving),
                                        proj_out, *run, bounds, gram)


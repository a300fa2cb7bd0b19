"""Backend dispatch of every emokern op: which backends exist (:data:`BACKENDS`), which can run
here (:func:`available_backends`), which one a call takes (:func:`resolve_backend`) and the
callable that runs it (:func:`runner_for`).

Each op module (:mod:`emokern.ops.steer`, :mod:`~emokern.ops.steer_packed`,
:mod:`~emokern.ops.scale_neurons`) declares its op here once (:func:`register_op`: its
backends, its reference, its dispatcher entry and the modules that hold its kernels); each
Python kernel module (:mod:`emokern.ops.triton_steer`, :mod:`~emokern.ops.triton_ablate`)
registers its launchers (:func:`register_runner`) when imported, which happens the first time a
call needs it, so Triton stays an optional extra. The compiled kernels register themselves with
the dispatcher (``torch.library`` in ``csrc/``) when :mod:`emokern.ops.build` loads them; their
runner is the op's dispatcher entry.

Imports flow one way: op and kernel modules import this module, this module imports only
:mod:`emokern.ops.build` (kernel modules are named by string and imported on demand), so
``emokern.ops`` has no import circle (checked by ``tests/ops/test_dispatch.py``).
"""

from __future__ import annotations

import importlib
import os
import re
from collections.abc import Callable

import torch

from emokern.errors import fail
from emokern.ops import build

__all__ = ["BACKENDS", "available_backends", "environ_get", "has_kernel", "op_schema",
           "register_op", "register_runner", "resolve_backend", "runner_for"]

BACKENDS = ("reference", "cpu", "triton", "cuda")


def _fail(exc: type[Exception], message: str, op: str):
    fail(exc, message, f"emokern.{op}")


# ------------------------------------------------------------------------------ registration

#: Per op: its backends, its runners by backend, the modules holding its Python kernels by
#: backend (imported on first use), and per backend a hook run when the backend is chosen for
#: CUDA tensors.
_ops: dict[str, dict] = {}


def op_schema(reference: Callable, mutates_args: tuple[str, ...]) -> str:
    """The ``torch.library`` schema of an op, derived from its reference's Python signature.

    ``torch.library.infer_schema`` gives the types, names and alias annotations; the alias sets
    are then named ``a, b, c, ...`` in order and the defaults dropped (every argument of an
    emokern op is passed positionally: the public wrappers hold the defaults), so
    ``ref(hidden: Tensor, ..., proj_out: Tensor | None = None)`` with ``hidden`` and
    ``proj_out`` mutated gives ``(Tensor(a!) hidden, ..., Tensor(b!)? proj_out) -> ()``.
    """
    inferred = torch.library.infer_schema(reference, mutates_args=mutates_args)
    names = iter("abcdefghijklmnopqrstuvwxyz")
    named = re.sub(r"\((a\d+)!\)", lambda m: f"({next(names)}!)", inferred)
    head, sep, tail = named.rpartition(") -> ")
    args = head.split(", ")
    keep = len(args)  # the trailing arguments defaulting to None keep their default
    while keep > 0 and args[keep - 1].endswith("=None"):
        keep -= 1
    args = [re.sub(r"=.*$", "", a) if i < keep else a for i, a in enumerate(args)]
    return ", ".join(args) + sep + tail


def register_op(op: str, *, backends: tuple[str, ...], reference: Callable[..., None],
                dispatcher: Callable[..., None], kernels: dict[str, str]) -> None:
    """Declare the op ``emokern::<op>`` (called once, by its op module).

    Parameters
    ----------
    op : str
        The op's name in the ``emokern`` namespace, e.g. ``"steer_"``.
    backends : tuple of str
        The backends it has, a subset of :data:`BACKENDS`.
    reference : callable
        The plain-PyTorch runner (``ref_<op>`` of :mod:`emokern.ops.reference`).
    dispatcher : callable
        ``torch.ops.emokern.<op>.default``: the runner of the compiled backends (``"cpu"``,
        ``"cuda"``), whose kernels the dispatcher picks by device.
    kernels : dict
        Backend name to the module that registers that backend's runner when imported, e.g.
        ``{"triton": "emokern.ops.triton_steer"}``.
    """
    _ops[op] = {"backends": tuple(backends), "kernels": dict(kernels), "on_cuda": {},
                "runners": {"reference": reference, "cpu": dispatcher, "cuda": dispatcher}}


def register_runner(op: str, backend: str, runner: Callable[..., None], *,
                    on_cuda: Callable[[], object] | None = None) -> None:
    """Register ``runner`` (positional arguments in the schema's order) as ``backend`` of
    ``op``: what a kernel module calls when imported.

    ``on_cuda`` is called whenever ``backend`` is chosen for CUDA tensors: Triton registers
    itself there as the op's CUDA kernel, so ``torch.ops.emokern.<op>`` (and ``torch.compile``
    graphs) on CUDA run it too.
    """
    entry = _ops[op]
    entry["runners"][backend] = runner
    if on_cuda is not None:
        entry["on_cuda"][backend] = on_cuda


def _entry(op: str, backend: str) -> dict:
    """The op's entry, with ``backend``'s kernel module imported if it has one."""
    entry = _ops[op]
    if backend not in entry["runners"] and backend in entry["kernels"]:
        importlib.import_module(entry["kernels"][backend])  # registers (optional extra)
    return entry


# ------------------------------------------------------------------------------ environment

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


# ------------------------------------------------------------------------------ resolution

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
        For a backend the op does not have, or one that cannot run on ``device`` (``"cpu"``
        needs CPU tensors, ``"cuda"`` CUDA tensors, ``"triton"`` CUDA tensors or CPU tensors
        under ``TRITON_INTERPRET=1``): the dispatcher would otherwise silently run another
        kernel.
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


def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether the compiled kernel of ``op`` is loaded for ``"CPU"``/``"CUDA"`` (an
    ahead-of-time build made from older sources may lack an op: the reference then runs).
    Decided once (a plain dict lookup afterwards in :data:`kernels_loaded`, which
    ``torch.compile`` traces through)."""
    key = (op, dispatch_key)
    if key not in kernels_loaded:
        loaded = build.load_cpu() if dispatch_key == "CPU" else build.load_cuda()
        kernels_loaded[key] = loaded and torch._C._dispatch_has_kernel_for_dispatch_key(
            f"emokern::{op}", dispatch_key)
    return kernels_loaded[key]


#: ``(op, dispatch key) -> bool`` once :func:`has_kernel` decided it (hot paths read it first).
kernels_loaded: dict[tuple[str, str], bool] = {}


def _resolve(op: str, backend: str | None, device: torch.device) -> str:
    allowed = _ops[op]["backends"]
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
        return "cpu" if has_kernel(op, "CPU") else "reference"
    if device.type == "cuda":
        if "cuda" in allowed and has_kernel(op, "CUDA"):
            return "cuda"
        if build.triton_usable():
            hook = _entry(op, "triton")["on_cuda"].get("triton")
            if hook is not None:
                hook()  # so torch.ops / torch.compile on CUDA run Triton too
            return "triton"
    return "reference"


def runner_for(backend: str, op: str = "steer_") -> Callable[..., None]:
    """The callable that runs ``emokern::<op>`` on ``backend`` (positional arguments in the
    schema's order), without the public wrapper's per-call validation: for callers that
    validated their arguments once (the steerer's hot path, a serving engine's layers, the
    ablator's hooks). Loads (or compiles) the kernel."""
    runners = _entry(op, backend)["runners"]
    if backend not in ("reference", "triton") and not has_kernel(op, backend.upper()):
        _fail(RuntimeError, f"the {backend!r} backend is not available here (see `emokern info`)",
              op)
    return runners[backend]
